"""`ftserve merge` and `ftserve verify`: thin wrappers that turn our errors into one-line messages and a non-zero
exit (`export` and `inspect` are in adapters.py)."""

from __future__ import annotations

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
@click.argument("inputs", nargs=-1, metavar="BASE INPUT[:WEIGHT]...")
@click.option("-o", "--output", "out_dir", type=DIR, required=True, help="Folder to create for the merged model.")
@click.option("--method", default=None,
              help="mergekit's merge method: linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, "
                   "breadcrumbs, breadcrumbs_ties, della, della_linear, slerp; with --output-kind adapter, PEFT's "
                   "combination types (svd, cat, ties_svd, ...). [default: adapters' weighted deltas added to BASE, "
                   "which is task_arithmetic unnormalized; svd for an adapter output]")
@click.option("--weights", default=None, metavar="W1,W2,...", help="A weight per INPUT, in order (or INPUT:WEIGHT).")
@click.option("--density", type=float, default=None, help="Fraction of each task vector kept (ties, dare_*, ...).")
@click.option("--lambda", "lambda_", type=float, default=None, help="Scale of the merged task vector.")
@click.option("--t", "t", type=float, default=None, help="slerp: where between BASE (0) and INPUT (1).")
@click.option("--seed", type=int, default=None, help="Seed of DARE / DELLA's random drops. [default: 0]")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A mergekit YAML recipe (merge_method, base_model, models, parameters, dtype); then no INPUTs.")
@click.option("--output-kind", type=click.Choice(["model", "adapter"]), default="model", show_default=True,
              help="Write a standalone model, or a new adapter merged from adapters (PEFT's add_weighted_adapter).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Rank of an adapter output (svd methods).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Dtype of the merged weights; with --method, mergekit's dtype: its arithmetic's too. "
                   "[default: the base's]")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin weights (with torch.load weights_only=True).")
@click.option("--verify", "check", is_flag=True,
              help="Afterwards, compare the merged model with base + adapters (with --method or --recipe: "
                   "recompute every tensor).")
@click.option("--into", type=click.Choice(["base", "dequantized"]), default="base", show_default=True,
              help="For a QLoRA adapter: fold into BASE as it is, or into the dequantized 4-bit weights it was "
                   "trained against (written in 16 bits either way).")
@clean_errors
def merge(inputs: tuple[str, ...], out_dir: Path, method: str | None, weights: str | None, density: float | None,
          lambda_: float | None, t: float | None, seed: int | None, recipe: Path | None, output_kind: str,
          rank: int | None, dtype: str | None, max_shard_size: str, force: bool, allow_pickle: bool, check: bool,
          into: str) -> None:
    """Merge INPUTs into BASE (a folder or a Hugging Face model id) and write a standalone model.

    An INPUT is an adapter folder (applied to BASE), a fine-tuned model folder or hub id, or MODEL+ADAPTER;
    each may carry a weight (DIR:0.7). By default adapters add their weighted deltas; --method merges as
    mergekit's method of that name, and --recipe reads a mergekit YAML recipe. Works shard by shard in bounded
    memory; OUT_DIR appears whole at the end or not at all.
    """
    from ..errors import ConfigError

    _interrupt_on_sigterm()
    flags = {"--method": method, "--weights": weights, "--density": density, "--lambda": lambda_, "--t": t,
             "--seed": seed, "--dtype": dtype}
    if rank is not None and output_kind != "adapter":
        raise ConfigError("--rank is the rank of an adapter output; give it with --output-kind adapter")
    if output_kind == "adapter":
        extra = [name for name, value in (("--recipe", recipe), ("--lambda", lambda_), ("--t", t), ("--dtype", dtype),
                                                  ("--verify", check or None)) if value is not None] \
            + (["--into dequantized"] if into == "dequantized" else [])
        base, texts = (None, inputs) if not inputs or _is_adapter(inputs[0]) else (inputs[0], inputs[1:])
        if extra or not texts:
            raise ConfigError(f"--output-kind adapter merges adapters with PEFT's methods: give [BASE] ADAPTER..."
                              f"{' and drop ' + ', '.join(extra) if extra else ''}")
        return _merge_to_adapter(base, texts, out_dir, method, weights, density, seed, rank, force, allow_pickle)
    if recipe is not None:
        given = [name for name, value in flags.items() if value is not None] + (["INPUTs"] if inputs else [])
        if given:
            raise ConfigError(f"--recipe holds the whole merge; drop {', '.join(given)} (or drop --recipe)")
        from ..merge.request import read_recipe

        request = read_recipe(recipe)
    elif len(inputs) < 2:
        raise ConfigError("give BASE and at least one INPUT (adapter or model folder), or --recipe FILE")
    elif all(value is None for value in (method, density, lambda_, t, seed)) and all(map(_is_adapter, inputs[1:])):
        specs = _weighted(inputs[1:], weights)
        if into == "dequantized":
            return _merge_into_dequantized(inputs[0], specs, out_dir, dtype, max_shard_size, force, check)
        return _merge_adapters(inputs[0], specs, out_dir, dtype, max_shard_size, force, allow_pickle, check)
    else:
        request = _request_from_flags(inputs[0], inputs[1:], method, weights, density, lambda_, t, seed, dtype)
    if into == "dequantized":
        raise ConfigError("--into dequantized folds one QLoRA adapter with the default method; not with --method, "
                          "--recipe or model INPUTs")
    _merge_models(request, out_dir, max_shard_size, force, allow_pickle, check)


