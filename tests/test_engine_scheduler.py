"""The engine's scheduling and architectures: prompts chunked over steps and mixed with decodes, arrivals while
others decode, no request starved of an adapter slot, Llama with grouped-query attention and GPT-2. Every
output is checked against the request run alone."""

import asyncio

import pytest
import torch

from ftserve.engine.base import GenerationRequest
from ftserve.engine.torch import TorchEngine
from ftserve.errors import ServingError
from ftserve.testing import build_tokenizer, tiny_gpt2, tiny_llama
from support.engine import collect, greedy, references, write_random_adapter

# Lengths 1 to 23: single-token prompts, prompts shorter and longer than the per-step budget.
PROMPTS = [[1] + [(7 * i + 3 * j) % 990 + 5 for j in range(n - 1)] for i, n in enumerate([23, 1, 9, 14, 2, 17, 6])]


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """Grouped-query attention (4 query heads share 2 K/V heads), as in Llama 3 and Mistral, with sharp
    attention: at initialisation scale every score is near zero and attention a near-uniform average, blind to
    which keys a query sees; larger query and key weights make each token's choice of keys matter."""
    model = tiny_llama(kv_heads=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    path = tmp_path_factory.mktemp("gqa") / "base"
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gqa_adapter(gqa_dir, tmp_path_factory):
    return write_random_adapter(gqa_dir, tmp_path_factory.mktemp("gqa_lora") / "lora", "lora", seed=7)


def test_chunked_prefill_mixed_with_decodes_equals_solo_runs(gqa_dir, gqa_adapter):
    """A budget of 6 tokens per step cuts most prompts into chunks that share steps with other rows' decodes
    and prefill chunks; requests arrive one by one while earlier ones decode."""
    expected = {(name, i): references(gqa_dir, path, [p], new=10)[0]
                for name, path in (("base", None), ("lora", gqa_adapter)) for i, p in enumerate(PROMPTS)}

    async def main():
        engine = TorchEngine.from_pretrained(gqa_dir, max_batch_size=5, max_num_batched_tokens=6)
        async with engine:
            await engine.load_adapter("lora", str(gqa_adapter))
            tasks = {}
            for i, prompt in enumerate(PROMPTS):
                for name in ("base", "lora"):
                    stream = collect(engine, GenerationRequest(prompt, adapter=name, params=greedy(10)))
                    tasks[name, i] = asyncio.create_task(stream)
                await asyncio.sleep(0.01)  # the next ones arrive while these prefill and decode
            results = {key: await task for key, task in tasks.items()}
            return results, engine.stats()

    results, stats = asyncio.run(main())
    for key, (ids, _, finish) in results.items():
        assert ids == expected[key], key
        assert finish == "length"
    assert stats["prefill_tokens_total"] == 2 * sum(len(p) for p in PROMPTS)
    # 14 requests x 10 tokens with at most 5 rows take at least 28 steps; chunking adds steps, not forwards
    # per token: every step ran decodes or chunks, never an empty or prefill-only pass while rows waited.
    assert stats["steps_total"] < 2 * 14 * 10 / 5 + 2 * sum(len(p) for p in PROMPTS) / 6


def test_a_request_whose_adapter_finds_no_slot_is_not_starved(llama_dir, tmp_path):
    """One adapter slot, held without a break by a stream of requests for adapter `a`: the request for `b`
    arrives early and must finish long before that stream ends, not after it."""
    paths = {n: write_random_adapter(llama_dir, tmp_path / n, "lora", seed=i) for i, n in enumerate("ab")}

    async def main():
        engine = TorchEngine.from_pretrained(llama_dir, max_loras=1, max_batch_size=2)
        finished: list[str] = []
        async with engine:
            for name, path in paths.items():
                await engine.load_adapter(name, str(path))

            async def run(name: str, tag: str, tokens: int):
                ids, _, _ = await collect(engine, GenerationRequest([1, 5, 6], adapter=name, params=greedy(tokens)))
                finished.append(tag)
                return ids

            async def stream_of_a():
                gate = asyncio.Semaphore(2)  # two requests for `a` in flight at every moment, never ending together

                async def one(i):
                    async with gate:
                        await run("a", f"a{i}", 5 if i % 2 else 8)

                await asyncio.gather(*[one(i) for i in range(60)])

            a_stream = asyncio.create_task(stream_of_a())
            while not finished:  # `b` arrives once the stream holds the slot: after its first request ends
                await asyncio.sleep(0.001)
            arrived = len(finished)
            b = await run("b", "b", 6)
            await a_stream
            return b, finished, arrived

    b, finished, arrived = asyncio.run(main())
    assert b == references(llama_dir, paths["b"], [[1, 5, 6]], new=6)[0]
    # Counted from its arrival, not from the stream's start: how many `a` requests end before a request that
    # arrives after 50 ms of wall time depends on the machine's load (under a load of 5 it was 30 of 61).
    assert finished.index("b") - arrived < (len(finished) - arrived) // 2, (arrived, finished)


@pytest.fixture(scope="module")
def sharp_gpt2_dir(tmp_path_factory):
    """GPT-2 (fused c_attn Conv1D, learned positions, LayerNorm) with sharp attention, as gqa_dir."""
    model = tiny_gpt2()
    width = model.config.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :2 * width].mul_(8)  # Conv1D is (in, out): q and k are the first columns
    path = tmp_path_factory.mktemp("gpt2_sharp") / "base"
    model.save_pretrained(path)
    build_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def test_gpt2_mixed_adapters_with_chunked_prefill_equal_solo_runs(sharp_gpt2_dir, tmp_path):
    """GPT-2 adapters of three methods (LoRA on every Conv1D, VeRA and Delta-LoRA on c_attn) and the base in
    one engine, prompts chunked over steps: every request equals its solo unmerged run in transformers."""
    adapters = {"lora": write_random_adapter(sharp_gpt2_dir, tmp_path / "lora", "lora", seed=1),
                "vera": write_random_adapter(sharp_gpt2_dir, tmp_path / "vera", "vera", seed=2, targets=["c_attn"]),
                "delta-lora": write_random_adapter(sharp_gpt2_dir, tmp_path / "delta", "delta-lora", seed=3,
                                                   targets=["c_attn"])}
    prompts = PROMPTS[:4]
    expected = {name: references(sharp_gpt2_dir, adapters.get(name), prompts, new=8)
                for name in ["base", *adapters]}
    assert len({tuple(expected[n][0]) for n in expected}) == 4  # every adapter changes the output

    async def main():
        async with TorchEngine.from_pretrained(sharp_gpt2_dir, max_batch_size=6, max_num_batched_tokens=8) as engine:
            for name, path in adapters.items():
                await engine.load_adapter(name, str(path))
            return await asyncio.gather(*[collect(engine, GenerationRequest(p, adapter=name, params=greedy(8)))
                                          for name in expected for p in prompts])

    outs = iter(asyncio.run(main()))
    for name in expected:
        for i in range(len(prompts)):
            assert next(outs)[0] == expected[name][i], (name, i)


