"""`ftserve export` and `ftserve inspect`: an adapter folder written as plain LoRA, or described; thin wrappers
that turn our errors into one-line messages and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import clean_errors
from .merge import DIR


@click.command()
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", type=DIR, required=True, help="Folder to create for the plain LoRA.")
@click.option("--base", default=None,
              help="Base model (folder or id): layer sizes for PEFT-saved VeRA adapters that lack them; the weights "
                   "for --approximate-rank.")
@click.option("--approximate-rank", type=int, default=None, metavar="R",
              help="Write the best rank-R LoRA of the merged delta per layer (SVD; needs --base) and print each "
                   "layer's relative error: for an adapter with no exact plain-LoRA form (DoRA), for servers that "
                   "take LoRA only.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@clean_errors
def export(adapter_dir: Path, out_dir: Path, base: str | None, approximate_rank: int | None, force: bool) -> None:
    """Write any method's adapter as an exact plain PEFT LoRA that PEFT, vLLM and any LoRA server load, or, with
    --approximate-rank, as its best approximation of that rank."""
    from ..errors import CheckpointError, ConfigError
    from ..files.adapter_folder import export_adapter, read_adapter
    from ..files.checkpoint import module_in_features

    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; pass --force to replace it")
    if approximate_rank is not None:
        if base is None:
            raise ConfigError("--approximate-rank needs the base model: the delta to approximate is computed from "
                              "its weights; pass --base")
        return _export_approximate(adapter_dir, out_dir, base, approximate_rank, force)
    sizes = module_in_features(base, sorted(read_adapter(adapter_dir).modules)) if base else None
    folder = export_adapter(adapter_dir, out_dir, in_features=sizes, force=force)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    click.echo(f"Exported {folder.config.method} adapter as plain LoRA (r={config['r']}, "
               f"lora_alpha={config['lora_alpha']:g}): {out_dir}")


def _export_approximate(adapter_dir: Path, out_dir: Path, base: str, rank: int, force: bool) -> None:
    from ..merge import export_approximate

    result = export_approximate(adapter_dir, out_dir, base, rank, force=force)
    width = max(map(len, result.errors))
    for module, error in result.errors.items():
        click.echo(f"  {module:<{width}}  relative error {error:.3g}")
    worst = max(result.errors, key=result.errors.get)
    click.echo(f"Exported {result.folder.config.method} adapter as its best rank-{rank} plain LoRA (r={rank}, "
               f"lora_alpha={rank}): {out_dir}; largest relative error {result.errors[worst]:.3g} ({worst}), "
               f"||delta - B A||_F / ||delta||_F per layer")


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
    info = {
        "adapter": str(path), "method": c.method, "peft_type": raw.get("peft_type"),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "form": _form(method),
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


def _form(method) -> str:
    """The served form (ftserve/methods/factors.py) in words."""
    if method.row_scaled:
        return (f"row-scaled ({method.title}): W' = diag(m / ||W + s B A||_row) (W + s B A), a magnitude m per "
                f"output row; merged exactly, served on the torch engine, exported as plain LoRA only approximately "
                f"(`ftserve export --approximate-rank R --base BASE`)")
    return "exact plain LoRA: W' = W + s B A"


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
