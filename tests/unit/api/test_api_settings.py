"""Settings, the entry point's arguments, and the shape of the status query."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.api.__main__ import parse_args
from services.api.repository import (
    MAX_COMMANDS_PER_REPLY,
    audit_query,
    command_from_row,
    due_commands_query,
    environments_query,
    event_status_query,
    next_due_query,
    operator_key_query,
)
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
    assert (settings.liveness_connected_s, settings.liveness_lost_s) == (30, 120)
    assert settings.operator_key_cache_s == 5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LIVENESS_LOST_S", "30"),  # must be above liveness_connected_s
        ("LIVENESS_CONNECTED_S", "0"),
        ("OPERATOR_KEY_CACHE_S", "6"),
        ("OPERATOR_KEY_CACHE_S", "-1"),
    ],
)
def test_invalid_new_settings(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"FLEETPLANE_API_{name}", value)
    with pytest.raises(ValidationError):
        ApiSettings.load()


def test_liveness_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETPLANE_API_LIVENESS_CONNECTED_S", "10")
    monkeypatch.setenv("FLEETPLANE_API_LIVENESS_LOST_S", "40")
    monkeypatch.setenv("FLEETPLANE_API_OPERATOR_KEY_CACHE_S", "0")
    settings = ApiSettings.load()
    assert (settings.liveness_connected_s, settings.liveness_lost_s) == (10, 40)
    assert settings.operator_key_cache_s == 0


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


def _where(query: object) -> tuple[str, list[object]]:
    compiled = query.compile()  # type: ignore[attr-defined]
    return str(compiled).split("WHERE", 1)[1], list(compiled.params.values())


def test_commands_queries_are_scoped_to_one_environment_and_read_only() -> None:
    for query in (due_commands_query("acme", "prod"), next_due_query("acme", "prod")):
        where, params = _where(query)
        assert "commands.customer_id = " in where
        assert "commands.environment_id = " in where
        assert "commands.status = " in where
        assert {"acme", "prod", "pending"} <= set(params)
        assert str(query).lstrip().startswith("SELECT")
    due, params = _where(due_commands_query("acme", "prod"))
    assert "commands.not_before <= now()" in due
    assert "ORDER BY commands.id" in due
    assert MAX_COMMANDS_PER_REPLY in params
    assert "commands.not_before > now()" in _where(next_due_query("acme", "prod"))[0]


def test_command_rows_become_the_agent_contract() -> None:
    class Row:
        id, epoch, revision, attempts = 7, 3, 2, 2
        action, resource_kind, resource_name, version = "update", "app", "web", "1.1"

    command = command_from_row(Row())
    assert (command.id, command.epoch, command.revision, command.attempt) == (7, 3, 2, 2)
    assert command.resource.version == "1.1"
    Row.action, Row.attempts = "delete", 0
    command = command_from_row(Row())
    assert command.resource.version is None
    assert command.attempt == 1


def test_operator_reads_are_scoped_to_the_customer() -> None:
    where, params = _where(environments_query("acme"))
    assert "environments.customer_id = " in where
    assert "acme" in params
    assert "ORDER BY environments.environment_id" in where
    where, params = _where(audit_query("acme", 10))
    assert "operator_audit.customer_id = " in where
    assert params[:2] == ["acme", 10]
    where, params = _where(operator_key_query("0123456789ab"))
    assert "operator_keys.revoked_at IS NULL" in where
    assert params == ["0123456789ab"]
