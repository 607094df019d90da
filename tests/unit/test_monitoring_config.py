"""The checked-in monitoring: alert rules valid and unit-tested with promtool, the Prometheus config as
tuneloop/prometheus.py renders it, and a Grafana dashboard whose queries name only metrics the gateway
really exports (a renamed metric breaks this test, not the dashboard in production)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from serving.inference_log import InferenceLogWriter
from serving.metrics import GatewayMetrics, write_drift_summary
from serving.supervisor import SupervisorCollector
from tests.support import REPO_ROOT
from tuneloop.config import DEFAULT_GATEWAY_PORTS, load_params
from tuneloop.prometheus import (
    ALERT_RULES,
    GATEWAY_JOB,
    PrometheusNotFound,
    prometheus_command,
    render_prometheus_config,
    start_prometheus,
    write_prometheus_config,
)

MONITORING_DIR = REPO_ROOT / "deploy/monitoring"
RULES_PATH = REPO_ROOT / ALERT_RULES
RULES_TEST_PATH = MONITORING_DIR / "prometheus/alerts_test.yml"
CONFIG_PATH = MONITORING_DIR / "prometheus/prometheus.yml"
DASHBOARD_PATH = MONITORING_DIR / "grafana/tuneloop-dashboard.json"
# Where the checked-in config expects the scrape key on a Prometheus host (a secret: never in the repo).
SCRAPE_KEY_FILE = "/etc/prometheus/tuneloop-scrape.key"
METRIC_NAME = re.compile(r"\btuneloop_[a-zA-Z0-9_]+")
# Grafana's variables, replaced the way Grafana would before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${env}": ".*",
    "$env": ".*",
}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run does)"
)


def run_promtool(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    assert promtool is not None
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES_PATH.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def dashboard_panels() -> Iterator[dict]:
    """Every panel, those inside collapsed rows too; rows themselves hold no query."""
    for panel in dashboard()["panels"]:
        yield from (panel.get("panels") or [])
        if panel["type"] != "row":
            yield panel


def as_prometheus_query(expr: str) -> str:
    """A panel's query with Grafana's variables replaced, as Prometheus receives it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and refId, query as Prometheus receives it) for every panel target."""
    return [
        (f"{panel['title']} [{target['refId']}]", as_prometheus_query(target["expr"]))
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Sample names a gateway exports with every optional collector on: cost, log, drift, supervisor."""
    metrics = GatewayMetrics(device_hour_usd=1.0)
    metrics.observe_model_call(0.2, 4)  # the cost gauge exists once a call was measured
    metrics.watch_inference_log(InferenceLogWriter(f"sqlite:///{tmp_path / 'log.db'}"))
    summary = {
        "data_drift": {
            "detected": True,
            "signals": {"text": {"score": 0.7, "method": "auc", "drifted": True}},
        },
        "concept_drift": {"detected": False, "tests": {"accuracy": {"reference": 0.9, "current": 0.85}}},
        "n_current": 500,
        "n_labelled": 40,
        "finished_at": "2026-11-30T12:00:00+00:00",
    }
    metrics.watch_drift(write_drift_summary(summary, tmp_path / "drift.json"))
    refusing = SimpleNamespace(
        state=SimpleNamespace(refused={"version": "2", "reasons": ["no approval"]}, refusals=1),
        pool=SimpleNamespace(model_name="tuneloop-intent", alias="prod"),
    )
    metrics.registry.register(SupervisorCollector(refusing))  # type: ignore[arg-type]
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


# ------------------------------------------------------------------------------- (a) promtool checks


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    checked = run_promtool("check", "rules", str(RULES_PATH))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


@needs_promtool
def test_checked_in_config_is_valid_and_loads_the_rules() -> None:
    # --syntax-only: the scrape key it names lives on the Prometheus host, not in the repo.
    checked = run_promtool("check", "config", "--syntax-only", str(CONFIG_PATH))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert yaml.safe_load(CONFIG_PATH.read_text())["rule_files"] == [RULES_PATH.name]


def test_checked_in_config_is_what_the_module_renders() -> None:
    urls = {env: f"http://127.0.0.1:{port}" for env, port in DEFAULT_GATEWAY_PORTS.items()}
    expected = render_prometheus_config(urls, RULES_PATH.name, credentials_file=SCRAPE_KEY_FILE)
    assert CONFIG_PATH.read_text() == expected


@needs_promtool
def test_rendered_config_passes_the_full_check(tmp_path) -> None:
    key = tmp_path / "scrape.key"
    key.write_text("tlk_example_secret")
    config = write_prometheus_config(
        tmp_path / "prometheus",
        {"prod": "http://127.0.0.1:8000", "dev": "http://127.0.0.1:8001"},
        RULES_PATH,
        credentials_file=key,
        scrape_interval_s=1,
        evaluation_interval_s=1,
    )
    checked = run_promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout
    rendered = yaml.safe_load(config.read_text())
    assert rendered["global"] == {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    (job,) = rendered["scrape_configs"]
    assert job["job_name"] == GATEWAY_JOB
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(key)}
    assert [(c["targets"], c["labels"]) for c in job["static_configs"]] == [
        (["127.0.0.1:8000"], {"env": "prod"}),
        (["127.0.0.1:8001"], {"env": "dev"}),
    ]


