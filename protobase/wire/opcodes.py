"""The operation codes of a commit request: what a client asks the coordinator to change.

Owned by the wire layer; the client encodes them (client/transaction), the
coordinator decodes and applies them (coordinator/writer). A commit carries a
list of operations, each `[code, path, argument]`; `OP_LIST` carries a list of
list operations, each `[code, index, value]`. Codes are never reused: a new
operation gets a new number.
"""

from __future__ import annotations

__all__ = [
    "OP_SET",
    "OP_DELETE",
    "OP_LIST",
    "OP_SET_ADD",
    "OP_SET_DISCARD",
    "OP_CREATE_INDEX",
    "OP_DROP_INDEX",
    "OP_INCR",
    "INCR_LIMIT",
    "LIST_APPEND",
    "LIST_SET",
    "LIST_INSERT",
    "LIST_DELETE",
]

OP_SET = 1  # [OP_SET, path, value]: bind the last key of path to value
OP_DELETE = 2  # [OP_DELETE, path, None]: remove the last key of path
OP_LIST = 3  # [OP_LIST, path, [list op, ...]]: edit the list at path in place
OP_SET_ADD = 4  # [OP_SET_ADD, path, [element, ...]]
OP_SET_DISCARD = 5  # [OP_SET_DISCARD, path, [element, ...]]
OP_CREATE_INDEX = 6  # [OP_CREATE_INDEX, path, index name]
OP_DROP_INDEX = 7  # [OP_DROP_INDEX, path, index name]
# [OP_INCR, path, n]: add n (an int or a finite float) to the number at path, a missing key counting
# as 0. Applied to the latest value at commit and never validated against the snapshot, so
# concurrent increments of one key never conflict (coordinator/conflicts.py, `validated_paths`).
OP_INCR = 8

INCR_LIMIT = 2**63  # |n| of an integer OP_INCR is below this: one increment is a 64-bit amount

LIST_APPEND = 1  # [LIST_APPEND, None, value]
LIST_SET = 2  # [LIST_SET, index, value]
LIST_INSERT = 3  # [LIST_INSERT, index, value]
LIST_DELETE = 4  # [LIST_DELETE, index, None]
