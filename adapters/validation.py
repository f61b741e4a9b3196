"""Adapter validation: decide whether a PEFT LoRA directory is safe and fits the served base model.

Boundary: reads the adapter's files (config, safetensors header and values) but never loads a model
and never unpickles anything. Pure rule functions (`decide_config`, `decide_tensors`) do the
judging; `validate_adapter_dir` gathers the facts and calls them. Every refusal is an
`AdapterValidationError` with a stable `code`.

Accepted layout: `adapter_config.json`, `adapter_model.safetensors`, optional `*.md` files.

Hostile content is bounded, not trusted: JSON nested deeper than `max_json_depth` is refused
before anything walks it (Python's parser would raise `RecursionError`); a `target_modules`
string (PEFT: a regex full-matched against module keys) is compiled by the `regex` package and
matched under a time budget (`regex_budget_s`), because the standard `re` backtracks without
bound and holds the GIL while it does. Refusal messages quote client input only through
`client_text` and never name a server path.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .basemodel import LLAMA_MODULES, BaseModelInfo, block_of
from .digest import digest_files
from .errors import AdapterValidationError, client_text

__all__ = [
    "CONFIG_FILE",
    "PICKLE_SUFFIXES",
    "WEIGHTS_FILE",
    "AdapterManifest",
    "ConfigClaims",
    "TensorInfo",
    "ValidationLimits",
    "decide_config",
    "decide_files",
    "decide_tensors",
    "read_safetensors_header",
    "validate_adapter_dir",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_MAX_CONFIG_BYTES = 1 << 20
_DTYPES: Mapping[str, tuple[str, int]] = {"F16": ("<f2", 2), "BF16": ("<u2", 2), "F32": ("<f4", 4)}
_TENSOR_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(0|[1-9][0-9]*)\.(self_attn|mlp)\.([a-z_]+)"
    r"\.lora_(A|B)\.weight$"
)
_CHUNK_ELEMENTS = 1 << 20
# A `target_modules` pattern longer than this is not a module selector.
_MAX_PATTERN_CHARS = 256
# Counted repetition (`{n}`, `{n,m}`): the `regex` package compiles `(a{1000}){1000}` for
# seconds and a nested one until memory runs out, before any match-time budget applies.
_COUNTED_REPEAT = re.compile(r"\{\s*\d*\s*,?\s*\d*\s*\}")


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    max_rank: int = 64
    max_bytes: int = 512 << 20  # all accepted files together
    max_header_bytes: int = 1 << 20  # a LoRA header lists at most a few hundred tensors
    max_entries: int = 64  # directory entries looked at before refusing
    max_json_depth: int = 32  # a PEFT config nests 3 deep, a safetensors header 3
    regex_budget_s: float = 0.25  # all matches of one `target_modules` pattern together


@dataclass(frozen=True, slots=True)
class AdapterManifest:
    """What validation learned: the facts an `AdapterRecord` is built from."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    digest: str
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConfigClaims:
    rank: int
    alpha: float
    target_modules: frozenset[str]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets inside the data region (after the header)
    end: int


def _refuse(code: Any, reason: str) -> AdapterValidationError:
    return AdapterValidationError(reason, code)


# --- files ----------------------------------------------------------------------------------


def decide_files(entries: Iterable[tuple[str, bool, bool]]) -> tuple[str, ...]:
    """Judge a directory listing of `(relative posix path, is_symlink, is_regular_file)`.

    Returns the accepted file names. The most dangerous finding wins: pickles, then links, then
    anything unexpected, then missing files.
    """
    items = list(entries)
    for rel, _, _ in items:
        if Path(rel).suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse("pickle_forbidden", f"{client_text(rel)}: pickle-based weights can run code when "
                          "loaded; only safetensors is accepted")
    for rel, is_link, _ in items:
        if is_link:
            raise _refuse("symlink_forbidden", f"{client_text(rel)} is a symbolic link")
    accepted = []
    for rel, _, is_file in items:
        top_level = "/" not in rel
        if is_file and top_level and (rel in (CONFIG_FILE, WEIGHTS_FILE) or rel.endswith(".md")):
            accepted.append(rel)
        else:
            raise _refuse("unexpected_file", f"{client_text(rel)}: only {CONFIG_FILE}, {WEIGHTS_FILE} and "
                          "*.md files are accepted")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in accepted:
            raise _refuse("missing_file", f"{required} is missing")
    return tuple(sorted(accepted))


