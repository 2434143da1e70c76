"""The general rate limit is one limit for all instances: two real `kairos serve` processes on one
Redis, one caller alternating between them, get the limit once in total (not once per instance)."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import KairosServer, server_env
from tests.web.conftest import at_a_fresh_rate_window, bearer, new_id

LIMIT = 6

pytestmark = pytest.mark.slow


def test_two_instances_allow_the_general_limit_once_in_total(
        redis_url: str, database_url: str, key_prefix: str) -> None:
    env = server_env(redis_url, database_url, key_prefix, KAIROS_RATE_LIMIT_GENERAL=str(LIMIT))
    with KairosServer(env) as a, KairosServer(env) as b, httpx.Client(timeout=10) as http:
        headers = bearer(a.token(f"caller-{new_id()}"))
        at_a_fresh_rate_window()
        answers = [http.get(f"{(a, b)[i % 2].url}/v1/sessions/{new_id()}", headers=headers)
                   for i in range(LIMIT + 2)]
    assert [r.status_code for r in answers] == [404] * LIMIT + [429, 429]
    assert [r.headers["RateLimit-Remaining"] for r in answers] == [str(LIMIT - 1 - i) for i in range(LIMIT)] + ["0", "0"]
    assert answers[-1].json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
