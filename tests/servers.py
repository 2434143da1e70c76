"""The test suites' `kairos serve` launcher lives in the package (`bench/servers.py`), so the bench
harness works from an installed wheel; tests import it from here as before."""

from pathlib import Path

from bench.servers import TEST_SECRET, KairosServer, free_port, make_token, server_env

REPO = Path(__file__).resolve().parent.parent  # the checkout the tests run from

__all__ = ["REPO", "TEST_SECRET", "KairosServer", "free_port", "make_token", "server_env"]
