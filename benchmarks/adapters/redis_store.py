"""Redis (Debian's redis-server), started on a free loopback port with a private directory.

Records are msgpack blobs under `u:<key>`; a sorted set per city (`c:<city>`,
score = the record's score) is the hand-made index W5 uses: ZRANGEBYSCORE, then
MGET. Durable = `appendonly yes` + `appendfsync always` (fsync before the
reply); relaxed = `appendfsync everysec` (the default). Transfers use
WATCH/MULTI/EXEC and retry on WatchError.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Any

from .base import Client, Store, dir_bytes

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisClient(Client):
    def __init__(self, port: int) -> None:
        import msgpack
        import redis

        self.r = redis.Redis(host="127.0.0.1", port=port)
        self.watch_error = redis.WatchError
        self.packb, self.unpackb = msgpack.packb, msgpack.unpackb

    def get(self, key: str) -> Any:
        return self.unpackb(self.r.get("u:" + key))

    def put(self, key: str, value: dict) -> int:
        self.r.set("u:" + key, self.packb(value))
        return 0

    def transfer(self, a: str, b: str, amount: int) -> int:
        retries = 0
        ka, kb = "a:" + a, "a:" + b
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(ka, kb)
                    ba, bb = (int(v) for v in pipe.mget(ka, kb))
                    pipe.multi()
                    pipe.set(ka, ba - amount)
                    pipe.set(kb, bb + amount)
                    pipe.execute()
                    return retries
                except self.watch_error:
                    retries += 1

    def query(self, city: str, score: int) -> list:
        keys = self.r.zrangebyscore("c:" + city, f"({score}", "+inf")
        if not keys:
            return []
        unpackb = self.unpackb
        return [unpackb(v) for v in self.r.mget(keys)]

    def total(self, accounts: int) -> int:
        return sum(int(v) for v in self.r.mget([f"a:acct{i}" for i in range(accounts)]))

    def close(self) -> None:
        self.r.close()


class Redis(Store):
    name = "Redis"
    method = "msgpack.unpackb(r.get(key)) over loopback TCP"
    query_method = "ZRANGEBYSCORE on a per-city sorted set, then MGET"

    def unavailable(self) -> str | None:
        try:
            import redis  # noqa: F401
        except ImportError as error:
            return f"the redis client is not installed ({error}); pip install '.[bench]'"
        if shutil.which("redis-server") is None:
            return "redis-server not found (apt-get install redis-server)"
        return None

    def start(self, tmp: str) -> None:
        import redis

        self.port = free_port()
        self.log = open(os.path.join(tmp, "redis.log"), "w")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                tmp,
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start (exit code {self.process.poll()})") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)

    def load(self, records: dict[str, dict]) -> None:
        import msgpack

        r = self._client()
        try:
            items = list(records.items())
            for begin in range(0, len(items), 10_000):
                pipe = r.pipeline(transaction=False)
                chunk = items[begin : begin + 10_000]
                pipe.mset({"u:" + key: msgpack.packb(value) for key, value in chunk})
                for key, value in chunk:
                    pipe.zadd("c:" + value["city"], {"u:" + key: value["score"]})
                pipe.execute()
        finally:
            r.close()

    def setup_accounts(self, accounts: int, balance: int) -> None:
        r = self._client()
        try:
            r.mset({f"a:acct{i}": balance for i in range(accounts)})
        finally:
            r.close()

    def set_mode(self, mode: str) -> None:
        r = self._client()
        try:
            r.config_set("appendfsync", "always" if mode == "durable" else "everysec")
        finally:
            r.close()

    def spec(self) -> dict:
        return {"port": self.port}

    @staticmethod
    def connect(spec: dict, mode: str) -> Client:
        return RedisClient(spec["port"])

    def info(self) -> dict:
        r = self._client()
        try:
            used = r.info("memory")["used_memory"]
        finally:
            r.close()
        return {"shared": used, "server_pid": self.process.pid, "disk": dir_bytes(self.tmp)}

    def stop(self) -> None:
        process = getattr(self, "process", None)
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # SIGTERM: redis-server shuts down cleanly
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()
