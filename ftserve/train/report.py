"""What ``ftserve train`` shows and leaves behind: a progress line per logging step (loss, learning rate,
tokens/s, ETA), a PNG of the loss curves, and the adapter's model card with the commands to merge and serve it."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

LOSS_PLOT = "loss.png"
LOG_FILE = "training_log.json"


class Progress(TrainerCallback):
    """One line per logged step: ``step 20/100  loss 2.310  lr 1.9e-04  1,234 tok/s  eta 0:01:20``."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.started = self.last_time = 0.0
        self.last_tokens = 0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_time = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.monotonic()
        if "loss" in logs:
            rate = (state.num_input_tokens_seen - self.last_tokens) / max(now - self.last_time, 1e-9)
            done = state.global_step - self.first_step
            eta = (now - self.started) / max(done, 1) * (state.max_steps - state.global_step)
            self.echo(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                      f"lr {logs.get('learning_rate', 0):.2e}  {rate:,.0f} tok/s  "
                      f"eta {timedelta(seconds=round(eta))}")
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
        if "eval_loss" in logs:
            self.echo(f"step {state.global_step}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}")


def curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    return {"train": [(e["step"], e["loss"]) for e in log_history if "loss" in e],
            "eval": [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]}


def plot_losses(log_history: list[dict], path: Path) -> bool:
    """The training and eval loss against the step, as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return False
    lines = curves(log_history)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in lines.items():
        if points:
            axes.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None,
                      label=f"{name} loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if any(lines.values()):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def next_commands(settings, output: Path) -> list[str]:
    """The commands that take the adapter further: merge it into the base, serve it unmerged."""
    name = settings.adapter_name or output.name
    return [f"ftserve merge {settings.base} {output} -o {output}-merged",
            f"ftserve serve {settings.base} --adapter {name}={output}"]


def model_card(settings, data: dict[str, Any], final: dict[str, Any], output: Path) -> str:
    """README.md of the adapter folder: base, data, settings, final losses, and how to merge and serve."""
    lines = curves(final.get("log_history", []))
    last_train = f"{lines['train'][-1][1]:.4f}" if lines["train"] else "n/a"
    last_eval = f"{lines['eval'][-1][1]:.4f}" if lines["eval"] else "n/a"
    adapter = {k: v for k, v in settings.as_dict().items() if k in
               ("method", "rank", "alpha", "dropout", "targets", "rslora", "settings", "load_in_4bit")}
    training = {k: v for k, v in settings.as_dict().items() if k in
                ("epochs", "max_steps", "lr", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size",
                 "grad_accum", "gradient_checkpointing", "bf16", "seed", "max_seq_len", "packing")}
    commands = "\n".join(next_commands(settings, output))
    quantized = ("\nThe base was loaded in 4 bits (bitsandbytes NF4, double quantization, bf16 compute). "
                 "`ftserve merge` folds the adapter into the original 16-bit base; `--into dequantized` folds it "
                 "into the dequantized 4-bit weights it was trained against.\n" if settings.load_in_4bit else "")
    return f"""---
library_name: peft
base_model: {settings.base}
tags: [ftserve, {settings.method}]
---

# {output.name}: a {settings.method} adapter of {settings.base}

Trained by `ftserve train` in {final.get('global_step', 0)} optimizer steps
({final.get('epoch', 0):.2f} epochs, {final.get('runtime', 0):.0f} s).
{quantized}
## Data

{json.dumps(data, indent=2)}

## Settings

Adapter: `{json.dumps(adapter)}`

Training: `{json.dumps(training)}`

## Results

Final training loss {last_train}; final eval loss {last_eval}. The curves are in `{LOSS_PLOT}`, every logged
value in `{LOG_FILE}`.

## Use

```
{commands}
```

Or in Python: `ftserve.load_adapter(base_model, "{output}")`, or `peft.PeftModel.from_pretrained(base_model,
"{output}")`.
"""
