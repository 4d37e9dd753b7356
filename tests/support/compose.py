"""docker-compose.yml and the Dockerfile, read as data: what the compose tests share.

The unit tests check the files' wiring without a Docker engine; the integration
tests run the entry points and scripts the files name.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
COMPOSE_FILE: Final = REPO_ROOT / "docker-compose.yml"
DOCKERFILE: Final = REPO_ROOT / "Dockerfile"


def _load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), f"{COMPOSE_FILE} is not a YAML mapping"
    return data


COMPOSE: Final = _load_compose()
SERVICES: Final[dict[str, dict[str, Any]]] = COMPOSE["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_json(keyword: str) -> list[str]:
    """The last exec-form (JSON) value of ENTRYPOINT or CMD, as Docker uses it."""
    values = [rest for kw, rest in dockerfile_instructions() if kw == keyword]
    assert values, f"Dockerfile has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"Dockerfile {keyword} must use the exec (JSON) form"
    return [str(part) for part in parsed]


def _argv(value: str | list[Any]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def our_services() -> list[str]:
    """Services built from this repository's Dockerfile."""
    return [name for name, service in SERVICES.items() if "build" in service]


def _effective_argv(service: dict[str, Any]) -> list[str]:
    # Docker's rule: a service that sets its own entrypoint drops the image's CMD.
    if "entrypoint" in service:
        return _argv(service["entrypoint"]) + _argv(service.get("command", []))
    command = _argv(service["command"]) if "command" in service else dockerfile_json("CMD")
    return dockerfile_json("ENTRYPOINT") + command


@dataclass(frozen=True)
class Invocation:
    module: str
    args: list[str]


def _python_module(words: list[str]) -> Invocation:
    if (
        len(words) < 3
        or PurePosixPath(words[0]).name not in {"python", "python3"}
        or words[1] != "-m"
    ):
        raise AssertionError(f"not a `python -m MODULE` command: {shlex.join(words)}")
    return Invocation(words[2], words[3:])


def invocations(service_name: str) -> list[Invocation]:
    """The Python modules a service runs, with their arguments, in order."""
    argv = _effective_argv(SERVICES[service_name])
    if PurePosixPath(argv[0]).name in {"sh", "bash"} and argv[1:2] == ["-c"]:
        # A shell script of `python -m ...` steps joined by && or ;.
        lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        steps: list[list[str]] = [[]]
        for token in lexer:
            if token in {"&&", ";"}:
                steps.append([])
            else:
                steps[-1].append(token)
        return [_python_module(step) for step in steps]
    return [_python_module(argv)]


def parsed_invocations(service_name: str) -> list[Invocation]:
    """Like invocations, but empty when the command cannot be read, so collecting
    the parametrised tests never errors: test_our_services_run_known_modules reports it."""
    try:
        return invocations(service_name)
    except AssertionError:
        return []
