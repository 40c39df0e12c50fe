"""ProtoBase's POSIX shared memory layer: segment names, mapped segments, the control block, the commit ring.

Modules, bottom-up: `names` (naming scheme and sweep), `segment` (one mapped
segment; only the coordinator creates and unlinks), `control` (the control
segment: root seqlock, reader table, shared counters), `ring` (the commit
ring from the coordinator to the persistence process). Nothing here uses
``multiprocessing.shared_memory``, whose resource tracker unlinks segments
that other processes still use.

Every process imports this layer; each module says which process may call
what. Only the coordinator creates and unlinks segments, attaching never does.
"""

from protobase.shm.control import (
    DEFAULT_READER_SLOTS,
    HEADER_SIZE,
    NO_SNAPSHOT,
    SLOT_SIZE,
    ControlBlock,
    ReaderSlot,
    process_is_alive,
    process_start_time,
)
from protobase.shm.names import (
    PREFIX,
    control_name,
    data_name,
    instance_entries,
    is_instance_id,
    new_instance_id,
    segment_name,
    sweep,
)
from protobase.shm.segment import Segment

__all__ = [
    "DEFAULT_READER_SLOTS",
    "HEADER_SIZE",
    "NO_SNAPSHOT",
    "PREFIX",
    "SLOT_SIZE",
    "ControlBlock",
    "ReaderSlot",
    "Segment",
    "control_name",
    "data_name",
    "instance_entries",
    "is_instance_id",
    "new_instance_id",
    "process_is_alive",
    "process_start_time",
    "segment_name",
    "sweep",
]
