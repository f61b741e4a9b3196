"""Grouped, index-safe replacements for vLLM's torch LoRA ops (CPU backend).

vLLM 0.32's ``vllm/lora/ops/torch_ops/lora_ops.py`` has two problems on the CPU:

* **Correctness.** A token's LoRA index is ``-1`` when its request uses no adapter.
  The stock ops use it as a Python index (``weights[indices]``), so ``-1`` picks the
  *last* slot: base-model rows of a mixed batch get that slot's adapter applied.
* **Speed.** For every token, every wrapped layer and every slice, the stock ops gather
  a full copy of the slot's weights (padded to ``max_lora_rank``) and run a batched einsum.

Here each op treats rows whose index is negative as "no adapter" (contribution zero). Small
calls (decode) keep the gather + einsum, with the index clamped and those rows zeroed; large
calls (prefill) group the rows by slot and run one plain matmul per slot in the batch. The semantics
of each function (argument order, ``add_inputs``, slicing, the single-row broadcast in
``bgmv_expand``) are those of the stock op it replaces.
"""

from __future__ import annotations

import torch

__all__ = [
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
    "sgmv_shrink",
]


# Below this many gathered weight elements (tokens x out x in) one gather + batched einsum
# beats a matmul per slot: decode steps, where a batch has few tokens and may touch many
# adapters. Above it (prefill), gathering a weight copy per token costs far more.
GATHER_MAX_ELEMENTS = 1 << 22


def grouped_lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Return ``out[t] = inputs[t] @ weights[indices[t]].T``, and zeros where ``indices[t] < 0``.

    ``weights`` is ``[slots, out, in]`` or ``[slots, 1, out, in]``.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    n = x.shape[0]
    idx = indices[:n]
    first = int(idx[0])
    if bool((idx == first).all()):
        # One adapter (or none) for the whole batch: a single plain matmul.
        if first < 0:
            return x.new_zeros((n, weights.shape[1]))
        return x @ weights[first].to(dtype).T
    if n * weights.shape[1] * weights.shape[2] <= GATHER_MAX_ELEMENTS:
        out = torch.einsum("bi,boi->bo", x, weights[idx.clamp(min=0)].to(dtype))
        return out.masked_fill_((idx < 0).unsqueeze(1), 0.0)
    slots = torch.unique(idx).tolist()
    out = x.new_zeros((n, weights.shape[1]))
    for slot in slots:
        if slot < 0:
            continue
        rows = idx == slot
        out[rows] = x[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to the output.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _explode(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _explode(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _explode(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _explode(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs
    )


def pristine_stock_ops():
    """A fresh copy of vLLM's own ``lora_ops`` module, untouched by our plugin's patching.

    Used by the op-level tests and ``lorafleet bench lora-ops`` to compare against stock.
    """
    import importlib.util

    import vllm.lora.ops.torch_ops.lora_ops as patched

    spec = importlib.util.spec_from_file_location("_lorafleet_stock_lora_ops", patched.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
