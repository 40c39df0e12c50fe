"""The contract every store adapter follows (see benchmarks/suite.py).

An adapter class lives in the parent process: `start(tmp)` starts what the
store needs (servers, files), `load(records)` fills it, `setup_accounts(n,
balance)` writes the W4 accounts, `spec()` returns a picklable description
from which a worker process builds a `Client` with `connect(spec, mode)`,
`info()` reports memory and disk after loading, `stop()` releases everything.
A client reads (`get`), commits (`put`, `transfer`), queries (`query`) and
sums balances (`total`). Every timed loop lives in benchmarks/workloads.py and
is the same for every store.

`unavailable()` returns why the store cannot run here (a missing package or
binary), or None. Capabilities say which workloads make sense:
`modes` the commit modes the store has ("durable" = fsync before the commit
returns, "relaxed" = not), `processes` whether several processes may use it
at once, `transfers` whether it can do atomic read-2-write-2 transfers.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["Store", "Client", "dir_bytes"]


def dir_bytes(path: str) -> int:
    """Bytes of the files under `path` (allocated blocks, so sparse files count what they use)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class Client:
    """One process's handle on a store. Commit methods return the retries they needed."""

    def get(self, key: str) -> Any:
        raise NotImplementedError

    def put(self, key: str, value: dict) -> int:
        raise NotImplementedError

    def transfer(self, a: str, b: str, amount: int) -> int:
        raise NotImplementedError

    def query(self, city: str, score: int) -> list:
        raise NotImplementedError

    def total(self, accounts: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Store:
    name = "?"
    method = ""  # how it reads, one line for the report
    query_method = "scan"
    modes: tuple[str, ...] = ("durable", "relaxed")
    processes = True
    transfers = True
    seed = 0  # the data set's seed, set by the runner (a store that rebuilds the data needs it)

    def unavailable(self) -> str | None:
        return None

    def start(self, tmp: str) -> None:
        self.tmp = tmp

    def load(self, records: dict[str, dict]) -> None:
        raise NotImplementedError

    def setup_accounts(self, accounts: int, balance: int) -> None:
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        raise NotImplementedError

    def set_mode(self, mode: str) -> None:
        """Switch a server-side durability setting before a commit round (Redis)."""

    def info(self) -> dict:
        """After load: {"shared": bytes, "server_pid": pid, "disk": bytes}; missing keys = not applicable."""
        return {}

    def stop(self) -> None:
        pass
