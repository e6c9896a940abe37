"""Structured outputs in the torch engine (llguidance): every answer the engine finishes follows its constraint,
checked by independent oracles (``jsonschema``, ``re``, ``json``), while greedy, seeded sampling, logprobs,
stop strings, mixed batches of adapters and preemption keep their meaning; every bad constraint is a 400
naming its field, and the requests beside it are unharmed."""

import asyncio
import json
import re

import jsonschema
import pytest

from ftserve.engine.base import GenerationRequest, SamplingParams, StructuredOutputs
from ftserve.engine.errors import RequestError, SamplingError
from ftserve.engine.structured import MAX_SCHEMA_DEPTH
from ftserve.engine.torch import TorchEngine

from support.engine import collect, write_random_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["the cat sees", "a red fox runs over", "the moon and the sun", "big dog"]
NAME = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                                              "legs": {"type": "integer"}},
                                              "required": ["kind", "legs"], "additionalProperties": False}},
     "required": ["pet"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "blue", "green"]}, "minItems": 1, "maxItems": 3},
    {"anyOf": [{"type": "boolean"}, {"type": "object", "properties": {"code": {"type": "string",
                                                                               "pattern": "^[A-Z]{2}[0-9]{2}$"}},
                                     "required": ["code"], "additionalProperties": False}]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 2}}, "required": ["tags"],
     "additionalProperties": False},
]
BLOCK_BYTES = 2 * 2 * 4 * 32 * 4 * 16  # K and V, 2 layers, 4 K/V heads of 32, fp32, 16 positions


def params(spec=None, max_tokens=80, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), structured_outputs=spec, **kw)


def serve(model_dir, jobs, adapters=None, solo=False, warm=False, **options):
    """Each job ``(prompt, params[, adapter])`` run on one engine, all at once (or one by one if ``solo``), as
    ``collect``'s (ids, text, finish); the engine's stats after. ``warm``: the constraints compiled first, so
    that every request reaches the engine loop at once, whatever the compile threads' timing."""
    async def main():
        async with TorchEngine.from_pretrained(model_dir, **options) as engine:
            for name, path in (adapters or {}).items():
                await engine.load_adapter(name, str(path))
            for job in jobs if warm else []:
                await engine.structured.constraint(job[1].structured_outputs, engine.tokenizer)
            requests = [GenerationRequest(job[0], *job[2:], params=job[1]) for job in jobs]
            if solo:
                return [await collect(engine, r) for r in requests], engine.stats()
            return await asyncio.gather(*[collect(engine, r) for r in requests]), engine.stats()
    return asyncio.run(main())


def outside_strings(text: str) -> str:
    """``text`` with the contents of its JSON strings removed: what is left is punctuation, numbers, keywords."""
    return re.sub(r'"(?:[^"\\]|\\.)*"?', '""', text)


def check_json(text: str, finish: str, schema: dict) -> None:
    assert not any(ord(c) < 0x20 for c in text), text  # strings escape control characters
    assert not re.search(r"\s", outside_strings(text)), text  # compact by default
    if finish == "stop":
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_answers_validate_compact_and_within_the_tokenizer(llama_dir, tokenizer):
    """Nested objects, arrays, enums, anyOf, required, patterns: each finished answer parses and validates;
    no answer has whitespace between tokens or a raw control character, nor a token beyond the tokenizer's
    vocabulary (the model's logits are wider)."""
    jobs = [(p, params(StructuredOutputs(json=s if i % 2 else json.dumps(s)))) for i, s in enumerate(SCHEMAS)
            for p in PROMPTS[:2]]
    outs, _ = serve(llama_dir, jobs + [(PROMPTS[2], params(StructuredOutputs(json_object=True)))])
    for (_, p), (ids, text, finish) in zip(jobs, outs):
        check_json(text, finish, p.structured_outputs.json if isinstance(p.structured_outputs.json, dict)
                   else json.loads(p.structured_outputs.json))
        assert max(ids) < len(tokenizer)
    assert sum(finish == "stop" for _, _, finish in outs) >= len(jobs) // 2  # enough answers end to test them
    ids, text, finish = outs[-1]
    check_json(text, finish, {"type": "object"})


