"""Hostile adapter content and hostile sources, one rule each (issue 19, items 1-5).

Each test names the behaviour a client of intake would notice: a refusal with the right code,
in bounded time and memory, with a short message that leaks nothing of the server.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import json
import struct
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters.basemodel import BaseModelInfo
from lorafleet.adapters.errors import AdapterFetchError, AdapterValidationError, client_text
from lorafleet.adapters.netguard import decide_address, parse_networks
from lorafleet.adapters.sources import fetch_adapter
from lorafleet.adapters.validation import (
    ValidationLimits,
    decide_config,
    read_safetensors_header,
    validate_adapter_dir,
)

LOOPBACK = parse_networks(["127.0.0.0/8"])


def _config(**overrides: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "base_model_name_or_path": "tiny-llama", "r": 4,
            "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **overrides}


# --- item 1: target_modules patterns ------------------------------------------------------

# `re` backtracks through every split of the key: minutes for a 31-character module key.
BACKTRACKING = r"(.*?)(.*?)(.*?)(.*?)(.*?)(.*?)(.*?)\7\1[0-9]"
CLASSIC = r"(.|.)*z"


@pytest.mark.timeout(60)
def test_backtracking_pattern_is_refused_within_its_budget(tiny_base: BaseModelInfo) -> None:
    limits = ValidationLimits(regex_budget_s=0.2)
    started = time.monotonic()
    with pytest.raises(AdapterValidationError) as info:
        decide_config(_config(target_modules=BACKTRACKING), tiny_base, limits)
    assert info.value.code == "too_complex"
    # The budget is enforced by the matcher itself: well under the 60 s the test allows.
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)
def test_classic_exponential_pattern_matches_nothing_quickly(tiny_base: BaseModelInfo) -> None:
    with pytest.raises(AdapterValidationError) as info:
        decide_config(_config(target_modules=CLASSIC), tiny_base, ValidationLimits())
    assert info.value.code == "unknown_target_module"


@pytest.mark.parametrize("pattern", ["(a{1000}){1000}", "q_proj{2,}", "x" * 300])
def test_patterns_costly_to_compile_are_refused(pattern: str, tiny_base: BaseModelInfo) -> None:
    with pytest.raises(AdapterValidationError) as info:
        decide_config(_config(target_modules=pattern), tiny_base, ValidationLimits())
    assert info.value.code == "bad_config"
    assert len(info.value.reason) < 300


@pytest.mark.timeout(60)
def test_a_pattern_match_lets_other_threads_run(tiny_base: BaseModelInfo) -> None:
    """The matcher releases the GIL: a server thread keeps running while a pattern is tried."""
    ticks: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        while not done.is_set():
            ticks.append(time.monotonic())
            done.wait(0.01)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        with pytest.raises(AdapterValidationError):
            decide_config(_config(target_modules=BACKTRACKING), tiny_base,
                          ValidationLimits(regex_budget_s=1.0))
    finally:
        done.set()
        thread.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert len(ticks) > 10 and max(gaps) < 0.5, max(gaps)


def test_peft_style_patterns_still_work(tiny_base: BaseModelInfo) -> None:
    claims = decide_config(_config(target_modules=r".*\.(q_proj|v_proj)"), tiny_base,
                           ValidationLimits())
    assert claims.target_modules == {"q_proj", "v_proj"}


# --- item 3: deep JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 5_000, 200_000])
def test_deeply_nested_config_is_bad_config(depth: int, make_adapter: Any,
                                            tiny_base: BaseModelInfo,
                                            limits: ValidationLimits) -> None:
    adapter = make_adapter()
    nested = "[" * depth + "]" * depth
    text = json.dumps(_config()).replace('"peft_type"', f'"x": {nested}, "peft_type"', 1)
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_dir(adapter, tiny_base, limits)
    assert info.value.code == "bad_config"
    assert "nests deeper" in info.value.reason


@pytest.mark.parametrize("depth", [40, 5_000, 200_000])
def test_deeply_nested_safetensors_header_is_bad_header(depth: int, tmp_path: Path) -> None:
    nested = "[" * depth + "]" * depth
    header = f'{{"__metadata__": {{"x": "y"}}, "t": {{"dtype": "F32", "shape": {nested}, ' \
             f'"data_offsets": [0, 0]}}}}'.encode()
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(AdapterValidationError) as info:
        read_safetensors_header(path, ValidationLimits())
    assert info.value.code == "bad_header"


def test_client_values_are_quoted_short_and_printable() -> None:
    deep: Any = []
    for _ in range(5_000):
        deep = [deep]
    for value in ("\x1b[31m" + "A" * 10_000, deep, 10**4000 if False else 10**300):
        text = client_text(value)
        assert len(text) <= 60 and text.isprintable() and text.isascii()


# --- item 2: tar extension headers ---------------------------------------------------------


def _gnu_long_name_tar(path: Path, name_len: int) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("a/" + "n" * name_len)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return path


def _pax_tar(path: Path, value_len: int) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.pax_headers = {"comment": "c" * value_len}
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return path


@pytest.mark.parametrize("build", [_gnu_long_name_tar, _pax_tar], ids=["gnu-long-name", "pax"])
def test_huge_extension_header_is_refused_before_it_is_read(build: Any, tmp_path: Path) -> None:
    archive = build(tmp_path / "evil.tar.gz", 32 << 20)  # 32 MiB of header, ~32 KiB on disk
    assert archive.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(AdapterValidationError) as info:
            fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "too_large"
    assert peak < 4 << 20, f"peak {peak >> 20} MiB"
    assert len(str(info.value)) < 300
    assert not (tmp_path / "out").exists()


def test_chained_extension_headers_are_counted(tmp_path: Path) -> None:
    """Thousands of long-name headers in a row: tarfile recurses once per header."""
    block = bytearray(512)
    block[0:13] = b"././@LongLink"
    block[100:108] = b"0000644\0"
    block[124:136] = b"00000000001\0"  # 1 byte of name data
    block[156:157] = b"L"
    block[257:265] = b"ustar  \0"
    block[148:156] = b"        "
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    chained = (bytes(block) + b"x" + bytes(511)) * 5_000
    archive = tmp_path / "chain.tar.gz"
    import gzip

    archive.write_bytes(gzip.compress(chained + bytes(1024)))
    with pytest.raises(AdapterValidationError) as info:
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    assert info.value.code == "too_large"


def test_refusal_quotes_member_names_short_and_sanitised(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    name = "\x1b[2J" + "évil" * 2_000  # 8 KiB, terminal escape, non-ASCII
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(AdapterValidationError) as err:
        fetch_adapter(str(archive), tmp_path / "out", max_bytes=1 << 20)
    message = str(err.value)
    assert err.value.code == "symlink_forbidden"
    assert len(message) < 200 and message.isascii() and message.isprintable()


def test_refusals_never_name_a_server_path(tmp_path: Path) -> None:
    archive = tmp_path / "dup.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("adapter_config.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    dest = tmp_path / "server-scratch" / "fetched"
    with pytest.raises(AdapterValidationError) as err:
        fetch_adapter(str(archive), dest, max_bytes=1 << 20)
    assert "server-scratch" not in str(err.value)


# --- item 5: SSRF --------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "127.0.0.1", "169.254.169.254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "fe80::1", "fc00::1", "::",
    "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "ff02::1",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert decide_address(ipaddress.ip_address(address), ()) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_pass(address: str) -> None:
    assert decide_address(ipaddress.ip_address(address), ()) is None


def test_allowlist_admits_named_networks_only() -> None:
    allow = parse_networks(["10.0.0.0/8"])
    assert decide_address(ipaddress.ip_address("10.9.9.9"), allow) is None
    assert decide_address(ipaddress.ip_address("192.168.1.1"), allow) is not None
    with pytest.raises(ValueError):
        parse_networks(["10.0.0.0/33"])


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[tuple[int, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (_Counting,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()
        server.server_close()


def test_loopback_source_refused_without_allowlist(tmp_path: Path,
                                                   counting_server: tuple[int, list[str]]) -> None:
    port, hits = counting_server
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(f"http://127.0.0.1:{port}/a.zip", tmp_path / "out", max_bytes=1 << 20)
    assert not info.value.transient and "loopback" in info.value.reason
    assert hits == []  # refused before connecting
    with pytest.raises(AdapterFetchError) as info:  # allowlisted: the server is asked (404)
        fetch_adapter(f"http://127.0.0.1:{port}/a.zip", tmp_path / "out2", max_bytes=1 << 20,
                      allow_networks=LOOPBACK)
    assert "404" in info.value.reason and hits == ["/a.zip"]


def test_a_name_resolving_to_the_metadata_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter("http://metadata.example/latest/a.zip", tmp_path / "out", max_bytes=100,
                      resolve=lambda host, port: ["169.254.169.254"])
    assert not info.value.transient and "link-local" in info.value.reason


def test_connection_goes_to_the_address_that_was_checked(
        tmp_path: Path, counting_server: tuple[int, list[str]]) -> None:
    """DNS rebinding: the first answer is checked and used; a later answer is never asked for.

    The name first resolves to 127.0.0.2 (allowlisted, nobody listens there), then to
    127.0.0.1 (where the server is, not allowlisted). Connecting by name again would reach it.
    """
    port, hits = counting_server
    answers = iter([["127.0.0.2"], ["127.0.0.1"], ["127.0.0.1"]])
    asked: list[str] = []

    def resolve(host: str, port_: int) -> list[str]:
        asked.append(host)
        return next(answers)

    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(f"http://rebind.example:{port}/a.zip", tmp_path / "out", max_bytes=100,
                      timeout_s=5, resolve=resolve,
                      allow_networks=parse_networks(["127.0.0.2/32"]))
    assert info.value.transient  # connection refused at 127.0.0.2
    assert hits == [] and asked == ["rebind.example"]


def test_redirect_to_a_private_address_is_refused(tmp_path: Path) -> None:
    """Each redirect hop is checked: a public host redirecting to the metadata address fails."""
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", "http://metadata.example/latest/a.zip")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    answers = {"public.example": ["127.0.0.1"], "metadata.example": ["169.254.169.254"]}
    try:
        with pytest.raises(AdapterFetchError) as info:
            fetch_adapter(f"http://public.example:{port}/a.zip", tmp_path / "out",
                          max_bytes=100, resolve=lambda host, _: answers[host],
                          allow_networks=LOOPBACK)
    finally:
        server.shutdown()
        server.server_close()
    assert not info.value.transient and "link-local" in info.value.reason


# --- item 4: an overall deadline -----------------------------------------------------------


@pytest.fixture
def drip_server() -> Iterator[int]:
    """Answers 200 with a large Content-Length, then one byte every 20 ms until told to stop."""
    stop = threading.Event()

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            while not stop.wait(0.02):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_a_drip_feeding_source_meets_the_deadline(tmp_path: Path, drip_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(AdapterFetchError) as info:
        fetch_adapter(f"http://127.0.0.1:{drip_server}/a.zip", tmp_path / "out",
                      max_bytes=1 << 22, timeout_s=30, deadline_s=1.0, allow_networks=LOOPBACK)
    took = time.monotonic() - started
    assert info.value.transient and "within 1 s" in info.value.reason
    # Each read returns within 20 ms, so the per-read timeout (30 s) never fires: only the
    # deadline ends this fetch, at most one read after it.
    assert took < 10, took
    assert not (tmp_path / "out").exists()
