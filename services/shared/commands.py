"""The commands contract: what ``GET /v1/commands`` returns to an agent.

An agent applies a command only if its ``epoch`` is not older than the newest
epoch it has seen: a command from an older epoch was created by a controller
that has since lost the customer's partition. It reports the outcome with a
``command_result`` event carrying the command's id and epoch.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.shared.events import ResourceKind, ResourceName, Version

MAX_WAIT_S: Final = 25
"""Longest long-poll; the edge's read timeout on this route is well above it."""


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandResource(_Reply):
    kind: ResourceKind
    name: ResourceName
    version: Version | None
    """The version to run; None for delete."""


class Command(_Reply):
    id: Annotated[int, Field(ge=1)]
    epoch: Annotated[int, Field(ge=0)]
    """The owning controller's epoch when the command was created."""
    revision: Annotated[int, Field(ge=1)]
    """The desired-state revision this command moves the environment towards."""
    action: Literal["create", "update", "delete"]
    resource: CommandResource
    attempt: Annotated[int, Field(ge=1)]
    """1 for the first offer; higher when re-offered after no result came in time."""


class CommandsReply(_Reply):
    commands: list[Command]
    next_poll_s: Annotated[float, Field(ge=0)]
    """When to poll again: the server's suggestion, with jitter to spread agents out."""
