"""The bucket behind one small interface, and its S3 implementation.

Every transfer goes through boto3's managed transfer (multipart with a bounded
number of parts in memory) and botocore's standard retry mode: no retry or
multipart code of our own. A multipart upload becomes visible only when it is
completed, so an interrupted backup never leaves a partial object; s3transfer
aborts the upload when the failure lets it reach the server, and
``jobs.abort_open_uploads`` (``open_uploads`` and ``abort`` here) cleans up after
the ones it could not (a killed process, a server that was down).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any, Protocol

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.backup.settings import S3Settings


class StorageError(Exception):
    """The bucket could not be reached or refused a request; the message says which."""


class NotFound(StorageError):
    """No object under that key."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified: datetime


@dataclass(frozen=True, slots=True)
class OpenUpload:
    key: str
    upload_id: str
    initiated: datetime


class Storage(Protocol):
    """What the verbs need from a bucket. Every method blocks; errors are StorageError."""

    def check(self) -> None:
        """Raise StorageError unless the bucket answers."""

    def upload(self, key: str, stream: IO[bytes]) -> None:
        """Store everything read from ``stream`` (until EOF) under ``key``.

        The object appears only when the stream ended cleanly; an exception raised by
        the stream's ``read`` aborts the upload.
        """

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes:
        """Raises NotFound when there is no such object."""

    def download(self, key: str, out: IO[bytes]) -> None:
        """Write the object to ``out`` (seekable); raises NotFound."""

    def list_objects(self, prefix: str) -> list[StoredObject]: ...

    def delete(self, keys: list[str]) -> None: ...

    def open_uploads(self, prefix: str) -> list[OpenUpload]:
        """Multipart uploads started under ``prefix`` and neither completed nor aborted."""

    def abort(self, upload: OpenUpload) -> None: ...


def _explain(error: Exception, what: str, settings: S3Settings) -> StorageError:
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "?")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{what}: no such object in bucket {settings.bucket}")
        if code == "NoSuchBucket":
            return StorageError(
                f"{what}: bucket {settings.bucket} does not exist at {settings.url}"
            )
        return StorageError(f"{what}: S3 at {settings.url} refused: {code}: {error}")
    return StorageError(
        f"{what}: S3 at {settings.url} unreachable after {settings.max_attempts} "
        f"attempts ({error}); check FLEETPLANE_S3_ENDPOINT and that the server is running"
    )


class S3Storage:
    """A bucket on any S3-compatible server (path-style addressing)."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        config = Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
            # boto3 >= 1.36 adds CRC checksums to every upload by default, which not
            # every S3-compatible server accepts; the sha256 in the manifest is ours.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
        )
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key.get_secret_value(),
            config=config,
        )
        part = settings.part_size_mib * 1024 * 1024
        self._transfer = TransferConfig(
            multipart_threshold=part,
            multipart_chunksize=part,
            max_concurrency=settings.max_concurrency,
            # A pipe cannot be re-read: s3transfer keeps each part in memory until it
            # is sent, at most 10 parts (its fixed default), so memory is bounded by
            # the part size, whatever the database's size.
            use_threads=True,
        )

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (for the scripts that start the server)."""
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
            return
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise _explain(e, "checking the bucket", self.settings) from e
        except BotoCoreError as e:
            raise _explain(e, "checking the bucket", self.settings) from e
        try:
            self._client.create_bucket(Bucket=self.settings.bucket)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, "creating the bucket", self.settings) from e

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.settings.bucket)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, "checking the bucket", self.settings) from e

    def upload(self, key: str, stream: IO[bytes]) -> None:
        try:
            self._client.upload_fileobj(stream, self.settings.bucket, key, Config=self._transfer)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"uploading {key}", self.settings) from e

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"writing {key}", self.settings) from e

    def get(self, key: str) -> bytes:
        try:
            body = self._client.get_object(Bucket=self.settings.bucket, Key=key)["Body"]
            return bytes(body.read())
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"reading {key}", self.settings) from e

    def download(self, key: str, out: IO[bytes]) -> None:
        try:
            self._client.download_fileobj(self.settings.bucket, key, out, Config=self._transfer)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"downloading {key}", self.settings) from e

    def _pages(self, operation: str, prefix: str, field: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator(operation)
        for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
            yield from page.get(field, [])

    def list_objects(self, prefix: str) -> list[StoredObject]:
        try:
            return [
                StoredObject(o["Key"], int(o["Size"]), o["LastModified"])
                for o in self._pages("list_objects_v2", prefix, "Contents")
            ]
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"listing {prefix}", self.settings) from e

    def delete(self, keys: list[str]) -> None:
        try:
            for key in keys:
                self._client.delete_object(Bucket=self.settings.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, "deleting objects", self.settings) from e

    def open_uploads(self, prefix: str) -> list[OpenUpload]:
        try:
            return [
                OpenUpload(u["Key"], u["UploadId"], u["Initiated"])
                for u in self._pages("list_multipart_uploads", prefix, "Uploads")
            ]
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, "listing open multipart uploads", self.settings) from e

    def abort(self, upload: OpenUpload) -> None:
        try:
            self._client.abort_multipart_upload(
                Bucket=self.settings.bucket, Key=upload.key, UploadId=upload.upload_id
            )
        except (BotoCoreError, ClientError) as e:
            raise _explain(e, f"aborting the upload of {upload.key}", self.settings) from e
