"""Settings, the entry point's arguments, and the shape of the status query."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.api.__main__ import parse_args
from services.api.repository import event_status_query
from services.api.settings import ApiSettings
from services.shared.identity import AgentIdentity


def test_defaults_and_pki_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETPLANE_PKI_DIR", "/etc/fp")
    monkeypatch.setenv("FLEETPLANE_API_TLS_KEY", "/secret/api.key")
    monkeypatch.setenv("FLEETPLANE_API_PORT", "19000")
    monkeypatch.setenv("FLEETPLANE_EVENTS_TOPIC", "t1")
    settings = ApiSettings.load()
    assert settings.tls_cert == Path("/etc/fp/api-server.pem")
    assert settings.tls_key == Path("/secret/api.key")
    assert settings.edge_ca == Path("/etc/fp/internal-ca.pem")
    assert (settings.host, settings.port, settings.kafka.events_topic) == ("127.0.0.1", 19000, "t1")
    assert (settings.produce_timeout_s, settings.retry_after_s) == (4.0, 2)
    assert (settings.edge_client_cn, settings.max_body_bytes) == ("fleetplane-edge", 1024 * 1024)


def test_default_pki_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETPLANE_PKI_DIR", raising=False)
    monkeypatch.delenv("FLEETPLANE_API_TLS_CERT", raising=False)
    assert ApiSettings.load().tls_cert == Path(".run/pki/api-server.pem")


def test_produce_timeout_must_leave_room_for_a_503_within_five_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEETPLANE_API_PRODUCE_TIMEOUT_S", "6")
    with pytest.raises(ValidationError):
        ApiSettings.load()


def test_settings_are_frozen() -> None:
    settings = ApiSettings.load()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]  # the point: frozen


def test_entry_point_arguments() -> None:
    assert parse_args(["--port", "18099"]).port == 18099
    assert parse_args([]).port is None
    with pytest.raises(SystemExit) as caught:
        parse_args(["--help"])
    assert caught.value.code == 0
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"])


def test_status_query_is_scoped_by_the_whole_identity() -> None:
    query = event_status_query(AgentIdentity("acme", "prod", "agent-1"), "e1")
    compiled = query.compile()
    assert sorted(compiled.params.values()) == ["acme", "agent-1", "e1", "prod"]
    where = str(compiled).split("WHERE", 1)[1]
    for column in ("customer_id", "agent_id", "event_id", "environment_id"):
        assert f"event_records.{column} = " in where
