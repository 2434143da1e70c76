"""Keep the cyclic GC's full collections short with 100k sessions in memory.

Every command replaces its session's state with new objects, which the young collections promote
to the oldest generation; a full collection then walks all of them: ~110 ms for 100,000 session
states here, during which no timer fires and no request is answered. Start-up, bulk activation
and socket joins already `gc.freeze()` what they create; on top of that, after a full collection
that cost more than `FREEZE_AFTER_CPU_S` of CPU, what survived it is frozen too, so the next full
collection only walks what was allocated since.

Frozen objects that later become cyclic garbage (an ended session's task and its frames) are not
collected while frozen (acyclic garbage is freed by reference counting as usual). So that this
stays bounded, once the frozen set has grown by `RECLAIM_GROWTH` since the last reclaim, the next
costly collection unfreezes instead of freezing: the one after it walks everything once, frees
that garbage, and freezes the survivors again. One long collection per doubling of the frozen
set: its cost is spread over the churn that caused it.

The frozen set is never counted: `gc.get_freeze_count()` walks it (tens of ms at 100k sessions,
with the loop standing still). A collection's CPU is proportional to the objects it walked, which
are the ones it then freezes, so the CPU of the costly collections since the last reclaim,
against the CPU of the collection that walked everything then, measures the growth (CPU per
object varies up to ~3x with memory locality: the reclaim comes somewhere past 1.5-6x).
"""

from __future__ import annotations

import gc
import time
from typing import Any

# CPU (not wall) time, so a collection that was merely preempted on a busy machine does not count.
FREEZE_AFTER_CPU_S = 0.005
RECLAIM_GROWTH = 2.0  # frozen set, as a multiple of its size after the last reclaim
_cpu = time.process_time
_started = [0.0]  # CPU time at the start of the running full collection
# CPU of the collection that walked everything after the last reclaim (before the first: of the
# first costly one, which walked all but the start-up freeze); 0 = the next costly one sets it.
_baseline = [0.0]
_grown = [0.0]  # CPU of the costly collections since, each the cost of the survivors it froze


def _freeze_after_costly_full_collections(phase: str, info: dict[str, Any]) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        _started[0] = _cpu()
        return
    cpu = _cpu() - _started[0]
    if cpu <= FREEZE_AFTER_CPU_S:
        return
    gc.freeze()  # the young generations are empty now: only survivors of the collection move
    if not _baseline[0]:
        _baseline[0], _grown[0] = cpu, 0.0
        return
    _grown[0] += cpu
    if _grown[0] > (RECLAIM_GROWTH - 1) * _baseline[0]:
        gc.unfreeze()  # the next full collection walks (and frees) what was frozen
        _baseline[0] = 0.0


def install() -> None:
    """Freeze what survives a costly full collection (once per process)."""
    if _freeze_after_costly_full_collections not in gc.callbacks:
        gc.callbacks.append(_freeze_after_costly_full_collections)


def uninstall() -> None:
    """Undo `install` (tests)."""
    if _freeze_after_costly_full_collections in gc.callbacks:
        gc.callbacks.remove(_freeze_after_costly_full_collections)
