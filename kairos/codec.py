"""Checkpoint codec: Session <-> compact bytes, exact round trip."""

from __future__ import annotations

from kairos.session import Session


def encode(state: Session) -> bytes:
    raise NotImplementedError


def decode(data: bytes) -> Session:
    raise NotImplementedError
