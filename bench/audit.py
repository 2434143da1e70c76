"""How fast the audit trail goes into PostgreSQL (events/s, as ratios to one-by-one inserts).

Real update messages (built by the domain core for chess-clock sessions: create, start, switches)
are measured three ways, each into a fresh database:
  - one by one: the same write path with one message per transaction (what batching must beat);
  - batched write: `write_batch` (COPY of the raw messages into a staging table, then
    INSERT ... SELECT ... ON CONFLICT DO NOTHING, one transaction per batch): PostgreSQL alone;
  - end to end: the outbox pre-filled in Redis, then one AuditWorker reads, decodes, writes,
    acknowledges and trims until caught up.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import redis.asyncio as aioredis

from actors.keys import Keys
from actors.outbox.audit import AuditWorker, prepare_connection, write_batch
from actors.outbox.consumer import decode_entry
from actors.outbox.migrations import migrate
from bench.report import BenchError, Report
from bench.servers import stores
from bench.target import add_store_arguments
from kairos import rules, wire
from kairos.commands import Create, ParticipantSpec, Start, Switch


def messages(count: int, sessions: int) -> list[bytes]:
    """`count` update messages spread over `sessions` two-player sessions (two switches a turn)."""
    now = 1_790_000_000_000
    out: list[bytes] = []
    states: list[Any] = []
    for _ in range(sessions):
        sid = str(uuid.uuid4())
        players = tuple(ParticipantSpec(str(uuid.uuid4()), 86_400_000) for _ in range(2))
        created = rules.apply(None, Create(session_id=sid, sync_mode="per_participant",
                                           participants=players, owner="bench"), now)
        started = rules.apply(created.state, Start(), now)
        out += [wire.update_message(r.state, r.events, now, sid) for r in (created, started)]
        states.append(started.state)
    i = 0
    while len(out) < count:
        if i == 0:  # one turn of 750 ms for every session per round
            now += 750
        r = rules.apply(states[i], Switch(), now)
        states[i] = r.state
        out.append(wire.update_message(r.state, r.events, now, r.state.session_id))
        i = (i + 1) % sessions
    return out[:count]


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _fresh_database(admin_url: str) -> str:
    name = f"kairos_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _with_database(admin_url, name)
    await migrate(url)
    return url


async def _drop_database(admin_url: str, url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    finally:
        await conn.close()


async def batched(url: str, msgs: list[bytes], batch: int) -> tuple[int, float]:
    """`write_batch` over pre-read entries, `batch` messages per transaction."""
    entries = [decode_entry(f"0-{i}", {"m": m}, parse=False) for i, m in enumerate(msgs)]
    conn = await asyncpg.connect(url)
    try:
        await prepare_connection(conn)
        stored = 0
        t = time.perf_counter()
        for i in range(0, len(entries), batch):
            stored += (await write_batch(conn, entries[i:i + batch]))[0]
        return stored, time.perf_counter() - t
    finally:
        await conn.close()


async def end_to_end(redis_url: str, url: str, msgs: list[bytes], batch: int) -> tuple[int, float]:
    client = aioredis.from_url(redis_url)
    keys = Keys(f"bench:{uuid.uuid4().hex[:8]}:")
    try:
        for i in range(0, len(msgs), 1000):
            pipe = client.pipeline(transaction=False)
            for m in msgs[i:i + 1000]:
                pipe.xadd(keys.outbox, {"m": m})
            await pipe.execute()
        worker = AuditWorker(client, keys, url, "bench", batch_size=batch, block_ms=100)
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            while True:
                lag = await worker.lag()
                if lag.pending == 0 and lag.oldest_id is None:
                    break
                await anyio.sleep(0.02)
            elapsed = time.perf_counter() - t
            tg.cancel_scope.cancel()
        return worker.stored, elapsed
    finally:
        await client.delete(keys.outbox)
        await client.aclose()


async def _run(args: argparse.Namespace, report: Report, redis_url: str, admin_url: str) -> None:
    msgs = messages(args.messages, args.sessions)
    size = sum(len(m) for m in msgs) / len(msgs)
    report.note(f"{len(msgs)} update messages over {args.sessions} sessions, {size:.0f} bytes each on average")
    steps = (
        ("one_by_one", "one message per transaction (baseline)", lambda url: batched(url, msgs[: args.row_sample], 1)),
        ("batched", f"batched write (batch {args.batch})", lambda url: batched(url, msgs, args.batch)),
        ("end_to_end", f"end to end (batch {args.batch})", lambda url: end_to_end(redis_url, url, msgs, args.batch)),
    )
    for name, label, job in steps:
        report.step(label)
        url = await _fresh_database(admin_url)
        try:
            rows, elapsed = await job(url)
        finally:
            await _drop_database(admin_url, url)
        report.value(f"{name}_events_per_s", rows / elapsed, "/s", label,
                     baseline=None if name == "one_by_one" else "one_by_one_events_per_s")


QUICK: dict[str, Any] = {"messages": 3000, "sessions": 100, "row_sample": 100}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bench audit`."""
    p.add_argument("--messages", type=int, default=50_000, help="update messages to store")
    p.add_argument("--sessions", type=int, default=500, help="sessions the messages are spread over")
    p.add_argument("--batch", type=int, default=1000, help="messages per transaction")
    p.add_argument("--row-sample", type=int, default=3000, help="messages for the one-by-one baseline")
    add_store_arguments(p)


def run(args: argparse.Namespace, report: Report) -> None:
    """Each step into a fresh database on the --database-url server (created and dropped here)."""
    if min(args.messages, args.sessions, args.batch, args.row_sample) < 1:
        raise BenchError("--messages, --sessions, --batch and --row-sample must be positive")
    with stores(args.redis_url, args.database_url) as (redis_url, admin_url):
        assert admin_url is not None
        report.redis_url, report.database_url = redis_url, admin_url
        anyio.run(_run, args, report, redis_url, admin_url)
