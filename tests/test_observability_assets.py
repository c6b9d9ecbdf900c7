"""The Grafana dashboard and the Prometheus alerting rules (deploy/grafana, deploy/prometheus).

Every metric a dashboard panel, a dashboard variable or an alert rule uses must be one the gateway
exports: the exported names come from the code (a fresh `Metrics()` registry), not from a list
here. `ANNOUNCED_NOT_YET_EXPORTED` would list metrics the assets use before the gateway exports
them; it is empty (the budget gauges the "Budget used" panel and GatewayBudgetNearlySpent use are
exported since the control plane).

promtool (Debian package `prometheus`) is optional here: `make check-rules` (a `make lint`
prerequisite) runs it in CI; these tests run it too when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from llm_gateway_server.errors import Reason
from llm_gateway_server.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/dashboards/llm-gateway.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yml"

# Announced, not yet exported: metric kind and label names, as the budgets issue announces them.
Spec = tuple[str, tuple[str, ...]]
ANNOUNCED_NOT_YET_EXPORTED: dict[str, Spec] = {}
# The budget gauges, with the label the assets rely on.
BUDGET_GAUGES: dict[str, Spec] = {
    "llm_gateway_budget_spend_usd": ("gauge", ("subject",)),
    "llm_gateway_budget_limit_usd": ("gauge", ("subject",)),
}

# The list of what the dashboard shows, as the series (or selector) each topic needs.
DASHBOARD_TOPICS = {
    "requests": "llm_gateway_requests_total",
    "errors by reason": "llm_gateway_errors_total",
    "latency": "llm_gateway_request_duration_seconds_bucket",
    "time to first token": "llm_gateway_time_to_first_token_seconds_bucket",
    "gateway overhead": "llm_gateway_overhead_seconds_bucket",
    "tokens/s": "llm_gateway_tokens_total",
    "cost/h by model": "llm_gateway_cost_usd_total",
    "cost/h by key": "llm_gateway_key_cost_usd_total",
    "cache hit ratio": "llm_gateway_cache_requests_total",
    "rate-limit refusals": "llm_gateway_rate_limit_rejections_total",
    "budget refusals": 'reason="BUDGET_EXCEEDED"',
    "fallbacks": "llm_gateway_fallbacks_total",
    "retries": "llm_gateway_retries_total",
    "breaker state": "llm_gateway_circuit_breaker_state",
    "in-flight calls": "llm_gateway_in_flight_calls",
}
ALERT_NAMES = {
    "GatewayHighErrorRate",
    "GatewayCircuitBreakerOpen",
    "GatewayBudgetNearlySpent",
    "GatewayHighOverhead",
    "GatewayNoTraffic",
    "GatewayLedgerRecordsDropped",
}
DATASOURCE_UIDS = {"${DS_PROMETHEUS}", "prometheus"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time

METRIC = re.compile(r"llm_gateway_[a-z_]+")
SELECTOR = re.compile(r"(llm_gateway_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def _series(name: str, kind: str) -> set[str]:
    """The series names a metric of `kind` exposes (prometheus-client family name in)."""
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def _exported() -> dict[str, tuple[str, ...]]:
    """Series name → label names, for every series a fresh gateway `Metrics()` registry exports."""
    metrics = Metrics()
    families = {family.name: family.type for family in metrics.registry.collect()}
    # Label names are not in an empty family: read them from the collectors the registry holds.
    labels = {
        getattr(c, "_name", ""): tuple(getattr(c, "_labelnames", ()))
        for c in vars(metrics).values()
        if isinstance(c, MetricWrapperBase)
    }
    out: dict[str, tuple[str, ...]] = {}
    for name, kind in families.items():
        for series in _series(name, kind):
            out[series] = labels.get(name, ())
    return out


def _pending(specs: dict[str, Spec]) -> dict[str, tuple[str, ...]]:
    return {series: labels for name, (kind, labels) in specs.items() for series in _series(name, kind)}


EXPORTED = _exported()
ANNOUNCED_SERIES = {s: lb for s, lb in _pending(ANNOUNCED_NOT_YET_EXPORTED).items() if s not in EXPORTED}
KNOWN = {**ANNOUNCED_SERIES, **EXPORTED}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included; rows themselves left out."""
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, dashboard query variable and alert rule."""
    dashboard = _dashboard()
    queries = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])
    ]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            queries.append((f"variable {var['name']}", query))
    queries += [(f"alert {r['alert']}", r["expr"]) for r in _alert_rules()]
    return queries


def test_exported_names_come_from_the_gateway_code() -> None:
    assert EXPORTED, "Metrics().registry exports nothing"
    assert all(name.startswith("llm_gateway_") for name in EXPORTED)
    # prometheus-client's naming, as the assets rely on it: counters end in _total, histograms
    # expose _bucket (with le), _sum and _count.
    assert "llm_gateway_requests_total" in EXPORTED
    assert "llm_gateway_overhead_seconds_bucket" in EXPORTED
    assert "llm_gateway_overhead_seconds" not in EXPORTED
    assert "code" in EXPORTED["llm_gateway_requests_total"]  # label names are read too


def test_every_metric_the_dashboard_and_rules_use_is_exported() -> None:
    unknown = {(where, name) for where, expr in _queries() for name in METRIC.findall(expr) if name not in KNOWN}
    assert not unknown, f"metrics the gateway does not export: {sorted(unknown)}"


def test_the_gap_is_only_the_announced_metrics() -> None:
    """What the assets use that the gateway does not export is exactly the announced list (now
    empty), and the budget gauges are exported with their `subject` label."""
    used = {name for _, expr in _queries() for name in METRIC.findall(expr)}
    assert used - EXPORTED.keys() == ANNOUNCED_SERIES.keys() == set()
    for name, (kind, labels) in BUDGET_GAUGES.items():
        for series in _series(name, kind):
            assert EXPORTED.get(series) == labels, series


def test_pending_list_is_current() -> None:
    """Warns (does not fail) when an announced metric is exported now: its entry can go. Fails
    when it is exported with other labels than announced (the assets rely on `subject`)."""
    stale = sorted(
        name for name, (kind, _) in ANNOUNCED_NOT_YET_EXPORTED.items() if _series(name, kind) <= EXPORTED.keys()
    )
    if stale:
        warnings.warn(f"exported now, remove from ANNOUNCED_NOT_YET_EXPORTED: {stale}", UserWarning, stacklevel=1)
    for name, (kind, labels) in ANNOUNCED_NOT_YET_EXPORTED.items():
        for series in _series(name, kind) & EXPORTED.keys():
            assert EXPORTED[series] == labels, f"{series}: exported labels differ from the announced ones"


def test_labels_used_exist_on_the_metrics() -> None:
    codes = {code.name for code in grpc.StatusCode}
    reasons = {reason.value for reason in Reason}
    problems = []
    for where, expr in _queries():
        names = METRIC.findall(expr)
        available = set(TARGET_LABELS)
        for name in names:
            available |= set(KNOWN.get(name, ()))
            if name.endswith("_bucket"):
                available.add("le")
        for name, body in SELECTOR.findall(expr):
            allowed = set(KNOWN.get(name, ())) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            for label, op, value in MATCHER.findall(body):
                if label not in allowed:
                    problems.append(f"{where}: {name} has no label {label!r}")
                literal = op in {"=", "!="}
                if literal and label == "code" and value not in codes:
                    problems.append(f"{where}: code {value!r} is not a gRPC status code name")
                if literal and label == "reason" and value not in reasons:
                    problems.append(f"{where}: reason {value!r} is not an ErrorInfo reason")
        for group in GROUPING.findall(expr):
            for label in filter(None, (lb.strip() for lb in group.split(","))):
                if label not in available:
                    problems.append(f"{where}: grouping label {label!r} is on none of {names}")
    assert not problems, "\n".join(problems)


def test_counters_and_buckets_are_read_through_rate() -> None:
    problems = []
    for where, expr in _queries():
        if expr.startswith("label_values("):
            continue
        for match in METRIC.finditer(expr):
            name = match.group(0)
            # counters and histogram series only make sense as rates (absent() tests existence)
            if name.endswith(("_total", "_bucket", "_sum", "_count")) and not re.search(
                r"\b(?:rate|increase|absent)\(\s*$", expr[: match.start()]
            ):
                problems.append(f"{where}: {name} outside rate()/increase()")
        if "histogram_quantile" in expr:
            groupings = [{lb.strip() for lb in g.split(",")} for g in GROUPING.findall(expr)]
            if not groupings or not all("le" in g for g in groupings):
                problems.append(f"{where}: histogram_quantile without `le` in its grouping")
    assert not problems, "\n".join(problems)


def test_dashboard_is_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "llm-gateway"
    assert dashboard["schemaVersion"] >= 38  # Grafana 10+
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["DS_PROMETHEUS"]["current"]["value"] == "prometheus"  # the provisioned uid
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] in DATASOURCE_UIDS

    all_panels = [p for p in dashboard["panels"] if p.get("type") == "row"] + _panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells

    panels = _panels(dashboard)
    assert panels
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["type"] == "prometheus", title
        assert panel["datasource"]["uid"] in DATASOURCE_UIDS, title
        targets = panel.get("targets")
        assert targets, f"panel {title!r} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), title
        for target in targets:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"])["uid"] in DATASOURCE_UIDS, title
            assert METRIC.search(target["expr"]), f"panel {title!r}: no gateway metric in {target['expr']!r}"
            assert 'job=~"$job"' in target["expr"], f"panel {title!r}: not filtered by $job"

    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    missing = [topic for topic, needle in DASHBOARD_TOPICS.items() if needle not in exprs]
    assert not missing, f"the dashboard does not show: {missing}"
    assert "rate(" in exprs and "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_grafana_provisioning_points_at_prometheus() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))
    assert datasources["apiVersion"] == 1
    (prometheus,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prometheus["uid"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_alert_rules_are_well_formed() -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for rule in rules:
        name = rule["alert"]
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert "absent(llm_gateway_requests_total)" in exprs["GatewayNoTraffic"]
    assert "histogram_quantile(0.99" in exprs["GatewayHighOverhead"]
    assert "llm_gateway_overhead_seconds_bucket" in exprs["GatewayHighOverhead"]


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == ALERT_NAMES, f"no firing case for {ALERT_NAMES - firing}"
    assert silent == ALERT_NAMES, f"no silent case for {ALERT_NAMES - silent}"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; `make check-rules` needs it)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)


def test_alert_rules_pass_promtool() -> None:
    checked = _promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """promtool has no query parser command: the queries, Grafana variables substituted, become
    recording rules that `promtool check rules` parses."""

    def substitute(match: re.Match[str]) -> str:
        return "5m" if match.group(1) in {"__rate_interval", "__interval", "__range"} else ".*"

    rules = [
        {"record": f"dashboard:query_{i}", "expr": GRAFANA_VARIABLE.sub(substitute, expr)}
        for i, (where, expr) in enumerate(_queries())
        if where.startswith("panel ")
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    checked = _promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
