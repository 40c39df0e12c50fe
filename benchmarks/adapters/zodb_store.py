"""ZODB on a FileStorage (one process) and through a ZEO server (`runzeo`, loopback TCP).

root["users"]: OOBTree {key: record dict}; root["by_city_score"]: OOBTree
{(city, score, id): record} (the covering index benchmarks/queries.py uses);
root["accounts"]: OOBTree {account: balance}. Commits are durable (FileStorage
fsyncs every commit); a ConflictError is retried after an abort.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from ..queries import zodb_values
from .base import Client, Store, dir_bytes
from .redis_store import free_port

CACHE_OBJECTS = 1_000_000
START_TIMEOUT = 30.0


def _storage(spec: dict) -> Any:
    if "port" in spec:
        from ZEO.ClientStorage import ClientStorage

        return ClientStorage(("127.0.0.1", spec["port"]), wait_timeout=START_TIMEOUT)
    import ZODB.FileStorage

    return ZODB.FileStorage.FileStorage(spec["path"])


class ZodbClient(Client):
    def __init__(self, spec: dict) -> None:
        import transaction
        import ZODB
        from ZODB.POSException import ConflictError

        self.conflict = ConflictError
        self.db = ZODB.DB(_storage(spec), cache_size=CACHE_OBJECTS)
        self.manager = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.manager)
        self.root = self.conn.root()
        self.users = self.root["users"]

    def get(self, key: str) -> Any:
        return self.users[key]

    def _commit(self, change: Any) -> int:
        retries = 0
        while True:
            try:
                change(self.conn.root())
                self.manager.commit()
                return retries
            except self.conflict:
                self.manager.abort()
                retries += 1

    def put(self, key: str, value: dict) -> int:
        def change(root: Any) -> None:
            root["users"][key] = value

        return self._commit(change)

    def transfer(self, a: str, b: str, amount: int) -> int:
        def change(root: Any) -> None:
            accounts = root["accounts"]
            accounts[a] -= amount
            accounts[b] += amount

        return self._commit(change)

    def query(self, city: str, score: int) -> list:
        return zodb_values(self.root["by_city_score"], city, score)

    def total(self, accounts: int) -> int:
        self.manager.abort()  # see the latest commits
        return sum(self.conn.root()["accounts"].values())

    def close(self) -> None:
        self.manager.abort()
        self.conn.close()
        self.db.close()


class ZodbFileStorage(Store):
    name = "ZODB FileStorage"
    method = "root['users'][key] (OOBTree of dicts), connection cache"
    query_method = "OOBTree keyed (city, score, id) -> record: values(min, max)"
    modes = ("durable",)
    processes = False  # a FileStorage is locked by one process
    transfers = False

    def start(self, tmp: str) -> None:
        self.path = os.path.join(tmp, "data.fs")

    def _spec_for_load(self) -> dict:
        return {"path": self.path}

    def load(self, records: dict[str, dict]) -> None:
        import transaction
        import ZODB
        from BTrees.OOBTree import OOBTree

        db = ZODB.DB(_storage(self._spec_for_load()))
        manager = transaction.TransactionManager()
        conn = db.open(transaction_manager=manager)
        try:
            root = conn.root()
            root["users"] = OOBTree(records)
            root["by_city_score"] = OOBTree({(r["city"], r["score"], r["id"]): r for r in records.values()})
            manager.commit()
        finally:
            manager.abort()
            conn.close()
            db.close()

    def setup_accounts(self, accounts: int, balance: int) -> None:
        import transaction
        import ZODB
        from BTrees.OOBTree import OOBTree

        db = ZODB.DB(_storage(self._spec_for_load()))
        manager = transaction.TransactionManager()
        conn = db.open(transaction_manager=manager)
        try:
            conn.root()["accounts"] = OOBTree({f"acct{i}": balance for i in range(accounts)})
            manager.commit()
        finally:
            manager.abort()
            conn.close()
            db.close()

    def spec(self) -> dict:
        return {"path": self.path}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return ZodbClient(spec)

    def info(self) -> dict:
        return {"disk": dir_bytes(self.tmp)}


class Zeo(ZodbFileStorage):
    name = "ZEO"
    method = "root['users'][key] through a ZEO client, connection cache"
    processes = True
    transfers = True

    def unavailable(self) -> str | None:
        try:
            import ZEO  # noqa: F401
        except ImportError as error:
            return f"ZEO is not installed ({error}); pip install '.[bench]'"
        return None

    def start(self, tmp: str) -> None:
        from ZEO.ClientStorage import ClientStorage

        super().start(tmp)
        self.port = free_port()
        self.log = open(os.path.join(tmp, "zeo.log"), "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ZEO.runzeo", "-a", f"127.0.0.1:{self.port}", "-f", self.path],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # wait until it answers (stop() ends the server if this raises)
            try:
                ClientStorage(("127.0.0.1", self.port), wait_timeout=1).close()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"runzeo did not start (exit code {self.process.poll()})") from None
                time.sleep(0.1)

    def _spec_for_load(self) -> dict:
        return {"port": self.port}

    def spec(self) -> dict:
        return {"port": self.port}

    def info(self) -> dict:
        return {"server_pid": self.process.pid, "disk": dir_bytes(self.tmp)}

    def stop(self) -> None:
        process = getattr(self, "process", None)
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()
