"""Where adapters come from: copy or download an adapter into a local directory.

Boundary: I/O only, no judgement about the adapter itself (that is `validation`). Supported URIs:
a local path or `file://` (copied, links refused), `hf://org/name[@revision]` (the local Hugging
Face cache only: this service runs offline), `http(s)://` (an archive `.tar.gz`/`.tgz`/`.zip`, or a
base URL holding `adapter_config.json` and `adapter_model.safetensors`), `s3://bucket/prefix`
(needs the optional `boto3`). Every byte written is counted against `max_bytes`.

Archive members are judged by the pure `decide_member_path`; hostile archives (absolute paths,
`..`, links, devices, sparse files, too many members, too many bytes, GNU long-name or pax
headers larger than `MAX_EXTENSION_HEADER_BYTES`) raise `AdapterValidationError`; a header's
size is checked before the header is read. Network failures raise `AdapterFetchError` with
`transient` telling whether a retry may help.

HTTP sources: every connection goes to an address `netguard` accepted (no private, loopback or
link-local address unless `allow_networks` names it), and one deadline (`deadline_s`) bounds the
whole fetch, redirects and every file included; `timeout_s` bounds each connect and read. Error
messages quote the client's URI or member names only through `client_text`, and never this
server's paths.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import httpx

from .errors import AdapterFetchError, AdapterValidationError, client_text
from .netguard import AddressRefused, CheckedTransport, IPNetwork, Resolver, system_resolver
from .validation import CONFIG_FILE, WEIGHTS_FILE

__all__ = [
    "ARCHIVE_SUFFIXES",
    "MAX_EXTENSION_HEADER_BYTES",
    "FetchCredentials",
    "decide_member_path",
    "extract_archive",
    "fetch_adapter",
]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
MAX_MEMBERS = 64
# A GNU long name / long link or a pax header: a path of at most PATH_MAX (4 KiB) and a few
# attributes. tarfile reads one whole into memory, so its size is checked first.
MAX_EXTENSION_HEADER_BYTES = 16 << 10
# Extension headers in one archive: a pax header and a long name per member, plus globals.
# Each one also costs a recursion level in tarfile.
_MAX_EXTENSION_HEADERS = 2 * MAX_MEMBERS + 4
_CHUNK = 1 << 16
# Files fetched from a base URL / S3 prefix: what validation accepts, nothing else.
_REMOTE_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True, slots=True)
class FetchCredentials:
    """Secrets for a source. `token`: HTTP bearer token or Hugging Face token."""

    token: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    endpoint_url: str | None = None  # S3-compatible stores (MinIO...)
    region: str | None = None

    def __repr__(self) -> str:  # never print secrets into logs
        return "FetchCredentials(<redacted>)"


def _permanent(reason: str) -> AdapterFetchError:
    return AdapterFetchError(reason, transient=False)


def _os_reason(exc: BaseException) -> str:
    """An exception for a message, without the file name an OSError carries (a server path)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return client_text(str(exc), 120)


# --- byte counting --------------------------------------------------------------------------


