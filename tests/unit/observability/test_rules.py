"""The monitoring configuration: rules valid and unit-tested with promtool, every alert
routed by severity with a runbook section that exists, Alertmanager's config valid.

promtool and amtool come with Debian's prometheus and prometheus-alertmanager
packages (infra/local/setup.sh installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from services.shared.metrics import ALL_METRICS

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
OBSERVABILITY: Final = REPO_ROOT / "infra" / "observability"
RULE_FILES: Final = sorted((OBSERVABILITY / "rules").glob("*.rules.yml"))
RULE_TESTS: Final = sorted((OBSERVABILITY / "tests").glob("*.test.yml"))
SEVERITIES: Final = {"page", "ticket"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run infra/local/setup.sh (Debian's prometheus packages)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def alerting_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(r for r in group["rules"] if "alert" in r)
    return rules


def test_there_are_rule_files_and_rule_tests() -> None:
    assert RULE_FILES
    assert RULE_TESTS


def test_promtool_check_rules() -> None:
    result = run(tool("promtool"), "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    for rule in alerting_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"], name
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        runbook = REPO_ROOT / path
        assert path.startswith("docs/runbooks/"), f"{name}: {url}"
        assert runbook.is_file(), f"{name}: {runbook} does not exist"
        # GitHub's anchors: the heading's text, lower case.
        headings = {
            h.strip().lower() for h in re.findall(r"^#+ (.+)$", runbook.read_text(), re.MULTILINE)
        }
        assert anchor == name.lower(), f"{name}: anchor {anchor!r}"
        assert anchor in headings, f"{name}: no section {anchor!r} in {path}"


def test_every_alert_is_unit_tested_firing() -> None:
    """Each alert has at least one promtool case where it is expected to fire."""
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert {r["alert"] for r in alerting_rules()} - fired == set()


def render(template: str, out: Path, **values: str) -> Path:
    result = subprocess.run(
        ["python3", str(OBSERVABILITY / "render.py"), str(OBSERVABILITY / template), str(out)],
        env={**os.environ, **values},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


AM_VALUES: Final = {"GROUP_WAIT": "30s", "GROUP_INTERVAL": "5m", "REPEAT_INTERVAL": "4h"}


@pytest.mark.parametrize(
    "webhooks",
    ["[]", '[{url: "http://127.0.0.1:9/%s", send_resolved: true}]'],
    ids=["no-receiver", "webhook"],
)
def test_amtool_check_config(tmp_path: Path, webhooks: str) -> None:
    config = render(
        "alertmanager.yml.template",
        tmp_path / "alertmanager.yml",
        PAGE_WEBHOOKS=webhooks.replace("%s", "page"),
        TICKET_WEBHOOKS=webhooks.replace("%s", "ticket"),
        **AM_VALUES,
    )
    result = run(tool("amtool"), "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ("severity=page alertname=FleetplanePartitionWithoutOwner", "page"),
        ("severity=ticket alertname=FleetplaneDeadLetters", "ticket"),
        ("alertname=Unlabelled", "ticket"),
    ],
)
def test_routing_by_severity(tmp_path: Path, labels: str, receiver: str) -> None:
    config = render(
        "alertmanager.yml.template",
        tmp_path / "alertmanager.yml",
        PAGE_WEBHOOKS="[]",
        TICKET_WEBHOOKS="[]",
        **AM_VALUES,
    )
    result = run(
        tool("amtool"), "config", "routes", "test", f"--config.file={config}", *labels.split()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_rendering_refuses_a_missing_value(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "python3",
            str(OBSERVABILITY / "render.py"),
            str(OBSERVABILITY / "alertmanager.yml.template"),
            str(tmp_path / "out.yml"),
        ],
        env={k: v for k, v in os.environ.items() if k not in AM_VALUES},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "needs the variable" in result.stderr
    assert not (tmp_path / "out.yml").exists()


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    """The rendered Prometheus config, with the real rules, passes promtool check config."""
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "internal-ca.pem").write_text("")  # promtool checks that the file exists
    config = render(
        "prometheus.yml.template",
        tmp_path / "prometheus.yml",
        SCRAPE_INTERVAL="15s",
        SCRAPE_TIMEOUT="10s",
        EVALUATION_INTERVAL="15s",
        DEPLOYMENT="test",
        RULES_DIR=str(OBSERVABILITY / "rules"),
        TARGETS_DIR=str(tmp_path / "targets"),
        PKI_DIR=str(pki),
        PROMETHEUS_PORT="9",
        ALERTMANAGER_PORT="9",
    )
    result = run(tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_provisions_every_dashboard_into_grafana() -> None:
    """The optional profile mounts the dashboards where its provider reads them."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in grafana["volumes"])
    provider = yaml.safe_load(
        (REPO_ROOT / "infra/compose/grafana/provisioning/dashboards/fleetplane.yml").read_text()
    )["providers"][0]
    assert mounts["./infra/observability/dashboards"] == provider["options"]["path"]
    assert mounts["./infra/compose/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards = [json.loads(p.read_text()) for p in (OBSERVABILITY / "dashboards").glob("*.json")]
    assert len({d["uid"] for d in dashboards}) == len(dashboards) == 2
    for dashboard in dashboards:
        names = [v["name"] for v in dashboard["templating"]["list"]]
        assert names[0] == "datasource", dashboard["uid"]


def test_the_observability_doc_lists_every_metric_alert_and_dashboard() -> None:
    doc = (REPO_ROOT / "docs" / "observability.md").read_text()
    named = [s.name for s in ALL_METRICS]
    named += [r["alert"] for r in alerting_rules()]
    named += [p.name for p in (OBSERVABILITY / "dashboards").glob("*.json")]
    named += re.findall(r"^counter (\w+)", (OBSERVABILITY / "mtail/edge.mtail").read_text(), re.M)
    assert [n for n in named if f"`{n}`" not in doc] == []