@pytest.mark.parametrize(
    ("interval_s", "expected"), [(15, ("15s", "10s")), (0.5, ("500ms", "500ms")), (60, ("60s", "10s"))]
)
def test_scrape_timeout_never_exceeds_the_interval(interval_s: float, expected: tuple[str, str]) -> None:
    config = yaml.safe_load(
        render_prometheus_config({"prod": "http://127.0.0.1:8000"}, "a.yml", scrape_interval_s=interval_s)
    )
    assert (config["global"]["scrape_interval"], config["global"]["scrape_timeout"]) == expected


def test_https_gateways_are_scraped_with_their_ca() -> None:
    config = yaml.safe_load(
        render_prometheus_config({"prod": "https://gw.internal"}, "a.yml", ca_file="/etc/ssl/ca.pem")
    )
    (job,) = config["scrape_configs"]
    assert job["scheme"] == "https" and job["tls_config"] == {"ca_file": "/etc/ssl/ca.pem"}
    assert job["static_configs"][0]["targets"] == ["gw.internal:443"]


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ({}, "no gateway"),
        ({"prod": "http://127.0.0.1:8000", "dev": "https://127.0.0.1:8001"}, "one scheme"),
        ({"prod": "127.0.0.1:8000"}, "http(s)://"),
    ],
)
def test_render_refuses_targets_it_cannot_scrape(urls: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render_prometheus_config(urls, "a.yml")


def test_prometheus_listens_on_loopback_only(tmp_path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    command = prometheus_command(tmp_path / "prometheus.yml", tmp_path / "data", 9999)
    assert "--web.listen-address=127.0.0.1:9999" in command


def test_a_missing_prometheus_says_how_to_install_it(tmp_path) -> None:
    with pytest.raises(PrometheusNotFound, match="apt-get install prometheus"):
        start_prometheus(tmp_path / "prometheus.yml", tmp_path / "data", binary="no-such-prometheus-here")
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------- (b) the rules' unit tests


@needs_promtool
def test_alerts_fire_on_faults_and_not_on_healthy_series() -> None:
    tested = run_promtool("test", "rules", RULES_TEST_PATH.name, cwd=RULES_TEST_PATH.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_case_in_the_unit_tests() -> None:
    tests = yaml.safe_load(RULES_TEST_PATH.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert "for" in rule, f"{rule['alert']}: say how long, even `for: 0s`, and why"


def test_canary_and_latency_alerts_use_the_canary_slos_of_params() -> None:
    canary = load_params(REPO_ROOT / "params.yaml").canary
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert f") > {canary.max_error_rate}\n" in rules["TuneloopCanaryErrors"]
    assert rules["TuneloopHighLatencyP99"].rstrip().endswith(f"> {canary.max_p99_latency_ms / 1000}")


# ----------------------------------------------------------------- (c) dashboard and rules vs metrics


def test_dashboard_and_alerts_use_only_exported_metrics(tmp_path) -> None:
    exported = exported_metric_names(tmp_path)
    queries = [*dashboard_queries(), *((rule["alert"], rule["expr"]) for rule in alert_rules())]
    unknown = {
        where: sorted(set(METRIC_NAME.findall(expr)) - exported)
        for where, expr in queries
        if set(METRIC_NAME.findall(expr)) - exported
    }
    assert not unknown, f"not exported by serving/metrics.py: {unknown}"
    assert all(METRIC_NAME.search(expr) for _, expr in dashboard_queries())
    variable_query = next(v for v in dashboard()["templating"]["list"] if v["name"] == "env")["definition"]
    assert set(METRIC_NAME.findall(variable_query)) <= exported


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path) -> None:
    # promtool parses rule expressions: each query becomes a recording rule of a throwaway file.
    rules = [
        {"record": f"dashboard_check:query_{index}", "expr": expr}
        for index, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_is_importable_and_laid_out() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels] + [p["id"] for panel in panels for p in panel.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
        assert panel["description"], panel["title"]
    cells = set()
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        covered = {
            (x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered


def test_docs_describe_every_panel_and_alert() -> None:
    docs = (REPO_ROOT / "docs/observability.md").read_text()
    missing = [panel["title"] for panel in dashboard_panels() if f"**{panel['title']}**" not in docs]
    missing += [
        f"{panel['title']} [{target['refId']}]"
        for panel in dashboard_panels()
        for target in panel["targets"]
        if target["expr"] not in docs
    ]
    missing += [rule["alert"] for rule in alert_rules() if f"`{rule['alert']}`" not in docs]
    assert not missing, f"docs/observability.md says nothing about {missing}"
