"""The embedded engine: mixed-adapter batches equal solo and merged runs, sampling, stops, cancellation.

Adapters of all five methods are written with random nonzero factors (B starts at zero in training) at a scale
that changes greedy tokens, so a row served with the wrong adapter, or none, is caught.
"""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.engine.base import GenerationRequest, SamplingParams
from ftserve.engine.torch.lora_slots import BatchedLoraLinear, LoraBatch, LoraContext
from ftserve.engine.torch import TorchEngine

METHODS = ["lora", "lora+", "lora-fa", "vera", "delta-lora"]
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 100, 200, 300, 400, 500, 600, 700, 800]]
NEW = 8


def write_random_adapter(base_dir, out, method: str, seed: int, r: int = 4, targets="all-linear"):
    """An adapter whose every tensor is random (Delta-LoRA: after its start snapshot, so it exports rank 2r)."""
    model = FineTuningModel(AutoModelForCausalLM.from_pretrained(base_dir),
                            FineTuningConfig(method=method, lora_r=r, lora_alpha=2 * r, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)

    def randomise():
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "vera_lambda" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                elif "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.6 / param.shape[-1] ** 0.5))

    randomise()
    if method == "delta-lora":
        for layer in model.adapter_layers.values():
            layer.start_weight_updates()
        randomise()
    model.save_adapter(out)
    return out


def references(base_dir, adapter_dir, prompts, new=NEW, merged=False) -> list[list[int]]:
    """Greedy tokens of each request alone: FineTuningModel with the adapter unmerged (or merged), no engine."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = FineTuningModel.from_pretrained(model, adapter_dir)
        if merged:
            model = model.merge_and_unload()
    outs = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=3) for p in prompts]
    return [out[0, len(p):].tolist() for p, out in zip(prompts, outs)]


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_adapters")
    return {m: write_random_adapter(llama_dir, root / m.replace("+", "plus"), m, seed=i) for i, m in enumerate(METHODS)}


def greedy(max_tokens=NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine, request) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    async for chunk in engine.generate(request):
        ids += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason
    return ids, text, finish


def test_batched_lora_linear_adds_each_rows_own_adapter():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    context = LoraContext()
    layer = BatchedLoraLinear(base, context, max_loras=3, max_rank=2)
    A0, B0 = torch.zeros(1, 6), torch.zeros(5, 1)
    A0[0, 4], B0[2, 0] = 1.0, 3.0  # slot 0: y[2] += 3 * 2 * x[4] (scale 2)
    A2, B2 = torch.zeros(2, 6), torch.zeros(5, 2)
    A2[1, 0], B2[4, 1] = 1.0, -1.0  # slot 2, rank 2: y[4] -= x[0]
    layer.write(0, A0, B0, 2.0)
    layer.write(2, A2, B2, 1.0)
    x = torch.randn(4, 6)
    context.batch = LoraBatch.for_rows([2, None, 0, 2])
    out = layer(x)
    expected = base(x)
    expected[0, 4] -= x[0, 0]
    expected[3, 4] -= x[3, 0]
    expected[2, 2] += 6 * x[2, 4]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    layer.write(2, None, None)  # cleared: rows of slot 2 now get the base output only
    torch.testing.assert_close(layer(x)[[0, 3]], base(x)[[0, 3]], rtol=0, atol=0)


def test_lora_batch_layout_is_bounded_when_groups_are_skewed():
    batch = LoraBatch.for_rows([0] * 13 + [1, 2, None])
    assert batch.m == 5 and batch.chunks == 5  # slot 0 cut into 3 chunks of 5; padded rows 25 <= 2 * 15 + 3
    assert sorted(set(batch.gather.tolist())) == list(range(15))
    assert batch.scatter[15] == 25  # the base row reads the zero row past the layout
    assert batch.slot_range is None and batch.slot_index.tolist() == [0, 0, 0, 1, 2]


def test_mixed_batch_equals_solo_and_merged_runs(llama_dir, adapters):
    """Every request of a batch mixing all five methods and the base equals its solo unmerged and merged run."""
    jobs = [(name, i) for name in [None, *METHODS] for i in range(len(PROMPTS))]
    expected = {name: references(llama_dir, adapters.get(name), PROMPTS) for name in [None, *METHODS]}
    merged = {name: references(llama_dir, adapters[name], PROMPTS, merged=True) for name in METHODS}

    async def main():
        engine = TorchEngine.from_pretrained(llama_dir, max_loras=6, max_batch_size=32)
        async with engine:
            for name, path in adapters.items():
                await engine.load_adapter(name, str(path))
            outs = await asyncio.gather(*[collect(engine, GenerationRequest(PROMPTS[i], adapter=n, params=greedy()))
                                          for n, i in jobs])
            assert {i.name: i.method for i in engine.list_adapters()} == {m: m for m in METHODS}
            return outs

    outs = asyncio.run(main())
    for (name, i), (ids, _, finish) in zip(jobs, outs):
        assert ids == expected[name][i], f"{name} on prompt {i}"
        assert name is None or ids == merged[name][i], f"{name} merged on prompt {i}"
        assert finish == "length"
    assert len({tuple(expected[n][0]) for n in [None, *METHODS]}) == 6  # every adapter changes the output


def test_seeded_sampling_is_reproducible_in_any_batch(llama_dir, adapters):
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    async def main():
        async with TorchEngine.from_pretrained(llama_dir, max_batch_size=8) as engine:
            await engine.load_adapter("lora", str(adapters["lora"]))
            alone = await collect(engine, GenerationRequest(PROMPTS[0], adapter="lora", params=sampled))
            crowd = await asyncio.gather(
                collect(engine, GenerationRequest(PROMPTS[0], adapter="lora", params=sampled)),
                *[collect(engine, GenerationRequest(p, params=greedy())) for p in PROMPTS],
                collect(engine, GenerationRequest(PROMPTS[0], adapter="lora",
                                                  params=SamplingParams(**{**sampled.__dict__, "seed": 99}))))
            return alone, crowd

    alone, crowd = asyncio.run(main())
    assert crowd[0][0] == alone[0]
    assert crowd[-1][0] != alone[0]


def test_stop_strings_stop_ids_and_text(llama_dir, tokenizer):
    prompt = "the cat sees a"

    async def main():
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            full = await collect(engine, GenerationRequest(prompt, params=greedy(12)))
            ids = full[0]
            by_id = await collect(engine, GenerationRequest(prompt, params=greedy(12, stop_token_ids=[ids[3]])))
            stop = full[1][len(full[1]) // 2:][:3]
            by_text = await collect(engine, GenerationRequest(prompt, params=greedy(12, stop=[stop])))
            return full, by_id, by_text, stop

    full, by_id, by_text, stop = asyncio.run(main())
    assert full[1] == tokenizer.decode(full[0], skip_special_tokens=True)
    assert by_id[0] == full[0][:full[0].index(full[0][3]) + 1] and by_id[2] == "stop"
    assert by_text[2] == "stop" and by_text[1] == full[1][:full[1].index(stop)]


def test_closing_a_stream_cancels_only_that_request(llama_dir, adapters):
    async def main():
        async with TorchEngine.from_pretrained(llama_dir, max_batch_size=4) as engine:
            await engine.load_adapter("vera", str(adapters["vera"]))
            other = asyncio.create_task(collect(engine, GenerationRequest(PROMPTS[1], adapter="vera",
                                                                          params=greedy(40))))
            stream = engine.generate(GenerationRequest(PROMPTS[0], params=greedy(200)))
            async for chunk in stream:
                if chunk.completion_tokens == 3:
                    break
            await stream.aclose()
            result = await other
            for _ in range(100):
                if engine.stats()["running_requests"] == 0:
                    break
                await asyncio.sleep(0.01)
            return result, engine.stats()

    (ids, _, finish), stats = asyncio.run(main())
    assert finish == "length" and [ids] == references(llama_dir, adapters["vera"], PROMPTS[1:2], new=40)
    assert stats["running_requests"] == 0 and stats["queued_requests"] == 0
