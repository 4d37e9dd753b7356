"""The S3 server the project starts (Versity Gateway): multipart upload, and aborts."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterator

import pytest

from services.backup.settings import S3Settings
from services.backup.storage import S3Storage, StorageError


@pytest.fixture
def storage() -> Iterator[tuple[S3Storage, str]]:
    store = S3Storage(S3Settings(part_size_mib=5))
    try:
        store.check()
    except StorageError as e:
        pytest.fail(f"{e} (start the stack with `bash infra/local/stack.sh up`)")
    prefix = f"test-{uuid.uuid4().hex[:10]}/"
    yield store, prefix
    store.delete([o.key for o in store.list_objects(prefix)])
    for upload in store.open_uploads(prefix):
        store.abort(upload)


def test_multipart_upload_round_trips(storage: tuple[S3Storage, str]) -> None:
    store, prefix = storage
    data = os.urandom(12 * 1024 * 1024)  # three 5 MiB parts
    store.upload(prefix + "object", io.BytesIO(data))
    out = io.BytesIO()
    store.download(prefix + "object", out)
    assert hashlib.sha256(out.getvalue()).digest() == hashlib.sha256(data).digest()
    assert [o.size for o in store.list_objects(prefix)] == [len(data)]


class _FailsAfter(io.RawIOBase):
    """A stream that breaks after some bytes, like a pg_dump that dies midway."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override] # RawIOBase's buffer type
        if self.left <= 0:
            raise OSError("the dump broke")
        n = min(len(buffer), self.left)
        buffer[:n] = b"\x07" * n
        self.left -= n
        return n


def test_a_broken_stream_leaves_no_object_and_no_open_upload(
    storage: tuple[S3Storage, str],
) -> None:
    store, prefix = storage
    with pytest.raises(OSError, match="the dump broke"):
        store.upload(prefix + "object", io.BufferedReader(_FailsAfter(11 * 1024 * 1024)))
    assert store.list_objects(prefix) == []
    assert store.open_uploads(prefix) == []
