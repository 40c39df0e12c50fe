"""ProtoBase: root["users"] with indexes on city and score, root["accounts"] for W4."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from ..durability import INSTANCES, close_and_wait
from ..queries import load_protobase, pb_query
from .base import Client, Store, dir_bytes

GRACE = 0.2
MODES = {"durable": "sync", "relaxed": "async"}


class ProtoBaseClient(Client):
    def __init__(self, path: str, mode: str, **options: Any) -> None:
        import protobase

        self.conflict = protobase.ConflictError
        self.db = protobase.open(path, durability=MODES.get(mode, "async"), shutdown_grace=GRACE, **options)
        self.snap = self.db.snapshot()  # readers hold one snapshot: warm reads
        self.users = self.snap.root["users"]

    def get(self, key: str) -> Any:
        return self.users[key]

    def put(self, key: str, value: dict) -> int:
        with self.db.transaction() as tx:
            tx.root["users"][key] = value
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        retries = 0
        while True:
            try:
                with self.db.transaction() as tx:
                    accounts = tx.root["accounts"]
                    accounts[a] -= amount
                    accounts[b] += amount
                return retries
            except self.conflict:
                retries += 1

    def query(self, city: str, score: int) -> list:
        return pb_query(self.users, city, score)

    def total(self, accounts: int) -> int:
        with self.db.snapshot() as snap:
            return sum(snap.root["accounts"].values())

    def close(self) -> None:
        self.snap.close()
        INSTANCES.add(self.db.instance_id)
        self.db.close()


class ProtoBase(Store):
    name = "ProtoBase"
    directory = "protobase"
    method = 'snap.root["users"][key] on one snapshot (FrozenDict)'
    query_method = "users.where((F.city == X) & (F.score > Y)), indexes city, score and (city, score)"

    OPTIONS: ClassVar[dict[str, Any]] = {}  # of protobase.open, for the coordinator and every client

    def start(self, tmp: str) -> None:
        self.path = os.path.join(tmp, self.directory)
        self.db = None

    def load(self, records: dict[str, dict]) -> None:
        self.db = load_protobase(self.path, records, **self.OPTIONS)  # async loading, then create_index city, score
        INSTANCES.add(self.db.instance_id)
        with self.db.transaction() as tx:  # and the composite index the W5 query can read exactly
            tx.root["users"].create_index("city", "score")

    def setup_accounts(self, accounts: int, balance: int) -> None:
        with self.db.transaction() as tx:
            tx.root["accounts"] = {f"acct{i}": balance for i in range(accounts)}

    def spec(self) -> dict:
        return {"path": self.path, "options": self.OPTIONS}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return ProtoBaseClient(spec["path"], mode, **spec["options"])

    def info(self) -> dict:
        self.db.compact()
        stats = self.db.stats()
        return {"shared": stats.shared_bytes, "server_pid": stats.coordinator_pid, "disk": dir_bytes(self.path)}

    def stop(self) -> None:
        if self.db is not None:
            close_and_wait(self.db)
            self.db = None


class ProtoBaseWithoutBusyPoll(ProtoBase):
    """ProtoBase with busy polling off in every process (`busy_poll=0`): each message wakes its receiver."""

    name = "ProtoBase, busy_poll=0"
    directory = "protobase-busy-poll-0"
    OPTIONS: ClassVar[dict[str, Any]] = {"busy_poll": 0.0}
