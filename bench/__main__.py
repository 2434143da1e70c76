"""`python -m bench SUBCOMMAND [options]`: see `bench/cli.py`."""

from bench.cli import main

if __name__ == "__main__":
    main()