@pytest.mark.parametrize("spec, check", [
    (StructuredOutputs(choice=("yes", "no", "maybe so")), lambda t: t in ("yes", "no", "maybe so")),
    (StructuredOutputs(regex=r"[a-z]{2,6}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{2,6}-[0-9]{2}", t)),
    (StructuredOutputs(grammar='start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]{1,2}/'),
     lambda t: re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)", t)),
    (StructuredOutputs(grammar='root ::= "x" ("a" | "b") ("a" | "b")? "y"'), lambda t: re.fullmatch(r"x[ab]{1,2}y", t)),
], ids=["choice", "regex", "lark", "gbnf"])
def test_choice_regex_and_grammar_answers_match(llama_dir, spec, check):
    outs, _ = serve(llama_dir, [(p, params(spec, max_tokens=40)) for p in PROMPTS])
    for ids, text, finish in outs:
        assert finish == "stop" and check(text), text


def test_a_mixed_batch_of_adapters_equals_each_request_alone(llama_dir, tmp_path):
    """Half the rows constrained (json, choice, regex), half not, over the base and two adapters, greedy: each
    row's tokens equal its solo run's."""
    adapters = {name: write_random_adapter(llama_dir, tmp_path / name, "lora", seed) for seed, name in
                enumerate("ab")}
    specs = [StructuredOutputs(json=SCHEMAS[0]), None, StructuredOutputs(choice=("cat", "dog")), None,
             StructuredOutputs(regex=r"[a-z ]{3,12}\."), None, StructuredOutputs(json=SCHEMAS[2]), None]
    jobs = [(PROMPTS[i % 4], params(spec, max_tokens=30, ignore_eos=spec is None), [None, "a", "b"][i % 3])
            for i, spec in enumerate(specs)]
    batch, _ = serve(llama_dir, jobs, adapters)
    alone, _ = serve(llama_dir, jobs, adapters, solo=True)
    assert batch == alone
    assert len({tuple(ids) for ids, _, _ in batch}) == len(batch)


def test_seeded_sampling_repeats_and_logprobs_are_the_models_own(llama_dir):
    """A seeded constrained request draws the same answer twice, valid; its logprobs are reported per token,
    and at the first step (the same logits) they equal the unconstrained request's: the model's own."""
    spec = StructuredOutputs(json=SCHEMAS[1])
    sampled = params(spec, temperature=1.0, seed=7, logprobs=2)
    async def main():
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            first = [c async for c in engine.generate(GenerationRequest(PROMPTS[0], params=sampled))]
            again = await collect(engine, GenerationRequest(PROMPTS[0], params=sampled))
            free = [c async for c in engine.generate(GenerationRequest(PROMPTS[0], params=params(logprobs=2)))]
            others = await asyncio.gather(*[collect(engine, GenerationRequest(PROMPTS[0], params=params(
                spec, temperature=1.0, seed=seed))) for seed in range(4)])  # n > 1, as several requests
            return first, again, free, others
    first, again, free, others = asyncio.run(main())
    assert [t for c in first for t in c.token_ids] == again[0]
    assert all(c.logprobs and len(c.logprobs[0].top) == 2 for c in first)
    assert first[0].logprobs[0].top == free[0].logprobs[0].top
    for ids, text, finish in [again, *others]:
        check_json(text, finish, SCHEMAS[1])
    assert len({tuple(ids) for ids, _, _ in others}) > 1


def test_a_stop_string_cuts_a_constrained_answer(llama_dir):
    outs, _ = serve(llama_dir, [(PROMPTS[0], params(StructuredOutputs(regex=r"ab{5}c"), stop=["bbb"]))])
    assert outs[0][1:] == ("a", "stop")  # "abbbbbc" up to the stop string


LONG = [StructuredOutputs(regex="[a-z]{120}"), StructuredOutputs(json={
    "type": "array", "items": {"type": "string", "minLength": 10, "maxLength": 10}, "minItems": 8, "maxItems": 8})]


def test_preempted_constrained_requests_stay_valid_and_equal_a_big_caches(llama_dir):
    """Twelve requests of about 40 + 30 to 115 tokens in a cache of 34 blocks: preempted and recomputed, each answer
    is the big cache's, and valid: its constraint, which consumed the tokens sent before, goes on from there."""
    jobs = [(PROMPTS[i % 4] * 8, params(LONG[i % 2], max_tokens=160)) for i in range(12)]
    small, stats = serve(llama_dir, jobs, warm=True, max_num_seqs=12, kv_cache_memory=34 * BLOCK_BYTES)
    big, big_stats = serve(llama_dir, jobs, warm=True, max_num_seqs=12)
    assert stats["preemptions_total"] > 0 and big_stats["preemptions_total"] == 0
    assert small == big
    for (_, p), (_, text, finish) in zip(jobs, small):
        assert finish == "stop"
        if p.structured_outputs.regex:
            assert re.fullmatch("[a-z]{120}", text), text
        else:
            check_json(text, finish, p.structured_outputs.json)


