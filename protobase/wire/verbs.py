"""The requests a client sends the coordinator and the replies it gets: envelopes and verbs.

Owns the request and reply envelopes, the table of verbs with their argument
types, and the check of a request body against them. The client builds
requests in this shape (client/connection.py, database.py); the coordinator
parses them with `parse_request` (coordinator/server.py).

Every request is an array `[request_id, verb, *arguments]`, every reply
`[request_id, status, *fields]`, where `request_id` is the positive integer
the client chose (increasing per connection) and the reply repeats it. Since
a client may stop waiting for a reply (Ctrl-C) and send its next request, and
the coordinator answers a sync commit only once it is durable, replies can
arrive late and out of order; the id says which request each answers, so a
reply is never taken for another's. Messages the coordinator sends on its own
(watch notifications) carry request id 0.

    request                                                 reply
    [id, "hello", format_version]                           [id, "ok", instance_id, reader_slot]
    [id, "commit", base_seq, serializable, durability,      [id, "ok", seq, [[op_index, ptr], ...]]
         ops_bytes, reads]                                  [id, "conflict", path, base_seq, seq]
    [id, "watch", format_version, [prefix, ...]]            [id, "ok", published_seq], then
                                                            [0, "changed", seq, [path, ...]] per commit
    [id, "stats"]                                           [id, "ok", counters]  (wire/counters.py)
    [id, "compact"]                                         [id, "ok", seq]
    [id, "checkpoint"]                                      [id, "ok", seq]
    [id, "backup", destination]                             [id, "ok", seq, checkpoint_file]
    any                                                     [id, "error", class_name, message]
                                                            (wire/error_table.py)

`ops_bytes` is the encoded list of [code, path, argument] ops (codes in
wire/opcodes.py), `reads` a list of paths, `durability` "sync" or
"async".

The socket is untrusted on the coordinator's side: `parse_request` checks the
envelope and the argument types of every verb and raises MalformedRequest
(a ProtocolError carrying the request id), which the coordinator answers with
an error reply.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from protobase.core import codec
from protobase.errors import CorruptionError, ProtocolError
from protobase.wire.framing import Body

__all__ = [
    "PUSH",
    "MAX_REQUEST_ID",
    "REQUEST_ARGUMENTS",
    "Durability",
    "DURABILITY_MODES",
    "MalformedRequest",
    "parse_request",
]

PUSH = 0  # request id of the messages the coordinator sends unasked
MAX_REQUEST_ID = 2**63 - 1

#: The durability a commit request asks for: "sync" is answered once its WAL record is fsynced,
#: "async" once it is published in memory.
Durability = Literal["sync", "async"]
DURABILITY_MODES: tuple[Durability, ...] = get_args(Durability)

#: {verb -> the types of its arguments, in order}: what `parse_request` accepts.
REQUEST_ARGUMENTS: dict[str, tuple[type, ...]] = {
    "hello": (int,),
    "commit": (int, bool, str, bytes, list),
    "watch": (int, list),
    "stats": (),
    "compact": (),
    "checkpoint": (),
    "backup": (str,),
}


class MalformedRequest(ProtocolError):
    """A request that `parse_request` refused, with the id to address the error reply to."""

    def __init__(self, request_id: int, why: str) -> None:
        super().__init__(f"malformed request: {why}")
        self.request_id = request_id  # PUSH when the request had no usable id


def parse_request(body: Body) -> tuple[int, str, list[Any]]:
    """(request id, verb, arguments) of a request body; MalformedRequest if it is not a well-formed request.

    The error carries the request id (PUSH when the body has none), so that
    the coordinator can still address its error reply.
    """
    try:
        message = codec.decode(body, frozen=False, opaque_dataclasses=True)
    except CorruptionError as error:
        raise MalformedRequest(PUSH, f"the request is not a valid message ({error})") from None
    if not isinstance(message, list) or not message:
        raise MalformedRequest(PUSH, f"a request is an array [request_id, verb, ...], not {type(message).__name__}")
    request_id = message[0]
    if type(request_id) is not int or not 0 < request_id <= MAX_REQUEST_ID:
        raise MalformedRequest(PUSH, f"a request id is an integer in 1..2**63-1, not {_describe(request_id)}")
    if len(message) < 2 or type(message[1]) is not str or message[1] not in REQUEST_ARGUMENTS:
        verb = _describe(message[1]) if len(message) > 1 else "none"
        raise MalformedRequest(request_id, f"unknown request {verb}; known: {sorted(REQUEST_ARGUMENTS)}")
    verb, arguments = message[1], message[2:]
    expected = REQUEST_ARGUMENTS[verb]
    if len(arguments) != len(expected) or not all(
        type(argument) is kind for argument, kind in zip(arguments, expected)
    ):
        received = [type(argument).__name__ for argument in arguments]
        raise MalformedRequest(
            request_id,
            f"a {verb!r} request takes arguments of types {[kind.__name__ for kind in expected]}, got {received}",
        )
    return request_id, verb, arguments


def _describe(value: Any) -> str:
    # A short description of an untrusted value: a crafted one may be huge.
    if type(value) is str:
        return repr(value[:40])
    if type(value) is int and value.bit_length() <= 64:
        return repr(value)
    return f"a {type(value).__name__}"
