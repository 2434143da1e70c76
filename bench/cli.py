"""`python -m bench` / `kairos-bench`: the benchmark harness's command line.

Each subcommand is a module `bench/NAME.py` with:

- `add_arguments(parser)`: its own options (each with a help text; defaults are shown by --help);
- `QUICK`: option values used by `--quick` (small sizes, a few seconds), for options left at
  their default;
- `check_arguments(args)` (optional): one-line `BenchError`s for bad combinations, before anything
  starts;
- `run(args, report)`: measures, recording latencies and values on the `Report` (progress goes to
  `report.step`); raises `BenchError` for a one-line failure.

Every subcommand also takes `--quick`, `--quiet`, `--json FILE` and `--plot FILE.png`. A module is
imported only when its subcommand runs, so one module's optional needs never break another.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType, ModuleType
from typing import Any, NoReturn

from bench.report import BenchError, Report, document, now_utc, plot, require_matplotlib, write_json
from bench.servers import EmbeddedMissing, stores

#: subcommand -> one-line description (the order `all` runs them in).
COMMANDS: dict[str, str] = {
    "codec": "checkpoint encode/decode CPU time, 2 and 1000 participants",
    "actor": "the actor hot path against Redis: local and forwarded ask vs a raw script call",
    "switch": "switch latency and throughput of one server over HTTP and WebSocket",
    "fanout": "WebSocket fan-out: delivery latency of one switch to many subscribers",
    "capacity": "how many live sessions and sockets one instance holds",
    "audit": "audit trail throughput into PostgreSQL",
    "failover": "failover and drain with three real `kairos serve` processes",
    "replicas": "what KAIROS_REDIS_MIN_REPLICAS_ACK=1 (WAIT) costs a fenced write, own master + replica",
    "compare": "the same switch workload against two or more SyncKairos-compatible servers, interleaved",
}


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep the module docstrings' line breaks and show every option's default."""


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line."""

    chosen: argparse.ArgumentParser | None = None  # the subcommand parser built in full

    def error(self, message: str) -> NoReturn:
        """Print `PROG: error: MESSAGE (see --help)` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--json", metavar="FILE", default=None,
                   help="write machine, parameters and results as JSON")
    g.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw latency percentile curves (needs matplotlib: the 'plot' extra)")


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            raise BenchError(f"subcommand {name!r} is not part of this version of the harness") from e
        raise


def _subparser(sub: Any, name: str) -> argparse.ArgumentParser:
    mod = _module(name)
    p = sub.add_parser(name, help=COMMANDS[name], description=mod.__doc__, formatter_class=Formatter)
    mod.add_arguments(p)
    _common(p)
    return p


def build_parser(chosen: str | None) -> Parser:
    """The parser; only the chosen subcommand's module is imported (all of them for `all`)."""
    top = Parser(prog="python -m bench", formatter_class=Formatter,
                 description="Kairos benchmark harness. Every latency is reported next to a baseline "
                             "measured in the same run (GET /health, a raw Redis round trip) and as "
                             "a ratio to it. `python -m bench SUBCOMMAND --help` lists its options.")
    sub = top.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True, parser_class=Parser)
    for name, text in COMMANDS.items():
        if name == chosen:
            top.chosen = _subparser(sub, name)
        else:
            sub.add_parser(name, help=text, add_help=False)
    p = sub.add_parser("all", help="every subcommand in turn (with --quick: a few minutes)",
                       formatter_class=Formatter,
                       description="Run every subcommand with its defaults (or --quick sizes), sharing "
                                   "one Redis and one PostgreSQL; one JSON document for all of them.")
    p.add_argument("--skip", action="append", default=[], choices=list(COMMANDS), metavar="NAME",
                   help="leave this subcommand out (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="NAME.OPTION=VALUE", dest="overrides",
                   help="an option of one subcommand, e.g. switch.n=100 or failover.ttl-ms=1000 "
                        "(repeatable; wins over --quick)")
    from bench.target import add_store_arguments

    add_store_arguments(p)
    _common(p)
    return top


