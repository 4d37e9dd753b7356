"""docker-compose.yml and the Dockerfile, checked where no Docker engine runs.

Nothing here builds or starts a container. Instead the compose file is validated
against the Compose Specification's JSON schema, its wiring (dependencies, health
checks, ports, mounts) is checked, and every service's ``environment:`` block is
loaded through the settings classes the service really uses, so a typo, a wrong
host or a port that does not match the edge fails here and not in someone's
``docker compose up``. Running the entry points with ``--help``, the health
check script and the edge renderer needs processes: tests/integration/test_compose_processes.py.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import jsonschema
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.backup.settings import BackupSettings, S3Settings
from services.controller.settings import ControllerSettings
from services.gateway_auth.settings import GatewayAuthSettings
from services.shared.settings import DatabaseSettings, KafkaSettings, PkiLocation
from tests.support.compose import (
    COMPOSE,
    REPO_ROOT,
    SERVICES,
    dockerfile_instructions,
    dockerfile_json,
    invocations,
    our_services,
    parsed_invocations,
)

DOCKERIGNORE: Final = REPO_ROOT / ".dockerignore"
EDGE_CONF: Final = REPO_ROOT / "infra" / "compose" / "edge.conf"
NATIVE_KAFKA_SCRIPT: Final = REPO_ROOT / "infra" / "local" / "kafka.sh"
# Shared project data beside the checkout (as CI lays it out too); used in place.
COMPOSE_SCHEMA: Final = REPO_ROOT.parent / "shared" / "compose-schema" / "compose-spec.json"

# The settings classes each entry point reads from its environment. A module that
# compose runs but this table lacks fails the tests until its settings are added.
SETTINGS_BY_MODULE: Final[Mapping[str, tuple[type[BaseSettings], ...]]] = {
    "services.api": (ApiSettings, PkiLocation),
    "services.gateway_auth": (GatewayAuthSettings, PkiLocation),
    "services.controller": (ControllerSettings,),
    "services.shared.topics": (KafkaSettings,),
    "services.shared.migrate": (DatabaseSettings,),
    "services.backup": (DatabaseSettings, KafkaSettings, S3Settings, BackupSettings),
    "services.backup.bucket": (S3Settings,),
    # Configured by arguments only.
    "services.gateway_auth.pki": (),
    "bench.simulator": (),
}

# Entry points that have no argument parser yet: `--help` runs the command itself
# (creating topics, migrating a database). Strict: once one gets a parser, its
# entry here fails the run and must go.

# Restart policies of services that run until stopped; any other service must be
# a one-shot step that something waits for, or an optional tool in a profile.
LONG_RUNNING_RESTART: Final = {"always", "unless-stopped"}
ONE_SHOT: Final = "service_completed_successfully"
HEALTHY: Final = "service_healthy"

# Broker properties that name this deployment's addresses and paths; every other
# property of the native broker (infra/local/kafka.sh) must be the same in compose.
KAFKA_DEPLOYMENT_SPECIFIC: Final = {
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "controller.quorum.voters",
    "log.dirs",
}
# KAFKA_* variables the apache/kafka image hands to the JVM, not to server.properties.
KAFKA_JVM_VARIABLES: Final = {"KAFKA_HEAP_OPTS", "KAFKA_OPTS", "KAFKA_JVM_PERFORMANCE_OPTS"}

# The PostgreSQL image's port inside the compose network.
POSTGRES_PORT: Final = 5432

_S = TypeVar("_S", bound=BaseSettings)


# --- loading ------------------------------------------------------------------


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _settings_classes(service_name: str) -> list[type[BaseSettings]]:
    classes: list[type[BaseSettings]] = []
    for invocation in parsed_invocations(service_name):
        for cls in SETTINGS_BY_MODULE.get(invocation.module, ()):
            if cls not in classes:
                classes.append(cls)
    return classes


def _env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable ``cls`` reads, nested settings included."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            # Nested fragments (database, kafka) read their own variables.
            names |= _env_names(annotation)
        elif isinstance(field.validation_alias, str):
            names.add(field.validation_alias.upper())
        else:
            names.add((prefix + field_name).upper())
    return names


def _load_settings(service_name: str) -> dict[type[BaseSettings], BaseSettings]:
    """Each settings class of the service, built from its compose environment alone."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.upper().startswith("FLEETPLANE_"):
                mp.delenv(key)
        for key, value in _environment(SERVICES[service_name]).items():
            mp.setenv(key, value)
        return {cls: cls() for cls in _settings_classes(service_name)}


