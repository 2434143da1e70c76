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


def test_survivors_of_a_costly_full_collection_are_frozen(installed: None) -> None:
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


def test_frozen_objects_are_exported() -> None:
    from prometheus_client import REGISTRY

    from web import metrics  # noqa: F401 - registers the gauge

    assert REGISTRY.get_sample_value("kairos_gc_frozen_objects") == gc.get_freeze_count()
