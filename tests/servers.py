"""The test suites' `kairos serve` launcher lives in the package (`bench/servers.py`), so the bench
harness works from an installed wheel; tests import it from here as before."""

from bench.servers import TEST_SECRET, KairosServer, free_port, make_token, server_env

__all__ = ["TEST_SECRET", "KairosServer", "free_port", "make_token", "server_env"]
