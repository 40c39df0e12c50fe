"""A typed user script: `mypy --strict` on it (in .ci/run) checks that the public API keeps precise types.

Not run by pytest. `assert_type` fails the type check when a type is not
exactly the one named (an `Any` leaking out fails it too); a line marked
`# type: ignore[...]` must really be an error, since --strict warns about an
ignore that is not needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from typing_extensions import assert_type

import protobase
from protobase import F, Query, Snapshot, Transaction
from protobase.client.pool import Pool
from protobase.client.watch import Change, Watcher


def city_of(snapshot: Snapshot, key: Any) -> str:
    return str(snapshot.root["users"][key]["city"])


def main() -> None:
    db = protobase.open("typed-data")
    with db.snapshot() as snap:
        users = snap.root["users"]
        query = users.where((F.city == "Paris") & (F.score > 5))
        assert_type(query, Query)
        assert_type(query.count(), int)
        assert_type(query.explain(), str)
        assert_type(query.order_by("score").keys(), list[Any])

    @db.transactional
    def rename(tx: Transaction, key: str, city: str) -> int:
        tx.root["users"][key]["city"] = city
        return len(tx.root["users"])

    assert_type(rename("alice", "Lyon"), int)
    rename("alice", 3)  # type: ignore[arg-type]

    @db.transactional(retries=3)
    def count(tx: Transaction) -> int:
        return len(tx.root)

    assert_type(count(), int)

    with db.pool(processes=2) as pool:
        assert_type(pool, Pool)
        assert_type(pool.map(city_of, ["alice", "bob"]), list[str])
        assert_type(pool.imap(city_of, ["alice"]), Iterator[str])

    with db.watch(("users",)) as watcher:
        assert_type(watcher, Watcher)
        change = watcher.wait(timeout=1.0)
        assert_type(change, Change | None)

    db.transaction(isolation="serializable")
    db.transaction(isolation="serialisable")  # type: ignore[arg-type]
    db.transaction(durability="async")
    db.transaction(durability="eventually")  # type: ignore[arg-type]
    db.close()
