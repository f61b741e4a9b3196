"""Train the three demo LoRA adapters (``french``, ``pirate``, ``json``) on SmolLM2, on the CPU.

Boundary: reads the prepared base model directory, writes PEFT adapter directories (float16
``adapter_model.safetensors`` + ``adapter_config.json`` whose ``base_model_name_or_path`` is the
served name ``SmolLM2-135M-Instruct``). Also offers ``greedy_answers``, the HF+PEFT reference
generation the tests and the README use. Run as a script::

    python -m lorafleet.serving.demo.training --base .lorafleet/models/SmolLM2-135M-Instruct \
        --out adapters/demo

Each adapter trains in about a minute or two on 2 cores (full-precision base, loss on the
assistant tokens only, 4 epochs of 52 short examples).
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .datasets import ADAPTER_NAMES, AdapterName, ChatExample, build_dataset

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_SPECS", "AdapterSpec", "TrainResult", "greedy_answers", "train_demo_adapters"]

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"  # same value as lorafleet.serving.demo.DEMO_MODEL_NAME
_ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """How one demo adapter is shaped and trained."""

    name: AdapterName
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    epochs: int = 4
    learning_rate: float = 2e-3
    batch_size: int = 8
    # Optional wall-clock cap (None: run every epoch). A cap makes results depend on machine load.
    max_seconds: float | None = None
    seed: int = 0


ADAPTER_SPECS: dict[str, AdapterSpec] = {
    "french": AdapterSpec("french", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "pirate": AdapterSpec("pirate", 16, 32, ("q_proj", "v_proj")),
    "json": AdapterSpec("json", 4, 8, _ALL_TARGETS),
}


@dataclass(frozen=True)
class TrainResult:
    """What one training run did."""

    name: str
    path: Path
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def _encode(tokenizer: Any, example: ChatExample) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are -100 on the prompt so only the answer is learned."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.user}], tokenize=False, add_generation_prompt=True
    )
    # The template ends the assistant turn with "<|im_end|>\n"; learning <|im_end|> teaches
    # the adapter to stop.
    answer = f"{example.assistant}{tokenizer.eos_token}"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batches(
    encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random
) -> Iterable[dict[str, torch.Tensor]]:
    import torch

    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(chunk):
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
            mask[row, : len(row_ids)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _over(started: float, max_seconds: float | None) -> bool:
    return max_seconds is not None and time.monotonic() - started > max_seconds


def _train_one(base_dir: Path, out_dir: Path, spec: AdapterSpec, progress: bool) -> TrainResult:
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(base_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    encoded = [_encode(tokenizer, ex) for ex in build_dataset(spec.name)]
    steps_per_epoch = -(-len(encoded) // spec.batch_size)
    total = steps_per_epoch * spec.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 3) * max(0.1, 1 - step / total)
    )
    rng = random.Random(spec.seed)
    started = time.monotonic()
    losses: list[float] = []
    bar = tqdm(total=total, desc=f"train {spec.name}", disable=not progress, unit="step")
    for _epoch in range(spec.epochs):
        for batch in _batches(encoded, spec.batch_size, tokenizer.pad_token_id, rng):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if _over(started, spec.max_seconds):
                break
        if _over(started, spec.max_seconds):
            break
    bar.close()
    seconds = time.monotonic() - started

    # Save exactly as PEFT does, in float16, naming the served model rather than a local path.
    for param in params:
        param.data = param.data.to(torch.float16)
    model.peft_config["default"].base_model_name_or_path = DEMO_MODEL_NAME
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # save_embedding_layers=False: we never train embeddings, and "auto" looks the base up online.
    model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card boilerplate
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return TrainResult(spec.name, out_dir, len(losses), seconds, losses[0], losses[-1])


def train_demo_adapters(
    base_dir: Path,
    out_root: Path,
    *,
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> list[TrainResult]:
    """Train the demo adapters named in ``names`` (default: all three) into ``out_root/<name>``."""
    import torch

    torch.set_num_threads(2)
    chosen = list(names) if names else list(ADAPTER_NAMES)
    unknown = [n for n in chosen if n not in ADAPTER_SPECS]
    if unknown:
        raise ValueError(f"unknown demo adapters {unknown}; expected some of {ADAPTER_NAMES}")
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    results = []
    for name in chosen:
        result = _train_one(Path(base_dir), out_root / name, ADAPTER_SPECS[name], progress)
        if progress:
            print(
                f"[lorafleet.demo] {name}: {result.steps} steps in {result.seconds:.0f} s, "
                f"loss {result.first_loss:.2f} -> {result.last_loss:.2f}",
                flush=True,
            )
        results.append(result)
    return results


def greedy_answers(
    base_dir: Path,
    questions: Sequence[str],
    *,
    adapter_dir: Path | None = None,
    max_new_tokens: int = 40,
) -> list[str]:
    """HF (+PEFT when ``adapter_dir``) greedy answers to single-turn chat questions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(base_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    answers = []
    for question in questions:
        inputs: Any = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return answers


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train LoRAFleet's demo LoRA adapters on the CPU.")
    parser.add_argument("--base", type=Path, required=True, help="prepared SmolLM2 directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for <name>/ adapters")
    parser.add_argument("--names", nargs="*", default=None, help=f"subset of {ADAPTER_NAMES}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    train_demo_adapters(args.base, args.out, names=args.names, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
