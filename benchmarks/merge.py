"""Figure: `ftserve merge` against PEFT (load, merge_and_unload, save_pretrained) and a plain file copy.

A synthetic Llama-shaped bf16 checkpoint (hidden 2048, intermediate 5632, 24 layers, vocab 32000: about
2.7 GB) in three shards of about 1 GB, and an r = 16 LoRA on all seven linear projections. Each variant runs
in its own process, started from a wrapper whose ``RUSAGE_CHILDREN`` gives that process's peak RSS and CPU
time (user + system; steadier than wall time on a shared machine); wall time includes interpreter start and
imports. Before each variant the input is read once (warm page cache)
and dirty pages are synced. Then the merged tensors of ftserve and PEFT are compared element by element.

    python benchmarks/merge.py [--workdir /tmp/ftserve-bench-merge] [--repeat 1] [--dora] [--layers 24]

``--dora`` makes the adapter a DoRA one (arXiv:2402.09353; PEFT's ``use_dora``): the same A and B plus a magnitude
per output row, ``||W + s B A||_row`` times 1 +- 0.1, so that each merged weight is
``round(m / ||W + s B A||_row * (W + s B A))``, against PEFT's DoRA ``merge_and_unload``. ``--layers`` builds a
smaller model (a busy machine); the figure's name gives the size.

Prints one JSON line: wall and peak-RSS ratios against PEFT, and the fraction of differing elements. The
full-model merges against mergekit (and this merge against ``cp`` again) are benchmarks/merge_models.py's. ftserve
fsyncs its output before returning and PEFT does not, so the wall ratio charges ftserve for durability;
``durable_wall_ratio_vs_peft`` compares both up to the output being on disk (PEFT's run plus a ``sync``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, RANK = 2048, 5632, 24, 32000, 16
MAGNITUDE_SPREAD = 0.1  # --dora: m = ||W + s B A||_row (1 + 0.1 N(0, 1)), so that r differs from one
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="1GB")
"""

