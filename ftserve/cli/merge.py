"""`ftserve merge`, `ftserve export`, `ftserve verify`, `ftserve inspect`: thin wrappers that turn our errors
into one-line messages and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import click

from .errors import clean_errors

DIR = click.Path(file_okay=False, path_type=Path)


def _interrupt_on_sigterm() -> None:
    """A SIGTERM (docker stop, kill) unwinds like Ctrl-C, so the temporary output folder is removed."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", "out_dir", type=DIR, required=True, help="Folder to create for the merged model.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Dtype of the merged weights. [default: the base's]")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin weights (with torch.load weights_only=True).")
@click.option("--verify", "check", is_flag=True, help="Afterwards, compare the merged model with base + adapters.")
@click.option("--into", type=click.Choice(["base", "dequantized"]), default="base", show_default=True,
              help="For a QLoRA adapter: fold into BASE as it is, or into the dequantized 4-bit weights it was "
                   "trained against (written in 16 bits either way).")
@clean_errors
def merge(base: str, adapters: tuple[str, ...], out_dir: Path, dtype: str | None, max_shard_size: str, force: bool,
          allow_pickle: bool, check: bool, into: str) -> None:
    """Fold adapters into BASE (a folder or a Hugging Face model id) and write a standalone model.

    Each ADAPTER may carry a weight (DIR:0.7); several adapters add their weighted deltas. Works shard by
    shard in bounded memory; OUT_DIR appears whole at the end or not at all.
    """
    from tqdm import tqdm

    from ..merge import AdapterSpec, merge_checkpoint

    _interrupt_on_sigterm()
    specs = [AdapterSpec.parse(a) for a in adapters]
    if into == "dequantized":
        return _merge_into_dequantized(base, specs, out_dir, dtype, max_shard_size, force, check)
    bar: list = []

    def progress(n: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                            disable=None))
        bar[0].update(n)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = merge_checkpoint(base, specs, out_dir, dtype=dtype, max_shard_size=max_shard_size, force=force,
                                      allow_pickle=allow_pickle, progress=progress)
        finally:
            if bar:
                bar[0].close()
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    plan = result.plan
    click.echo(f"Merged {len(specs)} adapter(s) into {sum(t.fold is not None for t in plan.tensors)} tensors: "
               f"{out_dir} ({len(plan.shards)} shard(s), {plan.total_bytes / 2**30:.2f} GiB, {plan.dtype_name})")
    if check:
        _verify(base, specs, out_dir)


