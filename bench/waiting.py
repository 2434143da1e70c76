"""Wait for a condition with a timeout — the one way tests and the bench harness synchronise."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import anyio

_POLL_S = 0.02  # how often a condition is re-checked; not a synchronisation delay


def wait_for(check: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    """Call `check` until it returns something truthy and return that; fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(_POLL_S)


async def eventually(check: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    """Async `wait_for`: `check` may be sync or async."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await anyio.sleep(_POLL_S)
