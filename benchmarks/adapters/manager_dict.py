"""multiprocessing.Manager().dict(): a dict in a server process, reached through proxies.

It has no transactions: transfers hold a Manager().Lock() around the read and
the writes. No durability: commits are "relaxed" (in the server's memory only).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from .base import Client, Store

CHUNK = 10_000


class ManagerClient(Client):
    def __init__(self, spec: dict) -> None:
        self.users, self.accounts, self.lock = spec["users"], spec["accounts"], spec["lock"]

    def get(self, key: str) -> Any:
        return self.users[key]

    def put(self, key: str, value: dict) -> int:
        self.users[key] = value
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        with self.lock:
            accounts = self.accounts
            accounts[a] = accounts[a] - amount
            accounts[b] = accounts[b] + amount
        return 0

    def query(self, city: str, score: int) -> list:
        return [r for _, r in self.users.items() if r["city"] == city and r["score"] > score]

    def total(self, accounts: int) -> int:
        return sum(self.accounts.values())


class ManagerDict(Store):
    name = "Manager().dict()"
    method = "proxy[key]: one round trip to the manager process, pickled"
    query_method = "scan of proxy.items() (one round trip)"
    modes = ("relaxed",)

    def start(self, tmp: str) -> None:
        self.manager = multiprocessing.get_context("spawn").Manager()
        self.users, self.accounts, self.lock = self.manager.dict(), self.manager.dict(), self.manager.Lock()

    def load(self, records: dict[str, dict]) -> None:
        items = list(records.items())
        for begin in range(0, len(items), CHUNK):
            self.users.update(items[begin : begin + CHUNK])

    def setup_accounts(self, accounts: int, balance: int) -> None:
        self.accounts.update({f"acct{i}": balance for i in range(accounts)})

    def spec(self) -> dict:
        return {"users": self.users, "accounts": self.accounts, "lock": self.lock}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return ManagerClient(spec)

    def info(self) -> dict:
        return {"server_pid": self.manager._process.pid}  # private, but the only way to name the server

    def stop(self) -> None:
        manager = getattr(self, "manager", None)
        if manager is not None:
            self.users = self.accounts = self.lock = None
            manager.shutdown()
