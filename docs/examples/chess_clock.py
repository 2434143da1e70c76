"""A two-player chess clock in the terminal, on the Kairos Python SDK.

    pip install kairos                      # the client alone
    export KAIROS_TOKEN=$(kairos token --sub alice)   # on the server's machine (or any JWT)
    python docs/examples/chess_clock.py --url http://localhost:3000

Press Enter to end the current player's turn, `p` + Enter to pause or resume, `q` + Enter to
quit (the game is cancelled). The remaining times tick live: they are computed from the last
state the server sent and the server's clock, measured with PING/PONG (clock sync), so every
device watching the same session shows the same times. `--moves N` plays N moves by itself
(one every `--move-ms`) and exits: a demo, and what the test suite runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

import anyio

from kairos.client import ConnectionState, KairosClient, Subscription
from kairos.results import SessionState


def chess_game(minutes: float, increment_s: float) -> dict:
    """A CreateSession body: two players, `minutes` each, Fischer increment."""
    bank = int(minutes * 60_000)
    return {
        "session_id": str(uuid.uuid4()),
        "sync_mode": "per_participant",
        "participants": [{"participant_id": str(uuid.uuid4()), "total_time_ms": bank}
                         for _ in range(2)],
        "total_time_ms": 2 * bank,
        "increment_ms": int(increment_s * 1000),
        "time_warning_ms": 10_000,
    }


def clock_face(ms: float) -> str:
    """`m:ss.t` for a remaining time."""
    tenths = int(max(0.0, ms) // 100)
    return f"{tenths // 600}:{tenths // 10 % 60:02d}.{tenths % 10}"


def line(state: SessionState, server_now: float, names: dict[str, str]) -> str:
    """One status line: both clocks, who is to move, the status."""
    parts = []
    for p in state.participants:
        mark = ">" if p.is_active else " "
        parts.append(f"{mark}{names[p.participant_id]} {clock_face(state.remaining_ms(p.participant_id, server_now))}")
    return f"{'  '.join(parts)}   [{state.status}, v{state.version}]"


class Game:
    """The live state of one game, kept current from the subscription's frames."""

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.connection = "connecting"
        self.ended = anyio.Event()
        self._changed = anyio.Event()

    def apply(self, state: SessionState | None) -> None:
        """Keep the newest state (versions only grow)."""
        if state is not None and state.version >= self.state.version:
            self.state = state
            self._changed.set()
            self._changed = anyio.Event()
            if state.status in ("expired", "completed", "cancelled"):
                self.ended.set()

    async def at_version(self, version: int) -> None:
        """Wait until the state of `version` (or a newer one) has arrived."""
        while self.state.version < version:
            await self._changed.wait()

    def on_connection(self, change: ConnectionState) -> None:
        """Show reconnects in the status line."""
        self.connection = change.state


async def follow(sub: Subscription, game: Game) -> None:
    """Apply every state the server sends (STATE_SYNC after each (re)connect, then updates)."""
    async for frame in sub:
        game.apply(frame.state)
        if frame.type in ("SESSION_DELETED", "CLOSED"):
            game.ended.set()
            return


async def draw(kc: KairosClient, game: Game, names: dict[str, str], interactive: bool) -> None:
    """Redraw the clocks ten times a second."""
    while not game.ended.is_set():
        text = line(game.state, kc.server_now(), names)
        if game.connection != "connected":
            text += f" ({game.connection})"
        if interactive:
            print(f"\r{text}   ", end="", flush=True)
        await anyio.sleep(0.1)


async def keyboard(sub: Subscription, game: Game) -> None:
    """Enter: switch; p: pause/resume; q: quit (cancel)."""
    while not game.ended.is_set():
        raw = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        key = raw.strip()
        if key == "q" or not raw:  # q, or the end of the input
            game.apply(await sub.cancel())
        elif key == "p":
            game.apply(await sub.command("RESUME" if game.state.status == "paused" else "PAUSE"))
        else:
            await sub.switch(expected_active_participant_id=game.state.active_participant_id)


async def demo(sub: Subscription, game: Game, moves: int, move_ms: int,
               names: dict[str, str], kc: KairosClient) -> None:
    """Play `moves` moves by itself, printing the clocks after each, then complete the game."""
    for _ in range(moves):
        await anyio.sleep(move_ms / 1000)
        result = await sub.switch(expected_active_participant_id=game.state.active_participant_id)
        with anyio.fail_after(5):  # the STATE_UPDATE of this move, which every device gets
            await game.at_version(result.version)
        print(f"move {result.version - 2}: " + line(game.state, kc.server_now(), names))
    game.apply(await sub.command("COMPLETE"))


async def main(argv: list[str] | None = None) -> int:
    """Create a game, subscribe, sync the clock, start, then play (by keyboard or `--moves`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("KAIROS_URL", "http://localhost:3000"))
    ap.add_argument("--token", default=os.environ.get("KAIROS_TOKEN"))
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--increment", type=float, default=3, help="seconds added after each move")
    ap.add_argument("--moves", type=int, default=0, help="play this many moves by itself, then stop")
    ap.add_argument("--move-ms", type=int, default=300)
    args = ap.parse_args(argv)

    async with KairosClient(args.url, args.token) as kc:
        print(f"server {(await kc.time()).implementation} at {args.url}")
        state = await kc.create_session(chess_game(args.minutes, args.increment))
        names = dict(zip([p.participant_id for p in state.participants], ["White", "Black"],
                         strict=True))
        game = Game(state)
        async with kc.subscribe(state.session_id, on_state=game.on_connection) as sub:
            sample = await sub.sync_clock()
            print(f"clock offset {sample.offset_ms:+.1f} ms (round trip {sample.delay_ms:.1f} ms)")
            game.apply(await sub.command("START"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, sub, game)
                tg.start_soon(draw, kc, game, names, args.moves == 0)
                if args.moves:
                    await demo(sub, game, args.moves, args.move_ms, names, kc)
                else:
                    print("Enter: end your turn   p: pause/resume   q: quit")
                    tg.start_soon(keyboard, sub, game)
                await game.ended.wait()
                tg.cancel_scope.cancel()
        print(f"\ngame over: {game.state.status}, " + line(game.state, kc.server_now(), names))
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
