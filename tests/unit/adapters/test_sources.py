from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.adapters.errors import AdapterFetchError, AdapterValidationError
from lorafleet.adapters.netguard import parse_networks
from lorafleet.adapters.sources import decide_member_path, fetch_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors")
# The test servers listen on loopback, which intake refuses unless allowlisted.
LOOPBACK = parse_networks(["127.0.0.0/8"])


def _tar(path: Path, members: dict[str, bytes], *, links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _adapter_files(adapter: Path) -> dict[str, bytes]:
    return {name: (adapter / name).read_bytes() for name in FILES}


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_local_path_and_file_uri(make_adapter: Any, tmp_path: Path) -> None:
    src = make_adapter()
    for i, uri in enumerate([str(src), src.as_uri()]):
        out = fetch_adapter(uri, tmp_path / f"out{i}", max_bytes=1 << 22)
        assert _adapter_files(out) == _adapter_files(src)


def test_local_symlink_refused_and_nothing_left(make_adapter: Any, tmp_path: Path) -> None:
    src = make_adapter()
    os.symlink("/etc/passwd", src / "README.md")
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(src), tmp_path / "out", max_bytes=1 << 22)
    assert info.value.code == "symlink_forbidden"
    assert not (tmp_path / "out").exists()


def test_local_over_limit(make_adapter: Any, tmp_path: Path) -> None:
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(make_adapter()), tmp_path / "out", max_bytes=1000)
    assert info.value.code == "too_large"


def test_missing_local_path_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(str(tmp_path / "nope"), tmp_path / "out", max_bytes=100)
    assert not info.value.transient


def test_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(AdapterFetchError, match="unsupported"):
        fetch_adapter("ftp://x/y", tmp_path / "out", max_bytes=100)


def test_http_tar_gz_zip_and_base_url(make_adapter: Any, tmp_path: Path,
                                      http_root: tuple[str, Path]) -> None:
    base_url, root = http_root
    src = make_adapter()
    _tar(root / "a.tar.gz", {f"my-adapter/{n}": d for n, d in _adapter_files(src).items()})
    _zip(root / "a.zip", _adapter_files(src))
    (root / "plain").mkdir()
    for name, data in _adapter_files(src).items():
        (root / "plain" / name).write_bytes(data)
    for i, path in enumerate(["a.tar.gz", "a.zip", "plain/"]):
        out = fetch_adapter(f"{base_url}/{path}", tmp_path / f"o{i}", max_bytes=1 << 22,
                            allow_networks=LOOPBACK)
        assert _adapter_files(out) == _adapter_files(src)


def test_http_404_is_permanent_and_refused_connection_transient(
        tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base_url, _ = http_root
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(f"{base_url}/missing.tar.gz", tmp_path / "a", max_bytes=100,
                      allow_networks=LOOPBACK)
    assert not info.value.transient and "404" in info.value.reason
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(f"http://127.0.0.1:{port}/a.zip", tmp_path / "b", max_bytes=100,
                      timeout_s=2, allow_networks=LOOPBACK)
    assert info.value.transient


def test_http_5xx_is_transient(tmp_path: Path) -> None:
    import httpx

    transport = httpx.MockTransport(lambda request: httpx.Response(503))
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter("https://example.invalid/a.zip", tmp_path / "a", max_bytes=100,
                      http_transport=transport)
    assert info.value.transient


def test_http_download_over_limit(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base_url, root = http_root
    (root / "big.zip").write_bytes(b"\0" * 5000)
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(f"{base_url}/big.zip", tmp_path / "a", max_bytes=1000,
                      allow_networks=LOOPBACK)
    assert info.value.code == "too_large"


@pytest.mark.parametrize("name", ["../evil", "/etc/cron.d/evil", "a/../../evil", "..",
                                  "a\\..\\evil", "C:/evil"])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_path_traversal(name: str, kind: str, tmp_path: Path) -> None:
    members = {"adapter_config.json": b"{}", name: b"pwned"}
    archive = (_tar if kind == "tar" else _zip)(tmp_path / f"a.{kind}", members)
    archive = archive.rename(tmp_path / ("a.tar.gz" if kind == "tar" else "a.zip"))
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(archive), tmp_path / "out" / "x", max_bytes=1 << 20)
    assert info.value.code == "path_traversal"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()


def test_tar_symlink_member_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", {"adapter_config.json": b"{}"},
                   links={"adapter_model.safetensors": "/etc/passwd"})
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    assert info.value.code == "symlink_forbidden"