def _get(loaded: dict[type[BaseSettings], BaseSettings], cls: type[_S]) -> _S:
    value = loaded[cls]
    assert isinstance(value, cls)
    return value


def _database(loaded: dict[type[BaseSettings], BaseSettings]) -> DatabaseSettings | None:
    if ApiSettings in loaded:
        return _get(loaded, ApiSettings).database
    if ControllerSettings in loaded:
        return _get(loaded, ControllerSettings).database
    return _get(loaded, DatabaseSettings) if DatabaseSettings in loaded else None


def _kafka(loaded: dict[type[BaseSettings], BaseSettings]) -> KafkaSettings | None:
    if ApiSettings in loaded:
        return _get(loaded, ApiSettings).kafka
    if ControllerSettings in loaded:
        return _get(loaded, ControllerSettings).kafka
    return _get(loaded, KafkaSettings) if KafkaSettings in loaded else None


def _services_running(module: str) -> list[str]:
    return [
        name for name in our_services() if any(i.module == module for i in parsed_invocations(name))
    ]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name -> condition (the short list form means service_started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _is_long_running(service: dict[str, Any]) -> bool:
    return service.get("restart") in LONG_RUNNING_RESTART


def _healthcheck_argv(service_name: str) -> list[str]:
    test = SERVICES[service_name].get("healthcheck", {}).get("test")
    assert isinstance(test, list), f"{service_name}: expected an exec-form health check"
    assert test[0] == "CMD", f"{service_name}: expected an exec-form health check (CMD ...)"
    return [str(word) for word in test[1:]]


def _health_url(service_name: str) -> re.Match[str]:
    argv = _healthcheck_argv(service_name)
    assert argv[0] == "fleetplane-healthcheck", f"{service_name}: {argv}"
    urls = [w for w in argv if "://" in w]
    assert len(urls) == 1, f"{service_name}: one URL expected in {argv}"
    match = re.fullmatch(r"(https?)://(127\.0\.0\.1|localhost):(\d+)(/\S*)", urls[0])
    assert match, f"{service_name}: health check URL {urls[0]} is not a loopback URL"
    return match


def _mount_target(service_name: str, volume: str) -> tuple[str, bool]:
    """Where ``volume`` is mounted in the service, and whether read-only."""
    for mount in SERVICES[service_name].get("volumes", []):
        source, _, rest = str(mount).partition(":")
        target, _, mode = rest.partition(":")
        if source == volume:
            return target, "ro" in mode.split(",")
    raise AssertionError(f"{service_name} does not mount the {volume} volume")


def _edge_upstreams() -> set[tuple[str, int]]:
    upstream = re.search(r"upstream\s+fleetplane_api\s*\{(.*?)\}", EDGE_CONF.read_text(), re.S)
    assert upstream, f"{EDGE_CONF}: no upstream fleetplane_api block"
    return {(h, int(p)) for h, p in re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream[1], re.M)}


def _published(service_name: str) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    published = []
    for port in SERVICES[service_name].get("ports", []):
        if isinstance(port, dict):
            published.append(
                (str(port.get("host_ip", "")), int(port["published"]), int(port["target"]))
            )
            continue
        parts = str(port).split(":")
        assert len(parts) == 3, f"{service_name}: {port} must name the host address"
        published.append((parts[0], int(parts[1]), int(parts[2].split("/")[0])))
    return published


# --- the file as a whole ------------------------------------------------------


def test_compose_file_matches_the_compose_schema() -> None:
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(
            f"Compose schema missing at {COMPOSE_SCHEMA}: the shared data folder must sit "
            "beside the repository (shared/compose-schema/compose-spec.json)"
        )
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(COMPOSE), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_depends_on_names_defined_services() -> None:
    unknown = [
        f"{name} -> {dep}"
        for name, service in SERVICES.items()
        for dep in _depends_on(service)
        if dep not in SERVICES
    ]
    assert not unknown


def test_long_running_services_have_health_checks() -> None:
    missing = [
        name
        for name, service in SERVICES.items()
        if _is_long_running(service)
        and (
            "test" not in service.get("healthcheck", {})
            or service["healthcheck"].get("disable")
            or service["healthcheck"]["test"] in (["NONE"], "NONE")
        )
    ]
    assert not missing


