"""The one renderer of the edge's nginx configuration (infra/nginx/render.py)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from infra.nginx.render import (
    EDGE_TEMPLATE,
    REPO_ROOT,
    EdgeConfig,
    EdgeLimits,
    RenderError,
    fill,
    render_edge,
)

CONFIG = EdgeConfig(
    nginx_dir="/run/edge",
    pki_dir="/pki",
    edge_port=1443,
    operator_port=1444,
    enroll_port=1445,
    status_port=1446,
    api_servers=["127.0.0.1:2001", "127.0.0.1:2002"],
    gateway_auth="127.0.0.1:2083",
    limits=EdgeLimits(api_conns=7),
)


def _block(text: str, name: str) -> str:
    match = re.search(rf"upstream {name} \{{(.*?)\n    \}}", text, re.S)
    assert match, f"no upstream {name}"
    return match[1]


def _server(text: str, port: int) -> str:
    start = text.index(f"listen 127.0.0.1:{port} ssl;")
    end = text.find("\n    server {", start)
    return text[start:end]


def test_fill_refuses_a_placeholder_without_a_value_and_a_value_without_a_placeholder() -> None:
    assert fill("a @@X@@ b", {"X": "1"}) == "a 1 b"
    with pytest.raises(RenderError, match="without a value"):
        fill("a @@X@@ @@Y@@", {"X": "1"})
    with pytest.raises(RenderError, match="does not use"):
        fill("a @@X@@", {"X": "1", "Y": "2"})


def test_the_template_renders_completely() -> None:
    text = render_edge(CONFIG)
    assert "@@" not in text
    assert text.count("listen 127.0.0.1:") == 4


def test_accept_routes_are_bounded_per_instance_and_long_polls_are_apart() -> None:
    text = render_edge(CONFIG)
    accept = _block(text, "fleetplane_api")
    assert re.findall(r"server (\S+) .*max_conns=(\d+);", accept) == [
        ("127.0.0.1:2001", "7"),
        ("127.0.0.1:2002", "7"),
    ]
    poll = _block(text, "fleetplane_api_poll")
    assert re.findall(r"server (\S+) ", poll) == ["127.0.0.1:2001", "127.0.0.1:2002"]
    assert "max_conns" not in poll
    assert re.search(r"location /v1/commands \{\s+proxy_pass https://fleetplane_api_poll;", text)
    identity = _block(text, "fleetplane_gateway_auth")
    assert "server 127.0.0.1:2083 max_fails=0;" in identity


def test_every_agent_request_carries_the_verified_certificate_and_no_check_hop() -> None:
    """The API checks each agent request itself (services/shared/certificate_check.py):
    the agent listener forwards the certificate nginx verified, and asks nobody first."""
    agent = _server(render_edge(CONFIG), 1443)
    assert "proxy_set_header X-Fleetplane-Client-Cert $ssl_client_escaped_cert;" in agent
    assert "auth_request" not in agent
    assert "proxy_cache" not in agent
    operator = _server(render_edge(CONFIG), 1444)
    assert 'proxy_set_header X-Fleetplane-Client-Cert "";' in operator


def test_switches_change_only_the_agent_listener() -> None:
    plain = render_edge(CONFIG)
    probed = render_edge(EdgeConfig(**{**vars(CONFIG), "agent_waf": False, "agent_mtls": False}))
    # At the server level (eight spaces in): the listener's engine.
    assert re.search(r"^ {8}modsecurity on;", _server(plain, 1443), re.M)
    assert re.search(r"^ {8}modsecurity off;", _server(probed, 1443), re.M)
    assert "ssl_verify_client on;" in _server(plain, 1443)
    assert "ssl_verify_client off;" in _server(probed, 1443)
    # The operator listener keeps its WAF.
    assert re.search(r"^ {8}modsecurity on;", _server(probed, 1444), re.M)


def test_a_container_edge_listens_on_every_address() -> None:
    text = render_edge(EdgeConfig(**{**vars(CONFIG), "loopback_only": False}))
    assert not re.search(r"^\s*listen\s+127\.", text, re.M)
    assert sorted(int(p) for p in re.findall(r"^\s*listen\s+(\d+)\b", text, re.M)) == [
        1443,
        1444,
        1445,
        1446,
    ]


def test_the_default_limits_are_the_native_stacks() -> None:
    """EdgeLimits' defaults (compose uses them) equal infra/local/lib.sh's."""
    names = {f.name: "EDGE_" + f.name.upper() for f in fields(EdgeLimits)}
    names["edge_conn"] = "EDGE_CONN"
    script = 'source "$1"; for n in ' + " ".join(names.values()) + '; do echo "${!n}"; done'
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETPLANE_EDGE_")}
    out = subprocess.run(
        ["bash", "-c", script, "lib", str(REPO_ROOT / "infra" / "local" / "lib.sh")],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=30,
    ).stdout.split()
    assert dict(zip(names, map(int, out), strict=True)) == vars(EdgeLimits())


def test_the_cli_writes_what_the_function_renders(tmp_path: Path) -> None:
    output = tmp_path / "nginx.conf"
    args = [
        "python3",
        str(REPO_ROOT / "infra" / "nginx" / "render.py"),
        "--output",
        str(output),
        "--nginx-dir",
        CONFIG.nginx_dir,
        "--pki-dir",
        CONFIG.pki_dir,
        "--edge-port",
        "1443",
        "--operator-port",
        "1444",
        "--enroll-port",
        "1445",
        "--status-port",
        "1446",
        "--api-server",
        "127.0.0.1:2001",
        "--api-server",
        "127.0.0.1:2002",
        "--gateway-auth",
        "127.0.0.1:2083",
        "--api-conns",
        "7",
    ]
    subprocess.run(args, check=True, timeout=30)
    assert output.read_text() == render_edge(CONFIG)
    assert EDGE_TEMPLATE.exists()