def _apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, quick: dict[str, Any]) -> None:
    for dest, value in quick.items():
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The options as run, without secrets (tokens; passwords inside URLs)."""
    return {k: _redact(v) for k, v in vars(args).items() if k != "command" and not k.startswith("token")}


def _redact(value: Any) -> Any:
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def run_one(name: str, args: argparse.Namespace) -> Report:
    """Run subcommand `name` with parsed `args`; the report (its `error` set if it failed)."""
    report = Report(name, _params(args), quiet=args.quiet)
    try:
        _module(name).run(args, report)
    except (BenchError, EmbeddedMissing) as e:
        report.error = str(e)
    finally:
        report.elapsed_s = time.monotonic() - report.started
    return report


def _finish(command: str, args: argparse.Namespace, reports: list[Report], started_at: Any,
            t0: float) -> int:
    for r in reports:
        print(r.table(), flush=True)
    if args.json:
        write_json(args.json, document(command, _params(args), reports, started_at, time.monotonic() - t0))
    if args.plot:
        plot(args.plot, reports, f"kairos bench {command}")
    failed = [r for r in reports if r.error]
    for r in failed:
        print(f"python -m bench {r.command}: error: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _override(p: argparse.ArgumentParser, args: argparse.Namespace, option: str, value: str) -> None:
    """Set `--option` of parser `p` on `args` from its text form, as the command line would."""
    action = next((a for a in p._actions if f"--{option}" in a.option_strings
                   or f"-{option}" in a.option_strings), None)
    if action is None or action.dest in ("help", "json", "plot", "quick", "quiet"):
        raise BenchError(f"--set: {p.prog} has no option --{option}")
    if action.nargs == 0:  # a flag
        setattr(args, action.dest, value.lower() in ("1", "true", "yes", "on"))
        return
    try:
        setattr(args, action.dest, action.type(value) if callable(action.type) else value)
    except ValueError as e:
        raise BenchError(f"--set {option}={value}: {e}") from e


def _run_all(args: argparse.Namespace) -> list[Report]:

    plans = []
    overrides: dict[str, list[tuple[str, str]]] = {}
    for item in args.overrides:
        name, dot, rest = item.partition(".")
        option, eq, value = rest.partition("=")
        if not dot or not eq or name not in COMMANDS:
            raise BenchError(f"--set {item!r}: expected NAME.OPTION=VALUE with NAME one of {', '.join(COMMANDS)}")
        overrides.setdefault(name, []).append((option, value))
    for name in COMMANDS:  # every option checked before anything runs
        if name in args.skip:
            continue
        try:
            mod = _module(name)
        except BenchError as e:  # a subcommand this version does not ship
            print(f"python -m bench all: skipping {name}: {e}", file=sys.stderr)
            continue
        p = Parser(prog=f"python -m bench {name}")
        mod.add_arguments(p)
        _common(p)
        sub_args = p.parse_args([])
        sub_args.quiet = args.quiet
        if args.quick:
            _apply_quick(p, sub_args, getattr(mod, "QUICK", {}))
        for option, value in overrides.get(name, []):
            _override(p, sub_args, option, value)
        check = getattr(mod, "check_arguments", None)
        if check is not None:
            check(sub_args)
        plans.append((name, sub_args))
    reports = []
    needs_db = any(n not in ("codec", "actor") for n, _ in plans)
    with stores(args.redis_url, args.database_url, database=needs_db) as (redis_url, database_url):
        for name, sub_args in plans:
            for dest, value in (("redis_url", redis_url), ("database_url", database_url)):
                if hasattr(sub_args, dest) and getattr(sub_args, dest) is None:
                    setattr(sub_args, dest, value)
            reports.append(run_one(name, sub_args))
    return reports


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every server started here is stopped


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m bench` and the `kairos-bench` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        parser = build_parser(chosen if chosen in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.plot:
            require_matplotlib()
        started_at, t0 = now_utc(), time.monotonic()
        if args.command == "all":
            reports = _run_all(args)
        else:
            mod = _module(args.command)
            if args.quick and parser.chosen is not None:
                _apply_quick(parser.chosen, args, getattr(mod, "QUICK", {}))
            check = getattr(mod, "check_arguments", None)
            if check is not None:
                check(args)
            reports = [run_one(args.command, args)]
        code = _finish(args.command, args, reports, started_at, t0)
    except (BenchError, EmbeddedMissing) as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("python -m bench: interrupted; servers started here were stopped", file=sys.stderr)
        code = 130
    raise SystemExit(code)
