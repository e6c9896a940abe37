"""Hot swap under load: 200 requests over 6 adapters, one adapter loaded and another unloaded mid-way.

The engine has fewer compute slots (max_loras) and fewer cached adapters (max_cpu_loras) than adapters in use,
so slots are rewritten and evicted adapters are read again from disk while requests run.
"""

import asyncio
import random

import pytest

from ftserve.engine.base import GenerationRequest, SamplingParams
from ftserve.engine.errors import UnknownAdapterError
from ftserve.engine.torch import TorchEngine
from test_engine import collect, references, write_random_adapter

METHODS = ["lora", "lora+", "lora-fa", "vera", "delta-lora", "lora", "lora"]  # a0 .. a5, then a6 loaded later
PROMPTS = [[1, 5, 6, 7], [1, 40, 41, 42, 43, 44], [1, 300, 301]]
NEW = 4


@pytest.fixture(scope="module")
def seven(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    return [write_random_adapter(llama_dir, root / f"a{i}", m, seed=50 + i, r=2 + i % 3)
            for i, m in enumerate(METHODS)]


def test_200_requests_with_load_and_unload_in_flight(llama_dir, seven):
    expected = {(i, j): ids for i in range(7)
                for j, ids in enumerate(references(llama_dir, seven[i], PROMPTS, new=NEW))}
    rng = random.Random(0)
    first = [(rng.randrange(6), rng.randrange(3)) for _ in range(100)]  # a5 is unloaded after these
    second = [(rng.choice([0, 1, 2, 3, 4, 6]), rng.randrange(3)) for _ in range(100)]
    max_loras, max_cpu_loras = 2, 3

    async def main():
        engine = TorchEngine.from_pretrained(llama_dir, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                                             max_batch_size=6, max_queue=256)
        peaks = {"slots": 0, "cached": 0, "running": 0}
        async with engine:
            for i in range(6):
                await engine.load_adapter(f"a{i}", str(seven[i]))

            async def monitor():
                while True:
                    stats = engine.stats()
                    peaks["slots"] = max(peaks["slots"], stats["lora_slots_active"])
                    peaks["cached"] = max(peaks["cached"], stats["adapters_cached"], len(engine.cache.cached))
                    peaks["running"] = max(peaks["running"], stats["running_requests"])
                    await asyncio.sleep(0.002)

            async def one(adapter, prompt, delay):
                await asyncio.sleep(delay)
                request = GenerationRequest(PROMPTS[prompt], adapter=f"a{adapter}",
                                            params=SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
                return (await collect(engine, request))[0]

            watcher = asyncio.create_task(monitor())
            wave1 = [asyncio.create_task(one(a, p, 0 if a == 5 else k * 0.001)) for k, (a, p) in enumerate(first)]
            await asyncio.sleep(0.02)
            load = asyncio.create_task(engine.load_adapter("a6", str(seven[6])))
            unload = asyncio.create_task(engine.unload_adapter("a5"))  # waits for a5's requests in flight
            await load
            wave2 = [asyncio.create_task(one(a, p, k * 0.001)) for k, (a, p) in enumerate(second)]
            with pytest.raises(UnknownAdapterError):
                engine.generate(GenerationRequest(PROMPTS[0], adapter="a5"))
            results = await asyncio.gather(*wave1, *wave2)
            await unload
            watcher.cancel()
            names = sorted(info.name for info in engine.list_adapters())
            return results, peaks, names, engine.stats()

    results, peaks, names, stats = asyncio.run(main())
    for (adapter, prompt), ids in zip(first + second, results):
        assert ids == expected[adapter, prompt], f"a{adapter} on prompt {prompt}"
    assert names == ["a0", "a1", "a2", "a3", "a4", "a6"]
    assert 0 < peaks["slots"] <= max_loras and 0 < peaks["cached"] <= max_cpu_loras
    assert peaks["running"] > 1  # requests really were batched together
    assert stats["adapters_cached"] <= max_cpu_loras and stats["finished_requests_total"] == 200
