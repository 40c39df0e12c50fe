"""The cart app's WSGI entry point, `benchmarks.cartapp.app:app`, as gunicorn workers serve it.

GET /cart/<user> returns the user's cart as JSON; POST /cart/<user>/add?item=X
adds one X to it and counts the add in the shared counter (stores.py says how,
per backend); GET /health answers once the worker is connected. Each worker
process connects on its first request (after gunicorn's fork: a handle is never
shared across one) and writes its counters when it exits. Runs in gunicorn
worker processes.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from benchmarks.cartapp.stores import Backend, open_backend

__all__ = ["app"]

_backend: Backend | None = None  # this worker's connection
_backend_pid = 0  # the process that opened it


def backend() -> Backend:
    """This worker's backend, connected on first use after the fork."""
    global _backend, _backend_pid
    if _backend is None or _backend_pid != os.getpid():
        _backend = open_backend()
        _backend_pid = os.getpid()
        atexit.register(_finish, _backend)
    return _backend


def _finish(backend: Backend) -> None:
    stats_dir = os.environ.get("CART_STATS_DIR")
    if stats_dir:
        backend.write_stats(stats_dir)
    backend.close()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Serve one request."""
    status = "200 OK"
    try:
        body: Any = route(environ)
    except LookupError as error:
        status, body = "404 Not Found", {"error": str(error)}
    except Exception as error:  # a failed add (e.g. conflicts past the retries): the load generator counts it
        status, body = "503 Service Unavailable", {"error": f"{type(error).__name__}: {error}"}
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


def route(environ: dict[str, Any]) -> Any:
    parts = [part for part in environ.get("PATH_INFO", "").split("/") if part]
    store = backend()
    if len(parts) == 2 and parts[0] == "cart":
        return {"user": parts[1], "items": store.view(parts[1])}
    if len(parts) == 3 and parts[0] == "cart" and parts[2] == "add" and environ["REQUEST_METHOD"] == "POST":
        item = parse_qs(environ.get("QUERY_STRING", "")).get("item", ["none"])[-1]
        return {"user": parts[1], "size": store.add(parts[1], item)}
    if parts == ["health"]:
        return {"pid": os.getpid()}
    raise LookupError(f"no such endpoint: {environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}")
