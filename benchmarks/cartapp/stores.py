"""The cart app's three backends: the same two operations (view a cart, add to it) on each store.

Owns what an operation does on each store, written as a careful user of
that store would: every add reads the user's cart, adds one of an item and
counts the add in one shared counter, atomically.

- ProtoBase: `root["carts"][user]` is a dict {item: quantity}, `root["stats"]["adds"]`
  the counter. An add is a retried transaction (`db.attempts`); the counter is
  `stats.incr("adds")`, a conflict-free increment (CART_COUNTER=rmw reads and
  writes it instead, `stats["adds"] += 1`, the contended form every add
  conflicts on). `durable` is `durability="sync"`, `relaxed` is `"async"`.
- SQLite WAL: tables carts(user, item, qty) and counters(name, value); an add is
  `BEGIN IMMEDIATE`, the cart's SELECT, an upsert and the counter's UPDATE.
  `durable` is `synchronous=FULL`, `relaxed` is `NORMAL`.
- Redis: a hash per cart; an add is HINCRBY + INCR + HLEN in one MULTI/EXEC
  (atomic and conflict-free, as a Redis user writes it). `durable` is
  `appendfsync always`, `relaxed` is `everysec` (set by the benchmark on the server).

Configured by environment variables (gunicorn workers inherit them): CART_BACKEND
(protobase, sqlite, redis), CART_DURABILITY (durable, relaxed), CART_PATH (the
data directory or database file), CART_REDIS_PORT, CART_COUNTER (incr, rmw).
Each worker keeps counters of its adds (attempts, the longest run of losses) and
writes them to CART_STATS_DIR/<pid>.json when it exits.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

__all__ = ["Backend", "open_backend", "prepare", "USERS", "ITEMS_PER_CART"]

USERS = 1000  # carts, u1 .. u1000 (cart.lua picks among them)
ITEMS_PER_CART = 3  # items each cart holds before the run
RETRIES = 1000  # a ProtoBase add is retried this often before the request fails


class Backend:
    """One worker's connection to the store: `view`, `add`, and counters of the adds."""

    def __init__(self) -> None:
        self.adds = 0  # adds served
        self.attempts = 0  # transaction attempts they took (ProtoBase; 1 per add elsewhere)
        self.longest_losing_run = 0  # the most attempts one add lost before it committed

    def view(self, user: str) -> dict[str, int]:
        raise NotImplementedError

    def add(self, user: str, item: str) -> int:
        """Add one `item` to `user`'s cart and count it; return the cart's number of distinct items."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def counted(self, attempts: int) -> None:
        self.adds += 1
        self.attempts += attempts
        self.longest_losing_run = max(self.longest_losing_run, attempts - 1)

    def write_stats(self, directory: str) -> None:
        stats = {"adds": self.adds, "attempts": self.attempts, "longest_losing_run": self.longest_losing_run}
        with open(os.path.join(directory, f"{os.getpid()}.json"), "w") as file:
            json.dump(stats, file)


def initial_cart(user_number: int) -> dict[str, int]:
    return {f"i{(user_number + k) % 20 + 1}": k + 1 for k in range(ITEMS_PER_CART)}


# -- ProtoBase --------------------------------------------------------------------------------


class ProtoBaseBackend(Backend):
    def __init__(self, path: str, durable: bool, counter: str) -> None:
        super().__init__()
        import protobase

        self.db = protobase.open(path, durability="sync" if durable else "async", shutdown_grace=1.0)
        self.conflict = protobase.ConflictError
        self.incr = counter == "incr"

    def view(self, user: str) -> dict[str, int]:
        with self.db.snapshot() as snapshot:
            cart = snapshot.root["carts"].get(user)
            return dict(cart) if cart is not None else {}

    def add(self, user: str, item: str) -> int:
        attempts = 0
        for attempt in self.db.attempts(retries=RETRIES):
            attempts += 1
            with attempt as tx:
                carts = tx.root["carts"]
                cart = carts.get(user)
                if cart is None:
                    carts[user] = {item: 1}
                    size = 1
                else:
                    cart[item] = cart.get(item, 0) + 1
                    size = len(cart)
                stats = tx.root["stats"]
                if self.incr:
                    stats.incr("adds")
                else:
                    stats["adds"] = stats["adds"] + 1
        self.counted(attempts)
        return size

    def close(self) -> None:
        self.db.close()


def prepare_protobase(path: str) -> None:
    import protobase

    with protobase.open(path, durability="async", shutdown_grace=0.5) as db:
        with db.transaction() as tx:
            tx.root["carts"] = {f"u{n}": initial_cart(n) for n in range(1, USERS + 1)}
            tx.root["stats"] = {"adds": 0}
        with db.snapshot() as snapshot:
            assert len(snapshot.root["carts"]) == USERS


# -- SQLite -----------------------------------------------------------------------------------


class SqliteBackend(Backend):
    def __init__(self, path: str, durable: bool) -> None:
        super().__init__()
        self.con = sqlite3.connect(path, timeout=60.0, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")

    def view(self, user: str) -> dict[str, int]:
        return dict(self.con.execute("SELECT item, qty FROM carts WHERE user = ?", (user,)).fetchall())

    def add(self, user: str, item: str) -> int:
        con = self.con
        con.execute("BEGIN IMMEDIATE")  # the write lock first: a read-modify-write never loses an update
        try:
            cart = dict(con.execute("SELECT item, qty FROM carts WHERE user = ?", (user,)).fetchall())
            con.execute("INSERT OR REPLACE INTO carts VALUES (?, ?, ?)", (user, item, cart.get(item, 0) + 1))
            con.execute("UPDATE counters SET value = value + 1 WHERE name = 'adds'")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self.counted(1)
        return len(cart) + (item not in cart)

    def close(self) -> None:
        self.con.close()


def prepare_sqlite(path: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE carts (user TEXT, item TEXT, qty INTEGER, PRIMARY KEY (user, item))")
        con.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER)")
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO carts VALUES (?, ?, ?)",
            [(f"u{n}", item, qty) for n in range(1, USERS + 1) for item, qty in initial_cart(n).items()],
        )
        con.execute("INSERT INTO counters VALUES ('adds', 0)")
        con.execute("COMMIT")
    finally:
        con.close()


# -- Redis ------------------------------------------------------------------------------------


class RedisBackend(Backend):
    def __init__(self, port: int) -> None:
        super().__init__()
        import redis

        self.r = redis.Redis(host="127.0.0.1", port=port)

    def view(self, user: str) -> dict[str, int]:
        found: dict[bytes, bytes] = self.r.hgetall("cart:" + user)  # type: ignore[assignment]
        return {item.decode(): int(qty) for item, qty in found.items()}

    def add(self, user: str, item: str) -> int:
        pipe = self.r.pipeline(transaction=True)  # MULTI ... EXEC: one round trip, atomic
        pipe.hincrby("cart:" + user, item, 1)
        pipe.incr("adds")
        pipe.hlen("cart:" + user)
        size: int = pipe.execute()[2]
        self.counted(1)
        return size

    def close(self) -> None:
        self.r.close()


def prepare_redis(port: int) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        pipe = r.pipeline(transaction=False)
        for n in range(1, USERS + 1):
            pipe.hset(f"cart:u{n}", mapping=dict(initial_cart(n)))  # type: ignore[arg-type]
        pipe.set("adds", 0)
        pipe.execute()
    finally:
        r.close()


# -- choosing ---------------------------------------------------------------------------------


def open_backend(environ: Any = os.environ) -> Backend:
    """The backend the environment names (CART_BACKEND and the rest), connected."""
    name = environ["CART_BACKEND"]
    durable = environ.get("CART_DURABILITY", "durable") == "durable"
    if name == "protobase":
        return ProtoBaseBackend(environ["CART_PATH"], durable, environ.get("CART_COUNTER", "incr"))
    if name == "sqlite":
        return SqliteBackend(environ["CART_PATH"], durable)
    if name == "redis":
        return RedisBackend(int(environ["CART_REDIS_PORT"]))
    raise ValueError(f"CART_BACKEND must be protobase, sqlite or redis, got {name!r}")


def prepare(name: str, path: str, redis_port: int | None = None) -> None:
    """Create the carts (USERS of them, ITEMS_PER_CART items each) and the counter, before the workers start."""
    if name == "protobase":
        prepare_protobase(path)
    elif name == "sqlite":
        prepare_sqlite(path)
    else:
        assert redis_port is not None, "Redis is prepared on its port"
        prepare_redis(redis_port)
