"""Clients for the failover suite: the switch loop and WebSocket watcher (shared with the failover
bench, in `bench/loops.py`), an owner lookup, and a log of a session's Redis channel (every
accepted write is published there, inside the fenced script)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx

from actors.connection import open_pubsub
from actors.keys import Keys
from bench.loops import Switcher, Watcher, create_running, wait_until  # noqa: F401 (re-exported)


async def owner_of(http: httpx.AsyncClient, url: str, sid: str, admin: dict[str, str]) -> str | None:
    """instance_id of the live owner of `sid` (admin view), None if nobody live holds it."""
    r = await http.get(f"{url}/admin/sessions/{sid}/owner", headers=admin)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    return data["instance_id"] if data["alive"] else None


def total_cycles(state: dict[str, Any]) -> int:
    return sum(p["cycle_count"] for p in state["participants"])


class ChannelLog:
    """Every update message published on some sessions' Redis channels (the fenced script
    publishes each accepted write once): versions per session, in publication order."""

    def __init__(self, redis_url: str, prefix: str, sids: list[str]) -> None:
        self.redis_url, self.keys, self.sids = redis_url, Keys(prefix), sids
        self.versions: dict[str, list[int]] = {sid: [] for sid in sids}
        self.ready = anyio.Event()

    async def run(self) -> None:
        client = open_pubsub(self.redis_url)  # a cluster too: classic PUBLISH reaches every node
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(*[self.keys.channel(s) for s in self.sids])
            self.ready.set()
            while True:
                m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if m is not None and m.get("type") == "message":
                    msg = json.loads(m["data"])
                    self.versions[msg["session_id"]].append(msg["version"])
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()
                await client.aclose()
