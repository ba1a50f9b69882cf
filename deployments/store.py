"""Byte storage for job records, uploads and artifacts, behind one small interface.

Keys are POSIX-style relative paths (``jobs/<id>/job.json``). Two backends:

* :class:`LocalStore` — a directory on the local disk (the default; fine for one node
  or a shared filesystem);
* :class:`S3Store` — an S3 bucket through boto3, with a configurable ``endpoint_url``
  (MinIO, moto, Ceph ...).

Both are plain, picklable objects built from a :class:`StoreConfig`, so
the ingress, the model deployments and Ray tasks each build their own from the config.
It lives with the model servers (the lowest layer that uses it); ``serve_app`` imports it from here.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Chunk size of streamed downloads, bytes.
STREAM_CHUNK_BYTES = 1024 * 1024


def iter_file(path: str) -> Iterator[bytes]:
    """A local file in STREAM_CHUNK_BYTES chunks (for streaming responses of temporary ZIPs)."""
    with open(path, "rb") as f:
        while chunk := f.read(STREAM_CHUNK_BYTES):
            yield chunk


class StoreConfig(BaseModel):
    """Where job records, uploads and artifacts live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "s3"] = Field("local", description="Backend: a local directory or an S3 bucket.")
    path: str = Field("./runs/service", description="Root directory of the local store.")
    bucket: str | None = Field(None, description="S3 bucket (kind=s3).")
    prefix: str = Field("recon3d", description="Key prefix inside the S3 bucket.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto ...); None = AWS.")
    region: str | None = Field(None, description="S3 region name.")
    create_bucket: bool = Field(False, description="Create the bucket at start-up when it does not exist.")
    shared: bool = Field(
        False,
        description="kind=local only: the directory is a filesystem every Ray node mounts at the same path "
        "(NFS, EFS, ...). Without it the builder refuses a local store on a cluster of more than one node.",
    )

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> StoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("store.kind 's3' needs store.bucket")
        return self


class InvalidKeyError(ValueError):
    """A key that is absolute, empty or climbs out of the store root."""


def check_key(key: str) -> str:
    """Return ``key`` normalised; raise InvalidKeyError if it could escape the store root."""
    if not isinstance(key, str) or not key or "\x00" in key or "\\" in key:
        raise InvalidKeyError(f"invalid key {key!r}")
    norm = posixpath.normpath(key)
    if key.startswith("/") or norm == "." or norm.startswith("../") or norm == ".." or "/../" in f"/{key}/":
        raise InvalidKeyError(f"key {key!r} escapes the store root")
    return norm


class Store(ABC):
    """Put/get/list/delete bytes by key."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically (readers see the old or the new value, never half)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes at ``key``; raises KeyError when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key; absent keys are ignored."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of the value at ``key`` in bytes; raises KeyError when absent."""

    def iter_bytes(self, key: str, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        """Stream the value in chunks (default: one get)."""
        data = self.get(key)
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A URL a client can download from directly, or None when the backend cannot make one."""
        return None

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many."""
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)

    def put_file(self, key: str, path: str | Path) -> None:
        self.put(key, Path(path).read_bytes())

    def download_prefix(self, prefix: str, dest: str | Path) -> list[Path]:
        """Copy every key under ``prefix`` into ``dest`` (keeping the relative layout)."""
        prefix = prefix.rstrip("/") + "/"
        out = []
        for k in self.list(prefix):
            p = Path(dest) / k[len(prefix) :]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(self.get(k))
            out.append(p)
        return out


class LocalStore(Store):
    """Keys are files under ``root``; writes go through a temporary file and ``os.replace``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=p.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        p = self._path(key)
        if not p.is_file():
            raise KeyError(key)
        return p.stat().st_size

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, key: str) -> None:
        p = self._path(key)
        p.unlink(missing_ok=True)
        # Prune empty parent folders so listings stay cheap.
        for parent in p.parents:
            if parent == self.root or not parent.is_dir():
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def iter_bytes(self, key: str, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        p = self._path(key)
        if not p.is_file():
            raise KeyError(key)
        with open(p, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def __reduce__(self):
        return (LocalStore, (str(self.root),))


class S3Store(Store):
    """Keys live under ``prefix`` in one bucket. The boto3 client is built lazily (and per process)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        create_bucket: bool = False,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._client = None
        if create_bucket:
            self._ensure_bucket()

    def __reduce__(self):
        return (
            S3Store,
            (self.bucket,),
            {"prefix": self.prefix, "endpoint_url": self.endpoint_url, "region": self.region},
        )

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)
        return self._client

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _k(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def put(self, key: str, data: bytes) -> None:
        # S3 PUTs are atomic per object.
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except KeyError:
            return False

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise KeyError(key) from None
            raise

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        full = self._k(prefix) if prefix else self.prefix
        if full:
            full += "/"
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(self._strip(o["Key"]) for o in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def iter_bytes(self, key: str, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None
        yield from body.iter_chunks(chunk_size)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=int(expires_s)
        )


def make_store(cfg: StoreConfig) -> Store:
    """Build the store a :class:`StoreConfig` describes."""
    if cfg.kind == "s3":
        return S3Store(
            cfg.bucket or "",
            prefix=cfg.prefix,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            create_bucket=cfg.create_bucket,
        )
    return LocalStore(cfg.path)
