"""The GC policy: what survives a costly full collection is frozen, a cheap one freezes nothing."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace

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


def test_the_frozen_set_is_reclaimed_once_collections_froze_more_than_it_held(monkeypatch: pytest.MonkeyPatch) -> None:
    # the policy alone, with an injected CPU clock: real collections' CPU varies with the cache
    calls: list[str] = []
    cpu = [0.0]
    monkeypatch.setattr(gctune, "gc", SimpleNamespace(freeze=lambda: calls.append("freeze"),
                                                      unfreeze=lambda: calls.append("unfreeze")))
    monkeypatch.setattr(gctune, "_cpu", lambda: cpu[0])
    monkeypatch.setattr(gctune, "_baseline", [0.0])
    monkeypatch.setattr(gctune, "_grown", [0.0])

    def collection(cpu_s: float, generation: int = 2) -> None:
        gctune._freeze_after_costly_full_collections("start", {"generation": generation})
        cpu[0] += cpu_s
        gctune._freeze_after_costly_full_collections("stop", {"generation": generation})

    collection(0.002)  # cheap: nothing frozen
    collection(0.5, generation=1)  # young collections are never frozen
    assert calls == []
    collection(0.100)  # costly: frozen, and its CPU is the baseline
    assert calls == ["freeze"] and gctune._baseline[0] == pytest.approx(0.100)
    collection(0.060)
    collection(0.030)  # frozen: 0.090 of growth so far, under the baseline
    assert calls == ["freeze"] * 3
    collection(0.020)  # past RECLAIM_GROWTH x: unfrozen, the next costly one sets the baseline again
    assert calls == ["freeze"] * 4 + ["unfreeze"] and gctune._baseline[0] == 0
    collection(0.300)  # walks everything once
    assert calls[-1] == "freeze" and gctune._baseline[0] == pytest.approx(0.300)


def test_unfrozen_cyclic_garbage_is_collected_by_the_next_full_collection() -> None:
    import weakref

    cycle = _Cycle()
    alive = weakref.ref(cycle)
    gc.collect()
    gc.freeze()
    del cycle
    gc.collect()
    assert alive() is not None  # frozen cyclic garbage: out of the collector's reach
    gc.unfreeze()
    gc.collect()
    assert alive() is None


class _Cycle:
    """An object in a reference cycle: only the cyclic GC can free it."""

    def __init__(self) -> None:
        self.me = self
