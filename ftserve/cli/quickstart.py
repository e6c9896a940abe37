"""`ftserve quickstart`."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command()
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("ftserve-quickstart"), show_default=True, help="Folder for the base model and adapters.")
@click.option("--steps", type=click.IntRange(min=2), default=40, show_default=True, help="Training steps per method.")
def quickstart(out_dir: Path, steps: int) -> None:
    """Offline tour: build a small model, train each of the five methods briefly, save the adapters."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..quickstart import run_training

    click.echo(f"Building a small Llama-shaped model and tokenizer in {out_dir / 'base'} ...")
    bars: dict = {}

    def progress(method: str, step: int, total: int, loss: float) -> None:
        if method not in bars:
            bars[method] = click.progressbar(length=total, label=f"training {method:<10}", show_pos=True)
            bars[method].__enter__()
        bar = bars[method]
        bar.label = f"training {method:<10} loss {loss:6.3f}"
        bar.update(1)
        if step == total:
            bar.__exit__(None, None, None)

    base_dir, results = run_training(out_dir, steps, progress)
    click.echo(f"\n{'method':<11} {'trainable':>10} {'loss first':>11} {'loss last':>10}  adapter")
    for r in results:
        click.echo(f"{r.method:<11} {r.trainable:>10,d} {r.first_loss:>11.3f} {r.last_loss:>10.3f}  {r.path}")
    click.echo(f"\nBase model: {base_dir}")
