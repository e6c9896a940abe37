"""`ftserve train BASE DATA -o ADAPTER_DIR`: a thin command over ftserve.train.run (transformers' Trainer)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import sys
from pathlib import Path

import click

from .merge import clean_errors

PATH = click.Path(path_type=str)


@click.command()
@click.argument("base", required=False)
@click.argument("data", required=False)
@click.option("-o", "--output", type=PATH, help="Folder to create for the adapter.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A YAML file of these settings (long names, _ for -); flags override it.")
@click.option("--method", help="lora, vera, lora+, delta-lora, lora-fa, or a registered method. [default: lora]")
@click.option("--rank", type=int, help="Adapter rank r. [default: 8]")
@click.option("--alpha", type=float, help="LoRA alpha. [default: 2 x rank]")
@click.option("--dropout", type=float, help="Dropout on the adapter's input. [default: 0]")
@click.option("--targets", help="Comma-separated module names, 'all-linear', or a regex. [default: the model "
                                "type's, as PEFT's]")
@click.option("--rslora/--no-rslora", default=None, help="Scale by alpha / sqrt(r).")
@click.option("--setting", "method_settings", multiple=True, metavar="KEY=VALUE",
              help="A setting of the chosen method, e.g. loraplus_lr_ratio=8, delta_start_step=100 (repeatable).")
@click.option("--load-in-4bit/--no-load-in-4bit", default=None,
              help="QLoRA: load the base in bitsandbytes NF4, double quantization, bf16 compute.")
@click.option("--eval-data", type=PATH, help="A file of eval rows, same shapes as DATA.")
@click.option("--eval-fraction", type=float, help="Hold out this fraction of DATA for evaluation.")
@click.option("--max-seq-len", type=int, help="Cut rows to this many tokens (and count them). [default: 1024]")
@click.option("--packing/--no-packing", default=None, help="Concatenate rows into --max-seq-len blocks.")
@click.option("--chat-template", type=PATH, help="A Jinja chat template file for 'messages' rows.")
@click.option("--epochs", type=float, help="[default: 1]")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, help="Peak learning rate. [default: 2e-4]")
@click.option("--lr-scheduler", help="transformers' scheduler name: linear, cosine, constant, ... [default: linear]")
@click.option("--warmup-ratio", type=float, help="[default: 0]")
@click.option("--weight-decay", type=float, help="[default: 0]")
@click.option("--batch-size", type=int, help="Rows per device and step. [default: 8]")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step. [default: 1]")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in backward to save memory.")
@click.option("--bf16/--no-bf16", default=None, help="bf16 mixed precision (autocast).")
@click.option("--seed", type=int, help="[default: 42]")
@click.option("--logging-steps", type=int, help="Print progress every N steps. [default: 10]")
@click.option("--eval-steps", type=int, help="Evaluate every N steps. [default: each epoch]")
@click.option("--save-steps", type=int, help="Checkpoint every N steps. [default: 500]")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
              help="Continue from the run's last complete checkpoint, or from CHECKPOINT.")
@click.option("--force", is_flag=True, default=None, help="Replace an existing output folder or earlier checkpoints.")
@click.option("--deploy-to", metavar="URL", help="Afterwards, load the adapter into a running ftserve serve.")
@click.option("--api-key", envvar="FTSERVE_API_KEY", help="The server's API key, for --deploy-to.")
@click.option("--adapter-name", help="The served adapter's name. [default: the output folder's name]")
@clean_errors
def train(config_file: Path | None, method_settings: tuple[str, ...], targets: str | None, **flags) -> None:
    """Train an adapter of BASE (a folder or a cached model id) on DATA (.jsonl, .json, .csv, .parquet, or a
    cached dataset id): rows of 'text', 'prompt'/'completion', or chat 'messages' (loss on the assistant turns).

    Writes the adapter in PEFT's layout with a model card, loss curves and the commands to merge and serve it.
    BASE, DATA and --output may come from --config instead.
    """
    from ..train.quantized import without_bitsandbytes
    from ..train.settings import TrainSettings, parse_setting

    if targets is not None:
        targets = targets if targets == "all-linear" or "," not in targets and not targets.isidentifier() \
            else [t.strip() for t in targets.split(",") if t.strip()]
    flags.update(targets=targets, settings=dict(parse_setting(s) for s in method_settings))
    settings = TrainSettings.from_sources(config_file, flags)
    # At exit, the interpreter's last collection walks every object torch and transformers made: seconds on a
    # busy machine, after the last line was printed, for memory the OS takes back anyway.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    with contextlib.nullcontext() if settings.load_in_4bit else without_bitsandbytes():
        if not click.get_current_context().find_root().params.get("verbose"):
            quiet_library_logs()
        _train(settings)


def _train(settings) -> None:
    from ..train.report import next_commands
    from ..train.run import Interrupted, deploy
    from ..train.run import train as run

    try:
        output = run(settings, echo=lambda line: click.echo(line, err=True))
    except Interrupted as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Error: interrupted before training started; nothing was written", err=True)
        sys.exit(130)
    if output is None:  # another process of a torchrun / accelerate run: the first one reports
        return
    click.echo(f"wrote {output}", err=True)
    for command in next_commands(settings, output):
        click.echo(command)
    if settings.deploy_to:
        name = deploy(settings, output)
        click.echo(f"loaded as {name!r} into {settings.deploy_to}", err=True)


def quiet_library_logs() -> None:
    """Errors only from the libraries under the command (``-v`` shows their warnings too): their warnings are
    about their own choices ("mtime may not be reliable on this filesystem ..."), not the user's. Each library
    sets its loggers' level when first imported, so this asks each one; one not installed is named where the
    command needs it."""
    for name in ("transformers.utils.logging", "datasets.utils.logging"):
        try:
            importlib.import_module(name).set_verbosity_error()
        except ImportError:
            pass