def test_any_whitespace_lets_json_hold_blanks(llama_dir):
    async def main():
        async with TorchEngine.from_pretrained(llama_dir, structured_outputs_any_whitespace=True) as engine:
            return await engine.structured.constraint(StructuredOutputs(json=SCHEMAS[0]), engine.tokenizer)
    constraint = asyncio.run(main())
    from ftserve.testing import build_tokenizer
    ids = build_tokenizer().encode('{ "name": "a",\n "age": 3 }', add_special_tokens=False)
    assert constraint.matcher.consume_tokens(ids) and constraint.matcher.is_accepting()


DEEP = {"type": "object", "properties": {}}
for _ in range(MAX_SCHEMA_DEPTH):
    DEEP = {"type": "object", "properties": {"a": DEEP}}
BAD = [
    (StructuredOutputs(json=5), "structured_outputs.json", "must be a JSON schema"),
    (StructuredOutputs(json="{not json"), "structured_outputs.json", "not valid JSON"),
    (StructuredOutputs(json={"type": "strin"}), "structured_outputs.json", "strin"),
    (StructuredOutputs(json={"type": "array", "uniqueItems": True}), "structured_outputs.json", "uniqueItems"),
    (StructuredOutputs(json={"type": "string", "pattern": "(a"}), "structured_outputs.json", "unclosed group"),
    (StructuredOutputs(json=DEEP), "structured_outputs.json", "too deep"),
    (StructuredOutputs(json={"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}}),
     "structured_outputs.json", "too large"),
    (StructuredOutputs(regex="(a"), "structured_outputs.regex", "does not compile"),
    (StructuredOutputs(regex=""), "structured_outputs.regex", "non-empty string"),
    (StructuredOutputs(grammar="root ::= ("), "structured_outputs.grammar", "invalid"),
    (StructuredOutputs(grammar='start: "a" | b'), "structured_outputs.grammar", "does not compile"),
    (StructuredOutputs(choice=()), "structured_outputs.choice", "non-empty list of strings"),
    (StructuredOutputs(choice=("a", 1)), "structured_outputs.choice", "non-empty list of strings"),
    (StructuredOutputs(regex="a", choice=("a",)), "structured_outputs", "exactly one"),
    (StructuredOutputs(), "structured_outputs", "exactly one"),
]


def test_each_bad_constraint_is_a_request_error_naming_its_field_and_others_go_on(llama_dir):
    """Refused when ``generate`` is called (types, bounds) or at the first read (what llguidance refuses), the
    same way twice (refusals are cached); a request in flight meanwhile gets its solo answer."""
    long = GenerationRequest(PROMPTS[1], params=params(max_tokens=60, ignore_eos=True))

    async def refusal(engine, spec):
        try:
            await collect(engine, GenerationRequest(PROMPTS[0], params=params(spec)))
        except RequestError as exc:
            return str(exc)
        return None

    async def main():
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            alone = await collect(engine, long)
            beside = asyncio.ensure_future(collect(engine, long))
            messages = [await refusal(engine, spec) for spec, _, _ in BAD + BAD[2:4]]
            engine.structured.timeout = 1e-4  # a schema that compiles, but not that fast: refused in time
            slow = await refusal(engine, StructuredOutputs(json={
                "type": "object", "properties": {f"q{i}": {"type": "integer"} for i in range(1500)}}))
            return alone, await beside, messages, slow
    alone, beside, messages, slow = asyncio.run(main())
    assert beside == alone
    for (spec, field, cause), message in zip(BAD + BAD[2:4], messages):
        assert message is not None and message.startswith(field) and cause in message, (spec, message)
    assert slow.startswith("structured_outputs.json took too long")


def test_a_row_whose_constraint_and_min_tokens_leave_no_token_fails_alone(llama_dir):
    """A finished choice allows only the end of sequence, which min_tokens still bans: that row's SamplingError;
    the unconstrained request beside it gets its solo answer."""
    stuck = GenerationRequest(PROMPTS[0], params=params(StructuredOutputs(choice=("yes", "no")), min_tokens=10))
    other = GenerationRequest(PROMPTS[1], params=params(max_tokens=30, ignore_eos=True))

    async def main():
        async with TorchEngine.from_pretrained(llama_dir) as engine:
            alone = await collect(engine, other)
            outcomes = await asyncio.gather(collect(engine, stuck), collect(engine, other), return_exceptions=True)
            return alone, outcomes
    alone, (failed, beside) = asyncio.run(main())
    assert isinstance(failed, SamplingError) and "every token is banned" in str(failed)
    assert beside == alone