def test_zip_symlink_member_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("adapter_model.safetensors")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(AdapterValidationError) as err:
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    assert err.value.code == "symlink_forbidden"


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_bomb_bounded(kind: str, tmp_path: Path) -> None:
    bomb = {"adapter_model.safetensors": b"\0" * (8 << 20)}  # 8 MiB compresses to a few KiB
    archive = _tar(tmp_path / "b.tar.gz", bomb) if kind == "tar" else _zip(tmp_path / "b.zip", bomb)
    assert archive.stat().st_size < 100_000
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    assert info.value.code == "too_large"
    assert not (tmp_path / "out").exists()


def test_zip_lying_about_sizes_is_still_bounded(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "b.zip", {"x.md": b"\0" * (2 << 20)})
    data = bytearray(archive.read_bytes())
    # Patch the central directory's declared uncompressed size down to 10 bytes.
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises((AdapterValidationError, AdapterFetchError)):
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_too_many_members(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "m.zip", {f"f{i}.md": b"x" for i in range(100)})
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    assert info.value.code == "too_large"


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "\\", "c:"]), max_size=6))
def test_member_paths_never_escape(parts: list[str]) -> None:
    name = "/".join(parts)
    try:
        safe = decide_member_path(name)
    except AdapterValidationError:
        return
    assert not safe.is_absolute()
    assert ".." not in safe.parts and safe.parts
    assert all(p not in ("", ".") for p in safe.parts)


def test_s3_without_boto3_is_a_clear_permanent_error(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    with pytest.raises(AdapterFetchError, match="boto3") as info:
        fetch_adapter("s3://bucket/adapters/a", tmp_path / "out", max_bytes=100)
    assert not info.value.transient


def test_s3_with_a_fake_client(monkeypatch: pytest.MonkeyPatch, make_adapter: Any,
                               tmp_path: Path) -> None:
    import sys
    import types

    files = _adapter_files(make_adapter())
    seen: dict[str, Any] = {}

    class FakeS3:
        def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
            return {"ContentLength": len(files[Key.rsplit("/", 1)[-1]])}

        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
            seen.setdefault("keys", []).append((Bucket, Key))
            return {"Body": io.BytesIO(files[Key.rsplit("/", 1)[-1]])}

    def client(service: str, **kwargs: Any) -> FakeS3:
        seen["endpoint_url"] = kwargs["endpoint_url"]
        return FakeS3()

    monkeypatch.setitem(sys.modules, "boto3", types.SimpleNamespace(client=client))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    out = fetch_adapter("s3://bucket/adapters/a/", tmp_path / "out", max_bytes=1 << 22)
    assert _adapter_files(out) == files
    assert seen["endpoint_url"] == "http://minio:9000"
    assert ("bucket", "adapters/a/adapter_config.json") in seen["keys"]


def test_hf_from_local_cache(make_adapter: Any, tmp_path: Path) -> None:
    files = _adapter_files(make_adapter())
    repo = tmp_path / "hub" / "models--org--my-lora"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        (repo / "blobs" / f"blob{i}").write_bytes(data)
        os.symlink(f"../../blobs/blob{i}", snap / name)
    out = fetch_adapter("hf://org/my-lora", tmp_path / "out", max_bytes=1 << 22,
                        hf_cache_dir=tmp_path / "hub")
    assert _adapter_files(out) == files
    assert not any(p.is_symlink() for p in out.iterdir())
    with pytest.raises(AdapterFetchError, match="not in the local") as info:
        fetch_adapter("hf://org/other", tmp_path / "out2", max_bytes=1 << 22,
                      hf_cache_dir=tmp_path / "hub")
    assert not info.value.transient
