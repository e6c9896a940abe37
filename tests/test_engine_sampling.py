"""Logit shaping (bias, presence, frequency, repetition penalties) and log probabilities in the engine, each
against an independent implementation on transformers' own logits."""

import asyncio
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftserve.engine.base import GenerationRequest, SamplingParams
from ftserve.engine.errors import RequestError
from ftserve.engine.torch.sampling import shape_row
from ftserve.engine.torch import TorchEngine

PROMPT = [1, 17, 230, 17, 45, 230, 9, 17, 88, 4, 230, 61]
STEPS = 10


@pytest.fixture(scope="module")
def model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def reference_greedy(model, prompt, steps, bias=None, presence=0.0, frequency=0.0, repetition=1.0, stop=(),
                     min_tokens=0):
    """Greedy decoding, recomputing the whole sequence each step, with the penalties written out one token at
    a time as vLLM defines them; ``stop`` token ids are banned for the first ``min_tokens`` and end it after."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            if len(out) < min_tokens:
                logits[list(stop)] = float("-inf")
            for token, value in (bias or {}).items():
                logits[token] += value
            for token in set(prompt) | set(out):
                if repetition != 1.0:
                    logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            for token in set(out):
                logits[token] -= presence + frequency * out.count(token)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
            if out[-1] in stop:
                break
    return out


def run(llama_dir, requests, **engine_options):
    async def main():
        async with TorchEngine.from_pretrained(llama_dir, **engine_options) as engine:
            async def one(request):
                return [chunk async for chunk in engine.generate(request)]
            return await asyncio.gather(*[one(r) for r in requests])
    return asyncio.run(main())


SHAPES = [
    {"frequency_penalty": 2.0},
    {"presence_penalty": 2.0},
    {"repetition_penalty": 4.0},
    {"repetition_penalty": 0.5},
    {"logit_bias": {321: 100.0}},
    {"logit_bias": {5: 3.0, 6: -3.0}, "frequency_penalty": 1.0, "presence_penalty": -0.5, "repetition_penalty": 1.5},
]


def test_penalties_and_bias_match_a_token_by_token_reference(llama_dir, model):
    """All six shapings in one batch with a plain greedy row: each row follows its own rules only."""
    plain = reference_greedy(model, PROMPT, STEPS)
    expected = [reference_greedy(model, PROMPT, STEPS, kw.get("logit_bias"), kw.get("presence_penalty", 0.0),
                                 kw.get("frequency_penalty", 0.0), kw.get("repetition_penalty", 1.0))
                for kw in SHAPES]
    assert all(e != plain for e in expected)  # every shaping changes this output, so each is really tested
    requests = [GenerationRequest(PROMPT, params=SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, **kw))
                for kw in [{}, *SHAPES]]
    outputs = run(llama_dir, requests)
    got = [[t for chunk in chunks for t in chunk.token_ids] for chunks in outputs]
    assert got[0] == plain
    for kw, want, have in zip(SHAPES, expected, got[1:]):
        assert have == want, kw
    assert got[5] == [321] * STEPS


def test_logprobs_of_generated_and_prompt_tokens_are_the_models(llama_dir, model):
    """Generated tokens' and prompt tokens' log probabilities and top-k equal log_softmax of transformers'
    logits over the whole sequence (the model's, not the shaped ones), also when the prompt is prefilled in
    chunks of 5 tokens."""
    plain = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=4, prompt_logprobs=2)
    shaped = SamplingParams(**{**plain.__dict__, "logit_bias": {5: 8.0}, "frequency_penalty": 1.0})
    for params, options in ((plain, {}), (plain, {"max_batch_size": 4, "max_num_batched_tokens": 5}),
                            (shaped, {})):
        (chunks,) = run(llama_dir, [GenerationRequest(PROMPT, params=params)], **options)
        output = [t for chunk in chunks for t in chunk.token_ids]
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([PROMPT + output])).logits[0].double(), dim=-1)
        generated = [lp for chunk in chunks for lp in chunk.logprobs]
        assert [lp.token_id for lp in generated] == output
        for i, lp in enumerate(generated):
            row = full[len(PROMPT) - 1 + i]
            assert lp.logprob == pytest.approx(float(row[output[i]]), abs=1e-4)
            assert [t for t, _ in lp.top] == row.topk(4).indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(row.topk(4).values.tolist(), abs=1e-4)
            assert lp.rank == int((row > row[output[i]] + 1e-6).sum()) + 1
        prompt = chunks[0].prompt_logprobs
        assert prompt[0] is None and len(prompt) == len(PROMPT)
        assert all(chunk.prompt_logprobs is None for chunk in chunks[1:])
        for i in range(1, len(PROMPT)):
            row = full[i - 1]
            assert prompt[i].token_id == PROMPT[i]
            assert prompt[i].logprob == pytest.approx(float(row[PROMPT[i]]), abs=1e-4)
            assert [t for t, _ in prompt[i].top] == row.topk(2).indices.tolist()


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(llama_dir, model, tokenizer):
    """The stop token id that ends plain greedy output at its second token, and a stop string matching its
    first tokens' text, end nothing before min_tokens; the stop id is banned until then, not after."""
    plain = reference_greedy(model, PROMPT, 12)
    stop = plain[1]
    expected = reference_greedy(model, PROMPT, 12, stop={stop}, min_tokens=6)
    assert len(expected) > 2 and stop not in expected[:6]
    word = tokenizer.decode(plain[:2], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()[:3]
    assert word

    def greedy(**kw):
        return GenerationRequest(PROMPT, params=SamplingParams(max_tokens=12, temperature=0, **kw))

    early, held, by_text, by_text_held = run(llama_dir, [
        greedy(stop_token_ids=[stop]), greedy(stop_token_ids=[stop], min_tokens=6),
        greedy(stop=[word], ignore_eos=True), greedy(stop=[word], ignore_eos=True, min_tokens=12)])
    assert [t for c in early for t in c.token_ids] == plain[:2]
    assert [t for c in held for t in c.token_ids] == expected
    assert by_text[-1].finish_reason == "stop" and sum(len(c.token_ids) for c in by_text) <= 2
    assert sum(len(c.token_ids) for c in by_text_held) == 12 and by_text_held[-1].finish_reason == "length"


def test_shaping_by_hand_placed_values():
    """Bias first, then repetition over prompt and output (divide positives, multiply negatives), then presence
    and frequency over output tokens only."""
    row = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0, 0.0])
    params = SamplingParams(logit_bias={5: 3.0, 1: 1.5}, repetition_penalty=2.0, presence_penalty=0.25,
                            frequency_penalty=0.5)
    shape_row(row, params, prompt=[0, 1], output=[3, 3, 5])
    # 0: 2/2 = 1 (prompt, positive); 1: (-1 + 1.5) / 2 = 0.25; 2: unseen; 3: -0.5 * 2 - 0.25 - 2 * 0.5 = -2.25;
    # 4: unseen; 5: 3 / 2 - 0.25 - 0.5 = 0.75
    assert row.tolist() == [1.0, 0.25, 0.5, -2.25, 1.0, 0.75]


