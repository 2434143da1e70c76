"""Waiting for a condition (never a bare sleep): the helpers live in the package (`bench/waiting.py`)
so the bench harness can use them from an installed wheel."""

from bench.waiting import eventually, wait_for

__all__ = ["eventually", "wait_for"]