def test_dependencies_wait_for_health_or_completion() -> None:
    wrong = []
    for name, service in SERVICES.items():
        for dep, condition in _depends_on(service).items():
            wanted = HEALTHY if _is_long_running(SERVICES[dep]) else ONE_SHOT
            if condition != wanted:
                wrong.append(f"{name} -> {dep}: {condition}, want {wanted}")
    assert not wrong


def test_every_other_service_is_a_one_shot_step_or_optional() -> None:
    # Otherwise a service could run forever with neither a health check nor
    # anything waiting for it to finish.
    waited_for = {
        dep
        for service in SERVICES.values()
        for dep, condition in _depends_on(service).items()
        if condition == ONE_SHOT
    }
    stray = [
        name
        for name, service in SERVICES.items()
        if not _is_long_running(service) and name not in waited_for and "profiles" not in service
    ]
    assert not stray
    restarting_one_shots = [n for n in waited_for if SERVICES[n].get("restart", "no") != "no"]
    assert not restarting_one_shots


def test_published_ports_bind_loopback_only() -> None:
    exposed = [
        f"{name}: {address or '<all addresses>'}:{host_port}"
        for name in SERVICES
        for address, host_port, _ in _published(name)
        if address != "127.0.0.1"
    ]
    assert not exposed


def test_volumes_and_bind_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    problems = []
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source = str(mount).split(":")[0]
            if source.startswith((".", "/")):
                if not (REPO_ROOT / source).exists():
                    problems.append(f"{name}: bind mount source {source} does not exist")
            elif source not in declared:
                problems.append(f"{name}: volume {source} is not declared under volumes:")
    assert not problems


# --- our image's entry points and settings -------------------------------------


@pytest.mark.parametrize("service_name", our_services())
def test_our_services_run_known_modules(service_name: str) -> None:
    modules = [i.module for i in invocations(service_name)]
    assert modules
    unknown = [m for m in modules if m not in SETTINGS_BY_MODULE]
    assert not unknown, f"{service_name} runs {unknown}: add them to SETTINGS_BY_MODULE"


def _services_with_settings() -> list[str]:
    return [name for name in our_services() if _settings_classes(name)]


@pytest.mark.parametrize("service_name", our_services())
def test_environment_has_only_variables_the_service_reads(service_name: str) -> None:
    known = set().union(*(_env_names(cls) for cls in _settings_classes(service_name)))
    unknown = sorted(
        key
        for key in _environment(SERVICES[service_name])
        if key.upper().startswith("FLEETPLANE_") and key.upper() not in known
    )
    assert not unknown, f"{service_name} sets variables nothing reads: {unknown}"


@pytest.mark.parametrize("service_name", _services_with_settings())
def test_settings_point_at_the_compose_services(service_name: str) -> None:
    loaded = _load_settings(service_name)
    database = _database(loaded)
    if database is not None:
        assert SERVICES[database.database_host]["image"].startswith("postgres:")
        assert database.database_port == POSTGRES_PORT
        # The role and database that infra/compose/postgres creates from the
        # postgres service's own copy of these values.
        postgres_env = _environment(SERVICES[database.database_host])
        assert database.database_name == postgres_env["FLEETPLANE_DATABASE_NAME"]
        assert database.database_user == postgres_env["FLEETPLANE_DATABASE_USER"]
        assert (
            database.database_password.get_secret_value()
            == postgres_env["FLEETPLANE_DATABASE_PASSWORD"]
        )
    kafka = _kafka(loaded)
    if kafka is not None:
        for address in kafka.kafka_bootstrap.split(","):
            host, _, port = address.rpartition(":")
            assert SERVICES[host]["image"].startswith("apache/kafka:")
            advertised = _environment(SERVICES[host])["KAFKA_ADVERTISED_LISTENERS"]
            # Only a listener the broker advertises under its compose name works
            # from another container (the HOST one says 127.0.0.1).
            assert f"://{host}:{port}" in advertised, f"{address} not in {advertised}"


