"""The Strimzi manifests for Kafka: valid custom resources, and settings the controllers rely on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import jsonschema
import pytest
import yaml

from services.controller.settings import ControllerSettings
from services.shared.settings import KafkaSettings

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
KAFKA_MANIFESTS: Final = REPO_ROOT / "infra" / "k8s" / "kafka" / "kafka.yaml"
# Shared project data beside the checkout (as CI lays it out too); used in place.
CRD_SCHEMAS: Final = REPO_ROOT.parent / "shared" / "crd-schemas"
NATIVE_KAFKA_SCRIPT: Final = REPO_ROOT / "infra" / "local" / "kafka.sh"


def documents() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KAFKA_MANIFESTS.read_text()) if d is not None]
    assert docs, f"{KAFKA_MANIFESTS} holds no resources"
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def schema_for(document: dict[str, Any]) -> dict[str, Any]:
    group, version = document["apiVersion"].split("/")
    path = CRD_SCHEMAS / group / f"{document['kind'].lower()}_{version}.json"
    if not path.is_file():
        pytest.fail(
            f"CRD schema missing at {path}: the shared data folder must sit beside the "
            "repository (shared/crd-schemas)"
        )
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


@pytest.mark.parametrize(
    "document", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_every_resource_matches_its_crd_schema(document: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(schema_for(document))
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_the_broker_admits_the_controllers_session_timeout() -> None:
    # A broker floor above the controllers' session timeout makes every join fail
    # (INVALID_SESSION_TIMEOUT): no partition would ever be owned.
    config = one("Kafka")["spec"]["kafka"]["config"]
    floor_ms = int(config["group.min.session.timeout.ms"])
    assert floor_ms <= ControllerSettings().session_timeout_s * 1000
    # The native broker uses the same floor, so what the tests show holds here.
    assert f"group.min.session.timeout.ms={floor_ms}\n" in NATIVE_KAFKA_SCRIPT.read_text()


def test_accepted_events_survive_the_loss_of_one_broker() -> None:
    config = one("Kafka")["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False
    assert config["unclean.leader.election.enable"] is False
    for topic in (
        one("KafkaTopic", "fleetplane-events"),
        one("KafkaTopic", "fleetplane-dead-letters"),
    ):
        assert topic["spec"]["replicas"] == 3
        assert int(topic["spec"]["config"]["min.insync.replicas"]) == 2


def test_topic_names_are_the_ones_the_services_use() -> None:
    kafka = KafkaSettings()
    assert one("KafkaTopic", "fleetplane-events")["spec"]["topicName"] == kafka.events_topic
    assert (
        one("KafkaTopic", "fleetplane-dead-letters")["spec"]["topicName"] == kafka.dead_letter_topic
    )


def test_deduplication_records_outlive_the_events_topic_retention() -> None:
    retention_ms = int(one("KafkaTopic", "fleetplane-events")["spec"]["config"]["retention.ms"])
    assert ControllerSettings().record_retention_s * 1000 > retention_ms
