"""Figure: full-model merges, `ftserve merge --recipe` against mergekit's CLI (`mergekit-yaml`), plus today's
adapter merge against a plain copy of the base's files.

The synthetic bf16 base of benchmarks/merge.py (about 2.7 GB at 24 layers) and three "fine-tuned" checkpoints
of it, each the base plus bf16 noise (``round(W + 0.1 std(W) N(0, 1))``, a seed per checkpoint), sharded like
the base. One mergekit recipe per method, with ``dtype: bfloat16``:

    ties        density 0.5, weights 0.5 / 0.3 / 0.2, normalize left at its default (true)
    dare_ties   the same, seed 0 (mergekit's ``--random-seed 0``; ours by default)

Each run is its own process, measured as benchmarks/merge.py measures (``RUSAGE_CHILDREN``: peak RSS and CPU
time; wall time includes interpreter start and imports), after the inputs were read once (warm page cache):
mergekit with its defaults, mergekit with ``--lazy-unpickle``, and ours. mergekit reads through safetensors'
mmap, so the file pages it touches count in its RSS; we read with pread. We fsync our output before the rename
and mergekit does not: ``*_durable_*`` ratios compare both up to the output being on disk (mergekit plus a
``sync``). For ties the outputs are compared element by element and must be identical (``ties_identical``):
where deltas tie at the magnitude threshold we keep the ones mergekit's unstable sort keeps
(ftserve/merge/introsort.py). DARE draws its own mask (a seeded stream per chunk, not mergekit's global RNG): only time and
memory are compared.

    python benchmarks/merge_models.py [--workdir /tmp/ftserve-bench-merge-models] [--layers 24] [--repeat 1]
                                      [--keep-inputs]

Prints one JSON line. Ours is skipped (its fields null) when ``ftserve merge`` has no ``--recipe`` yet.
``--layers 4`` makes a small model (0.5 GB) for a quick rerun; the figure's name gives the size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from merge import build_inputs, compare, run, warm

FINE_TUNED = 3
NOISE = 0.1  # of each tensor's own standard deviation (the norms, all ones, get 0.1 N(0, 1))
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5
SEED = 0
METHODS = ("ties", "dare_ties")
MERGEKIT = "from mergekit.scripts.run_yaml import main; main()"
FTSERVE = "from ftserve.cli import main; main()"


def build_fine_tuned(base: Path, work: Path) -> list[Path]:
    """Three checkpoints of the base plus noise, with the base's shard names, index and config."""
    import torch
    from safetensors.torch import load_file, save_file

    folders = [work / f"fine-tuned-{i + 1}" for i in range(FINE_TUNED)]
    stamp = (base / "config.json").read_text()
    for i, folder in enumerate(folders):
        if (folder / "done").exists() and (folder / "config.json").read_text() == stamp:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        gen = torch.Generator().manual_seed(100 + i)
        for shard in sorted(base.glob("*.safetensors")):
            state = load_file(str(shard))
            for name, w in state.items():
                x = w.float()
                spread = float(x.std()) if x.numel() > 1 and float(x.std()) > 0 else 1.0
                state[name] = x.add_(torch.randn(x.shape, generator=gen), alpha=NOISE * spread).to(w.dtype)
            save_file(state, str(folder / shard.name), metadata={"format": "pt"})
            del state
        for side in ("config.json", "model.safetensors.index.json"):
            if (base / side).exists():
                shutil.copyfile(base / side, folder / side)
        (folder / "done").write_text("")
    return folders


