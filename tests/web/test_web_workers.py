"""`kairos serve --workers N`: N full instances on one port, sharing Redis."""

from __future__ import annotations

import httpx

from tests.servers import KairosServer, server_env
from tests.web.conftest import bearer, wait_for


def test_workers_are_separate_instances_on_one_port(redis_url: str, database_url: str, key_prefix: str) -> None:
    env = server_env(redis_url, database_url, key_prefix)
    with KairosServer(env, workers=2) as srv, httpx.Client(base_url=srv.url) as http:
        srv.wait_ready()
        admin = bearer(srv.token("root", "admin"))

        def both_listed() -> set[str] | None:
            ids = {i["instance_id"] for i in http.get("/admin/instances", headers=admin).json()["data"]}
            return ids if ids == {f"{env_id}-0", f"{env_id}-1"} else None

        env_id = srv.env["KAIROS_INSTANCE_ID"]
        assert wait_for(both_listed) == {f"{env_id}-0", f"{env_id}-1"}
        assert srv.stop() == 0  # SIGTERM reaches every worker and all exit cleanly