class _Budget:
    """Counts bytes written across all files of one fetch."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise AdapterValidationError(
                f"the adapter is larger than the limit of {self.max_bytes} bytes", "too_large"
            )


def _copy_stream(src: IO[bytes], dest: Path, budget: _Budget) -> None:
    # "xb": a name seen twice (duplicate archive member) fails instead of overwriting.
    with dest.open("xb") as out:
        while chunk := src.read(_CHUNK):
            budget.take(len(chunk))
            out.write(chunk)


# --- archives -------------------------------------------------------------------------------


def decide_member_path(name: str) -> PurePosixPath:
    """Return the safe relative path of an archive member, or raise `path_traversal`."""
    if not name or "\\" in name or "\0" in name:
        raise AdapterValidationError(f"archive member name {client_text(name)} is not allowed",
                                     "path_traversal")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise AdapterValidationError(f"archive member {client_text(name)} is an absolute path",
                                     "path_traversal")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts or ".." in parts or (parts[0].endswith(":")):
        raise AdapterValidationError(
            f"archive member {client_text(name)} escapes the target directory", "path_traversal")
    return PurePosixPath(*parts)


def _safe_target(dest: Path, name: str) -> Path:
    target = dest.joinpath(*decide_member_path(name).parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A previously extracted directory cannot be a link (we never create links), so this holds.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise AdapterValidationError(
            f"archive member {client_text(name)} escapes the target directory", "path_traversal")
    return target


_EXTENSION_TYPES = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                              tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})


def _bounded_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses oversized or too many extension headers, and sparse files,
    before tarfile reads them (one class per archive: it counts that archive's headers).

    `_proc_member` is tarfile's documented hook for subclasses ("can be overridden in a
    subclass"); it runs on a header block before the data that follows it is read.
    """
    seen = {"extension_headers": 0}

    class BoundedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type in _EXTENSION_TYPES:
                if self.size > MAX_EXTENSION_HEADER_BYTES:
                    raise AdapterValidationError(
                        f"archive holds a {self.size}-byte long-name or pax header; the limit "
                        f"is {MAX_EXTENSION_HEADER_BYTES}", "too_large")
                seen["extension_headers"] += 1
                if seen["extension_headers"] > _MAX_EXTENSION_HEADERS:
                    raise AdapterValidationError(
                        f"archive holds more than {_MAX_EXTENSION_HEADERS} long-name or pax "
                        "headers", "too_large")
            elif self.type == tarfile.GNUTYPE_SPARSE:  # its extension blocks are unbounded
                raise AdapterValidationError("archive holds a sparse file", "symlink_forbidden")
            return super()._proc_member(tarfile_)  # type: ignore[misc]

    return BoundedTarInfo


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(archive, mode="r:*", tarinfo=_bounded_tarinfo()) as tar:
            count = 0
            for member in tar:
                count += 1
                name = client_text(member.name)
                if count > MAX_MEMBERS:
                    raise AdapterValidationError(f"archive has more than {MAX_MEMBERS} members",
                                                 "too_large")
                if member.issym() or member.islnk():
                    raise AdapterValidationError(f"archive member {name} is a link",
                                                 "symlink_forbidden")
                if member.isdir():
                    _safe_target(dest, member.name).mkdir(exist_ok=True)
                    continue
                if not member.isfile():
                    raise AdapterValidationError(
                        f"archive member {name} is not a regular file", "symlink_forbidden")
                if member.size > budget.max_bytes - budget.used:  # refuse before inflating
                    raise AdapterValidationError(
                        f"archive member {name} is {member.size} bytes; the limit is "
                        f"{budget.max_bytes}", "too_large")
                source = tar.extractfile(member)
                if source is None:
                    raise _permanent(f"cannot read archive member {name}")
                with source:
                    _copy_stream(source, _safe_target(dest, member.name), budget)
    except (tarfile.TarError, EOFError, OSError, RecursionError) as exc:
        if isinstance(exc, FileExistsError):
            raise AdapterValidationError("archive holds a member twice",
                                         "path_traversal") from None
        raise _permanent(f"corrupt tar archive: {_os_reason(exc)}") from None


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise AdapterValidationError(f"archive has more than {MAX_MEMBERS} members",
                                             "too_large")
            declared = 0
            for info in infos:
                decide_member_path(info.filename)
                file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when not recorded
                if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise AdapterValidationError(
                        f"archive member {client_text(info.filename)} is a link or device",
                        "symlink_forbidden")
                if info.flag_bits & 0x1:
                    raise _permanent(f"archive member {client_text(info.filename)} is encrypted")
                declared += info.file_size
            if declared > budget.max_bytes:  # cheap early refusal of a zip bomb
                raise AdapterValidationError(
                    f"archive expands to {declared} bytes; the limit is {budget.max_bytes}",
                    "too_large")
            for info in infos:
                if info.is_dir():
                    _safe_target(dest, info.filename).mkdir(exist_ok=True)
                    continue
                # Declared sizes can lie; the budget counts the bytes actually inflated.
                with zf.open(info) as source:
                    _copy_stream(source, _safe_target(dest, info.filename), budget)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise AdapterValidationError("archive holds a member twice",
                                         "path_traversal") from None
        raise _permanent(f"corrupt zip archive: {_os_reason(exc)}") from None


