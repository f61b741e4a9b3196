from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lorafleet.adapters.basemodel import BaseModelInfo, load_base_model_info
from lorafleet.adapters.errors import AdapterValidationError
from lorafleet.adapters.validation import ValidationLimits, validate_adapter_dir

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _refused(path: Path, base: BaseModelInfo, limits: ValidationLimits) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        validate_adapter_dir(path, base, limits)
    return info.value


def test_tiny_base_shapes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 4}))
    base = load_base_model_info(tmp_path, "tiny-llama")
    assert base.num_layers == 4
    assert base.modules["q_proj"] == (256, 256)
    assert base.modules["k_proj"] == (256, 128)
    assert base.modules["down_proj"] == (512, 256)


def test_valid_adapter_manifest(make_adapter: Any, tiny_base: BaseModelInfo,
                                limits: ValidationLimits) -> None:
    path = make_adapter(rank=8, targets=("v_proj", "q_proj", "down_proj"))
    (path / "README.md").write_text("# my adapter\n")
    manifest = validate_adapter_dir(path, tiny_base, limits)
    assert manifest.rank == 8 and manifest.alpha == 16.0
    assert manifest.target_modules == ("q_proj", "v_proj", "down_proj")
    assert manifest.files == ("README.md", "adapter_config.json", "adapter_model.safetensors")
    assert manifest.size_bytes == sum(p.stat().st_size for p in path.iterdir())
    assert len(manifest.digest) == 64


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dtypes_accepted(dtype: Any, make_adapter: Any, tiny_base: BaseModelInfo,
                         limits: ValidationLimits) -> None:
    validate_adapter_dir(make_adapter(dtype=dtype), tiny_base, limits)


def test_same_content_same_digest(make_adapter: Any, tiny_base: BaseModelInfo,
                                  limits: ValidationLimits) -> None:
    a = validate_adapter_dir(make_adapter(), tiny_base, limits)
    b = validate_adapter_dir(make_adapter(), tiny_base, limits)
    c = validate_adapter_dir(make_adapter(rank=2), tiny_base, limits)
    assert a.digest == b.digest != c.digest


def test_regex_and_all_linear_targets(make_adapter: Any, tiny_base: BaseModelInfo,
                                      limits: ValidationLimits) -> None:
    path = make_adapter(targets=("q_proj", "v_proj"),
                        config={"target_modules": r".*\.(q_proj|v_proj)"})
    assert validate_adapter_dir(path, tiny_base, limits).target_modules == ("q_proj", "v_proj")
    all_modules = tuple(tiny_base.modules)
    path = make_adapter(targets=all_modules, config={"target_modules": "all-linear"})
    assert validate_adapter_dir(path, tiny_base, limits).target_modules == all_modules


@pytest.mark.parametrize("filename", ["adapter_model.bin", "pytorch_model.pt", "x.pth",
                                      "opt.pkl", "last.ckpt", "sub/hidden.bin"])
def test_pickle_files_refused(filename: str, make_adapter: Any, tiny_base: BaseModelInfo,
                              limits: ValidationLimits) -> None:
    path = make_adapter()
    (path / filename).parent.mkdir(exist_ok=True)
    (path / filename).write_bytes(b"\x80\x04K\x01.")  # a pickle
    assert _refused(path, tiny_base, limits).code == "pickle_forbidden"


def test_unexpected_file_refused(make_adapter: Any, tiny_base: BaseModelInfo,
                                 limits: ValidationLimits) -> None:
    path = make_adapter()
    (path / "run.sh").write_text("echo hi")
    assert _refused(path, tiny_base, limits).code == "unexpected_file"


def test_symlink_refused(make_adapter: Any, tiny_base: BaseModelInfo, limits: ValidationLimits,
                         tmp_path: Path) -> None:
    path = make_adapter()
    (tmp_path / "secret.md").write_text("secret")
    os.symlink(tmp_path / "secret.md", path / "notes.md")
    assert _refused(path, tiny_base, limits).code == "symlink_forbidden"
    os.symlink(path, tmp_path / "link")
    assert _refused(tmp_path / "link", tiny_base, limits).code == "symlink_forbidden"


def test_missing_weights(make_adapter: Any, tiny_base: BaseModelInfo,
                         limits: ValidationLimits) -> None:
    path = make_adapter()
    (path / "adapter_model.safetensors").unlink()
    assert _refused(path, tiny_base, limits).code == "missing_file"


def test_wrong_base_model_names_both(make_adapter: Any, tiny_base: BaseModelInfo,
                                     limits: ValidationLimits) -> None:
    path = make_adapter(config={"base_model_name_or_path": "meta-llama/Llama-3-8B"})
    error = _refused(path, tiny_base, limits)
    assert error.code == "wrong_base_model"
    assert "meta-llama/Llama-3-8B" in error.reason and "tiny-llama" in error.reason


