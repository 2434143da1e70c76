"""The `kairos` command: `serve [--workers N]`, `token --sub S`, `drain [--url U]`, `migrate`.

A bad setting or a refused start prints one line per problem and exits 2 before anything binds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import anyio
import structlog

from web.logging import configure_logging, set_instance
from web.settings import Settings, SettingsError, load

log = structlog.get_logger("kairos.cli")

ROLES = ("admin",)  # the roles web.auth grants anything to


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kairos` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load()
    except SettingsError as e:
        _refuse(str(e))
    configure_logging(settings.log_level, settings.log_format)
    if args.cmd == "serve":
        serve(settings, args.workers or settings.workers, args.fd)
    elif args.cmd == "token":
        from web.auth import mint_token

        _no_generated_secret_in_production(settings)
        print(mint_token(settings, args.sub, args.role, args.ttl))
    elif args.cmd == "drain":
        if args.token is None:
            _no_generated_secret_in_production(settings)
        raise SystemExit(drain(settings, args.url, args.token))
    elif args.cmd == "migrate":
        migrate(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kairos", description="Kairos timer service. Settings come from KAIROS_* environment "
        "variables (docs/configuration.md).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="run the HTTP + WebSocket service",
                       description="Run the service; embedded Redis/PostgreSQL when their URLs are unset.")
    p.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="instance processes sharing this port and Redis (default: KAIROS_WORKERS, 1)")
    p.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)  # worker: inherited socket
    p = sub.add_parser("token", help="mint a JWT with the configured secret (local use)",
                       description="Print a token signed with KAIROS_JWT_SECRET or the local secret.")
    p.add_argument("--sub", required=True, help="the caller's identity (the token's `sub` claim)")
    p.add_argument("--role", default=None, choices=ROLES, help="grant a role (admin: the /admin routes)")
    p.add_argument("--ttl", type=_positive, default=3600, metavar="SECONDS",
                   help="lifetime in seconds (default 3600)")
    p = sub.add_parser("drain", help="ask an instance to drain (POST /admin/drain)",
                       description="Drain an instance: hand its sessions off (a lone instance exits).")
    p.add_argument("--url", default=None, help="instance base URL (default: http://127.0.0.1:KAIROS_PORT)")
    p.add_argument("--token", default=None, help="admin token (default: mint one with the local secret)")
    sub.add_parser("migrate", help="apply pending audit database migrations",
                   description="Apply pending PostgreSQL migrations (embedded PostgreSQL when "
                   "KAIROS_DATABASE_URL is unset).")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("kairos")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _no_generated_secret_in_production(settings: Settings) -> None:
    """A token signed with a freshly generated local secret would be rejected by every instance."""
    if settings.env == "production" and settings.auth_enabled and not settings.jwt_secret:
        _refuse("KAIROS_ENV=production: set KAIROS_JWT_SECRET (or JWT_SECRET) to mint a token")


def _refuse(message: str) -> NoReturn:
    """Stop before binding anything: the message on stderr, no traceback, status 2."""
    for line in message.splitlines():
        print(f"kairos: {line}", file=sys.stderr)
    raise SystemExit(2)


def serve(settings: Settings, workers: int, fd: int | None = None) -> None:
    """Run one instance here, or `workers` instance processes sharing one listening socket."""
    from web import embedded
    from web.auth import local_secret

    problems = settings.production_problems()
    if problems:
        _refuse("KAIROS_ENV=production refuses embedded servers and a generated secret (a "
                "container's files are lost on redeploy): " + "; ".join(problems))
    log.info("configuration", env=settings.env, sources=settings.sources(), data_dir=settings.data_dir,
             redis=_redact(settings.redis_url), database=_redact(settings.database_url))
    if settings.auth_enabled and not settings.jwt_public_key:
        local_secret(settings)  # create the local secret once, before workers race for it
    try:
        with embedded.servers(settings) as resolved:
            if workers <= 1:
                run_instance(resolved, fd)
            else:
                run_workers(resolved, workers)
    except embedded.Refused as e:
        _refuse(str(e))


def _redact(url: str | None) -> str | None:
    """A URL without its password (for the log)."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


# Listen backlog: Hypercorn's 100 overflowed under a burst of WebSocket connects (1,000 at once),
# and every dropped SYN costs its client a 1 s retransmit. The kernel caps it at somaxconn.
_BACKLOG = 4096