def extract_archive(archive: Path, dest: Path, *, max_bytes: int) -> Path:
    """Safely extract a `.tar.gz`/`.tgz`/`.zip` into `dest`; return the adapter directory."""
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_bytes)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest, budget)
    else:
        _extract_tar(archive, dest, budget)
    return _adapter_root(dest)


def _adapter_root(dest: Path) -> Path:
    """The extracted adapter: `dest` itself, or its single top-level directory."""
    if (dest / CONFIG_FILE).exists():
        return dest
    children = list(dest.iterdir())
    if len(children) == 1 and children[0].is_dir() and not children[0].is_symlink():
        return children[0]
    return dest


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


# --- local ----------------------------------------------------------------------------------


def _copy_tree(src: Path, dest: Path, budget: _Budget, *, links_within: Path | None = None) -> None:
    """Copy regular files and directories; refuse links unless they resolve inside `links_within`
    (the Hugging Face cache stores snapshot files as links into its own `blobs/`)."""
    dest.mkdir(parents=True, exist_ok=True)
    for count, entry in enumerate(sorted(src.iterdir()), start=1):
        if count > MAX_MEMBERS:
            raise AdapterValidationError(f"more than {MAX_MEMBERS} files", "too_large")
        real = entry
        if entry.is_symlink():
            resolved = entry.resolve()
            if links_within is None or not resolved.is_relative_to(links_within.resolve()):
                raise AdapterValidationError(f"{client_text(entry.name)} is a symbolic link",
                                             "symlink_forbidden")
            real = resolved
        mode = real.lstat().st_mode
        if stat.S_ISDIR(mode):
            _copy_tree(real, dest / entry.name, budget, links_within=links_within)
        elif stat.S_ISREG(mode):
            with real.open("rb") as f:
                _copy_stream(f, dest / entry.name, budget)
        else:
            raise AdapterValidationError(f"{client_text(entry.name)} is not a regular file",
                                         "symlink_forbidden")


def _fetch_local(src: Path, dest: Path, max_bytes: int) -> Path:
    shown = client_text(str(src), 120)  # the path the client gave, never more of it
    if src.is_symlink():
        raise AdapterValidationError(f"{shown} is a symbolic link", "symlink_forbidden")
    if not src.exists():
        raise _permanent(f"{shown} does not exist")
    if src.is_file() and _is_archive_name(src.name):
        return extract_archive(src, dest, max_bytes=max_bytes)
    if not src.is_dir():
        raise _permanent(f"{shown} is neither an adapter directory nor an archive")
    try:
        _copy_tree(src, dest, _Budget(max_bytes))
    except PermissionError:
        raise _permanent(f"cannot read {shown}: permission denied") from None
    return dest


# --- Hugging Face ---------------------------------------------------------------------------


def _fetch_hf(spec: str, dest: Path, max_bytes: int, credentials: FetchCredentials | None,
              cache_dir: Path | None) -> Path:
    repo_id, _, revision = spec.partition("@")
    shown = client_text(f"hf://{spec}")
    if repo_id.count("/") != 1:
        raise _permanent(f"{shown}: expected hf://org/name[@revision]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(
            repo_id, revision=revision or None, cache_dir=cache_dir, local_files_only=True,
            allow_patterns=[*_REMOTE_FILES, "*.md"],
            token=credentials.token if credentials else None,
        ))
    except LocalEntryNotFoundError:
        raise _permanent(f"{shown} is not in the local Hugging Face cache (this service is "
                         "offline: pre-download it with `hf download`)") from None
    except Exception as exc:  # huggingface_hub raises many unrelated types for a bad repo id
        raise _permanent(f"{shown}: {type(exc).__name__}") from None
    # snapshots/<commit>/file -> ../../blobs/<sha>: links inside the repo's cache folder are fine.
    _copy_tree(snapshot, dest, _Budget(max_bytes), links_within=snapshot.parents[1])
    return dest


