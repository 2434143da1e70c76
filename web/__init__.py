"""The Kairos service's HTTP edge: the Quart app, REST routes, WebSocket, auth, limits and the CLI."""

from __future__ import annotations


def main() -> None:
    """The `kairos` console script: the CLI, or one line saying the server extra is missing."""
    try:
        from web.cli import main as cli_main
    except ModuleNotFoundError as e:  # `pip install kairos` is the client SDK alone
        raise SystemExit(
            f"kairos: the service needs the server extra ({e.name} is missing): "
            "pip install 'kairos[server]'"
        ) from None
    cli_main()
