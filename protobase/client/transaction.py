"""Transactions: a private, mutable view of one snapshot that records its writes and commits them.

Owns a transaction's life: the snapshot it pins (through its session,
client/session.py), its state from active to committed, aborted or unknown,
and its commit: the write set (writeset.py) sent to the coordinator, and the
answer recorded so that an interruption at any point leaves a state
`outcome()` can finish. Runs in client processes.

`tx.root` is a `TxDict` (txvalues.py); reading a container through it hands
out a wrapper that records every change: dicts at key-addressable paths
record key-level writes (so two transactions writing different keys of one
record do not conflict); small lists and sets, and anything inside them, and
registered dataclasses are tracked copies recorded as a whole new value for
their path (tracked.py); large (tree) lists and sets record element
operations, so the coordinator writes O(log n) atoms for them too.

Values are encoded at commit, not at assignment: what a write stores is the
state of the object when the transaction commits, as with a plain dict.
Assignments are validated at once, so a bad value fails on the line that
stored it.

Invariant: the wrappers never change the snapshot's frozen objects, which are
shared with every other reader of this process; the pin is released exactly
once, when the transaction ends (or its commit went out).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal, get_args

from protobase.client.txvalues import TxDict
from protobase.client.writeset import WriteSet, validate
from protobase.errors import DatabaseClosedError, OutcomeUnknownError, ProtoBaseError
from protobase.wire.opcodes import OP_SET
from protobase.wire.verbs import Durability

if TYPE_CHECKING:
    from protobase.client.session import CommitRequest, Session

__all__ = ["Transaction", "Isolation", "ISOLATION_LEVELS"]

#: "snapshot" validates the keys a transaction wrote; "serializable" also the keys it read.
Isolation = Literal["snapshot", "serializable"]
ISOLATION_LEVELS: tuple[Isolation, ...] = get_args(Isolation)


class Transaction:
    """One transaction: a snapshot, the writes made on top of it, and (serializable) its reads."""

    def __init__(
        self, session: Session, isolation: Isolation = "snapshot", durability: Durability | None = None
    ) -> None:
        if isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {ISOLATION_LEVELS}, got {isolation!r}")
        self._session = session
        self.isolation = isolation
        self.serializable = isolation == "serializable"
        self.durability = durability  # None: the database handle's default
        self.base_seq, root, self._epoch = session.pin()
        self._pinned_by = session.pid  # a forked child that inherits the transaction did not pin it
        self.seq: int | None = None  # sequence number of the commit, once committed
        self._request: CommitRequest | None = None  # the commit sent, until its answer is recorded
        self._refusal: BaseException | None = None  # why the commit was refused (nothing committed)
        self._pinned = True  # base_seq is pinned in the session's reader slot
        self._writes = WriteSet(self.serializable)  # its ops, reads and state, as the wrappers record them
        self.root = TxDict(self._writes, (), root)

    # -- ending -----------------------------------------------------------------

    def commit(self) -> int:
        """Send the writes to the coordinator; return the commit's sequence number.

        Raises ConflictError when another commit changed what this one wrote
        (or, serializable, read) since its snapshot: run it again. If the wait
        for the answer is interrupted (Ctrl-C), the transaction is left in
        state "unknown": the coordinator may still commit it, and `outcome()`
        tells. OutcomeUnknownError means the connection was lost before the
        answer came.
        """
        self._writes.check_active()
        try:
            self._check_own_process()
            ops = self._writes.wire_ops()
            if not ops:
                self.seq = self.base_seq
                return self.seq
            reads = [list(path) for path in self._writes.reads] if self.serializable else []
            request = self._session.prepare_commit(
                self._epoch, self.base_seq, self.serializable, self.durability, ops, reads, self._check_encodable
            )
            self._request = request
            self._writes.state = "committing"  # from here on, the coordinator may commit it
            self._session.send_commit(request)
            seq = self._await(None)
            assert seq is not None, "a wait without a timeout ends with the answer"
            return seq
        except ProtoBaseError as error:  # the session maps the socket's OSErrors to these
            if not isinstance(error, OutcomeUnknownError):
                self._refusal = _kept(error)  # refused, or never sent: nothing was committed
            raise
        finally:
            self._settle()

    def outcome(self, timeout: float | None = None) -> int | None:
        """The sequence number this transaction committed as, once the coordinator's answer is known.

        For a commit whose wait was interrupted (state "unknown"): waits up to
        `timeout` seconds (None: until it comes) for the answer the coordinator
        still sends, and returns the seq, or None if none came in time. Raises
        the ConflictError (or other error) the commit got, and
        OutcomeUnknownError if the connection it went out on is lost. For a
        committed transaction it is `seq`; for a refused one, the error it got
        is raised again; an active one, or one aborted before its commit went
        out, raises DatabaseClosedError.
        """
        if self._writes.state in ("committing", "unknown") and self._answer_may_come():
            try:
                self._await(timeout)
            except ProtoBaseError as error:
                if not isinstance(error, OutcomeUnknownError):
                    self._refusal = _kept(error)
                raise
            finally:
                self._settle()
        elif self._writes.state in ("committing", "unknown"):
            self._settle()  # an interruption came between learning the answer and recording it
        if self._writes.state == "committed":
            return self.seq
        if self._writes.state == "unknown":
            return None
        if self._refusal is not None:
            raise _kept(self._refusal)  # a copy: raised, the kept one would hold this frame, which holds us
        raise DatabaseClosedError(f"this transaction is {self._writes.state}: nothing of it was committed")

    def _await(self, timeout: float | None) -> int | None:
        assert self._request is not None, "only a commit that went out is awaited"
        self.seq = self._session.await_commit(self._request, timeout)
        return self.seq

    def _answer_may_come(self) -> bool:
        return (
            self.seq is None
            and self._refusal is None
            and self._request is not None
            and self._request.may_have_been_sent
        )

    def _settle(self) -> None:
        """Committed, aborted, or (a commit sent whose answer is still to come) unknown.

        Decided from facts recorded as they are learnt (`seq`, `_refusal`,
        what was sent), so an interruption at any point leaves a state that
        `outcome()` can finish.
        """
        if self.seq is not None:
            self._finish("committed")
        elif self._answer_may_come():
            self._finish("unknown")
        else:
            self._finish("aborted")

    def _check_own_process(self) -> None:
        # A forked child holds a copy of its parent's open transactions: were both to commit one,
        # its writes would go in twice (increments are not validated: both would count).
        if self._session.pid != self._pinned_by:
            raise ProtoBaseError(
                f"this transaction was begun in process {self._pinned_by}; process {self._session.pid}, a forked "
                f"child of it, cannot commit it (nothing was committed): begin a new transaction in the child"
            )

    def _check_encodable(self, ops: list[Any]) -> None:
        for code, path, argument in ops:
            if code == OP_SET:
                validate(argument, tuple(path))

    def abort(self) -> None:
        """Drop every write; the transaction ends."""
        if self._writes.state == "active":
            self._finish("aborted")

    def _finish(self, state: str) -> None:
        self._writes.state = state
        self._writes.release()  # no wrapper of it is left in a reference cycle
        if self._pinned:
            # Flag first: an interruption between the two leaks a pin (memory held a
            # while longer), never unpins twice (which could free another snapshot's).
            self._pinned = False
            self._session.unpin(self.base_seq, self._epoch, self._pinned_by)  # what it read no longer matters
        if state != "unknown":
            request, self._request = self._request, None
            if request is not None:
                request.release()  # last: interrupted before it, the answer just stays parked a while

    @property
    def active(self) -> bool:
        return self._writes.state == "active"

    @property
    def state(self) -> str:
        """ "active", "committed", "aborted", or "unknown": its commit was sent and the answer has not come.

        A commit whose wait was interrupted (Ctrl-C) is "unknown" until
        `outcome()` collects the coordinator's answer.
        """
        return "unknown" if self._writes.state == "committing" else self._writes.state

    def __del__(self) -> None:
        # A forgotten transaction must not pin shared memory for the life of the process.
        try:
            self.abort()
        except Exception:  # interpreter shutdown: the database may be gone already
            pass

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<Transaction {self._writes.state} base_seq={self.base_seq} writes={len(self._writes)}>"


def _kept(error: BaseException) -> BaseException:
    """A copy of `error` without its traceback, for a transaction to keep.

    The traceback holds the frames the error went through, and their locals
    the transaction: keeping the error itself made a reference cycle of every
    refused commit (a conflict), which only the cyclic GC could free. Errors
    copy with their arguments and attributes (errors.py: they pickle so).
    """
    return copy.copy(error)
