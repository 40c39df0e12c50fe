"""LMDB: records pickled under their key (as benchmarks/core.py does), accounts in a second database."""

from __future__ import annotations

import os
import pickle
from typing import Any

from .base import Client, Store, dir_bytes

MAP_SIZE = 8 << 30


def _open(path: str, mode: str, readonly: bool = False) -> Any:
    import lmdb

    durable = mode == "durable"
    return lmdb.open(
        path,
        map_size=MAP_SIZE,
        subdir=True,
        max_dbs=2,
        max_readers=64,
        readonly=readonly,
        sync=durable,
        metasync=durable,
    )


class LmdbClient(Client):
    def __init__(self, path: str, mode: str) -> None:
        self.env = _open(path, mode)
        self.users = self.env.open_db(b"users")
        self.accounts = self.env.open_db(b"accounts")
        self.txn = self.env.begin(db=self.users)  # readers reuse one read transaction (warm)

    def get(self, key: str) -> Any:
        return pickle.loads(self.txn.get(key.encode()))

    def put(self, key: str, value: dict) -> int:
        with self.env.begin(write=True, db=self.users) as txn:
            txn.put(key.encode(), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        with self.env.begin(write=True, db=self.accounts) as txn:  # one writer at a time: never a conflict
            ka, kb = a.encode(), b.encode()
            txn.put(ka, str(int(txn.get(ka)) - amount).encode())
            txn.put(kb, str(int(txn.get(kb)) + amount).encode())
        return 0

    def query(self, city: str, score: int) -> list:
        loads, found = pickle.loads, []
        for value in self.txn.cursor().iternext(keys=False, values=True):
            r = loads(value)
            if r["city"] == city and r["score"] > score:
                found.append(r)
        return found

    def total(self, accounts: int) -> int:
        with self.env.begin(db=self.accounts) as txn:
            return sum(int(v) for v in txn.cursor().iternext(keys=False, values=True))

    def close(self) -> None:
        self.txn.abort()
        self.env.close()


class Lmdb(Store):
    name = "LMDB"
    method = "pickle.loads(txn.get(key)), one read transaction"
    query_method = "scan of a cursor, unpickling every record"

    def start(self, tmp: str) -> None:
        self.path = os.path.join(tmp, "lmdb")

    def load(self, records: dict[str, dict]) -> None:
        env = _open(self.path, "relaxed")
        try:
            users = env.open_db(b"users")
            with env.begin(write=True, db=users) as txn:
                for key, value in records.items():
                    txn.put(key.encode(), pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
            env.sync(True)
        finally:
            env.close()

    def setup_accounts(self, accounts: int, balance: int) -> None:
        env = _open(self.path, "durable")
        try:
            db = env.open_db(b"accounts")
            with env.begin(write=True, db=db) as txn:
                for i in range(accounts):
                    txn.put(f"acct{i}".encode(), str(balance).encode())
        finally:
            env.close()

    def spec(self) -> dict:
        return {"path": self.path}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return LmdbClient(spec["path"], mode)

    def info(self) -> dict:
        return {"disk": dir_bytes(self.path)}