def _scan(root: Path, limit: int) -> list[tuple[str, bool, bool, int]]:
    """List every entry under `root` without following links: (rel, is_link, is_file, size)."""
    found: list[tuple[str, bool, bool, int]] = []
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                rel = f"{prefix}{entry.name}"
                is_link = entry.is_symlink()
                is_dir = not is_link and entry.is_dir(follow_symlinks=False)
                is_file = not is_link and entry.is_file(follow_symlinks=False)
                size = entry.stat(follow_symlinks=False).st_size if is_file else 0
                found.append((rel, is_link, is_file, size))
                if len(found) > limit:
                    raise _refuse("too_large", f"more than {limit} files in the adapter")
                if is_dir:
                    stack.append((Path(entry.path), rel + "/"))
    return found


# --- config ---------------------------------------------------------------------------------


def _claimed_targets(targets: Any, base: BaseModelInfo, budget_s: float) -> frozenset[str]:
    known = ", ".join(base.modules)
    if isinstance(targets, str):
        if targets == "all-linear":
            return frozenset(base.modules)
        return _pattern_targets(targets, base, budget_s)
    if not isinstance(targets, list | tuple) or not targets or not all(
        isinstance(t, str) for t in targets
    ):
        raise _refuse("bad_config", "target_modules must be a non-empty list of names, "
                      "'all-linear' or a regex")
    if len(targets) > 4 * len(LLAMA_MODULES):
        raise _refuse("bad_config", f"target_modules lists {len(targets)} names")
    claimed = set()
    for target in targets:
        module = target.rsplit(".", 1)[-1]  # `self_attn.q_proj` names the same module as `q_proj`
        if module not in base.modules:
            raise _refuse("unknown_target_module", f"target module {client_text(target)} is not "
                          f"one of the base model's LoRA-able modules ({known})")
        claimed.add(module)
    return frozenset(claimed)


