"""diskcache.Cache: pickled values in SQLite (WAL) plus files, one Cache per process.

Durable = `sqlite_synchronous=2` (FULL), relaxed = 1 (NORMAL, diskcache's
default). Transfers run in `cache.transact()` (BEGIN IMMEDIATE: one writer at
a time) and retry on diskcache.Timeout.
"""

from __future__ import annotations

import os
from typing import Any

from .base import Client, Store, dir_bytes


def _cache(path: str, mode: str) -> Any:
    import diskcache

    return diskcache.Cache(
        path, sqlite_synchronous=2 if mode == "durable" else 1, timeout=60, size_limit=1 << 40, cull_limit=0
    )


class DiskcacheClient(Client):
    def __init__(self, path: str, mode: str) -> None:
        import diskcache

        self.timeout = diskcache.Timeout
        self.cache = _cache(os.path.join(path, "users"), mode)
        self.accounts = _cache(os.path.join(path, "accounts"), mode)

    def get(self, key: str) -> Any:
        return self.cache[key]

    def put(self, key: str, value: dict) -> int:
        self.cache[key] = value
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        retries = 0
        while True:
            try:
                with self.accounts.transact(retry=False):
                    self.accounts[a] = self.accounts[a] - amount
                    self.accounts[b] = self.accounts[b] + amount
                return retries
            except self.timeout:
                retries += 1

    def query(self, city: str, score: int) -> list:
        cache, found = self.cache, []
        for key in cache.iterkeys():
            r = cache[key]
            if r["city"] == city and r["score"] > score:
                found.append(r)
        return found

    def total(self, accounts: int) -> int:
        return sum(self.accounts[f"acct{i}"] for i in range(accounts))

    def close(self) -> None:
        self.cache.close()
        self.accounts.close()


class Diskcache(Store):
    name = "diskcache"
    method = "cache[key] (SELECT + unpickle)"
    query_method = "scan: iterkeys() then cache[key]"

    def unavailable(self) -> str | None:
        try:
            import diskcache  # noqa: F401
        except ImportError as error:
            return f"diskcache is not installed ({error}); pip install '.[bench]'"
        return None

    def load(self, records: dict[str, dict]) -> None:
        cache = _cache(os.path.join(self.tmp, "users"), "relaxed")
        try:
            with cache.transact():
                for key, value in records.items():
                    cache[key] = value
        finally:
            cache.close()

    def setup_accounts(self, accounts: int, balance: int) -> None:
        cache = _cache(os.path.join(self.tmp, "accounts"), "durable")
        try:
            with cache.transact():
                for i in range(accounts):
                    cache[f"acct{i}"] = balance
        finally:
            cache.close()

    def spec(self) -> dict:
        return {"path": self.tmp}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return DiskcacheClient(spec["path"], mode)

    def info(self) -> dict:
        return {"disk": dir_bytes(self.tmp)}
