"""SQLite in WAL mode: table users (index on city, score) as benchmarks/queries.py builds it."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from ..queries import load_sqlite, sqlite_dicts_json
from .base import Client, Store, dir_bytes

GET = "SELECT id, name, city, score, tags FROM users WHERE key = ?"
PUT = "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?)"
COLUMNS = ("id", "name", "city", "score", "tags")


class SqliteClient(Client):
    def __init__(self, path: str, mode: str) -> None:
        self.con = sqlite3.connect(path, timeout=60.0, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={'FULL' if mode == 'durable' else 'NORMAL'}")
        self.con.execute("PRAGMA cache_size=-65536")

    def get(self, key: str) -> Any:
        row = self.con.execute(GET, (key,)).fetchone()
        found = dict(zip(COLUMNS, row))
        found["tags"] = json.loads(found["tags"])
        return found

    def put(self, key: str, value: dict) -> int:
        self.con.execute(
            PUT, (key, value["id"], value["name"], value["city"], value["score"], json.dumps(value["tags"]))
        )
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        retries = 0
        while True:
            try:
                self.con.execute("BEGIN IMMEDIATE")  # takes the write lock first: no lost update
            except sqlite3.OperationalError:  # busy beyond the timeout
                retries += 1
                continue
            try:
                get = "SELECT balance FROM accounts WHERE k = ?"
                (ba,), (bb,) = self.con.execute(get, (a,)).fetchone(), self.con.execute(get, (b,)).fetchone()
                self.con.execute("UPDATE accounts SET balance = ? WHERE k = ?", (ba - amount, a))
                self.con.execute("UPDATE accounts SET balance = ? WHERE k = ?", (bb + amount, b))
                self.con.execute("COMMIT")
                return retries
            except BaseException:
                self.con.execute("ROLLBACK")
                raise

    def query(self, city: str, score: int) -> list:
        return sqlite_dicts_json(self.con, city, score)

    def total(self, accounts: int) -> int:
        return self.con.execute("SELECT SUM(balance) FROM accounts").fetchone()[0]

    def close(self) -> None:
        self.con.close()


class Sqlite(Store):
    name = "SQLite WAL"
    method = "SELECT ... WHERE key=? -> dict, tags json.loads"
    query_method = "SELECT ... WHERE city=? AND score>?, index on (city, score)"

    def start(self, tmp: str) -> None:
        self.path = os.path.join(tmp, "sqlite.db")

    def load(self, records: dict[str, dict]) -> None:
        load_sqlite(self.path, records)

    def setup_accounts(self, accounts: int, balance: int) -> None:
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            con.execute("CREATE TABLE accounts (k TEXT PRIMARY KEY, balance INTEGER NOT NULL)")
            con.execute("BEGIN")
            con.executemany("INSERT INTO accounts VALUES (?, ?)", [(f"acct{i}", balance) for i in range(accounts)])
            con.execute("COMMIT")
        finally:
            con.close()

    def spec(self) -> dict:
        return {"path": self.path}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return SqliteClient(spec["path"], mode)

    def info(self) -> dict:
        return {"disk": dir_bytes(self.tmp)}