def recipe(method: str, base: Path, models: list[Path]) -> str:
    """mergekit's YAML for ``method`` over ``models`` (weights WEIGHTS, density DENSITY)."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: bfloat16", "models:"]
    for model, weight in zip(models, WEIGHTS):
        lines += [f"  - model: {model}", "    parameters:", f"      density: {DENSITY}", f"      weight: {weight}"]
    return "\n".join(lines) + "\n"


def has_recipe_flag() -> bool:
    out = subprocess.run([sys.executable, "-c", FTSERVE, "merge", "--help"], capture_output=True, text=True)
    return "--recipe" in out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftserve-bench-merge-models"))
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the synthetic base")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest counts")
    parser.add_argument("--keep-inputs", action="store_true", help="leave the built models for the next run")
    args = parser.parse_args()
    work = args.workdir
    base, adapter = build_inputs(work, args.layers)
    models = build_fine_tuned(base, work)
    ours_too = has_recipe_flag()
    commands: dict[str, list[str]] = {
        "adapter": [sys.executable, "-c", FTSERVE, "merge", str(base), str(adapter), "-o", str(work / "out-adapter"),
                    "--max-shard-size", "1GB", "--force"],
        "copy": ["cp", "-r", str(base), str(work / "out-copy")],
    }
    for method in METHODS:
        file = work / f"{method}.yml"
        file.write_text(recipe(method, base, models))
        seed = ["--random-seed", str(SEED)] if method.startswith("dare") else []
        for mode, flags in (("mergekit", []), ("mergekit_lazy", ["--lazy-unpickle"])):
            commands[f"{method}_{mode}"] = [sys.executable, "-c", MERGEKIT, str(file), str(work / f"out-{method}_{mode}"),
                                            "--quiet", *flags, *seed]
        if ours_too:
            commands[f"{method}_ours"] = [sys.executable, "-c", FTSERVE, "merge", "--recipe", str(file), "-o",
                                          str(work / f"out-{method}_ours"), "--force"]  # our seed: 0 by default
    best: dict[str, tuple[float, ...]] = {}
    try:
        for _ in range(args.repeat):
            for name, command in commands.items():
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                for folder in (base, *models) if name not in ("adapter", "copy") else (base,):
                    warm(folder)
                runs = run(command)
                best[name] = tuple(min(a, b) for a, b in zip(runs, best.get(name, runs)))
        load = os.getloadavg()[0]
        figure: dict[str, object] = {}
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
        figure["figure"] = f"merge_models_{size:.1f}GB_bf16_{FINE_TUNED}_fine_tuned"
        for method in METHODS:
            for mode in ("mergekit", "mergekit_lazy"):
                wall, rss, cpu, durable = best[f"{method}_{mode}"]
                figure[f"{method}_{mode}_wall_s"] = round(wall, 2)
                figure[f"{method}_{mode}_peak_rss_mb"] = round(rss / 2**20)
                figure[f"{method}_{mode}_cpu_s"] = round(cpu, 2)
                ours = best.get(f"{method}_ours")
                figure[f"{method}_wall_ratio_vs_{mode}"] = round(ours[0] / wall, 3) if ours else None
                figure[f"{method}_durable_wall_ratio_vs_{mode}"] = round(ours[3] / durable, 3) if ours else None
                figure[f"{method}_peak_rss_ratio_vs_{mode}"] = round(ours[1] / rss, 3) if ours else None
                figure[f"{method}_cpu_time_ratio_vs_{mode}"] = round(ours[2] / cpu, 3) if ours else None
            ours = best.get(f"{method}_ours")
            figure[f"{method}_ours_wall_s"] = round(ours[0], 2) if ours else None
            figure[f"{method}_ours_peak_rss_mb"] = round(ours[1] / 2**20) if ours else None
            figure[f"{method}_ours_cpu_s"] = round(ours[2], 2) if ours else None
        if ours_too:
            differing, total, largest, ulps = compare(work / "out-ties_ours", work / "out-ties_mergekit")
            figure["ties_differing_elements"] = differing
            figure["ties_differing_fraction"] = differing / total
            figure["ties_max_ulp_diff"] = ulps
            figure["ties_identical"] = differing == 0
        (aw, ar, ac, ad), (cw, _, cc, cd) = best["adapter"], best["copy"]
        figure.update({"adapter_wall_ratio_vs_copy": round(aw / cw, 3),
                       "adapter_durable_wall_ratio_vs_copy_sync": round(ad / cd, 3),
                       "adapter_wall_s": round(aw, 2), "copy_wall_s": round(cw, 2),
                       "adapter_durable_s": round(ad, 2), "copy_durable_s": round(cd, 2),
                       "adapter_cpu_s": round(ac, 2), "copy_cpu_s": round(cc, 2),
                       "adapter_peak_rss_mb": round(ar / 2**20),
                       "repeat": args.repeat, "cpus": os.cpu_count(), "load_average_1min_at_end": round(load, 1)})
        print(json.dumps(figure))
    finally:
        for name in commands:
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
        if not args.keep_inputs:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
