"""ProtoBase: a transactional object database shared by the processes of one host.

    import protobase

    with protobase.open("data") as db:
        with db.transaction() as tx:
            tx.root["users"] = {"alice": {"city": "Paris", "score": 7}}
        with db.snapshot() as snap:
            print(snap.root["users"]["alice"]["score"])

See README.md and docs/ for the tour.
"""

from protobase.client.snapshot import Snapshot
from protobase.client.stats import DatabaseStats, ReaderStats
from protobase.client.transaction import Isolation, Transaction
from protobase.core.codec import register_dataclass
from protobase.core.frozen import FrozenDict, FrozenList, FrozenSet, json_default, thaw
from protobase.core.views import TreeDict, TreeList, TreeSet
from protobase.database import Attempt, Database, open
from protobase.errors import (
    ConflictError,
    CoordinatorError,
    CoordinatorRestartedError,
    CorruptionError,
    DatabaseClosedError,
    DataDirectoryError,
    EncodingError,
    OutcomeUnknownError,
    PathError,
    ProtoBaseError,
    ProtocolError,
    ReadOnlyError,
    WalError,
    WalSyncError,
    WalWriteError,
    WorkerDiedError,
)
from protobase.query import F, Query
from protobase.wire.verbs import Durability

__all__ = [
    "open",
    "Database",
    "Snapshot",
    "Transaction",
    "Attempt",
    "register_dataclass",
    "thaw",
    "json_default",
    "ProtoBaseError",
    "ConflictError",
    "ReadOnlyError",
    "EncodingError",
    "DatabaseClosedError",
    "CorruptionError",
    "CoordinatorError",
    "CoordinatorRestartedError",
    "OutcomeUnknownError",
    "ProtocolError",
    "DataDirectoryError",
    "PathError",
    "WorkerDiedError",
    "WalError",
    "WalWriteError",
    "WalSyncError",
    "FrozenDict",
    "FrozenList",
    "FrozenSet",
    "TreeDict",
    "TreeList",
    "TreeSet",
    "DatabaseStats",
    "ReaderStats",
    "F",
    "Query",
    "Isolation",
    "Durability",
]

__version__ = "0.1.0"