def raise_file_limit() -> None:
    """Raise RLIMIT_NOFILE to its hard limit: every WebSocket is a file descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit", soft=soft, hard=hard, error=str(e))
            return
    log.info("open-file limit", limit=hard, was=soft)


def run_instance(settings: Settings, fd: int | None = None) -> None:
    """One instance in this process (uvloop when available)."""
    raise_file_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(settings, fd))


async def _serve(settings: Settings, fd: int | None) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from web import hygiene, hypercorn_ws
    from web.app import create_app

    hygiene.patch_hypercorn()
    app = create_app(settings)
    hypercorn_ws.apply(app.extensions["kairos.ws"])  # /ws over HTTP/1.1 served without ASGI
    svc = app.extensions["kairos"]
    set_instance(svc.instance_id)
    config = Config()
    config.bind = [f"fd://{fd}"] if fd is not None else [f"{settings.host}:{settings.port}"]
    config.backlog = _BACKLOG
    config.websocket_ping_interval = settings.ws_heartbeat_s
    config.websocket_max_message_size = settings.ws_max_frame_bytes
    config.accesslog = None  # our own access log (which skips health and metrics)
    config.errorlog = logging.getLogger("hypercorn.error")  # a logger object: our handler, no other
    config.loglevel = settings.log_level.upper()
    config.graceful_timeout = max(1.0, settings.drain_timeout_s)
    config.keep_alive_timeout = 75
    config.keep_alive_max_requests = 100_000  # Hypercorn's 1000 makes busy clients reconnect
    stop = anyio.Event()
    svc.stop = stop.set  # a drain with nobody to hand sessions to ends the process

    listening = anyio.CancelScope()

    async def on_signals() -> None:
        with listening, anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal received: draining, then stopping", signal=signum)
                with anyio.move_on_after(settings.drain_timeout_s + 2):
                    await svc.drain()
                stop.set()
                return  # default handlers are back: a second signal stops us hard

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        # Returns once `stop` is set and the lifespan (background tasks) has ended.
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        # A drain stopped us, not a signal: stop listening. (Only this scope: cancelling the
        # task group's trips over Hypercorn's own asyncio TaskGroup.)
        listening.cancel()
    log.info("http server stopped")


def run_workers(settings: Settings, workers: int) -> None:
    """N instance processes, each on its own listening socket of one port (SO_REUSEPORT: the
    kernel spreads connections evenly; with one shared socket the split was ~65/35);
    SIGTERM/SIGINT go to each."""
    socks = [socket.create_server((settings.host, settings.port), reuse_port=True, backlog=_BACKLOG)
             for _ in range(workers)]
    env = {**os.environ}
    env.update({"KAIROS_REDIS_URL": settings.redis_url or "", "KAIROS_DATABASE_URL": settings.database_url or "",
                "KAIROS_DATA_DIR": settings.data_dir})
    procs: list[subprocess.Popen[bytes]] = []
    for i, sock in enumerate(socks):
        sock.set_inheritable(True)
        wenv = dict(env)
        if settings.instance_id:
            wenv["KAIROS_INSTANCE_ID"] = f"{settings.instance_id}-{i}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "web.cli", "serve", "--workers", "1", "--fd", str(sock.fileno())],
            pass_fds=(sock.fileno(),), env=wenv,
        ))
    log.info("started workers", workers=workers, pids=[p.pid for p in procs])

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.wait()
    for sock in socks:
        sock.close()


def drain(settings: Settings, url: str | None, token: str | None) -> int:
    """POST /admin/drain to an instance; returns a process exit status."""
    import httpx

    from web.auth import mint_token

    base = url or f"http://127.0.0.1:{settings.port}"
    if token is None and settings.auth_enabled and not settings.jwt_public_key:
        token = mint_token(settings, "kairos-cli", "admin", 300)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = httpx.post(f"{base.rstrip('/')}/admin/drain", headers=headers, timeout=30)
    print(resp.status_code, resp.text)
    return 0 if resp.status_code == 202 else 1


def migrate(settings: Settings) -> None:
    """Apply audit migrations (embedded PostgreSQL when KAIROS_DATABASE_URL is unset)."""
    from actors.outbox.migrations import migrate as run_migrations
    from web import embedded

    with embedded.servers(settings.model_copy(update={"redis_url": settings.redis_url or "unused"})) as s:
        applied = asyncio.run(run_migrations(s.database_url or ""))
        print("applied:", ", ".join(applied) if applied else "nothing (up to date)")


if __name__ == "__main__":
    main()
