"""The shared adapter store: content-addressed copies every node can read.

Boundary: bytes in and out of one place shared by the cluster; no validation (that happens after
every fetch, in `materialize`), no registry. Two backends, one layout:

    s3://bucket/prefix    (`S3Store`, boto3; an S3-compatible server works through an endpoint)
    file:///shared/dir    (`FileStore`: one machine, or a filesystem every node mounts)

    <location>/<digest>/<file>            the adapter's accepted files, as validated
    <location>/<digest>/manifest.json     {"digest", "files": {name: size}}, written last

Why the manifest is written last: a copy without one is incomplete (an upload that died
midway) and is neither fetched nor trusted as "already there". Why content addressed: the same
bytes imported twice (two tenants, two names) are stored once, and a fetched copy is checked
against the digest it is stored under, so a corrupted or tampered object is refused, not served.

Credentials of the store are the deployment's own (ambient: environment, pod identity, or the
`FetchCredentials` given to `open_store`), never a tenant's secretRef.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import AdapterFetchError, AdapterValidationError
from .sources import (
    MAX_MEMBERS,
    FetchCredentials,
    _Budget,
    _copy_stream,
    _s3_client,
    _s3_error,
    decide_member_path,
)

__all__ = ["MANIFEST", "FileStore", "S3Store", "SharedStore", "open_store"]

MANIFEST = "manifest.json"


def _manifest(digest: str, src_dir: Path, files: Iterable[str]) -> tuple[dict[str, int], bytes]:
    sizes = {name: (src_dir / name).stat().st_size for name in sorted(files)}
    return sizes, json.dumps({"digest": digest, "files": sizes}, sort_keys=True).encode()


def _read_manifest(raw: bytes, where: str, max_bytes: int) -> dict[str, int]:
    """The file list of a stored copy, refusing names and sizes no adapter has."""
    try:
        files = json.loads(raw)["files"]
        sizes = {str(k): int(v) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterFetchError(f"{where}: unreadable {MANIFEST}", transient=False) from exc
    if len(sizes) > MAX_MEMBERS or sum(sizes.values()) > max_bytes:
        raise AdapterValidationError(f"{where}: the stored copy exceeds the limits", "too_large")
    for name in sizes:
        if len(decide_member_path(name).parts) != 1:
            raise AdapterValidationError(f"{where}: {name!r} is not a plain file name",
                                         "path_traversal")
    return sizes


class SharedStore(ABC):
    """A content-addressed adapter store. All methods block: call them through a thread."""

    url: str

    def locate(self, digest: str) -> str:
        """The URI of `digest`'s copy (what `AdapterRecord.stored_at` holds)."""
        return f"{self.url.rstrip('/')}/{digest}"

    @abstractmethod
    def has(self, digest: str) -> bool:
        """Whether a complete copy of `digest` is stored."""

    @abstractmethod
    def put(self, src_dir: Path, digest: str, files: Iterable[str]) -> str:
        """Store `files` of `src_dir` as `digest` (a no-op when complete); return its URI."""

    @abstractmethod
    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> Path:
        """Copy `digest`'s files into the new directory `dest`; `AdapterFetchError` if absent."""


class FileStore(SharedStore):
    """A directory as the store (`file:///path`): the single-machine default, or an NFS mount."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()

    def has(self, digest: str) -> bool:
        return (self.root / digest / MANIFEST).is_file()

    def put(self, src_dir: Path, digest: str, files: Iterable[str]) -> str:
        if self.has(digest):
            return self.locate(digest)
        _, manifest = _manifest(digest, src_dir, files := list(files))
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{digest}-{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            for name in files:
                shutil.copyfile(src_dir / name, staging / name)
            (staging / MANIFEST).write_bytes(manifest)
            try:
                os.rename(staging, self.root / digest)  # atomic; another writer may have won
            except OSError:
                if not self.has(digest):
                    raise
        except OSError as exc:
            raise AdapterFetchError(f"cannot write to the adapter store {self.url}: {exc}",
                                    transient=True) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.locate(digest)

    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> Path:
        where = self.locate(digest)
        try:
            sizes = _read_manifest((self.root / digest / MANIFEST).read_bytes(), where, max_bytes)
        except FileNotFoundError as exc:
            raise AdapterFetchError(f"{where} is not in the adapter store", transient=False) \
                from exc
        dest.mkdir(parents=True, exist_ok=False)
        for name in sizes:
            shutil.copyfile(self.root / digest / name, dest / name)
        return dest


class S3Store(SharedStore):
    """An S3 bucket (or any S3-compatible server) as the store: `s3://bucket/prefix`."""

    def __init__(self, url: str, credentials: FetchCredentials | None = None,
                 client: Any = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"{url!r}: expected s3://bucket/prefix")
        self.bucket = parts.netloc
        self.prefix = unquote(parts.path).strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = client if client is not None else _s3_client(credentials)

    def _key(self, digest: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, digest, name) if p)

    def has(self, digest: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(digest, MANIFEST))
            return True
        except Exception as exc:
            error = _s3_error(self.locate(digest), exc)
            if error.transient:
                raise error from exc
            return False

    def put(self, src_dir: Path, digest: str, files: Iterable[str]) -> str:
        if self.has(digest):
            return self.locate(digest)
        _, manifest = _manifest(digest, src_dir, files := list(files))
        try:
            for name in files:
                self._client.upload_file(str(src_dir / name), self.bucket,
                                         self._key(digest, name))
            self._client.put_object(Bucket=self.bucket, Key=self._key(digest, MANIFEST),
                                    Body=manifest, ContentType="application/json")
        except Exception as exc:
            raise _s3_error(self.locate(digest), exc) from exc
        return self.locate(digest)

    def fetch(self, digest: str, dest: Path, *, max_bytes: int) -> Path:
        where = self.locate(digest)
        try:
            body = self._client.get_object(Bucket=self.bucket,
                                           Key=self._key(digest, MANIFEST))["Body"]
            try:
                sizes = _read_manifest(body.read(1 << 16), where, max_bytes)
            finally:
                body.close()
            dest.mkdir(parents=True, exist_ok=False)
            budget = _Budget(max_bytes)  # the manifest's sizes are a claim: count real bytes
            for name in sizes:
                obj = self._client.get_object(Bucket=self.bucket, Key=self._key(digest, name))
                try:
                    _copy_stream(obj["Body"], dest / name, budget)
                finally:
                    obj["Body"].close()
        except (AdapterFetchError, AdapterValidationError):
            raise
        except Exception as exc:
            raise _s3_error(where, exc) from exc
        # What was fetched is checked against the digest by the caller (`materialize`).
        return dest


def open_store(url: str, credentials: FetchCredentials | None = None) -> SharedStore:
    """The store a URL names: `s3://bucket/prefix` or `file:///path` (others are refused)."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return S3Store(url, credentials)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: file:// store URLs must name a local path")
        return FileStore(unquote(parts.path))
    raise ValueError(f"unsupported adapter store {url!r}: use s3://bucket/prefix or file:///path")
