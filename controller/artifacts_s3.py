"""S3 (or any S3-protocol store) for bundle bytes, through boto3.

Rules this module keeps:
- bundle bytes never pass through the controller on download: the controller's bundle route
  answers with a redirect to a presigned GET URL made fresh for each request, so URLs in stored
  desired state never expire and HTTP Range resume works against S3 itself;
- an upload is streamed, hashed and size-capped while it goes up (a multipart upload for large
  bundles); an oversized upload is aborted and leaves no object behind;
- keys are the same layout as the local store (`bundles/<name>/<version>/bundle.tar`) under an
  optional prefix, so moving from one store to the other is a copy.
"""

from __future__ import annotations

import hashlib
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from fleet.controller.artifacts import ArtifactStore, check_key
from fleet.core.errors import InvalidInputError, NotFoundError

MULTIPART_CHUNK = 16 * 1024 * 1024


class _CappedHashingReader:
    """A file-like view of `src` that hashes what is read and refuses more than `limit` bytes."""

    def __init__(self, src: BinaryIO, limit: int, key: str) -> None:
        self.src = src
        self.limit = limit
        self.key = key
        self.size = 0
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n if n is not None and n >= 0 else self.limit + 1 - self.size)
        self.size += len(data)
        if self.size > self.limit:
            raise InvalidInputError(f"artifact {self.key!r} exceeds the {self.limit} byte limit")
        self.digest.update(data)
        return data


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_ttl_s: int = 900,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise InvalidInputError("the S3 artifact store needs a bucket (FLEET_S3_BUCKET)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_ttl_s = presign_ttl_s
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, src: BinaryIO, *, max_bytes: int) -> tuple[int, str]:
        reader = _CappedHashingReader(src, max_bytes, key)
        config = boto3.s3.transfer.TransferConfig(multipart_chunksize=MULTIPART_CHUNK, use_threads=False)
        # upload_fileobj aborts the multipart upload when reading fails, so nothing partial stays.
        self.client.upload_fileobj(reader, self.bucket, self._key(key), Config=config)
        return reader.size, reader.digest.hexdigest()

    def open(self, key: str) -> BinaryIO:
        try:
            body: BinaryIO = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            raise self._missing(exc, key) from exc
        return body

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            raise self._missing(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def download_url(self, key: str, base_url: str) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=self.presign_ttl_s
        )
        return url

    def _missing(self, exc: ClientError, key: str) -> Exception:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFoundError(f"artifact {key!r} not found in s3://{self.bucket}", key=key)
        return exc