def _pattern_targets(pattern: str, base: BaseModelInfo, budget_s: float) -> frozenset[str]:
    """The modules a PEFT `target_modules` regex claims: those it full-matches in at least one
    layer's key (`model.layers.0.self_attn.q_proj`), as PEFT decides when it trains.

    Bounded three ways: the pattern's length, no counted repetition (compile cost), and one time
    budget for every match (the `regex` package checks it while it backtracks and releases the
    GIL meanwhile). A pattern that runs out of budget is refused as `too_complex`.
    """
    shown = client_text(pattern)
    if len(pattern) > _MAX_PATTERN_CHARS:
        raise _refuse("bad_config", f"target_modules pattern {shown} is longer than "
                      f"{_MAX_PATTERN_CHARS} characters")
    if _COUNTED_REPEAT.search(pattern):
        raise _refuse("bad_config", f"target_modules pattern {shown}: counted repetition "
                      "({n,m}) is not accepted; list the module names instead")
    try:
        import regex  # linear-time guards and a match timeout, which `re` lacks
    except ImportError:  # pragma: no cover - a dependency of the package
        raise _refuse("unsupported_config", "a target_modules pattern needs the `regex` package "
                      "on this server; list the module names instead") from None
    try:
        compiled = regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise _refuse("bad_config", f"target_modules pattern {shown} does not compile "
                      f"({client_text(str(exc))})") from None
    deadline = time.monotonic() + budget_s
    matched = set()
    try:
        for module in base.modules:
            for i in range(base.num_layers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                key = f"model.layers.{i}.{block_of(module)}.{module}"
                if compiled.fullmatch(key, timeout=remaining, concurrent=True):
                    matched.add(module)
                    break
    except TimeoutError:
        raise _refuse("too_complex", f"target_modules pattern {shown} takes longer than "
                      f"{budget_s:g} s to match the base model's {len(base.modules)} module "
                      "names; list the module names instead") from None
    if not matched:
        raise _refuse("unknown_target_module", f"target_modules pattern {shown} matches "
                      f"none of the base model's modules ({', '.join(base.modules)})")
    return frozenset(matched)


def decide_config(config: Any, base: BaseModelInfo, limits: ValidationLimits) -> ConfigClaims:
    """Judge a parsed `adapter_config.json`; return what it claims about the tensors."""
    if not isinstance(config, dict):
        raise _refuse("bad_config", f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise _refuse("not_lora", f"peft_type is {client_text(peft_type)}; only LORA adapters "
                      "are served")
    trained_for = config.get("base_model_name_or_path")
    if trained_for != base.name:
        raise _refuse("wrong_base_model", f"the adapter was trained for {client_text(trained_for)} "
                      f"but this server serves {base.name!r}")
    if config.get("modules_to_save"):
        raise _refuse("unsupported_config", "modules_to_save is set: adapters that replace whole "
                      "modules are not served")
    if config.get("use_dora"):
        raise _refuse("unsupported_config", "DoRA adapters (use_dora) are not served")
    if config.get("bias", "none") not in (None, "none"):
        raise _refuse("unsupported_config", f"bias={client_text(config.get('bias'))}: only 'none' "
                      "is served")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _refuse("unsupported_config", f"{key} is set: the engine applies one r and one "
                          "lora_alpha to every module, so per-module overrides would be ignored")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise _refuse("bad_config", f"r must be a positive integer, got {client_text(rank)}")
    if rank > limits.max_rank:
        raise _refuse("rank_too_large", f"r={rank} exceeds this server's limit {limits.max_rank}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise _refuse("bad_config", f"lora_alpha must be a number, got {client_text(alpha)}")
    targets = _claimed_targets(config.get("target_modules"), base, limits.regex_budget_s)
    return ConfigClaims(rank=rank, alpha=float(alpha), target_modules=targets)


# --- safetensors ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in safetensors header")
    return dict(pairs)


def _json_depth(value: Any) -> int:
    """How deep `value` nests (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in
                         (item.values() if isinstance(item, dict) else item))
    return deepest


def _load_json(raw: bytes, what: str, code: Any, max_depth: int, **kwargs: Any) -> Any:
    """Parse client JSON; anything unreadable or nested deeper than `max_depth` is `code`.

    Python's parser recurses once per level and raises `RecursionError` near 1,000 levels; the
    depth check after it keeps every later walk (repr, messages) on shallow data.
    """
    try:
        value = json.loads(raw.decode("utf-8"), **kwargs)
    except RecursionError:
        raise _refuse(code, f"{what} nests deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        # json's messages give a position, never the input itself.
        raise _refuse(code, f"{what} is not valid JSON ({client_text(str(exc), 120)})") from None
    if _json_depth(value) > max_depth:
        raise _refuse(code, f"{what} nests deeper than {max_depth} levels")
    return value


def read_safetensors_header(path: Path, limits: ValidationLimits) -> tuple[int, list[TensorInfo]]:
    """Parse a safetensors header defensively; return (data offset, tensors).

    The 8-byte length is checked against the file size and `limits.max_header_bytes` *before*
    anything is read, so a forged length cannot make us allocate gigabytes.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _refuse("bad_header", f"{path.name} is too short to be safetensors")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > limits.max_header_bytes or 8 + header_len > size:
            raise _refuse("bad_header", f"{path.name} declares a {header_len}-byte header "
                          f"(file is {size} bytes, limit {limits.max_header_bytes})")
        raw = f.read(header_len)
    header = _load_json(raw, f"{path.name} header", "bad_header", limits.max_json_depth,
                        object_pairs_hook=_no_duplicates)
    if not isinstance(header, dict):
        raise _refuse("bad_header", f"{path.name}: header is not a JSON object")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                    and isinstance(begin, int) and isinstance(end, int)):
                raise TypeError("bad field types")
        except (KeyError, TypeError, ValueError):
            raise _refuse("bad_header", f"{path.name}: malformed entry {client_text(name)}") \
                from None
        tensors.append(TensorInfo(name, dtype, tuple(shape), begin, end))
    data_len = size - 8 - header_len
    position = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != position or t.end < t.begin:
            raise _refuse("bad_header", f"{path.name}: tensor {client_text(t.name)} has overlapping or "
                          "gapped data offsets")
        position = t.end
    if position != data_len:
        raise _refuse("bad_header", f"{path.name}: offsets cover {position} bytes of {data_len}")
    _cross_check_with_library(path, {t.name for t in tensors})
    return 8 + header_len, tensors


def _cross_check_with_library(path: Path, names: set[str]) -> None:
    # A second, independent parser (the Rust one vLLM uses) must agree with ours.
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            library_names = set(f.keys())
    except Exception as exc:  # the library raises its own SafetensorError / OSError types
        raise _refuse("bad_header", f"{path.name}: safetensors refuses the file "
                      f"({client_text(str(exc), 120)})") from None
    if library_names != names:
        raise _refuse("bad_header", f"{path.name}: header parsers disagree on the tensor names")


# --- tensors --------------------------------------------------------------------------------


def decide_tensors(
    tensors: Iterable[TensorInfo], claims: ConfigClaims, base: BaseModelInfo
) -> None:
    """Judge tensor names, dtypes and shapes against the base model and the config's claims."""
    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    for t in tensors:
        match = _TENSOR_NAME.fullmatch(t.name)
        if match is None:
            raise _refuse("bad_tensor", f"unexpected tensor {client_text(t.name)}: expected "
                          "base_model.model.model.layers.<i>.<self_attn|mlp>.<module>"
                          ".lora_<A|B>.weight")
        layer, block, module, side = int(match[1]), match[2], match[3], match[4]
        if module not in base.modules or block != block_of(module):
            raise _refuse("bad_tensor", f"{t.name}: {block}.{module} is not a LoRA-able module "
                          "of the base model")
        if layer >= base.num_layers:
            raise _refuse("bad_tensor", f"{t.name}: layer {layer} but the base model has "
                          f"{base.num_layers} layers")
        if t.dtype not in _DTYPES:
            raise _refuse("bad_tensor", f"{t.name}: dtype {t.dtype} (accepted: F16, BF16, F32)")
        expected_bytes = math.prod(t.shape) * _DTYPES[t.dtype][1]
        if len(t.shape) != 2 or t.end - t.begin != expected_bytes:
            raise _refuse("shape_mismatch", f"{t.name}: shape {list(t.shape)} is not a matrix "
                          "matching its byte size")
        pairs.setdefault((layer, module), {})[side] = t
    if not pairs:
        raise _refuse("bad_tensor", "the safetensors file holds no LoRA tensors")
    for (layer, module), sides in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(sides) != {"A", "B"}:
            raise _refuse("bad_tensor", f"{where}: lora_A and lora_B must both be present")
        in_f, out_f = base.modules[module]
        a, b = sides["A"].shape, sides["B"].shape
        if a[1] != in_f or b[0] != out_f:
            raise _refuse("shape_mismatch", f"{where}: lora_A {list(a)} / lora_B {list(b)} do "
                          f"not fit the base module ({in_f} in, {out_f} out)")
        if a[0] != b[1]:
            raise _refuse("shape_mismatch", f"{where}: lora_A rank {a[0]} != lora_B rank {b[1]}")
        if a[0] != claims.rank:
            raise _refuse("config_mismatch", f"{where}: tensors have rank {a[0]} but the config "
                          f"says r={claims.rank}")
    modules = {module for _, module in pairs}
    if modules != claims.target_modules:
        raise _refuse("config_mismatch", f"the config targets {sorted(claims.target_modules)} "
                      f"but the tensors cover {sorted(modules)}")


def _check_values(path: Path, data_offset: int, tensors: Iterable[TensorInfo]) -> None:
    """Refuse NaN/Inf. Memory-mapped and chunked, so memory stays small whatever the size."""
    if path.stat().st_size == data_offset:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_offset)
    try:
        for t in tensors:
            dtype, width = _DTYPES[t.dtype]
            count = (t.end - t.begin) // width
            for start in range(0, count, _CHUNK_ELEMENTS):
                n = min(_CHUNK_ELEMENTS, count - start)
                values = np.frombuffer(data, dtype=dtype, count=n, offset=t.begin + start * width)
                if t.dtype == "BF16":  # bf16: all exponent bits set means Inf or NaN
                    bad = bool(np.any((values & 0x7F80) == 0x7F80))
                else:
                    bad = not bool(np.isfinite(values).all())
                if bad:
                    raise _refuse("bad_tensor", f"{t.name} contains NaN or Inf values")
    finally:
        del data


# --- the whole directory --------------------------------------------------------------------


def validate_adapter_dir(
    path: Path | str, base: BaseModelInfo, limits: ValidationLimits
) -> AdapterManifest:
    """Validate a PEFT LoRA adapter directory; return its manifest or raise the first refusal."""
    root = Path(path)
    # The root is this server's scratch path: refusals name the adapter, never the path.
    if root.is_symlink():
        raise _refuse("symlink_forbidden", "the adapter directory is a symbolic link")
    if not root.is_dir():
        raise _refuse("missing_file", "the adapter is not a directory")
    entries = _scan(root, limits.max_entries)
    accepted = decide_files((rel, link, is_file) for rel, link, is_file, _ in entries)
    size = sum(s for rel, _, _, s in entries if rel in accepted)
    if size > limits.max_bytes:
        raise _refuse("too_large", f"the adapter is {size} bytes; the limit is {limits.max_bytes}")

    config_path = root / CONFIG_FILE
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise _refuse("bad_config", f"{CONFIG_FILE} is larger than {_MAX_CONFIG_BYTES} bytes")
    config = _load_json(config_path.read_bytes(), CONFIG_FILE, "bad_config", limits.max_json_depth)
    claims = decide_config(config, base, limits)

    weights = root / WEIGHTS_FILE
    data_offset, tensors = read_safetensors_header(weights, limits)
    decide_tensors(tensors, claims, base)
    _check_values(weights, data_offset, tensors)

    return AdapterManifest(
        rank=claims.rank,
        alpha=claims.alpha,
        target_modules=tuple(m for m in LLAMA_MODULES if m in claims.target_modules),
        size_bytes=size,
        digest=digest_files(root, accepted),
        files=accepted,
    )