def _is_adapter(text: str) -> bool:
    """An INPUT naming an adapter folder (with or without :WEIGHT), as opposed to a model or MODEL+ADAPTER."""
    from ..merge import AdapterSpec

    from ..files.hub import looks_like_path

    path = AdapterSpec.parse(text).path
    if path.exists():
        return (path / "adapter_config.json").is_file()
    return "+" not in str(path) and (looks_like_path(str(path)) or "/" not in str(path))  # else a hub id


def _request_from_flags(base: str, texts: tuple[str, ...], method: str | None, weights: str | None,
                        density: float | None, lambda_: float | None, t: float | None, seed: int | None,
                        dtype: str | None):
    """The MergeRequest the flags spell (its recipe is written beside the output: mergekit_config.yml)."""
    from ..merge.request import request_from_flags

    specs = _weighted(texts, weights)
    given = weights is not None or any(str(spec.path) != text for spec, text in zip(specs, texts))
    return request_from_flags(method or "task_arithmetic", base, [str(spec.path) for spec in specs],
                              [spec.weight for spec in specs] if given else None, density, lambda_, t,
                              0 if seed is None else seed, dtype)


def _merge_adapters(base: str, specs, out_dir: Path, dtype, max_shard_size, force: bool, allow_pickle: bool,
                    check: bool) -> None:
    """Today's merge: the adapters' weighted deltas folded into BASE, low-rank and fast."""
    from ..merge import merge_checkpoint

    with _progress_bar() as progress:
        result = merge_checkpoint(base, specs, out_dir, dtype=dtype, max_shard_size=max_shard_size, force=force,
                                  allow_pickle=allow_pickle, progress=progress)
    plan = result.plan
    click.echo(f"Merged {len(specs)} adapter(s) into {sum(t.fold is not None for t in plan.tensors)} tensors: "
               f"{out_dir} ({len(plan.shards)} shard(s), {plan.total_bytes / 2**30:.2f} GiB, {plan.dtype_name})")
    if check:
        _verify(base, specs, out_dir)


def _merge_models(request, out_dir: Path, max_shard_size, force: bool, allow_pickle: bool, check: bool) -> None:
    from ..merge import merge_models

    with _progress_bar() as progress:
        result = merge_models(request, out_dir, max_shard_size=max_shard_size, force=force,
                              allow_pickle=allow_pickle, progress=progress)
    plan = result.plan
    click.echo(f"Merged {len(request.inputs)} model(s) with {request.method} into "
               f"{sum(t.fold is not None for t in plan.tensors)} tensors: {out_dir} ({len(plan.shards)} shard(s), "
               f"{plan.total_bytes / 2**30:.2f} GiB, {plan.dtype_name})")
    if check:
        _verify_models(out_dir, request)


