"""The PostgreSQL NOTIFY channels, named once for every writer and follower."""

from __future__ import annotations

from typing import Final

COMMANDS_CHANNEL: Final = "fleetplane_commands"
"""The controller created or re-offered commands; payload ``<customer>/<environment>``,
sent in the transaction that wrote them. The API wakes that environment's long polls."""
IDENTITY_CHANNEL: Final = "fleetplane_identity"
"""A revocation was recorded or the set of issuing CAs changed (gateway_auth, restores);
the API and gateway_auth reload their trust state."""