def _merge_into_dequantized(base, specs, out_dir: Path, dtype, max_shard_size, force: bool, check: bool) -> None:
    """Rebuild the dequantized 4-bit base beside the output, merge into it, remove it."""
    import shutil
    import uuid

    from ..errors import CheckpointError, ConfigError
    from ..merge import merge_checkpoint
    from ..merge.dequantized import quantized_base_of, write_dequantized_base

    if len(specs) != 1:
        raise ConfigError("--into dequantized merges one QLoRA adapter at a time")
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; pass --force to replace it")
    recipe = quantized_base_of(specs[0].path)
    scratch = out_dir.parent / f".{out_dir.name}.dequantized-{uuid.uuid4().hex[:8]}"
    try:
        write_dequantized_base(base, recipe, scratch)
        result = merge_checkpoint(scratch, specs, out_dir, dtype=dtype or recipe.get("bnb_4bit_compute_dtype"),
                                  max_shard_size=max_shard_size, force=force)
        if check:
            _verify(str(scratch), specs, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    card = out_dir / "README.md"  # name the real base, not the scratch copy
    staged = out_dir / ".README.md.tmp"
    staged.write_text(card.read_text().replace(str(scratch), f"{base} (its 4-bit weights, dequantized)"))
    os.replace(staged, card)
    click.echo(f"Merged into the dequantized 4-bit weights of {base}: {out_dir} ({result.plan.dtype_name})")


@click.command()
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", type=DIR, required=True, help="Folder to create for the plain LoRA.")
@click.option("--base", default=None,
              help="Base model (folder or id) giving layer sizes, for PEFT-saved VeRA adapters that lack them.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@clean_errors
def export(adapter_dir: Path, out_dir: Path, base: str | None, force: bool) -> None:
    """Write any method's adapter as an exact plain PEFT LoRA that PEFT, vLLM and any LoRA server load."""
    from ..errors import CheckpointError
    from ..files.adapter_folder import export_adapter, read_adapter
    from ..files.checkpoint import module_in_features

    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; pass --force to replace it")
    sizes = module_in_features(base, sorted(read_adapter(adapter_dir).modules)) if base else None
    folder = export_adapter(adapter_dir, out_dir, in_features=sizes, force=force)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    click.echo(f"Exported {folder.config.method} adapter as plain LoRA (r={config['r']}, "
               f"lora_alpha={config['lora_alpha']:g}): {out_dir}")


@click.command()
@click.argument("base")
@click.argument("adapter", metavar="ADAPTER[:WEIGHT]")
@click.argument("merged")
@click.option("--prompt", "prompts", multiple=True, help="A prompt to compare on (repeatable).")
@click.option("--new-tokens", type=click.IntRange(min=0), default=8, show_default=True,
              help="Greedy tokens appended to each prompt by the unmerged model.")
@clean_errors
def verify(base: str, adapter: str, merged: str, prompts: tuple[str, ...], new_tokens: int) -> None:
    """Compare MERGED with BASE + ADAPTER on a few prompts; exit 1 when they disagree beyond tolerance."""
    from ..merge.plan import AdapterSpec

    _verify(base, [AdapterSpec.parse(adapter)], merged, prompts, new_tokens)


def _verify(base, specs, merged, prompts=(), new_tokens: int = 8) -> None:
    from ..merge.verify import PROMPTS, verify_merge

    report = verify_merge(base, specs, merged, tuple(prompts) or PROMPTS, new_tokens)
    click.echo(report.summary())
    if not report.passed:
        raise click.exceptions.Exit(1)


@click.command("inspect")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@clean_errors
def inspect_adapter(adapter_dir: Path, as_json: bool) -> None:
    """Method, rank, alpha, targets, parameters, size, base model, and whether vLLM serves it as is."""
    info = describe_adapter(adapter_dir)
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,d}"
        click.echo(f"{key.replace('_', ' '):<18} {value}")


def describe_adapter(path: Path) -> dict:
    from ..files.adapter_folder import read_adapter

    folder = read_adapter(path)
    c, raw = folder.config, folder.raw_config
    method = c.adapter_method
    trainable = sum(t.numel() for state in folder.modules.values() for k, t in state.items()
                    if k not in method.snapshot_keys)
    ranks = sorted({method.state_shape(s)[2] for s in folder.modules.values()})
    form = ("row-scaled: W' = diag(m / ||W + s B A||_row) (W + s B A), a magnitude m per output row"
            if method.row_scaled else "plain LoRA")
    info = {
        "adapter": str(path), "method": c.method, "peft_type": raw.get("peft_type"), "form": form,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        **method.describe(c),
        "targets": sorted({n.rsplit(".", 1)[-1] for n in folder.modules}), "modules": len(folder.modules),
        "parameters": trainable,
    }
    if folder.shared:
        info["frozen_shared"] = sum(t.numel() for t in folder.shared.values())
    info["size_bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info["base_model"] = c.base_model_name_or_path
    info["vllm"] = _vllm_verdict(c, raw)
    return info


def _vllm_verdict(c, raw: dict) -> str:
    from ..files.adapter_folder import row_scaled_reason

    rank = raw.get("r")
    if c.adapter_method.row_scaled:
        return f"no: {row_scaled_reason(c)}"
    if raw.get("peft_type") != "LORA" or "lora_alpha" not in raw:
        return "needs `ftserve export` (vLLM serves only peft_type LORA; VeRA stops its engine)"
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        return ("needs `ftserve export` (vLLM applies one alpha/r to every module and ignores "
                "rank_pattern/alpha_pattern; the export bakes each module's scale into B)")
    if c.adapter_method.side_file:
        return (f"as is: adapter_model.safetensors is the exact rank-{rank} plain LoRA (the training state is in "
                f"{c.adapter_method.side_file}, which vLLM ignores); serve with --max-lora-rank >= {rank}")
    return f"as is (plain LoRA); serve with --max-lora-rank >= {rank}"
