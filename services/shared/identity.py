"""Agent identity: the ids carried by an agent's client certificate.

The edge (nginx) forwards the verified certificate's subject DN in RFC 2253 form
(``CN=<agent>,OU=<environment>,O=<customer>``). Ids are restricted to a small
alphabet so the DN needs no escaping and cannot smuggle extra attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ID_RE: Final = re.compile(ID_PATTERN)
SPIFFE_PREFIX: Final = "spiffe://fleetplane/"


class IdentityError(ValueError):
    """The presented identity is malformed."""


def check_id(kind: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise IdentityError(f"{kind} id {value!r} must match {ID_PATTERN}")
    return value


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    customer_id: str
    environment_id: str
    agent_id: str

    def __post_init__(self) -> None:
        check_id("customer", self.customer_id)
        check_id("environment", self.environment_id)
        check_id("agent", self.agent_id)

    @property
    def spiffe_uri(self) -> str:
        return (
            f"{SPIFFE_PREFIX}customer/{self.customer_id}"
            f"/env/{self.environment_id}/agent/{self.agent_id}"
        )

    @classmethod
    def from_subject_dn(cls, dn: str) -> AgentIdentity:
        """Parse nginx's ``$ssl_client_s_dn`` (RFC 2253, most specific first).

        Raises IdentityError unless the DN holds exactly one O, OU and CN.
        """
        attributes: dict[str, str] = {}
        for part in dn.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or name not in ("O", "OU", "CN") or name in attributes:
                raise IdentityError(f"unexpected subject DN {dn!r}")
            attributes[name] = value
        if attributes.keys() != {"O", "OU", "CN"}:
            raise IdentityError(f"subject DN {dn!r} must carry O, OU and CN")
        return cls(attributes["O"], attributes["OU"], attributes["CN"])
