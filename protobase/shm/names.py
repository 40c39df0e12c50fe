"""Names of ProtoBase's POSIX shared memory segments, and the sweep that removes them.

Owns: the naming scheme. Every segment of one database instance is named

    /protobase.<iid>.<suffix>        e.g. /protobase.<iid>.ctl, /protobase.<iid>.d17

where ``<iid>`` is a fresh instance id of 128 random bits (32 lowercase hex
digits) drawn by the coordinator when it starts. The id is the only secret
protecting the segments beyond their 0600 mode: another user cannot guess a
name, so cannot pre-create a segment to hijack it.

Invariant: every name built here starts with ``/protobase.<iid>.``, so
`sweep(iid)` finds every segment of an instance, whatever its kind, and
nothing of any other instance.

Callers: any process may build names and list entries. `sweep` unlinks, so
only a coordinator calls it: the next coordinator after a crash, for the dead
instance's id, or a test fixture for its own instance. Linux only: listing
relies on POSIX shared memory living in ``/dev/shm``.
"""

from __future__ import annotations

import os
import re
import secrets

import posix_ipc

__all__ = [
    "PREFIX",
    "SHM_DIR",
    "control_name",
    "data_name",
    "instance_entries",
    "is_instance_id",
    "new_instance_id",
    "segment_name",
    "sweep",
]

#: Every ProtoBase segment name starts with this (after the leading slash).
PREFIX = "protobase."

#: Where Linux exposes POSIX shared memory objects as files.
SHM_DIR = "/dev/shm"

_INSTANCE_ID = re.compile(r"[0-9a-f]{32}")
_SUFFIX = re.compile(r"[a-z0-9]+")
_ENTRY = re.compile(re.escape(PREFIX) + r"([0-9a-f]{32})\.[a-z0-9]+")


def new_instance_id() -> str:
    """Return a fresh, unguessable instance id: 128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def is_instance_id(value: object) -> bool:
    """Return True if *value* is a well-formed instance id (exactly 32 lowercase hex digits)."""
    return isinstance(value, str) and _INSTANCE_ID.fullmatch(value) is not None


def segment_name(iid: str, suffix: str) -> str:
    """Return the segment name ``/protobase.<iid>.<suffix>``.

    The general form behind `control_name` and `data_name`; other segment
    kinds (a commit ring, say) use it so that `sweep` still finds them.
    *suffix* is lowercase letters and digits. Raises ValueError on a
    malformed *iid* or *suffix*: a name outside the scheme would escape sweep.
    """
    _check_instance_id(iid)
    if _SUFFIX.fullmatch(suffix) is None:
        raise ValueError(f"segment suffix must be lowercase letters and digits, got {suffix!r}")
    return f"/{PREFIX}{iid}.{suffix}"


def control_name(iid: str) -> str:
    """Return the name of the control segment of instance *iid*: ``/protobase.<iid>.ctl``."""
    return segment_name(iid, "ctl")


def data_name(iid: str, index: int) -> str:
    """Return the name of data segment number *index* of instance *iid*: ``/protobase.<iid>.d<index>``."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"data segment index must be a non-negative int, got {index!r}")
    return segment_name(iid, f"d{index}")


def instance_entries(iid: str | None = None) -> list[str]:
    """List the ProtoBase segments present in /dev/shm, sorted, as names with the leading slash.

    With *iid*, only that instance's segments; with None, every instance's.
    Tests use it to check that nothing is left behind. Entries that merely
    start with ``protobase.`` but do not follow the scheme are not listed.
    """
    if iid is not None:
        _check_instance_id(iid)
    found = []
    for entry in os.listdir(SHM_DIR):
        match = _ENTRY.fullmatch(entry)
        if match is not None and (iid is None or match.group(1) == iid):
            found.append("/" + entry)
    return sorted(found)


def sweep(iid: str) -> list[str]:
    """Unlink every segment of instance *iid*; return the names removed, sorted.

    Coordinator only (and test fixtures): used after a crash to remove the
    dead instance's orphans. Never call it for a live instance you do not
    own: processes attached to it keep their mappings, but nobody can attach
    to the removed segments any more. A segment that vanishes between the
    listing and the unlink (someone else swept it) is skipped, not an error.
    """
    removed = []
    for name in instance_entries(iid):
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            continue
        removed.append(name)
    return removed


def _check_instance_id(iid: object) -> None:
    # A malformed id is a caller bug; failing here keeps a bad name from being
    # created (and then missed by sweep) or a sweep from matching too much.
    if not is_instance_id(iid):
        raise ValueError(f"instance id must be 32 lowercase hex digits, got {iid!r}")
