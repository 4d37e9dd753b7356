"""age encryption of backup objects (pyrage), streamed in constant memory.

age is a vetted streaming format (64 KiB authenticated chunks); Debian's ``age``
decrypts a downloaded object by hand: ``age -d -i key.txt dump > dump.pgc``.
Backups need only the recipient (public key); restore and verify need the identity.
"""

from __future__ import annotations

from typing import IO, Any

import pyrage

from services.backup.settings import BackupSettings


class CryptoError(Exception):
    """A key is missing, malformed or does not open the backup; the message says which."""


def _identity_text(settings: BackupSettings) -> str | None:
    if settings.age_identity is not None:
        return settings.age_identity.get_secret_value().strip()
    if settings.age_identity_file is not None:
        try:
            lines = settings.age_identity_file.read_text().splitlines()
        except OSError as e:
            raise CryptoError(f"cannot read the age identity file: {e}") from e
        keys = [line.strip() for line in lines if line.strip().startswith("AGE-SECRET-KEY-")]
        if not keys:
            raise CryptoError(
                f"{settings.age_identity_file} holds no AGE-SECRET-KEY line (age-keygen's format)"
            )
        return keys[0]
    return None


def identity(settings: BackupSettings) -> Any | None:
    """The age identity from FLEETPLANE_BACKUP_AGE_IDENTITY(_FILE), or None when unset."""
    text = _identity_text(settings)
    if text is None:
        return None
    try:
        return pyrage.x25519.Identity.from_str(text)
    except pyrage.IdentityError as e:
        raise CryptoError("the age identity is malformed (want AGE-SECRET-KEY-1…)") from e


def recipient(settings: BackupSettings) -> Any | None:
    """Who backups are encrypted to: the configured recipient, else the identity's; or None."""
    if settings.age_recipient is not None:
        try:
            return pyrage.x25519.Recipient.from_str(settings.age_recipient.strip())
        except pyrage.RecipientError as e:
            raise CryptoError("FLEETPLANE_BACKUP_AGE_RECIPIENT is malformed (want age1…)") from e
    own = identity(settings)
    return None if own is None else own.to_public()


def encrypt(source: IO[bytes], sink: IO[bytes], to: Any) -> None:
    """Encrypt ``source`` until EOF into ``sink``; blocks; neither is closed."""
    pyrage.encrypt_io(source, sink, [to])


def decrypt(source: IO[bytes], sink: IO[bytes], key: Any) -> None:
    """Decrypt ``source`` into ``sink``; raises CryptoError for a wrong key or damaged data."""
    try:
        pyrage.decrypt_io(source, sink, [key])
    except pyrage.DecryptError as e:
        raise CryptoError(
            f"cannot decrypt the backup: {e}; the age identity does not match the key it "
            "was encrypted to, or the object is damaged"
        ) from e


class _Enough(Exception):
    pass


class _StopAtFirstWrite:
    """A sink that ends decryption as soon as the first authenticated chunk is out."""

    def write(self, data: bytes) -> int:
        raise _Enough


def check_key(source: IO[bytes], key: Any) -> None:
    """Raise CryptoError unless ``key`` opens ``source``, reading only its first chunk.

    Lets restore refuse a wrong key before it touches the target database.
    """
    try:
        pyrage.decrypt_io(source, _StopAtFirstWrite(), [key])
    except _Enough:
        return
    except pyrage.DecryptError as e:
        raise CryptoError(
            f"cannot decrypt the backup: {e}; the age identity does not match the key it "
            "was encrypted to, or the object is damaged"
        ) from e
