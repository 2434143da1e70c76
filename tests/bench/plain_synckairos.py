"""A bare SyncKairos v2 server for the compare test: in memory, no auth, no WebSocket commands,
none of Kairos' extra fields. `python tests/bench/plain_synckairos.py PORT` serves on loopback."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime
from typing import Any

from quart import Quart, request, websocket

app = Quart(__name__)
sessions: dict[str, dict[str, Any]] = {}
watchers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _publish(sid: str) -> None:
    frame = {"type": "STATE_UPDATE", "sessionId": sid, "timestamp": int(time.time() * 1000),
             "state": sessions[sid]}
    for q in watchers.get(sid, set()):
        q.put_nowait(frame)


@app.get("/health")
async def health() -> Any:
    return {"status": "ok"}


@app.post("/v1/sessions")
async def create() -> Any:
    body = await request.get_json()
    sid = body["session_id"]
    sessions[sid] = {"session_id": sid, "sync_mode": body["sync_mode"], "status": "pending",
                     "participants": [{"participant_id": p["participant_id"], "participant_index": i,
                                       "total_time_ms": p["total_time_ms"], "is_active": False}
                                      for i, p in enumerate(body["participants"])],
                     "active_participant_id": None, "cycle_started_at": None}
    return {"data": sessions[sid]}, 201


@app.post("/v1/sessions/<sid>/start")
async def start(sid: str) -> Any:
    s = sessions[sid]
    s["status"], s["cycle_started_at"] = "running", _now_iso()
    s["participants"][0]["is_active"] = True
    s["active_participant_id"] = s["participants"][0]["participant_id"]
    _publish(sid)
    return {"data": s}


@app.post("/v1/sessions/<sid>/switch")
async def switch(sid: str) -> Any:
    s = sessions[sid]
    ps = s["participants"]
    i = next(k for k, p in enumerate(ps) if p["is_active"])
    ps[i]["is_active"], ps[(i + 1) % len(ps)]["is_active"] = False, True
    s["active_participant_id"], s["cycle_started_at"] = ps[(i + 1) % len(ps)]["participant_id"], _now_iso()
    _publish(sid)
    return {"data": {"session_id": sid, "active_participant_id": s["active_participant_id"],
                     "cycle_started_at": s["cycle_started_at"], "participants": ps, "status": s["status"]}}


@app.get("/v1/sessions/<sid>")
async def get(sid: str) -> Any:
    return {"data": sessions[sid]}


@app.websocket("/ws")
async def ws() -> None:
    sid = websocket.args["sessionId"]
    q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    watchers.setdefault(sid, set()).add(q)
    try:
        await websocket.send_json({"type": "CONNECTED", "sessionId": sid, "timestamp": int(time.time() * 1000)})
        while True:  # client frames are ignored: this server has no WebSocket commands
            await websocket.send_json(await q.get())
    finally:
        watchers[sid].discard(q)


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), use_reloader=False)
