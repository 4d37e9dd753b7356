"""The identity command-line tools against a real database and Kafka: keys and issuing CAs."""

from __future__ import annotations

import subprocess
import sys

from tests.support.deployment import Deployment
from tests.support.waiting import eventually


def tool(deployment: Deployment, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=deployment.fleet.service_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_operator_keys_are_created_listed_and_revoked(deployment: Deployment) -> None:
    keys = "services.gateway_auth.operator_keys"
    made = tool(deployment, keys, "create", "--name", "ci", "--customer", "acme")
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.strip().split("_")[1]

    listed = tool(deployment, keys, "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [line.split("\t") for line in listed.stdout.splitlines()]
    assert row[:3] == [key_id, "ci", "acme"]
    assert row[4] == ""  # not revoked

    assert tool(deployment, keys, "revoke", key_id).returncode == 0
    [row] = [line.split("\t") for line in tool(deployment, keys, "list").stdout.splitlines()]
    assert row[4] != ""
    again = tool(deployment, keys, "revoke", key_id)
    assert again.returncode == 1
    assert f"no active key {key_id}" in again.stderr


async def test_issuing_cas_are_listed_and_retired(deployment: Deployment) -> None:
    issuers = "services.gateway_auth.issuers"
    deployment.start_gateway_auth()  # registers the current issuing CA

    async def listing() -> str:
        return tool(deployment, issuers, "list").stdout

    shown = await eventually(listing, lambda out: "\tretire -" in out, what="the CA registered")
    [subject] = [line.split("\t")[0] for line in shown.splitlines()]

    retired = tool(deployment, issuers, "retire", "--subject", subject, "--in", "3600")
    assert retired.returncode == 0, retired.stderr
    assert "\tretire -" not in tool(deployment, issuers, "list").stdout
    unknown = tool(deployment, issuers, "retire", "--subject", "CN=nobody", "--in", "1")
    assert unknown.returncode == 1
    assert "no registered issuing CA 'CN=nobody'" in unknown.stderr