def test_an_architecture_without_a_runner_is_refused_by_name():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ServingError, match="this base is 'gpt_neox'.*vLLM engine"):
        TorchEngine(model)


def _family_model(kind: str):
    """Tiny Mistral, Qwen2 (biased q/k/v projections) and Qwen3 (per-head q/k RMSNorm) with grouped-query and
    sharp attention, built here from their transformers configs."""
    import transformers

    config_class, model_class = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    config = getattr(transformers, config_class)(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_llama_family_models_equal_transformers(kind, tmp_path):
    """The Llama runner on the other families it claims: a LoRA and the base mixed, prompts chunked, each
    request equal to its solo run in transformers."""
    model = _family_model(kind)
    base = tmp_path / "base"
    model.save_pretrained(base)
    build_tokenizer(1000).save_pretrained(base)
    adapter = write_random_adapter(base, tmp_path / "lora", "lora", seed=5)
    prompts = PROMPTS[:3]
    expected = {name: references(base, path, prompts, new=8) for name, path in (("base", None), ("lora", adapter))}
    assert expected["base"] != expected["lora"]

    async def main():
        async with TorchEngine.from_pretrained(base, max_batch_size=6, max_num_batched_tokens=8) as engine:
            assert type(engine.runner).__name__ == "LlamaRunner"
            await engine.load_adapter("lora", str(adapter))
            return await asyncio.gather(*[collect(engine, GenerationRequest(p, adapter=name, params=greedy(8)))
                                          for name in expected for p in prompts])

    outs = iter(asyncio.run(main()))
    for name in expected:
        for i in range(len(prompts)):
            assert next(outs)[0] == expected[name][i], (kind, name, i)


def test_a_long_request_beside_short_ones_takes_blocks_as_it_grows_and_returns_them(llama_dir):
    """A 230-token prompt generating 60 tokens crosses 19 blocks while two short requests run beside it in the
    same pool; every request equals its solo run, and every block is back in the pool at the end."""
    long_prompt = [1] + [(13 * j) % 990 + 5 for j in range(229)]
    prompts = [long_prompt, PROMPTS[0], PROMPTS[2]]
    expected = references(llama_dir, None, prompts, new=60)

    async def main():
        async with TorchEngine.from_pretrained(llama_dir, max_batch_size=4, enable_prefix_caching=False) as engine:
            before = engine.stats()
            outs = await asyncio.gather(*[collect(engine, GenerationRequest(p, params=greedy(60))) for p in prompts])
            return outs, before, engine.stats()

    outs, before, after = asyncio.run(main())
    assert [ids for ids, _, _ in outs] == expected
    assert before["kv_blocks_used"] == after["kv_blocks_used"] == 0
    assert after["kv_blocks_free"] == before["kv_blocks_free"] == 4 * 512 / 16  # max_num_seqs x max_model_len
    assert after["kv_cache_bytes"] == before["kv_cache_bytes"]


def test_a_kv_cache_that_cannot_fit_in_memory_is_refused_at_start(llama_dir):
    with pytest.raises(ServingError, match=r"the KV cache \(kv_cache_memory\) takes .* GiB, and .* GiB of memory "
                                           r"is free; lower it \(each token of one request takes 2 KiB\)"):
        TorchEngine.from_pretrained(llama_dir, kv_cache_memory=10 ** 15)


def test_a_kv_cache_too_small_for_one_request_is_refused_at_start(llama_dir):
    with pytest.raises(ServingError, match=r"holds 496 tokens, fewer than one request of max_model_len 512 needs"):
        TorchEngine.from_pretrained(llama_dir, kv_cache_memory=31 * 16 * 2048)


def test_a_stop_string_found_off_the_engine_thread_ends_the_request_and_its_generation(llama_dir):
    """Text is decoded on the event loop as each step's outputs arrive, not as the caller reads them: the
    engine stops generating for the request long before max_tokens even while its caller reads nothing, the
    chunk that completes the stop string is the last one emitted (the few tokens computed past it never are),
    and its usage counts only emitted tokens."""
    prompt = "the cat sees a"

    async def main():
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            _, full, _ = await collect(engine, GenerationRequest(prompt, params=greedy(12)))
            stop = full[len(full) // 2:][:3]
            before = engine.stats()["generated_tokens_total"]
            stream = engine.generate(GenerationRequest(prompt, params=greedy(400, stop=[stop])))
            chunks = [await anext(stream)]
            for _ in range(200):  # the caller reads nothing meanwhile
                if engine.stats()["running_requests"] == 0:
                    break
                await asyncio.sleep(0.01)
            chunks += [c async for c in stream]
            return full, stop, chunks, engine.stats()["generated_tokens_total"] - before, engine.stats()

    full, stop, chunks, generated, stats = asyncio.run(main())
    assert "".join(c.text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].completion_tokens == len(chunks) == sum(len(c.token_ids) for c in chunks)
    assert stats["running_requests"] == 0 and generated < 200
