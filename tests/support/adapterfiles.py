"""Engine tests with adapters in local directories: refs by content, a real node materializer.

The engine takes adapters as content (digest + source), never as paths; these helpers give a
test the same thing a replica has: `node_files` is the real `Materializer` rooted in a scratch
"node" data directory, `local_ref` names a local adapter directory as the source.

Adapter files without an engine: `write_model_config` (a base model as adapter checks see it:
its config.json), `write_adapter` (a valid PEFT LoRA), `hostile_corpus` (adapters intake must
refuse, each with its refusal code).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from lorafleet.adapters.basemodel import load_base_model_info
from lorafleet.adapters.materialize import Materializer
from lorafleet.adapters.model import AdapterContent
from lorafleet.adapters.validation import ValidationLimits, validate_adapter_dir
from lorafleet.serving.assemble import make_materializer
from lorafleet.serving.config import AdapterFilesConfig, EngineConfig
from lorafleet.serving.engine.protocol import AdapterRef


def node_files(config: EngineConfig, data_dir: Path | None = None,
               store: str | None = None) -> Materializer:
    """The materializer a replica with data directory `data_dir` (default: a new temp) and the
    shared adapter store `store` uses."""
    data = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="node-"))
    return make_materializer(config, AdapterFilesConfig(
        data_dir=str(data), secrets_dir=str(data / "secrets"), store=store))


def local_ref(adapter_id: str, path: Path, model_dir: Path | str, served_name: str) -> AdapterRef:
    """A ref whose source is the local directory `path` (its digest computed here)."""
    base = load_base_model_info(model_dir, served_name)
    manifest = validate_adapter_dir(path, base, ValidationLimits())
    return AdapterRef(adapter_id, AdapterContent(manifest.digest, str(path)))


# --- adapters as files on disk, valid and hostile (no engine, no model weights) -------------

# SmolLM2-135M-Instruct's shapes (the demo model): what `lorafleet adapter check --model-dir`
# reads of a base model is its config.json, so a directory holding only that file stands in.
SMOLLM2_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
}
DEMO_ADAPTERS = Path(__file__).resolve().parents[2] / "adapters" / "demo"
# The tiny random Llama (tinyengine.py's shapes) as adapter checks see it; served as "tiny-llama".
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 4,
}

# `re` backtracks through every split of a module name: minutes for one name.
BACKTRACKING_PATTERN = r"(.*?)(.*?)(.*?)(.*?)(.*?)(.*?)(.*?)\7\1[0-9]"


def write_model_config(path: Path, config: dict[str, Any] = SMOLLM2_CONFIG) -> Path:
    """A base-model directory holding only `config.json` (all that adapter checks read)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_adapter(path: Path, *, base: str = "SmolLM2-135M-Instruct", rank: int = 4,
                  targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  model: dict[str, Any] = SMOLLM2_CONFIG,
                  config: dict[str, Any] | None = None) -> Path:
    """A valid PEFT LoRA adapter for `model` (seeded weights); `config` overrides its config."""
    import numpy as np
    from safetensors.numpy import save_file

    from lorafleet.adapters.basemodel import base_model_info_from_config, block_of

    info = base_model_info_from_config(model, base)
    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"peft_type": "LORA", "base_model_name_or_path": base, "r": rank,
                           "lora_alpha": 2 * rank, "target_modules": list(targets),
                           "bias": "none", "task_type": "CAUSAL_LM", **(config or {})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    weights = {}
    for layer in range(info.num_layers):
        for module in targets:
            in_f, out_f = info.modules[module]
            prefix = f"base_model.model.model.layers.{layer}.{block_of(module)}.{module}"
            weights[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, in_f)).astype(np.float16)
            weights[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, rank)).astype(np.float16)
    save_file(weights, str(path / "adapter_model.safetensors"))
    return path


def write_tiny_adapter(path: Path, *, base: str = "tiny-llama", rank: int = 4) -> Path:
    """A valid PEFT LoRA adapter on q_proj and v_proj for the tiny Llama (`TINY_LLAMA_CONFIG`)."""
    return write_adapter(path, base=base, rank=rank, model=TINY_LLAMA_CONFIG)


_write_adapter = write_adapter


def _tar_of(archive: Path, members: list[tuple[tarfile.TarInfo, bytes]],
            fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(archive, "w:gz", format=fmt) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def hostile_corpus(root: Path, *, base: str = "SmolLM2-135M-Instruct",
                   model: dict[str, Any] = SMOLLM2_CONFIG) -> dict[str, tuple[Path, str]]:
    """Adapters that intake must refuse, each with the refusal code it must get.

    Built for the base model `model` served as `base` (default: SmolLM2, as
    `write_model_config` writes it) and a rank limit of at most 32 (the engine's default
    `max_lora_rank`). Every one is small on disk; what makes it hostile is what reading or
    judging it would cost, or what it would do, if intake were naive.
    """
    root.mkdir(parents=True, exist_ok=True)
    corpus: dict[str, tuple[Path, str]] = {}

    def write_adapter(path: Path, **kwargs: Any) -> Path:
        return _write_adapter(path, **{"base": base, "model": model, **kwargs})

    pickle_dir = write_adapter(root / "pickle")
    (pickle_dir / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")  # unpickling runs code
    corpus["pickle"] = (pickle_dir, "pickle_forbidden")

    valid = write_adapter(root / "valid-src")
    corpus["traversal"] = (_tar_of(root / "traversal.tar.gz", [
        (tarfile.TarInfo("adapter_config.json"), (valid / "adapter_config.json").read_bytes()),
        (tarfile.TarInfo("../../escaped.txt"), b"owned"),
    ]), "path_traversal")

    corpus["wrong-base"] = (write_adapter(root / "wrong-base", base="Llama-3-8B"),
                            "wrong_base_model")
    corpus["rank-too-large"] = (write_adapter(root / "rank-too-large", rank=64), "rank_too_large")

    deep = write_adapter(root / "deep-json")
    nested = "[" * 100_000 + "]" * 100_000
    text = (deep / "adapter_config.json").read_text()
    (deep / "adapter_config.json").write_text(text.replace('"peft_type"', f'"x": {nested}, '
                                                          '"peft_type"', 1))
    corpus["deep-json"] = (deep, "bad_config")

    corpus["backtracking-targets"] = (write_adapter(
        root / "backtracking", config={"target_modules": BACKTRACKING_PATTERN}), "too_complex")

    long_name = tarfile.TarInfo("a/" + "n" * (64 << 20))  # 64 MiB of name, ~64 KiB gzipped
    corpus["tar-long-name"] = (_tar_of(root / "long-name.tar.gz", [(long_name, b"x")]),
                               "too_large")
    return corpus