def test_logprobs_zero_reports_the_token_alone_and_none_reports_nothing(llama_dir):
    chunks_zero, chunks_none = run(llama_dir, [
        GenerationRequest(PROMPT, params=SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)),
        GenerationRequest(PROMPT, params=SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))])
    assert all(len(c.logprobs) == 1 and c.logprobs[0].top == [] and c.logprobs[0].rank == 1 for c in chunks_zero)
    assert all(c.logprobs is None and c.prompt_logprobs is None for c in chunks_none)


@pytest.mark.parametrize("field, value, message", [
    ("frequency_penalty", 2.5, "frequency_penalty must be a number in [-2, 2]"),
    ("presence_penalty", float("nan"), "presence_penalty must be a number in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a number in [0.01, 10]"),
    ("repetition_penalty", 1e-300, "repetition_penalty must be a number in [0.01, 10]"),
    ("seed", 2 ** 64, "seed must be a 64-bit signed integer"),
    ("logit_bias", {5: 101.0}, "logit_bias must map token ids to numbers in [-100, 100]"),
    ("logit_bias", {"5": 1.0}, "logit_bias must map token ids"),
    ("logit_bias", {5000: 1.0}, "outside this model's vocabulary"),
    ("logprobs", 21, "logprobs must be an integer in [0, 20]"),
    ("prompt_logprobs", -1, "prompt_logprobs must be an integer in [0, 20]"),
    ("min_tokens", 17, "min_tokens must be an integer in [0, max_tokens=16]"),
])
def test_out_of_range_shaping_and_logprobs_are_refused_by_name(llama_dir, field, value, message):
    async def main():
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            with pytest.raises(RequestError, match=re.escape(message)):
                engine.generate(GenerationRequest(PROMPT, params=SamplingParams(**{field: value})))
    asyncio.run(main())
