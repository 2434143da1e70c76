"""Keep the cyclic GC's full collections short with 100k sessions in memory.

Every command replaces its session's state with new objects, which the young collections promote
to the oldest generation; a full collection then walks all of them: ~110 ms for 100,000 session
states here, during which no timer fires and no request is answered. Start-up, bulk activation
and socket joins already `gc.freeze()` what they create; on top of that, after a full collection
that cost more than `FREEZE_AFTER_CPU_S` of CPU, what survived it is frozen too, so the next full
collection only walks what was allocated since. Garbage that is frozen is never collected when it
forms a cycle later (acyclic garbage is freed by reference counting as usual); only expensive
collections freeze, so that stays rare.
"""

from __future__ import annotations

import gc
import time
from typing import Any

# CPU (not wall) time, so a collection that was merely preempted on a busy machine does not count.
FREEZE_AFTER_CPU_S = 0.005
_started = [0.0]  # CPU time at the start of the running full collection


def _freeze_after_costly_full_collections(phase: str, info: dict[str, Any]) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        _started[0] = time.process_time()
    elif time.process_time() - _started[0] > FREEZE_AFTER_CPU_S:
        gc.freeze()  # the young generations are empty now: only survivors of the collection move


def install() -> None:
    """Freeze what survives a costly full collection (once per process)."""
    if _freeze_after_costly_full_collections not in gc.callbacks:
        gc.callbacks.append(_freeze_after_costly_full_collections)


def uninstall() -> None:
    """Undo `install` (tests)."""
    if _freeze_after_costly_full_collections in gc.callbacks:
        gc.callbacks.remove(_freeze_after_costly_full_collections)
