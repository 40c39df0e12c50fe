"""A plain WSGI shop: gunicorn workers sharing carts and a leaderboard in one ProtoBase database.

What it shows: several web worker processes (forked by gunicorn) read and
write one database with no server in between. Each worker opens the database
once, lazily, on its first request (checked against os.getpid(), so a handle
is never shared across a fork), and closes it when the worker exits. Updates
run in retried transactions (`db.attempts`): two workers adding to the same
cart conflict on that cart's key path, and the loser re-runs on the new state,
so no update is lost. Reads take a snapshot and never block writers. The
leaderboard is a query on an index of the players' scores.

Run it (from the repository root):

    pip install gunicorn
    PROTOBASE_PATH=/tmp/shop gunicorn -w 3 -b 127.0.0.1:8000 examples.shop_app:app

    curl -X POST 'http://127.0.0.1:8000/cart/alice/add?item=apple'
    curl http://127.0.0.1:8000/cart/alice
    curl -X POST 'http://127.0.0.1:8000/score/alice?points=5'
    curl 'http://127.0.0.1:8000/leaderboard?top=3&explain=1'

Endpoints (JSON responses; each carries the serving worker's pid in X-Worker-Pid):

    POST /cart/<user>/add?item=X   append X to the user's cart
    GET  /cart/<user>              the user's cart
    POST /score/<user>?points=N    add N (an integer) to the user's score
    GET  /leaderboard?top=N        the N best scores, best first (explain=1 adds the query plan)
    GET  /health                   the worker's pid and the latest commit's seq

Environment: PROTOBASE_PATH (required: the data directory),
PROTOBASE_DURABILITY ("sync", the default: a 200 means the update is on disk;
or "async"), PROTOBASE_SHUTDOWN_GRACE (seconds the coordinator lingers after
the last worker detaches; default 2).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import protobase
from protobase import F

__all__ = ["app", "database"]

RETRIES = 100  # conflicts on one hot cart are retried this many times before a 503
MAX_TOP = 100

_lock = threading.Lock()  # guards the lazy open (gthread workers serve requests in threads)
_db: protobase.Database | None = None  # this worker's handle
_db_pid = 0  # the process that opened _db


class HTTPError(Exception):
    """An error response: status line and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- the database, once per worker process --------------------------------------------------


def database() -> protobase.Database:
    """This process's database handle, opened on first use after the fork."""
    global _db, _db_pid
    with _lock:
        if _db is None or _db_pid != os.getpid():
            _db = _open_from_environment()
            _db_pid = os.getpid()
            atexit.register(_close, _db)
        return _db


def _open_from_environment() -> protobase.Database:
    path = os.environ.get("PROTOBASE_PATH")
    if not path:
        raise RuntimeError("set PROTOBASE_PATH to the shop's data directory, e.g. PROTOBASE_PATH=/tmp/shop")
    db = protobase.open(
        path,
        durability=os.environ.get("PROTOBASE_DURABILITY", "sync"),
        shutdown_grace=float(os.environ.get("PROTOBASE_SHUTDOWN_GRACE", "2")),
    )
    try:
        ensure_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def _close(db: protobase.Database) -> None:
    db.close()


def ensure_schema(db: protobase.Database) -> None:
    """Create the carts and the indexed scores once; workers racing to do it conflict and retry."""
    for attempt in db.attempts(retries=RETRIES):
        with attempt as tx:
            if "carts" not in tx.root:
                tx.root["carts"] = {}  # {user -> [item, ...]}
            if "scores" not in tx.root:
                tx.root["scores"] = {}  # {user -> {"user": user, "score": int}}
                tx.root["scores"].create_index("score")


# -- the operations -----------------------------------------------------------------------


def add_to_cart(db: protobase.Database, user: str, item: str) -> int:
    """Append `item` to `user`'s cart; return the cart's new size."""
    for attempt in db.attempts(retries=RETRIES):
        with attempt as tx:
            carts = tx.root["carts"]
            if user in carts:
                carts[user].append(item)  # recorded on the path ("carts", user): a concurrent add conflicts
            else:
                carts[user] = [item]
            size = len(carts[user])
    return size


def cart(db: protobase.Database, user: str) -> list:
    with db.snapshot() as snapshot:
        return list(snapshot.root["carts"].get(user, ()))


def add_points(db: protobase.Database, user: str, points: int) -> int:
    """Add `points` to `user`'s score; return the new score."""
    for attempt in db.attempts(retries=RETRIES):
        with attempt as tx:
            scores = tx.root["scores"]
            record = scores.get(user)
            score = (record["score"] if record is not None else 0) + points
            scores[user] = {"user": user, "score": score}
    return score


def leaderboard(db: protobase.Database, top: int, explain: bool = False) -> dict:
    """The `top` best scores, best first, through the index on "score"."""
    with db.snapshot() as snapshot:
        query = snapshot.root["scores"].where(F.score > 0).order_by("score", descending=True).limit(top)
        board = [{"user": record["user"], "score": record["score"]} for record in query]
        result: dict[str, Any] = {"seq": snapshot.seq, "leaderboard": board}
        if explain:
            result["plan"] = query.explain()
        return result


# -- WSGI ------------------------------------------------------------------------------------


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The WSGI entry point."""
    try:
        status, body = "200 OK", route(environ)
    except HTTPError as error:
        status, body = error.status, {"error": str(error)}
    except protobase.ConflictError as error:
        status, body = "503 Service Unavailable", {"error": f"too much contention, try again: {error}"}
    payload = json.dumps(body).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("X-Worker-Pid", str(os.getpid())),
        ],
    )
    return [payload]


def route(environ: dict) -> Any:
    """Dispatch one request to its operation; raise HTTPError for a bad one."""
    method = environ["REQUEST_METHOD"]
    parts = [part for part in environ.get("PATH_INFO", "").split("/") if part]
    query = {key: values[-1] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    db = database()
    if parts[:1] == ["cart"] and len(parts) == 3 and parts[2] == "add":
        _require(method, "POST")
        return {"user": parts[1], "size": add_to_cart(db, parts[1], _param(query, "item"))}
    if parts[:1] == ["cart"] and len(parts) == 2:
        _require(method, "GET")
        return {"user": parts[1], "items": cart(db, parts[1])}
    if parts[:1] == ["score"] and len(parts) == 2:
        _require(method, "POST")
        return {"user": parts[1], "score": add_points(db, parts[1], _integer(query, "points", 1, 10**9))}
    if parts == ["leaderboard"]:
        _require(method, "GET")
        top = _integer(query, "top", 1, MAX_TOP) if "top" in query else 10
        return leaderboard(db, top, explain=query.get("explain") == "1")
    if parts == ["health"]:
        with db.snapshot() as snapshot:
            return {"pid": os.getpid(), "seq": snapshot.seq}
    raise HTTPError("404 Not Found", f"no such endpoint: {method} {environ.get('PATH_INFO', '')}")


def _require(method: str, expected: str) -> None:
    if method != expected:
        raise HTTPError("405 Method Not Allowed", f"use {expected}")


def _param(query: dict, name: str) -> str:
    if not query.get(name):
        raise HTTPError("400 Bad Request", f"missing query parameter {name!r}")
    return query[name]


def _integer(query: dict, name: str, low: int, high: int) -> int:
    text = _param(query, name)
    try:
        value = int(text)
    except ValueError:
        raise HTTPError("400 Bad Request", f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise HTTPError("400 Bad Request", f"{name} must be between {low} and {high}, got {value}")
    return value