def _merge_to_adapter(base: str | None, texts: tuple[str, ...], out_dir: Path, method: str | None, weights: str | None,
                      density: float | None, seed: int | None, rank: int | None, force: bool,
                      allow_pickle: bool) -> None:
    """--output-kind adapter: a new adapter from adapters with PEFT's add_weighted_adapter semantics
    (ftserve.merge.adapter_merge), which needs no base model; BASE, when given, checks the shapes and is the
    recorded base."""
    from ..merge.adapter_merge import merge_to_adapter

    specs = _weighted(texts, weights)
    options = {"method": method, "rank": rank, "density": density, "seed": seed}
    result = merge_to_adapter(specs, out_dir, base=base, force=force, allow_pickle=allow_pickle,
                              **{k: v for k, v in options.items() if v is not None})
    for line in result.lines():
        click.echo(line)


def _weighted(texts: tuple[str, ...], weights: str | None) -> list:
    """ADAPTER[:WEIGHT]s as AdapterSpecs, with the weights of --weights when given."""
    from ..errors import ConfigError
    from ..merge import AdapterSpec

    specs = [AdapterSpec.parse(text) for text in texts]
    if weights is None:
        return specs
    if any(str(spec.path) != text for spec, text in zip(specs, texts)):
        raise ConfigError("give weights either as ADAPTER:WEIGHT or with --weights, not both")
    values = _numbers(weights)
    if len(values) != len(specs):
        raise ConfigError(f"--weights gives {len(values)} weight(s) for {len(specs)} input(s); give one each")
    return [AdapterSpec(spec.path, w) for spec, w in zip(specs, values)]


def _numbers(weights: str) -> list[float]:
    from ..errors import ConfigError

    try:
        return [float(w) for w in weights.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {weights!r}: write numbers separated by commas, e.g. 0.6,0.4") from None


class _progress_bar:
    """``progress(n, total)`` for the merge, drawing one tqdm bar; warnings the merge gives are printed after."""

    def __enter__(self):
        from tqdm import tqdm

        self.bar = None
        self.caught = warnings.catch_warnings(record=True)
        self.warnings = self.caught.__enter__()
        warnings.simplefilter("always")

        def progress(n: int, total: int) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                                disable=None)
            self.bar.update(n)

        return progress

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        self.caught.__exit__(*exc)
        if exc[0] is None:
            for w in self.warnings:
                click.echo(f"warning: {w.message}", err=True)


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
@click.argument("paths", nargs=-1, required=True, metavar="[BASE ADAPTER[:WEIGHT]] MERGED")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The recipe MERGED was made from. [default: MERGED/mergekit_config.yml]")
@click.option("--prompt", "prompts", multiple=True, help="A prompt to compare on (repeatable).")
@click.option("--new-tokens", type=click.IntRange(min=0), default=8, show_default=True,
              help="Greedy tokens appended to each prompt by the unmerged model.")
@clean_errors
def verify(paths: tuple[str, ...], recipe: Path | None, prompts: tuple[str, ...], new_tokens: int) -> None:
    """Check MERGED: against BASE + ADAPTER on a few prompts, or (MERGED alone) tensor by tensor against its
    recipe recomputed with the method's reference; exit 1 when they disagree."""
    from ..errors import ConfigError
    from ..merge.plan import AdapterSpec

    if len(paths) == 3 and recipe is None:
        return _verify(paths[0], [AdapterSpec.parse(paths[1])], paths[2], prompts, new_tokens)
    if len(paths) != 1:
        raise ConfigError("give BASE ADAPTER MERGED (an adapter merge), or MERGED alone with its "
                          "mergekit_config.yml (a model merge), or --recipe FILE MERGED")
    from ..merge.request import read_recipe

    merged = Path(paths[0])
    recipe = recipe or merged / "mergekit_config.yml"
    if not recipe.is_file():
        raise ConfigError(f"{merged}: no mergekit_config.yml to recompute it from; give --recipe FILE, or BASE "
                          f"ADAPTER MERGED for an adapter merge")
    _verify_models(merged, read_recipe(recipe))


def _verify(base, specs, merged, prompts=(), new_tokens: int = 8) -> None:
    from ..merge.verify import PROMPTS, verify_merge

    report = verify_merge(base, specs, merged, tuple(prompts) or PROMPTS, new_tokens)
    click.echo(report.summary())
    if not report.passed:
        raise click.exceptions.Exit(1)


def _verify_models(merged, request) -> None:
    from ..merge.verify import verify_models

    report = verify_models(merged, request)
    click.echo(report.summary())
    if not report.passed:
        raise click.exceptions.Exit(1)
