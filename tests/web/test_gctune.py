"""The GC policy: what survives a costly full collection is frozen, a cheap one freezes nothing."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from web import gctune


@pytest.fixture
def installed() -> Iterator[None]:
    gctune.install()
    try:
        yield
    finally:
        gctune.uninstall()


def test_survivors_of_a_costly_full_collection_are_frozen(installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gctune, "RECLAIM_GROWTH", float("inf"))  # no reclaim in this one
    gc.collect()
    before = gc.get_freeze_count()
    gc.collect()  # nothing new since: a cheap collection
    assert gc.get_freeze_count() <= before
    gc.disable()  # one full collection at the end, over all of them (no automatic one meanwhile)
    try:
        states = [[i] for i in range(500_000)]  # long-lived objects, as switched sessions' new states
    finally:
        gc.enable()
    gc.collect()  # walks half a million objects: tens of ms of CPU, far above the threshold
    assert gc.get_freeze_count() >= before + len(states)
    del states  # frozen, yet acyclic: freed by reference counting as usual


def test_install_is_idempotent_and_uninstall_removes_it() -> None:
    gctune.install()
    gctune.install()
    try:
        assert sum(cb is gctune._freeze_after_costly_full_collections for cb in gc.callbacks) == 1
    finally:
        gctune.uninstall()
    assert gctune._freeze_after_costly_full_collections not in gc.callbacks


class _Cycle:
    """An object in a reference cycle: only the cyclic GC can free it."""

    def __init__(self) -> None:
        self.me = self


def _long_lived(n: int) -> list[list[int]]:
    gc.disable()  # no automatic collection while they are made: the next full one walks them all
    try:
        return [[i] for i in range(n)]
    finally:
        gc.enable()


def test_frozen_cyclic_garbage_is_reclaimed_once_the_frozen_set_has_grown(installed: None) -> None:
    import weakref

    gc.unfreeze()
    gctune._baseline[0] = 0.0
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    states = _long_lived(300_000)
    gc.collect()  # costly: the survivors, the cycle among them, are frozen; its CPU is the baseline
    assert gctune._baseline[0] > gctune.FREEZE_AFTER_CPU_S
    walked = gc.get_freeze_count()  # everything the baseline collection walked
    assert walked >= len(states)
    del cycle
    gc.collect()
    assert alive() is not None  # frozen cyclic garbage: out of the collector's reach
    # growth is judged by CPU per object walked, which varies ~3x with memory locality (these new
    # objects are contiguous, the baseline's were scattered): well past RECLAIM_GROWTH x the baseline
    more = _long_lived(int(4 * walked * gctune.RECLAIM_GROWTH))
    gc.collect()  # costly, and the frozen set has more than doubled: unfrozen
    assert gc.get_freeze_count() == 0
    gc.collect()  # walks everything once
    assert alive() is None
    assert gc.get_freeze_count() >= len(states) + len(more)  # survivors frozen again
