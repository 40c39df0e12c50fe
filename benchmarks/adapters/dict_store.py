"""A plain in-process dict: the physical reference. Every process builds its own copy."""

from __future__ import annotations

from typing import Any

from .base import Client, Store


class DictClient(Client):
    def __init__(self, spec: dict) -> None:
        from ..queries import make_records

        self.users = make_records(spec["records"], spec["seed"])
        self.accounts = {f"acct{i}": spec["balance"] for i in range(spec["accounts"])}

    def get(self, key: str) -> Any:
        return self.users[key]

    def put(self, key: str, value: dict) -> int:
        self.users[key] = value
        return 0

    def query(self, city: str, score: int) -> list:
        return [r for r in self.users.values() if r["city"] == city and r["score"] > score]

    def total(self, accounts: int) -> int:
        return sum(self.accounts.values())


class PlainDict(Store):
    name = "dict"
    method = "d[key], a private copy in every process"
    query_method = "scan of d.values()"
    modes = ("relaxed",)
    processes = False  # no sharing: W2 gives every reader its own copy (ideal scaling)
    transfers = False

    def load(self, records: dict[str, dict]) -> None:
        self.records = len(records)
        self.accounts, self.balance = 0, 0

    def setup_accounts(self, accounts: int, balance: int) -> None:
        self.accounts, self.balance = accounts, balance

    def spec(self) -> dict:
        return {"records": self.records, "seed": self.seed, "accounts": self.accounts, "balance": self.balance}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return DictClient(spec)
