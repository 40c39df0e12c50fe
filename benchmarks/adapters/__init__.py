"""One small adapter per store the suite compares (see base.py for the contract).

STORES lists them in report order as (module, class); the runner imports each
lazily so a store whose package is missing is reported as skipped, not fatal.
"""

from __future__ import annotations

import importlib

from .base import Client, Store

__all__ = ["STORES", "Client", "Store", "load_store"]

STORES = [
    ("protobase_store", "ProtoBase"),
    ("dict_store", "PlainDict"),
    ("msgpack_shm", "MsgpackShm"),
    ("lmdb_store", "Lmdb"),
    ("sqlite_store", "Sqlite"),
    ("redis_store", "Redis"),
    ("zodb_store", "ZodbFileStorage"),
    ("zodb_store", "Zeo"),
    ("manager_dict", "ManagerDict"),
    ("ultradict_store", "UltraDictStore"),
    ("diskcache_store", "Diskcache"),
]


def load_store(module: str, name: str) -> type[Store]:
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
