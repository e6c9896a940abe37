"""`ftserve quickstart`: the whole tool on a small model built locally, offline, in about a minute.

Builds a tiny Llama-shaped model and tokenizer, trains a short adapter with each of the five methods on a
toy language-modelling task, and saves base and adapters under one folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import METHODS, FineTuningConfig
from .methods import get_method
from .model import FineTuningModel
from .testing import build_tokenizer, tiny_llama, toy_sentences


@dataclass
class TrainResult:
    method: str
    trainable: int
    first_loss: float
    last_loss: float
    seconds: float
    path: Path


def toy_batches(tokenizer, batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> list[dict]:
    ids = tokenizer(". ".join(toy_sentences(200, seed)))["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)]
    batches = []
    for i in range(0, len(chunks) - batch_size + 1, batch_size):
        x = torch.tensor(chunks[i:i + batch_size])
        batches.append({"input_ids": x, "labels": x})
    return batches


def train_adapter(base_dir: Path, method: str, out_dir: Path, steps: int, progress) -> TrainResult:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    chosen = get_method(method)
    settings = chosen.quickstart_settings
    start = {"delta_start_step": steps // 2} if "delta_start_step" in chosen.option_defaults else {}
    config = FineTuningConfig(method=method, lora_r=settings["rank"], lora_alpha=16, target_modules="all-linear",
                              **start)
    model = FineTuningModel(base, config)
    optimizer = model.create_optimizer(lr=settings["lr"])
    batches = toy_batches(build_tokenizer())
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        progress(method, step + 1, steps, losses[-1])
    path = out_dir / "adapters" / method
    model.save_adapter(path)
    return TrainResult(method, model.trainable_parameters()[0], losses[0], sum(losses[-5:]) / len(losses[-5:]),
                       time.perf_counter() - start, path)


def build_base(out_dir: Path) -> Path:
    base_dir = out_dir / "base"
    if not (base_dir / "config.json").exists():
        tiny_llama(hidden=128, layers=2, heads=4, intermediate=256).save_pretrained(base_dir)
        build_tokenizer().save_pretrained(base_dir)
    return base_dir


def run_training(out_dir: Path, steps: int, progress, methods=METHODS) -> tuple[Path, list[TrainResult]]:
    torch.manual_seed(0)
    base_dir = build_base(out_dir)
    return base_dir, [train_adapter(base_dir, m, out_dir, steps, progress) for m in methods]
