"""The manifest stored beside each backup object, and where objects live in the bucket.

A backup exists when its manifest does: the dump object is written first, the
manifest last, so a listing never shows a backup whose dump is incomplete.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

FORMAT_VERSION = 1
TOOL_VERSION = "fleetplane-backup 1"


class TableSum(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: int
    checksum: str
    """Sum over the rows of the first 60 bits of md5(row::text): order-independent."""


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    backup_id: str
    database: str
    dump_key: str
    sha256: str
    """Of the stored object (after encryption)."""
    size: int
    started_at: datetime
    finished_at: datetime
    pg_version: str
    pg_dump_version: str
    alembic_revision: str | None
    epoch_sequence_value: int | None
    """ownership_epoch_seq's last value when the dump began."""
    commands_id_sequence_value: int | None
    partition_offsets: dict[str, dict[int, int]]
    """topic -> partition -> next offset to apply, from the dump's own snapshot."""
    tables: dict[str, TableSum]
    """From the dump's own snapshot, so verify compares like with like."""
    tool_version: str = TOOL_VERSION
    encryption: Literal["age", "none"]
    recipient: str | None = None


class Verification(BaseModel):
    model_config = ConfigDict(frozen=True)

    backup_id: str
    ok: bool
    verified_at: datetime
    detail: str


class Layout:
    """Object keys: ``<prefix>/<database>/<backup id>/{dump,manifest.json,verified.json}``."""

    def __init__(self, prefix: str, database: str) -> None:
        self.root = f"{prefix.strip('/')}/{database}/"

    def folder(self, backup_id: str) -> str:
        return f"{self.root}{backup_id}/"

    def dump(self, backup_id: str, encrypted: bool) -> str:
        return self.folder(backup_id) + ("dump.pgc.age" if encrypted else "dump.pgc")

    def manifest(self, backup_id: str) -> str:
        return self.folder(backup_id) + "manifest.json"

    def verification(self, backup_id: str) -> str:
        return self.folder(backup_id) + "verified.json"

    def backup_id_of(self, key: str) -> str | None:
        rest = key.removeprefix(self.root)
        if rest == key or "/" not in rest:
            return None
        return rest.split("/", 1)[0]