def test_services_agree_on_the_shared_settings() -> None:
    databases = {}
    kafkas = {}
    for name in _services_with_settings():
        loaded = _load_settings(name)
        if (database := _database(loaded)) is not None:
            databases[name] = database
        if (kafka := _kafka(loaded)) is not None:
            kafkas[name] = kafka
    assert len(databases) >= 2
    assert len(kafkas) >= 2
    # The URL carries the password, which the JSON dump masks.
    assert len({(d.sync_url, d.model_dump_json()) for d in databases.values()}) == 1, databases
    # `init` creates the topics with the partition count the others expect.
    assert len({k.model_dump_json() for k in kafkas.values()}) == 1, kafkas


def test_api_instances_are_the_edge_upstreams() -> None:
    api_services = _services_running("services.api")
    assert len(api_services) >= 2, "two API instances, as natively"
    expected = set()
    for name in api_services:
        api = _get(_load_settings(name), ApiSettings)
        # The edge reaches the API across the compose network.
        assert api.host == "0.0.0.0", f"{name}: FLEETPLANE_API_HOST"  # noqa: S104
        expected.add((name, api.port))
        assert set(_depends_on(SERVICES["edge"])) >= {name}
    assert _edge_upstreams() == expected


def test_api_trusts_the_pki_volume_and_is_checked_as_the_edge_checks_it() -> None:
    trusted = re.search(r"proxy_ssl_trusted_certificate\s+(\S+);", EDGE_CONF.read_text())
    assert trusted, "edge.conf verifies the API with proxy_ssl_trusted_certificate"
    edge_pki, edge_read_only = _mount_target("edge", "pki")
    assert edge_read_only
    for name in _services_running("services.api"):
        loaded = _load_settings(name)
        api = _get(loaded, ApiSettings)
        pki_dir = _get(loaded, PkiLocation).pki_dir
        target, read_only = _mount_target(name, "pki")
        assert (str(pki_dir), read_only) == (target, True)
        for path in (api.tls_cert, api.tls_key, api.edge_ca):
            assert path.parent == pki_dir, f"{name}: {path} is outside the PKI volume"
        # Same file in both containers: the pki volume is mounted at one path.
        assert target == edge_pki
        url = _health_url(name)
        argv = _healthcheck_argv(name)
        assert (url[1], int(url[3])) == ("https", api.port)
        assert argv[argv.index("--cafile") + 1] == trusted[1]


def test_controllers_are_one_group_with_their_own_names_and_checks() -> None:
    controllers = _services_running("services.controller")
    assert len(controllers) >= 2, "two controllers, as natively"
    settings = [_get(_load_settings(name), ControllerSettings) for name in controllers]
    assert len({s.group_id for s in settings}) == 1
    assert len({s.instance_id for s in settings}) == len(settings)
    for name, controller in zip(controllers, settings, strict=True):
        # Only the in-container health check reads these pages.
        assert controller.web_host == "127.0.0.1"
        assert int(_health_url(name)[3]) == controller.web_port
        # A relative folder would land in the image's working directory.
        assert controller.data_dir.is_absolute()


# --- the edge -----------------------------------------------------------------


def test_edge_publishes_exactly_what_it_listens_on() -> None:
    text = EDGE_CONF.read_text()
    listens = {int(p) for p in re.findall(r"^\s*listen\s+(\d+)\b", text, re.M)}
    assert listens, "every listen directive binds all container addresses"
    assert not re.search(r"^\s*listen\s+127\.", text, re.M)
    assert {container for _, _, container in _published("edge")} == listens


def test_edge_runs_as_the_uid_that_owns_the_pki_keys() -> None:
    runs = " ".join(rest for kw, rest in dockerfile_instructions() if kw == "RUN")
    uid = re.search(r"useradd\b[^&]*?--uid\s+(\d+)", runs)
    gid = re.search(r"groupadd\b[^&]*?--gid\s+(\d+)", runs)
    assert uid, "the Dockerfile creates its user with a fixed uid"
    assert gid, "the Dockerfile creates its group with a fixed gid"
    assert SERVICES["edge"]["user"] == f"{uid[1]}:{gid[1]}"


# --- Kafka ----------------------------------------------------------------------