# --- HTTP -----------------------------------------------------------------------------------


class _Deadline:
    """One deadline for a whole fetch; each connect/read also has its own timeout."""

    def __init__(self, deadline_s: float, timeout_s: float) -> None:
        self.deadline_s = deadline_s
        self.timeout_s = timeout_s
        self.ends = time.monotonic() + deadline_s

    def timeout(self) -> httpx.Timeout:
        """The per-operation timeout for a request starting now: never past the deadline."""
        self.check()
        return httpx.Timeout(min(self.timeout_s, self.ends - time.monotonic()))

    def check(self) -> None:
        if time.monotonic() >= self.ends:
            raise AdapterFetchError(f"the source did not deliver the adapter within "
                                    f"{self.deadline_s:g} s", transient=True)


def _http_error(shown: str, exc: Exception) -> AdapterFetchError:
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        transient = code >= 500 or code in (408, 429)
        return AdapterFetchError(f"GET {shown}: HTTP {code}", transient=transient)
    if isinstance(exc, httpx.TooManyRedirects):
        return _permanent(f"GET {shown}: too many redirects")
    if isinstance(exc, httpx.TransportError):
        return AdapterFetchError(f"GET {shown}: {type(exc).__name__}", transient=True)
    return _permanent(f"GET {shown}: {type(exc).__name__}")


def _download(client: httpx.Client, url: str, dest: Path, budget: _Budget,
              deadline: _Deadline) -> None:
    shown = client_text(url, 120)
    try:
        with client.stream("GET", url, timeout=deadline.timeout()) as response:
            response.raise_for_status()
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and \
                    int(declared) + budget.used > budget.max_bytes:
                raise AdapterValidationError(
                    f"{shown} is {declared} bytes; the limit is {budget.max_bytes}", "too_large")
            with dest.open("xb") as out:
                # No chunk size: each network read comes back at once, so a source that
                # drip-feeds bytes meets the deadline check between reads.
                for chunk in response.iter_bytes():
                    budget.take(len(chunk))
                    out.write(chunk)
                    deadline.check()
    except AddressRefused as exc:
        raise _permanent(f"GET {shown}: {exc}") from None
    except httpx.HTTPError as exc:
        deadline.check()  # a read cut short by the deadline is the deadline's failure
        raise _http_error(shown, exc) from None


def _fetch_http(url: str, dest: Path, max_bytes: int, credentials: FetchCredentials | None,
                transport: httpx.BaseTransport | None, deadline: _Deadline,
                allow_networks: Sequence[IPNetwork], resolve: Resolver) -> Path:
    headers = {"Authorization": f"Bearer {credentials.token}"} if credentials and \
        credentials.token else {}
    budget = _Budget(max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    # httpx drops the Authorization header when a redirect leaves the origin.
    with httpx.Client(transport=transport or CheckedTransport(allow_networks, resolve),
                      headers=headers, follow_redirects=True, max_redirects=5,
                      trust_env=False) as client:
        if _is_archive_name(urlsplit(url).path):
            with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
                archive = Path(tmp) / "archive"
                _download(client, url, archive, budget, deadline)
                return extract_archive(archive, dest / "adapter", max_bytes=max_bytes)
        base = url.rstrip("/")
        for name in _REMOTE_FILES:
            _download(client, f"{base}/{name}", dest / name, budget, deadline)
    return dest


# --- S3 -------------------------------------------------------------------------------------


def _s3_error(uri: str, exc: Exception) -> AdapterFetchError:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        transient = status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout",
                                              "ServiceUnavailable", "InternalError")
        return AdapterFetchError(f"{uri}: {client_text(code or status)}", transient=transient)
    # botocore's connection errors (EndpointConnectionError, timeouts) carry no response.
    return AdapterFetchError(f"{uri}: {type(exc).__name__}", transient=True)