MEASURE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(u.ru_maxrss * 1024, u.ru_utime + u.ru_stime, rc)
"""


def build_inputs(work: Path, layers: int) -> tuple[Path, Path]:
    """The synthetic base and adapter, written once and reused."""
    import torch
    from safetensors.torch import save_file

    from ftserve.config import FineTuningConfig

    base, adapter = work / "base", work / "adapter"
    if (base / "done").exists() and (adapter / "adapter_config.json").exists() \
            and json.loads((base / "config.json").read_text())["num_hidden_layers"] == layers:
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        tensors += [(p + f"self_attn.{n}.weight", (HIDDEN, HIDDEN)) for n in PROJECTIONS[:4]]
        tensors += [(p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
                    (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                    (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    shards, size, limit = [[]], 0, 10**9
    for name, shape in tensors:
        n = 2 * int(torch.tensor(shape).prod())
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) if len(shape) == 2
                 else torch.ones(shape, dtype=torch.bfloat16) for name, shape in shard}
        save_file(state, str(base / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in state})
        del state
    total = sum(2 * int(torch.tensor(s).prod()) for _, s in tensors)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(adapter, ignore_errors=True)
    adapter.mkdir(parents=True)
    lora = {}
    for i in range(layers):
        for n in PROJECTIONS:
            module = f"model.layers.{i}.{'self_attn' if n in PROJECTIONS[:4] else 'mlp'}.{n}"
            d_out, d_in = dict(tensors)[module + ".weight"]
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, d_in, generator=gen) / d_in ** 0.5
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, RANK, generator=gen) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = FineTuningConfig(method="lora", lora_r=RANK, lora_alpha=2 * RANK, target_modules=list(PROJECTIONS),
                                   base_model_name_or_path=str(base)).to_peft_dict(list(PROJECTIONS), False)
    (adapter / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    (base / "done").write_text("")
    return base, adapter


def build_dora(base: Path, adapter: Path) -> Path:
    """The adapter with a magnitude per output row of every targeted weight, as a DoRA folder beside it (rebuilt
    every run: the magnitudes depend on the base)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ftserve.config import FineTuningConfig

    dora = adapter.parent / "adapter-dora"
    shutil.rmtree(dora, ignore_errors=True)
    dora.mkdir(parents=True)
    lora, gen = load_file(str(adapter / "adapter_model.safetensors")), torch.Generator().manual_seed(1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weight_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        with safe_open(str(base / weight_map[module + ".weight"]), "pt") as f:
            W = f.get_tensor(module + ".weight").float()
        B = lora[key.replace("lora_A", "lora_B")]
        norm = torch.addmm(W, B, lora[key], alpha=scale).norm(dim=1)
        spread = 1 + MAGNITUDE_SPREAD * torch.randn(norm.shape, generator=gen)
        lora[f"base_model.model.{module}.lora_magnitude_vector"] = norm * spread
    save_file(lora, str(dora / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = FineTuningConfig(method="dora", lora_r=config["r"], lora_alpha=config["lora_alpha"],
                                   target_modules=list(PROJECTIONS), base_model_name_or_path=str(base))
    (dora / "adapter_config.json").write_text(json.dumps(peft_config.to_peft_dict(list(PROJECTIONS), False), indent=2))
    return dora


def warm(base: Path) -> None:
    os.sync()
    for file in sorted(base.glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(64 * 2**20):
                pass


def run(command: list[str]) -> tuple[float, int, float, float]:
    """(wall seconds, peak RSS bytes, CPU seconds, wall seconds until the output is on disk) of ``command`` in
    its own process. ftserve merge fsyncs its output before it returns; PEFT's save_pretrained and cp leave
    it in the page cache, so the last figure adds the ``sync`` that makes theirs durable too."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    os.sync()
    durable = time.perf_counter() - start
    lines = out.stdout.strip().splitlines()
    rss, cpu, rc = lines[-1].split()
    if rc != "0":
        sys.exit(f"{command[:3]} failed:\n{out.stderr[-3000:]}")
    return wall, int(rss), float(cpu), durable


def compare(ours: Path, theirs: Path) -> tuple[int, int, float, int]:
    """(differing elements, elements, largest |difference|, largest difference in units in the last place) over
    every tensor both outputs hold. The units count representable values between two of the same sign: their
    bit patterns' difference as integers."""
    import torch

    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    a, b = where(ours), where(theirs)
    if set(a) != set(b):
        sys.exit(f"outputs hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    differing = total = ulps = 0
    largest = 0.0
    ints = {2: torch.int16, 4: torch.int32}
    for name in sorted(a):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            sys.exit(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        diff = x.view(-1) != y.view(-1)
        differing += int(diff.sum())
        total += x.numel()
        if diff.any():
            largest = max(largest, float((x.float() - y.float()).abs().max()))
            bits = ints[x.element_size()]
            apart = (x.view(bits).long() - y.view(bits).long()).abs()[(x.float() * y.float()) > 0]
            ulps = max(ulps, int(apart.max()) if apart.numel() else 0)
    return differing, total, largest, ulps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftserve-bench-merge"))
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant; the fastest counts")
    parser.add_argument("--dora", action="store_true", help="a DoRA adapter (a magnitude per output row)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of the synthetic base")
    args = parser.parse_args()
    base, adapter = build_inputs(args.workdir, args.layers)
    if args.dora:
        adapter = build_dora(base, adapter)
    outs = {name: args.workdir / f"out-{name}" for name in ("ftserve", "peft", "copy")}
    commands = {
        "ftserve": [sys.executable, "-c", "from ftserve.cli import main; main()", "merge", str(base), str(adapter),
                    "-o", str(outs["ftserve"]), "--max-shard-size", "1GB", "--force"],
        "peft": [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(outs["peft"])],
        "copy": ["cp", "-r", str(base), str(outs["copy"])],
    }
    best: dict[str, tuple[float, ...]] = {}
    for _ in range(args.repeat):
        for name, command in commands.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            warm(base)
            runs = run(command)
            best[name] = tuple(min(a, b) for a, b in zip(runs, best.get(name, runs)))
    load = os.getloadavg()[0]
    differing, total, largest, ulps = compare(outs["ftserve"], outs["peft"])
    (pw, pr, pc, pd), (fw, fr, fc, fd), (cw, _, _, _) = best["peft"], best["ftserve"], best["copy"]
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    print(json.dumps({
        "figure": f"merge_{'dora_' if args.dora else ''}{size:.1f}GB_bf16_r16_all_linear",
        "wall_ratio_vs_peft": round(fw / pw, 3), "durable_wall_ratio_vs_peft": round(fd / pd, 3),
        "peak_rss_ratio_vs_peft": round(fr / pr, 3),
        "cpu_time_ratio_vs_peft": round(fc / pc, 3), "wall_ratio_vs_copy": round(fw / cw, 3),
        "copy_wall_ratio_vs_peft": round(cw / pw, 3),
        "differing_fraction_vs_peft": differing / total, "max_abs_diff_vs_peft": largest,
        "bit_identical_to_peft": differing == 0, "max_ulp_diff_vs_peft": ulps,
        "ftserve_wall_s": round(fw, 2), "peft_wall_s": round(pw, 2), "copy_wall_s": round(cw, 2),
        "ftserve_durable_s": round(fd, 2), "peft_durable_s": round(pd, 2),
        "ftserve_peak_rss_mb": round(fr / 2**20), "peft_peak_rss_mb": round(pr / 2**20),
        "ftserve_cpu_s": round(fc, 2), "peft_cpu_s": round(pc, 2),
        "repeat": args.repeat, "cpus": os.cpu_count(), "load_average_1min_at_end": round(load, 1),
    }))


if __name__ == "__main__":
    main()
