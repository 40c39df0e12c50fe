"""ProtoBase: a transactional object database shared by the processes of one host.

    import protobase

    with protobase.open("data") as db:
        with db.transaction() as tx:
            tx.root["users"] = {"alice": {"city": "Paris", "score": 7}}
        with db.snapshot() as snap:
            print(snap.root["users"]["alice"]["score"])

See README.md and docs/ for the tour.
"""

from .codec import register_dataclass
from .database import Attempt, Database, open
from .errors import (
    ConflictError,
    CoordinatorError,
    CorruptionError,
    DatabaseClosedError,
    DataDirectoryError,
    EncodingError,
    ProtoBaseError,
    ReadOnlyError,
)
from .frozen import FrozenDict, FrozenList, FrozenSet, json_default, thaw
from .query import F, Query
from .snapshot import Snapshot
from .stats import DatabaseStats, ReaderStats
from .transaction import Transaction
from .views import TreeDict, TreeList, TreeSet

__all__ = [
    "open", "Database", "Snapshot", "Transaction", "Attempt", "register_dataclass", "thaw", "json_default",
    "ProtoBaseError", "ConflictError", "ReadOnlyError", "EncodingError", "DatabaseClosedError",
    "CorruptionError", "CoordinatorError", "DataDirectoryError",
    "FrozenDict", "FrozenList", "FrozenSet", "TreeDict", "TreeList", "TreeSet",
    "DatabaseStats", "ReaderStats", "F", "Query",

]

__version__ = "0.1.0"