def _s3_client(credentials: FetchCredentials | None) -> Any:
    try:
        import boto3  # optional: only installations that read from S3 need it
    except ImportError as exc:
        raise _permanent("s3:// sources need the optional package boto3 "
                         "(pip install boto3)") from exc
    c = credentials or FetchCredentials()
    return boto3.client(
        "s3",
        endpoint_url=c.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
        aws_access_key_id=c.aws_access_key_id,
        aws_secret_access_key=c.aws_secret_access_key,
        aws_session_token=c.aws_session_token,
        region_name=c.region,
    )


def _fetch_s3(uri: str, dest: Path, max_bytes: int, credentials: FetchCredentials | None) -> Path:
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, unquote(parts.path).lstrip("/")
    if not bucket:
        raise _permanent(f"{client_text(uri)}: expected s3://bucket/prefix")
    client = _s3_client(credentials)
    budget = _Budget(max_bytes)
    dest.mkdir(parents=True, exist_ok=True)
    keys = [prefix] if _is_archive_name(prefix) else \
        [f"{prefix.rstrip('/')}/{name}".lstrip("/") for name in _REMOTE_FILES]
    for key in keys:
        target = dest / ("archive" if key == prefix else PurePosixPath(key).name)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            if int(head.get("ContentLength", 0)) + budget.used > max_bytes:
                raise AdapterValidationError(
                    f"{client_text(f's3://{bucket}/{key}', 120)} exceeds {max_bytes} bytes",
                    "too_large")
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                _copy_stream(body, target, budget)
            finally:
                body.close()
        except (AdapterValidationError, AdapterFetchError):
            raise
        except Exception as exc:
            raise _s3_error(client_text(f"s3://{bucket}/{key}", 120), exc) from None
    if keys == [prefix]:
        root = extract_archive(dest / "archive", dest / "adapter", max_bytes=max_bytes)
        (dest / "archive").unlink()
        return root
    return dest


# --- entry point ----------------------------------------------------------------------------


def fetch_adapter(
    uri: str,
    dest_dir: Path | str,
    *,
    max_bytes: int,
    credentials: FetchCredentials | None = None,
    hf_cache_dir: Path | None = None,
    http_transport: httpx.BaseTransport | None = None,
    timeout_s: float = 60.0,
    deadline_s: float = 600.0,
    allow_networks: Sequence[IPNetwork] = (),
    resolve: Resolver = system_resolver,
) -> Path:
    """Bring the adapter at `uri` into `dest_dir` (created; must not hold anything yet).

    Returns the directory that holds the adapter's files (`dest_dir` or a folder under it).
    HTTP sources: `timeout_s` per connect or read, `deadline_s` for the whole fetch, and only
    public addresses or those in `allow_networks` (`http_transport`, for tests, replaces the
    checked transport and with it that check). Blocking: call it from a worker thread or
    process (`lorafleet.adapters.sandbox`), never on an event loop.
    """
    dest = Path(dest_dir)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    with _cleanup_on_error(dest):
        if scheme == "":
            return _fetch_local(Path(uri).expanduser(), dest, max_bytes)
        if scheme == "file":
            parts = urlsplit(uri)
            if parts.netloc not in ("", "localhost"):
                raise _permanent(f"{client_text(uri)}: file:// URIs must name a local path")
            return _fetch_local(Path(unquote(parts.path)), dest, max_bytes)
        if scheme == "hf":
            return _fetch_hf(uri[len("hf://"):], dest, max_bytes, credentials, hf_cache_dir)
        if scheme in ("http", "https"):
            return _fetch_http(uri, dest, max_bytes, credentials, http_transport,
                               _Deadline(deadline_s, timeout_s), allow_networks, resolve)
        if scheme == "s3":
            return _fetch_s3(uri, dest, max_bytes, credentials)
        raise _permanent(f"unsupported adapter source {client_text(uri)}: use a path, file://, "
                         "hf://, http(s):// or s3://")


@contextmanager
def _cleanup_on_error(dest: Path) -> Iterator[None]:
    # A refused fetch leaves nothing half-written behind.
    try:
        yield
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
