"""Kairos' benchmark harness: `python -m bench --help` (or the `kairos-bench` command)."""
