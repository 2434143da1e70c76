"""`python -m bench all --quick` end to end at tiny sizes (real servers, real processes), and
`python -m bench switch --quick` from the wheel installed into a fresh virtualenv without tests/."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from bench.cli import COMMANDS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["codec.rounds=50", "actor.n=50", "switch.n=50", "switch.seconds=0.5", "audit.messages=300",
        "audit.row-sample=50", "failover.ttl-ms=1000", "failover.sessions=20", "failover.loops=4",
        "compare.rounds=2", "compare.n=20", "compare.seconds=0.3", "compare.subscribers=3",
        "fanout.switches=3", "fanout.sockets=10", "fanout.clients=1", "capacity.sessions=50",
        "capacity.expiring=3", "capacity.sample=5"]
LATENCY_KEYS = {"label", "unit", "count", "p50", "p90", "p99", "p99_9", "max", "mean", "baseline",
                "ratio_p50", "ratio_p99"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIROS_")}
    return env | {"PYTHONUNBUFFERED": "1"}


def _bench(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the harness; past `timeout` stop it with SIGTERM (it then stops the servers it started,
    which a SIGKILL would orphan) and fail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{' '.join(cmd[1:4])} still running after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tiny_sets() -> list[str]:
    shipped = {n for n in COMMANDS if (REPO / "bench" / f"{n}.py").exists()}
    return [a for s in TINY if s.split(".")[0] in shipped for a in ("--set", s)]


@pytest.mark.timeout(330)  # ten `kairos serve` starts, each a few seconds on a loaded 2-core box
def test_all_quick_runs_every_subcommand_and_writes_the_documented_json(
        tmp_path: Path, redis_url: str, database_url: str) -> None:
    out_json, out_png = tmp_path / "all.json", tmp_path / "all.png"
    try:
        import matplotlib  # noqa: F401
        plot = ["--plot", str(out_png)]
    except ImportError:
        print("matplotlib is not installed: the plot is not checked")
        plot = []
    cmd = [sys.executable, "-m", "bench", "all", "--quick", *_tiny_sets(), "--redis-url", redis_url,
           "--database-url", database_url, "--json", str(out_json), *plot]
    done = _bench(cmd, cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == "kairos-bench/1" and doc["command"] == "all"
    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["python"].startswith("3.")
    assert machine["redis"] and machine["postgresql"] and machine["kairos"]
    assert set(doc["runs"]) == {n for n in COMMANDS if (REPO / "bench" / f"{n}.py").exists()}
    for name, run in doc["runs"].items():
        assert run["error"] is None, (name, run["error"])
        assert run["latencies"] or run["values"], name
        for key, lat in run["latencies"].items():
            assert LATENCY_KEYS <= lat.keys(), (name, key)
            assert lat["count"] > 0, (name, key)
            if lat["baseline"] is not None:  # every ratio names a baseline of the same run
                assert lat["baseline"] in run["latencies"], (name, key)
                if run["latencies"][lat["baseline"]]["p50"]:  # (a zero baseline has no ratio)
                    assert lat["ratio_p50"] is not None and lat["ratio_p50"] >= 0, (name, key)
        # the table on stdout shows each run
        assert f"== {name}" in done.stdout
    switch = doc["runs"]["switch"]["latencies"]
    assert switch["switch"]["baseline"] == "health" and switch["redis_ping"]["count"] > 0
    # WebSocket SWITCH under concurrency: CPU per command next to REST's
    assert switch["ws_switch_concurrent"]["count"] > 0
    cpu = doc["runs"]["switch"]["values"]
    assert cpu["server_cpu_ms_per_ws_switch"]["value"] > 0 and cpu["server_cpu_ms_per_switch"]["value"] > 0
    # capacity: loop lag, GC pauses and preemptions per phase; fanout: the client processes' loop lag
    assert any("loaded phase: loop lag" in n and "load average" in n for n in doc["runs"]["capacity"]["notes"])
    assert any(k.endswith("client_lag_max_ms") for k in doc["runs"]["fanout"]["values"])
    if plot:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(420)  # building the wheel, installing it, then the run (each bounded below)
def test_switch_quick_runs_from_the_installed_wheel_without_the_tests_package(
        tmp_path: Path, redis_url: str, database_url: str) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=180)
    (wheel,) = wheels.glob("kairos-*.whl")
    # A fresh venv holding only the wheel; the dependencies come from this venv's site-packages by
    # a path entry (its .pth files, including the editable install of the repo, are not run).
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    py = target / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    Path(site, "_kairos_deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=180)
    where = tmp_path / "elsewhere"
    where.mkdir()
    probe = subprocess.run([str(py), "-c", "import bench, web; print(bench.__file__, web.__file__)\n"
                            "import importlib.util as u; print(u.find_spec('tests'))"],
                           cwd=where, env=_env(), check=True, capture_output=True, text=True).stdout
    assert probe.count(site) == 2 and probe.strip().endswith("None"), probe
    done = _bench([str(py), "-m", "bench", "switch", "--quick", "--quiet", "-n", "50", "--seconds", "0.5",
                           "--redis-url", redis_url, "--database-url", database_url,
                           "--json", str(tmp_path / "switch.json")],
                  cwd=where, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== switch" in done.stdout
    run = json.loads((tmp_path / "switch.json").read_text())["runs"]["switch"]
    assert run["error"] is None and run["latencies"]["switch"]["count"] == 50


@pytest.mark.timeout(240)
def test_compare_runs_against_a_plain_synckairos_server_without_auth_or_ws_commands(
        tmp_path: Path, redis_url: str, database_url: str) -> None:
    from bench.servers import free_port
    from tests.waiting import wait_for

    port = free_port()
    plain = subprocess.Popen([sys.executable, str(REPO / "tests" / "bench" / "plain_synckairos.py"), str(port)],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "the plain server")
        out = tmp_path / "compare.json"
        done = _bench([sys.executable, "-m", "bench", "compare", "--quiet", "--url", f"http://127.0.0.1:{port}",
                               "--no-auth-A", "--pid-A", str(plain.pid), "--rounds", "2", "-n", "40",
                               "--seconds", "0.4", "--subscribers", "3", "--switches", "6",
                               "--redis-url", redis_url, "--database-url", database_url, "--json", str(out)],
                      cwd=REPO, timeout=150)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        plain.kill()
        plain.wait(10)
    run = json.loads(out.read_text())["runs"]["compare"]
    assert run["error"] is None
    for x in ("A", "B"):
        for name in ("health", "switch", "get", "switch_concurrent", "fanout_delivery", "fanout_last"):
            assert run["latencies"][f"{x}.{name}"]["count"] > 0, (x, name)
        assert run["values"][f"{x}.cpu_ms_per_switch"]["value"] > 0
        assert run["values"][f"{x}.fanout_missed"]["value"] == 0
    for metric in ("switch_p50", "switch_p99", "get_p50", "switches_per_s", "cpu_ms_per_switch",
                   "fanout_delivery_p50", "switch_over_health"):
        assert run["values"][f"B/A.{metric}"]["value"] > 0, metric
    assert "B/A: sequential switch p50" in done.stdout


@pytest.mark.timeout(150)
def test_fanout_slow_reader_reports_the_others_delivery_and_how_the_slow_socket_ended(
        tmp_path: Path, redis_url: str, database_url: str) -> None:
    out = tmp_path / "fanout.json"
    done = _bench([sys.executable, "-m", "bench", "fanout", "--quiet", "--sockets", "5", "--clients", "1",
                   "--switches", "3", "--slow-reader", "--slow-max-switches", "40", "--send-queue", "8",
                   "--redis-url", redis_url, "--database-url", database_url, "--json", str(out)],
                  cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(out.read_text())["runs"]["fanout"]
    assert run["error"] is None
    assert run["latencies"]["5.delivery_slow"]["count"] >= 5 * 3  # every other socket, every switch
    assert run["latencies"]["5.delivery_slow"]["baseline"] == "5.delivery"
    assert run["values"]["5.missed"]["value"] == 0
    assert run["values"]["5.slow_dropped_1013"]["value"] in (0, 1)
    assert any("one socket that never reads" in n for n in run["notes"])
    assert any("slow socket, after" in n for n in run["notes"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_run_stops_the_server_it_started(
        sig: signal.Signals, redis_url: str, database_url: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "bench", "switch", "-n", "1000000", "--redis-url", redis_url,
                             "--database-url", database_url], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_in_a_terminal)
    try:
        server_pid, prefix = None, ""
        assert proc.stderr is not None
        for line in proc.stderr:  # progress lines, until the workload is under way
            m = re.search(r"kairos serve ready: pid (\d+), .* keys under (\S+)", line)
            server_pid, prefix = (int(m.group(1)), m.group(2)) if m else (server_pid, prefix)
            if "sequential:" in line:
                break
        assert server_pid is not None and _alive(server_pid)
        assert _keys(redis_url, prefix) > 0
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in err
    assert not _alive(server_pid)
    assert _keys(redis_url, prefix) == 0  # the run's sessions were dropped from the shared Redis


def _sigint_as_in_a_terminal() -> None:
    # A suite started in the background (`make test &`, some CI runners) inherits SIGINT ignored,
    # and Python then installs no Ctrl-C handler in the child; a user's terminal does not do that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _keys(redis_url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for _ in client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        client.close()


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_switch_and_actor_on_one_and_two_masters_report_throughput_per_master(
        tmp_path: Path, database_url: str) -> None:
    for command, sizes in (("switch", ["-n", "20", "--seconds", "0.6", "--sessions", "8", "--connections", "4",
                                       "--no-ws"]),
                           ("actor", ["-n", "128"])):
        out = tmp_path / f"{command}.json"
        done = _bench([sys.executable, "-m", "bench", command, "--quiet", "--masters", "1,2", "--rounds", "2",
                       *sizes, *(["--database-url", database_url] if command == "switch" else []),
                       "--json", str(out)], cwd=REPO, timeout=200)
        assert done.returncode == 0, done.stderr[-3000:]
        values = json.loads(out.read_text())["runs"][command]["values"]
        rate = "switches_per_s" if command == "switch" else "asks_per_s"
        one, two = values[f"1m_{rate}"], values[f"2m_{rate}"]
        assert one["value"] > 0 and two["value"] > 0
        assert two["baseline"] == f"1m_{rate}" and two["ratio"] == pytest.approx(two["value"] / one["value"])
        assert values[f"2m_{rate}_per_master"]["value"] == pytest.approx(two["value"] / 2)
        assert "load average" in done.stdout