def _native_broker_properties() -> dict[str, str]:
    script = NATIVE_KAFKA_SCRIPT.read_text()
    block = re.search(r'cat >"\$PROPS" <<EOF\n(.*?)\nEOF', script, re.S)
    assert block, f"no server.properties heredoc in {NATIVE_KAFKA_SCRIPT}"
    lines = [ln for ln in block[1].splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


def _compose_broker_properties() -> dict[str, str]:
    # The apache/kafka image's rule: drop KAFKA_, lower-case, "_" -> ".",
    # "___" -> "-", "__" -> "_".
    properties = {}
    for key, value in _environment(SERVICES["kafka"]).items():
        if key.startswith("KAFKA_") and key not in KAFKA_JVM_VARIABLES:
            name = key.removeprefix("KAFKA_").lower().replace("_", ".")
            properties[name.replace("...", "-").replace("..", "_")] = value
    return properties


def test_kafka_has_the_native_broker_settings() -> None:
    native = _native_broker_properties()
    compose = _compose_broker_properties()
    assert compose["auto.create.topics.enable"] == "false"
    assert compose["group.min.session.timeout.ms"] == "1000"
    differ = {
        key: (native.get(key), compose.get(key))
        for key in (native.keys() | compose.keys()) - KAFKA_DEPLOYMENT_SPECIFIC
        if native.get(key) != compose.get(key)
    }
    assert not differ, f"(native, compose) differ: {differ}"


def test_kafka_cluster_id_is_a_kraft_uuid() -> None:
    cluster_id = _environment(SERVICES["kafka"])["CLUSTER_ID"]
    # KRaft wants 16 bytes in URL-safe base64 without padding, not starting with "-".
    raw = base64.urlsafe_b64decode(cluster_id + "==")
    assert len(raw) == 16
    assert base64.urlsafe_b64encode(raw).decode().rstrip("=") == cluster_id
    assert not cluster_id.startswith("-")


# --- the image ----------------------------------------------------------------


def test_dockerfile_builds_a_non_root_python_311_image() -> None:
    instructions = dockerfile_instructions()
    assert [rest for kw, rest in instructions if kw == "FROM"] == ["python:3.11-slim-bookworm"]
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert dockerfile_json("ENTRYPOINT") == ["python", "-m"]
    # Build tools would stay in the image: every dependency must come as a wheel
    # or pure Python.
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert not re.search(r"\b(gcc|build-essential)\b", runs)
    installed = re.findall(r"apt-get install (.*?)(?:&&|$)", runs)
    packages = {w for line in installed for w in line.split() if not w.startswith("-")}
    assert packages <= {"postgresql-client-15"}, packages


def test_image_has_pg_dump_of_the_server_major_version() -> None:
    # A newer pg_dump writes settings an older server refuses, and an older one
    # refuses a newer server: the image's client must match compose's server.
    server = SERVICES["postgres"]["image"]
    major = re.fullmatch(r"postgres:(\d+)(\.\d+)*", server)
    assert major, server
    runs = " ".join(rest for kw, rest in dockerfile_instructions() if kw == "RUN")
    assert f"postgresql-client-{major[1]}" in runs
    # Debian 12 (bookworm) carries PostgreSQL 15; an unpinned tag would move.
    froms = [rest for kw, rest in dockerfile_instructions() if kw == "FROM"]
    assert all(f.endswith("-bookworm") for f in froms), froms
    assert BackupSettings().pg_bin == Path(f"/usr/lib/postgresql/{major[1]}/bin")


def test_dockerignore_lets_through_everything_the_dockerfile_copies() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    # An allow-list: everything is excluded, then the copied paths let back in.
    assert "*" in lines
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            copied += words[:-1]
    assert copied
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path"
        assert source.rstrip("/") in allowed, f".dockerignore excludes COPY source {source}"


def test_lock_pins_every_runtime_dependency() -> None:
    # The Dockerfile installs pyproject.toml's dependencies with requirements.lock
    # as constraints: a package the lock does not name would come unpinned.
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    lock = REPO_ROOT / "requirements.lock"
    pinned = {
        canonicalize_name(line.split("==")[0])
        for line in lock.read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    queue = [(Requirement(r), frozenset[str]()) for r in pyproject["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    needed: set[str] = set()
    while queue:
        requirement, parent_extras = queue.pop()
        if not _marker_applies(requirement.marker, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.add(name)
        for child in importlib.metadata.requires(name) or []:
            queue.append((Requirement(child), frozenset(requirement.extras)))
    assert needed - pinned == set()


def _marker_applies(marker: Marker | None, extras: frozenset[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({"extra": extra}) for extra in extras | {""})
