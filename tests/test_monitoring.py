"""The monitoring pieces against the code: /metrics passes `promtool check metrics`, the
alert rules pass `promtool check rules` and their unit tests, the Prometheus config is
valid, and the Grafana dashboard and the rules use only metrics the code defines.

promtool comes from Debian's prometheus package (`make promtool`); without it the
promtool tests are skipped with the reason, the others still run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.monitoring import ROOT, exercised_metrics, exposition, run_promtool

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tierstream.json"
METRIC_NAME = re.compile(r"\btierstream_[a-z0-9_]+\b")
# Every label the code may put on a series: small, fixed or configured sets only.
BOUNDED_LABELS = {
    "role", "tier", "status", "provider", "direction", "code", "topic", "scope", "agent_type", "model", "le",
}


def _families() -> dict[str, str]:
    """family name -> type, for everything the code exposes (not the text format's
    separate ``_created`` families)."""
    return {f.name: f.type for f in exercised_metrics().registry.collect()}


def _sample_names() -> set[str]:
    """Every series name a query can use (with _total, _bucket, _sum, _count)."""
    text = exposition(exercised_metrics()).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_every_metric_family_has_samples_and_bounded_labels() -> None:
    text = exposition(exercised_metrics()).decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 20
    for family in families:
        assert family.samples, f"{family.name} has no sample: the promtool check would not see it"
        for sample in family.samples:
            assert set(sample.labels) <= BOUNDED_LABELS, (sample.name, sample.labels)
    assert "workflow_id" not in text and "request_id" not in text


def test_metrics_output_passes_promtool_check_metrics() -> None:
    out = run_promtool("check", "metrics", stdin=exposition(exercised_metrics()))
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_promtool_check_metrics_catches_a_bad_name() -> None:
    # The check above can fail: promtool rejects a counter without the _total suffix.
    out = run_promtool("check", "metrics", stdin=b"# HELP x_requests a\n# TYPE x_requests counter\nx_requests 1\n")
    assert out.returncode != 0 and "_total" in out.stdout + out.stderr


def test_alert_rules_pass_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    out = run_promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_prometheus_config_is_valid() -> None:
    out = run_promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_cover_the_issue_list() -> None:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert alerts == {
        "TierstreamHourlyBudgetAlert", "TierstreamHourlyLimitReached", "TierstreamConsumerLagGrowing",
        "TierstreamDeadLetters", "TierstreamProviderErrors",
    }


def test_dashboard_and_rules_use_only_metrics_the_code_defines() -> None:
    defined = _sample_names()
    for source, exprs in (("dashboard", _dashboard_exprs()), ("alerts.yml", _rule_exprs())):
        assert exprs, source
        for expr in exprs:
            used = set(METRIC_NAME.findall(expr))
            assert used, (source, expr)
            assert used <= defined, f"{source}: {sorted(used - defined)} not defined by the code, in {expr}"


def test_dashboard_shows_every_metric_family() -> None:
    used = {name for expr in _dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    for family, kind in _families().items():
        series = {"counter": f"{family}_total", "histogram": f"{family}_bucket"}.get(kind, family)
        assert series in used, f"the dashboard has no panel for {family}"


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "tierstream" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    grafana = ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((grafana / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((grafana / "dashboards" / "tierstream.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_rules_file_names_are_the_ones_prometheus_loads() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [Path(p).name for p in config["rule_files"]] == ["alerts.yml"]
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
