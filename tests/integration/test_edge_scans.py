"""Outside scanners against the edge: GoTestWAF (a peer's WAF suite) and sslyze.

GoTestWAF cannot present a client certificate, so it is run against an extra
edge rendered from the same template (tests.support.edge_probe.EdgeProbe) whose agent
listener asks for none (``ssl_verify_client off``) and whose limits are lifted;
everything else, the WAF configuration included, is the edge's. Requests that
pass the WAF reach a no-op upstream, so the results are the WAF's alone (for
agents, the API's schema is the body-level defence, which GoTestWAF does not
see). The reports land in ``<run dir>/security-tests/``; docs/security-tests.md
records them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.gateway_auth.ca import CertificateAuthority
from services.gateway_auth.pki import write_agent_certificate
from tests.support.edge_probe import EdgeProbe
from tests.support.scanners import gotestwaf, run_gotestwaf, run_sslyze
from tests.support.stack import Stack

# Regression floors below what docs/security-tests.md records (the share of
# GoTestWAF's attacks blocked): a WAF that stops loading or blocking falls far
# below them.
AGENT_POLICY_FLOOR = 25.0
OPERATOR_CRS_FLOOR = 35.0


def _query_string_cases(module_dir: Path, out: Path) -> int:
    """GoTestWAF's own test cases that use a URL query parameter, placed there only.

    The files are rewritten as text: Go's YAML reader accepts escapes in them
    that PyYAML refuses. Returns how many test cases were kept.
    """
    kept = 0
    for source in sorted((module_dir / "testcases").glob("*/*.yml")):
        lines = source.read_text().splitlines()
        start = lines.index("placeholder:")
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()),
            len(lines),
        )
        if "- URLParam" not in (line.strip() for line in lines[start + 1 : end]):
            continue
        lines[start + 1 : end] = ["  - URLParam"]
        target = out / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n")
        kept += 1
    return kept


def _true_positives(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = report["summary"]["true_positive_tests"]
    return summary


@pytest.mark.timeout(300)
def test_gotestwaf_against_both_waf_policies(stack: Stack, tmp_path: Path) -> None:
    out = stack.run_dir / "security-tests"
    shutil.rmtree(out, ignore_errors=True)
    _, module_dir = gotestwaf()
    subset = tmp_path / "query-string-cases"
    assert _query_string_cases(module_dir, subset) >= 10
    with EdgeProbe(stack.run_dir / "waf-probe", stack.pki_dir, agent_mtls=False) as probe:
        agent = run_gotestwaf(f"{probe.agent_url}/", out, "agent-policy")
        operator = run_gotestwaf(f"{probe.operator_url}/", out, "operator-crs")
        agent_query = run_gotestwaf(
            f"{probe.agent_url}/", out, "agent-policy-query-string", test_cases=subset
        )
        error_log = probe.error_log.read_text()

    summary = {
        name: {
            "score": report["score"],
            "true_positive": _true_positives(report)["score"],
            "blocked": _true_positives(report)["summary"]["blocked_tests"],
            "sent": _true_positives(report)["summary"]["total_sent"],
            "true_negative": report["summary"]["true_negative_tests"]["score"],
        }
        for name, report in (("agent", agent), ("operator", operator))
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    assert summary["agent"]["true_positive"] >= AGENT_POLICY_FLOOR, summary
    assert summary["operator"]["true_positive"] >= OPERATOR_CRS_FLOOR, summary
    # The agent policy's positive model: no attack gets through in a query string.
    query = _true_positives(agent_query)["summary"]
    assert query["total_sent"] >= 100
    assert (query["bypassed_tests"], query["unresolved_tests"]) == (0, 0), query
    # The refusals were the WAF's, in both policies.
    assert "ModSecurity: Access denied with code 403" in error_log
    assert "OWASP_CRS" in error_log


def test_tls_meets_mozilla_intermediate_on_every_listener(
    stack: Stack, issuing_ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert, key = write_agent_certificate(issuing_ca, tmp_path, "acme", "prod", "agent-1")
    root = stack.pki_dir / "root-ca.pem"
    results = {}
    for name, url, client in (
        ("agent", stack.edge_url, (cert, key)),
        ("operator", stack.operator_url, (None, None)),
        ("enrollment", stack.enroll_url, (None, None)),
    ):
        target = url.removeprefix("https://")
        code, report, text = run_sslyze(
            target, tmp_path / f"{name}.json", ca_file=root, cert=client[0], key=client[1]
        )
        results[name] = code
        assert code == 0, f"{name} listener:\n{text[-3000:]}"
        (scan,) = report["server_scan_results"]
        assert scan["scan_status"] == "COMPLETED"
        protocols = scan["scan_result"]
        for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
            assert protocols[f"{old}_cipher_suites"]["result"]["accepted_cipher_suites"] == []
        for current in ("tls_1_2", "tls_1_3"):
            assert protocols[f"{current}_cipher_suites"]["result"]["accepted_cipher_suites"]
    assert results == {"agent": 0, "operator": 0, "enrollment": 0}
