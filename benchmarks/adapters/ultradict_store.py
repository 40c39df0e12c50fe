"""UltraDict: a dict synchronised through shared memory; every process keeps a full local copy.

Writes append to a shared stream buffer that the other processes replay on
their next access; `shared_lock=True` (needs the `atomics` package) gives the
lock transfers hold. No durability: commits are "relaxed".
"""

from __future__ import annotations

import os
from typing import Any

from .base import Client, Store

BUFFER = 1 << 20


class UltraDictClient(Client):
    def __init__(self, spec: dict) -> None:
        from UltraDict import UltraDict

        self.users = UltraDict(name=spec["users"], auto_unlink=False)
        self.accounts = UltraDict(name=spec["accounts"], auto_unlink=False)

    def get(self, key: str) -> Any:
        return self.users[key]

    def put(self, key: str, value: dict) -> int:
        self.users[key] = value
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        accounts = self.accounts
        with accounts.lock:
            accounts[a] = accounts[a] - amount
            accounts[b] = accounts[b] + amount
        return 0

    def query(self, city: str, score: int) -> list:
        return [r for r in self.users.values() if r["city"] == city and r["score"] > score]

    def total(self, accounts: int) -> int:
        return sum(self.accounts.values())

    def close(self) -> None:
        self.users.close(unlink=False)
        self.accounts.close(unlink=False)


class UltraDictStore(Store):
    name = "UltraDict"
    method = "ud[key]: a local dict, after replaying the shared update stream"
    query_method = "scan of ud.values() (local copy)"
    modes = ("relaxed",)

    def unavailable(self) -> str | None:
        try:
            import atomics  # noqa: F401
            import UltraDict  # noqa: F401
        except ImportError as error:
            return f"UltraDict with shared_lock needs UltraDict and atomics ({error}); pip install '.[bench]'"
        return None

    def start(self, tmp: str) -> None:
        self.base = f"pbbench{os.getpid()}{os.urandom(4).hex()}"
        self.dicts: list[Any] = []

    def _create(self, suffix: str, records: int) -> Any:
        from UltraDict import UltraDict

        d = UltraDict(
            name=self.base + suffix,
            create=True,
            shared_lock=True,
            buffer_size=BUFFER,
            full_dump_size=max(64 << 20, records * 256),
            auto_unlink=False,
        )
        self.dicts.append(d)
        return d

    def load(self, records: dict[str, dict]) -> None:
        self.users = self._create("u", len(records))
        self.users.update(records)

    def setup_accounts(self, accounts: int, balance: int) -> None:
        self.accounts = self._create("a", accounts)
        self.accounts.update({f"acct{i}": balance for i in range(accounts)})

    def spec(self) -> dict:
        return {"users": self.base + "u", "accounts": self.base + "a"}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return UltraDictClient(spec)

    def segments(self) -> list[str]:
        return [entry for entry in os.listdir("/dev/shm") if entry.startswith(self.base)]

    def info(self) -> dict:
        # allocated pages, not the (sparse) sizes of the segments
        return {"shared": sum(os.stat(os.path.join("/dev/shm", e)).st_blocks * 512 for e in self.segments())}

    def stop(self) -> None:
        import posix_ipc

        for d in getattr(self, "dicts", []):
            d.unlink()
        self.dicts = []
        for entry in self.segments():  # unlink() leaves some segments of a shared_lock dict behind
            try:
                posix_ipc.unlink_shared_memory("/" + entry)
            except posix_ipc.ExistentialError:
                pass
