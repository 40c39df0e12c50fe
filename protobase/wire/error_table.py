"""The error table: how an error crosses the socket and arrives as its own class.

Both sides use it. The coordinator answers a request it refuses with
`error_reply(error)` or `error_fields(ErrorClass, message)`:
`["error", class_name, message]`. The client turns such a reply back into an
exception with `error_from_reply`.

Invariant: the table holds exactly the `ProtoBaseError` subclasses defined in
protobase/errors.py (the one hierarchy), so every error the coordinator can
send arrives as itself, and a peer can never make the client build any other
class. A name the table does not know arrives as a plain `ProtoBaseError`
with the message. An error class defined elsewhere (a client-side subclass) is
sent under the name of its nearest class in the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from protobase import errors
from protobase.errors import ProtoBaseError

__all__ = ["ERROR_CLASSES", "error_fields", "error_reply", "error_from_reply"]


def _classes_of_the_hierarchy() -> dict[str, type[ProtoBaseError]]:
    found: dict[str, type[ProtoBaseError]] = {}
    pending: list[type[ProtoBaseError]] = [ProtoBaseError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


#: {class name -> class}: every error class of protobase/errors.py.
ERROR_CLASSES: Mapping[str, type[ProtoBaseError]] = MappingProxyType(_classes_of_the_hierarchy())


def error_fields(error_class: type[ProtoBaseError], message: str) -> list[str]:
    """The fields of an error reply that raises `error_class(message)` in the client."""
    for cls in error_class.__mro__:
        if ERROR_CLASSES.get(cls.__name__) is cls:
            return ["error", cls.__name__, message]
    raise AssertionError(f"{error_class!r} is not a ProtoBaseError")


def error_reply(error: ProtoBaseError) -> list[str]:
    """The fields of an error reply that raises `error` again in the client."""
    return error_fields(type(error), str(error))


def error_from_reply(reply: list[object]) -> ProtoBaseError:
    """The exception an `["error", class_name, message]` reply stands for.

    Only classes of the table are built. A class whose constructor takes other
    arguments than a message (ConflictError, which has its own reply status)
    arrives as a plain ProtoBaseError with the message.
    """
    message = str(reply[2]) if len(reply) > 2 else "the coordinator sent an error without a message"
    error_class = ERROR_CLASSES.get(str(reply[1]), ProtoBaseError)
    try:
        return error_class(message)
    except TypeError:
        return ProtoBaseError(message)