@pytest.mark.parametrize("config, code", [
    ({"peft_type": "PREFIX_TUNING"}, "not_lora"),
    ({"r": 32}, "rank_too_large"),
    ({"target_modules": ["q_proj", "lm_head"]}, "unknown_target_module"),
    ({"target_modules": "nothing_matches"}, "unknown_target_module"),
    ({"modules_to_save": ["lm_head"]}, "unsupported_config"),
    ({"use_dora": True}, "unsupported_config"),
    ({"rank_pattern": {"q_proj": 8}}, "unsupported_config"),
    ({"r": "4"}, "bad_config"),
    ({"r": 8}, "config_mismatch"),  # the config lies about the rank
    ({"target_modules": ["q_proj"]}, "config_mismatch"),  # ... or about the targets
])
def test_config_rules(config: dict[str, Any], code: str, make_adapter: Any,
                      tiny_base: BaseModelInfo, limits: ValidationLimits) -> None:
    assert _refused(make_adapter(config=config), tiny_base, limits).code == code


def test_wrong_shape(make_adapter: Any, tiny_base: BaseModelInfo,
                     limits: ValidationLimits) -> None:
    def widen(w: dict[str, np.ndarray]) -> None:
        w[Q_A] = np.zeros((4, 300), dtype=np.float16)

    assert _refused(make_adapter(tensors=widen), tiny_base, limits).code == "shape_mismatch"


def test_layer_beyond_model(make_adapter: Any, tiny_base: BaseModelInfo,
                            limits: ValidationLimits) -> None:
    assert _refused(make_adapter(layers=5), tiny_base, limits).code == "bad_tensor"


def test_missing_lora_b(make_adapter: Any, tiny_base: BaseModelInfo,
                        limits: ValidationLimits) -> None:
    def drop(w: dict[str, np.ndarray]) -> None:
        del w[Q_A.replace("lora_A", "lora_B")]

    assert _refused(make_adapter(tensors=drop), tiny_base, limits).code == "bad_tensor"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(value: float, make_adapter: Any, tiny_base: BaseModelInfo,
                            limits: ValidationLimits) -> None:
    def poison(w: dict[str, np.ndarray]) -> None:
        w[Q_A][1, 2] = value

    error = _refused(make_adapter(tensors=poison), tiny_base, limits)
    assert error.code == "bad_tensor" and Q_A in error.reason


def test_wrong_dtype(make_adapter: Any, tiny_base: BaseModelInfo,
                     limits: ValidationLimits) -> None:
    assert _refused(make_adapter(dtype=np.float64), tiny_base, limits).code == "bad_tensor"


def test_foreign_tensor_name(make_adapter: Any, tiny_base: BaseModelInfo,
                             limits: ValidationLimits) -> None:
    def extra(w: dict[str, np.ndarray]) -> None:
        w["base_model.model.lm_head.weight"] = np.zeros((2, 2), dtype=np.float16)

    assert _refused(make_adapter(tensors=extra), tiny_base, limits).code == "bad_tensor"


def test_oversize(make_adapter: Any, tiny_base: BaseModelInfo) -> None:
    path = make_adapter()
    error = _refused(path, tiny_base, ValidationLimits(max_bytes=10_000))
    assert error.code == "too_large"


def _write_raw(path: Path, header: bytes, declared_len: int | None = None,
               data: bytes = b"") -> None:
    length = len(header) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", length) + header + data)


def test_huge_declared_header_is_refused_without_reading(make_adapter: Any,
                                                         tiny_base: BaseModelInfo,
                                                         limits: ValidationLimits) -> None:
    path = make_adapter()
    _write_raw(path / "adapter_model.safetensors", b"{}", declared_len=2**62)
    assert _refused(path, tiny_base, limits).code == "bad_header"


@pytest.mark.parametrize("header, data", [
    (b"not json", b""),
    (b"[1, 2]", b""),
    (json.dumps({Q_A: {"dtype": "F16", "shape": [4, 256], "data_offsets": [0, 10**9]}}).encode(),
     b"\0" * 16),  # offsets beyond the file
    (json.dumps({Q_A: {"dtype": "F16", "shape": [1, 1], "data_offsets": [2, 4]}}).encode(),
     b"\0" * 4),  # a gap before the first tensor
    (b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}, '
     b'"a": {"dtype": "F16", "shape": [1], "data_offsets": [2, 4]}}', b"\0" * 4),  # duplicate
])
def test_malformed_headers(header: bytes, data: bytes, make_adapter: Any,
                           tiny_base: BaseModelInfo, limits: ValidationLimits) -> None:
    path = make_adapter()
    _write_raw(path / "adapter_model.safetensors", header, data=data)
    assert _refused(path, tiny_base, limits).code == "bad_header"


def test_bfloat16_checked_for_non_finite(make_adapter: Any, tiny_base: BaseModelInfo,
                                         limits: ValidationLimits) -> None:
    """numpy has no bf16: build the file by hand (bf16 = the top 16 bits of a float32)."""
    path = make_adapter(dtype=np.float32)
    weights_path = path / "adapter_model.safetensors"
    from safetensors.numpy import load_file

    tensors = load_file(str(weights_path))

    def write(poison: bool) -> None:
        header: dict[str, Any] = {}
        chunks = []
        offset = 0
        for name in sorted(tensors):
            values = tensors[name].copy()
            if poison and name == Q_A:
                values[0, 0] = np.inf
            raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
            header[name] = {"dtype": "BF16", "shape": list(values.shape),
                            "data_offsets": [offset, offset + len(raw)]}
            chunks.append(raw)
            offset += len(raw)
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        weights_path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))

    write(poison=False)
    validate_adapter_dir(path, tiny_base, limits)
    write(poison=True)
    assert _refused(path, tiny_base, limits).code == "bad_tensor"
