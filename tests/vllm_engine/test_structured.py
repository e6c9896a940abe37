"""Structured outputs on the vLLM engine: vLLM's own guidance backend runs each request's constraint, and every
answer that finishes holds to it, whatever adapter the row runs and whatever runs beside it.

One engine serves the whole module (a vLLM start is about 40 s on a 2-core machine), on an event loop of the
module's own. The tiny model is random: left free inside a JSON string it writes until ``max_tokens``, so the
schemas bound every string and array (``maxLength``, ``maxItems``, ``additionalProperties: false``) and the
answers finish by the grammar's end of sequence. jsonschema (a vLLM dependency) is the oracle.
"""

import asyncio
import json
import os
import re

import pytest

from ftserve.engine import create_engine, missing
from ftserve.engine.base import GenerationRequest, SamplingParams, StructuredOutputs
from ftserve.engine.errors import RequestError
from ftserve.engine.options import EngineOptions

NEEDED = missing("vllm")
if NEEDED and os.environ.get("FTSERVE_REQUIRE_VLLM") == "1":
    pytest.fail(f"FTSERVE_REQUIRE_VLLM=1 but {NEEDED}", pytrace=False)

from support.engine import PROMPTS, collect, write_random_adapter  # noqa: E402
from support.structured_cases import (ANSWER_TOKENS, BAD_CONSTRAINTS, SCHEMAS, closing_bias,  # noqa: E402
                                      json_whitespace, valid)

pytestmark = pytest.mark.skipif(bool(NEEDED), reason=NEEDED or "")
ADAPTERS = ("lora", "lora+", "lora-fa", "delta-lora")
RECURSIVE = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"k": {"$ref": "#/$defs/n"}},
                                                  "required": ["k"]}}}  # no finite answer: {"k":{"k":...
VLLM_SAYS = {  # words of each error: llguidance's or vLLM's (or, for bounds and types, the front end's check)
    "schema of an unknown type": ("does not compile: Invalid type: frobnicate",),
    "schema text that is not JSON": ("key must be a string", "is not valid JSON"),
    "regex that does not compile": ("unclosed group",),
    "GBNF that does not parse": ("Failed to convert the grammar from GBNF to Lark",),
    "Lark that does not parse": ("does not compile: 1(10): Expected token ')'",),
    "schema nested 100 deep": ("recursion limit exceeded", "is too deep"),
    "schema of 10,000 properties": ("is too large",),
    "empty choice": ("cannot be an empty list", "must be a non-empty list"),
    "two constraints": ("exactly one of json, regex, choice, grammar, json_object must be set; got json, regex",),
    "recursive schema": ("failed in vLLM's engine after 1 tokens",),
}


def constrained(spec: StructuredOutputs, max_tokens: int = ANSWER_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=spec, **kw)


class Served:
    """The module's engine and the loop it runs on: ``run(coro)`` runs a coroutine there."""

    def __init__(self, engine, loop):
        self.engine, self.loop = engine, loop

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def answer(self, spec, prompt=PROMPTS[0], adapter=None, **kw):
        return self.run(collect(self.engine, GenerationRequest(prompt, adapter, constrained(spec, **kw))))


@pytest.fixture(scope="module")
def served(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured_adapters")
    loop = asyncio.new_event_loop()
    engine = create_engine("vllm", str(llama_dir), EngineOptions(device="cpu", dtype="float32", max_loras=4,
                                                                 max_num_seqs=16, max_model_len=256))
    loop.run_until_complete(engine.start())
    for i, method in enumerate(ADAPTERS):
        folder = write_random_adapter(llama_dir, root / f"a{i}", method, seed=70 + i)
        loop.run_until_complete(engine.load_adapter(f"a{i}", str(folder)))
    yield Served(engine, loop)
    loop.run_until_complete(engine.shutdown())
    loop.close()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_parse_and_validate(served, name):
    ids, text, finish = served.answer(StructuredOutputs(json=SCHEMAS[name]))
    assert finish == "stop", text
    assert valid(text, SCHEMAS[name])
    assert not json_whitespace(text)  # compact JSON by default: no blanks between tokens


def test_a_schema_given_as_json_text_is_the_same_constraint(served):
    schema = SCHEMAS["nested object"]
    assert served.answer(StructuredOutputs(json=json.dumps(schema))) == \
        served.answer(StructuredOutputs(json=schema))


def test_choice_answers_are_one_of_the_choices(served):
    choices = ("yes", "no", "maybe", "the cat")
    answers = {served.answer(StructuredOutputs(choice=choices), prompt=p)[1:] for p in PROMPTS}
    assert all(text in choices and finish == "stop" for text, finish in answers)


def test_regex_answers_match_in_full(served):
    pattern = r"[a-c]{3}-\d{2}( [xyz]+)?"
    for prompt in PROMPTS:
        _, text, finish = served.answer(StructuredOutputs(regex=pattern), prompt=prompt)
        assert finish == "stop" and re.fullmatch(pattern, text), text


def test_grammar_answers_follow_it(served):
    _, text, finish = served.answer(StructuredOutputs(grammar='root ::= "x" [yz] [yz]? [yz]? "w"'))  # GBNF
    assert finish == "stop" and re.fullmatch("x[yz]{1,3}w", text), text
    _, text, finish = served.answer(StructuredOutputs(grammar='start: "x" ("y" | "z"){1,3} "w"'))  # Lark
    assert finish == "stop" and re.fullmatch("x[yz]{1,3}w", text), text


def test_json_object_answers_are_objects(served):
    """Any JSON object; the bias makes the random model close its strings and the object (what the mask allows
    it still chooses among)."""
    _, text, finish = served.answer(StructuredOutputs(json_object=True), logit_bias=closing_bias(served.engine))
    assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_seeded_sampling_under_a_schema_validates_and_repeats(served):
    spec = StructuredOutputs(json=SCHEMAS["enum and boolean"])
    params = dict(temperature=0.9, seed=7)
    first = served.run(collect(served.engine, GenerationRequest(PROMPTS[1], params=SamplingParams(
        max_tokens=ANSWER_TOKENS, structured_outputs=spec, **params))))
    again = served.run(collect(served.engine, GenerationRequest(PROMPTS[1], params=SamplingParams(
        max_tokens=ANSWER_TOKENS, structured_outputs=spec, **params))))
    assert first == again and first[2] == "stop" and valid(first[1], SCHEMAS["enum and boolean"])


def test_logprobs_and_stop_strings_keep_their_meaning_under_a_constraint(served):
    """Log probabilities are the model's own, one per token; a stop string ends the answer where it appears."""
    spec = StructuredOutputs(regex=r"[a-c]{3}-\d{2}")
    ids, text, finish = served.answer(spec)
    chunks = served.run(_chunks(served.engine, GenerationRequest(PROMPTS[0], params=constrained(spec, logprobs=2))))
    logprobs = [entry for chunk in chunks for entry in chunk.logprobs or []]
    assert [entry.token_id for entry in logprobs] == ids and all(len(entry.top) == 2 for entry in logprobs)
    _, cut, finish = served.answer(spec, stop=["-"])
    assert finish == "stop" and cut == text[:text.index("-")]


async def _chunks(engine, request):
    return [chunk async for chunk in engine.generate(request)]


def test_a_mixed_batch_equals_each_request_alone(served):
    """Four adapters and the base, half the rows constrained (each its own schema) and half not, in one batch:
    every row's tokens equal the same request sent alone, and every constrained answer validates."""
    names = sorted(SCHEMAS)
    jobs = []
    for i, adapter in enumerate([None, "a0", "a1", "a2", "a3"]):
        jobs.append(GenerationRequest(PROMPTS[i % 3], adapter, constrained(StructuredOutputs(json=SCHEMAS[names[i]]))))
        jobs.append(GenerationRequest(PROMPTS[(i + 1) % 3], adapter, SamplingParams(max_tokens=12, temperature=0.0)))
    alone = [served.run(collect(served.engine, job)) for job in jobs]

    async def together():
        return await asyncio.gather(*[collect(served.engine, job) for job in jobs])

    batch = served.run(together())
    assert batch == alone
    for job, (_, text, finish) in zip(jobs, batch):
        spec = job.params.structured_outputs
        if spec is not None:
            assert finish == "stop" and valid(text, spec.json), (job.adapter, text)
    unconstrained = [ids for job, (ids, _, _) in zip(jobs, batch) if job.params.structured_outputs is None]
    assert len({tuple(ids) for ids in unconstrained}) > 1  # the adapters really differ


@pytest.mark.parametrize("case", sorted([*BAD_CONSTRAINTS, "recursive schema"]))
def test_a_bad_constraint_fails_alone_naming_its_field(served, case):
    """Each bad or pathological constraint is a RequestError (400) naming its field, out of its stream (checked
    before vLLM queues it, or, for a schema whose grammar passes llguidance's limits only once decoding begins,
    when vLLM's core ends it); the requests running beside it finish as they would alone, and the engine
    serves on."""
    spec, field = BAD_CONSTRAINTS.get(case) or (StructuredOutputs(json=RECURSIVE), "structured_outputs.json")
    words = VLLM_SAYS[case]
    beside = [GenerationRequest(PROMPTS[0], "a0", SamplingParams(max_tokens=30, temperature=0.0)),
              GenerationRequest(PROMPTS[2], None, constrained(StructuredOutputs(json=SCHEMAS["array"])))]
    alone = [served.run(collect(served.engine, job)) for job in beside]

    async def with_the_bad_one():
        running = [asyncio.create_task(collect(served.engine, job)) for job in beside]
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as info:
            await collect(served.engine, GenerationRequest(PROMPTS[1], params=constrained(spec, max_tokens=20)))
        return info.value, await asyncio.gather(*running)

    error, results = served.run(with_the_bad_one())
    assert error.http_status == 400 and str(error).startswith(field), str(error)
    assert any(w in str(error) for w in words), str(error)
    assert results == alone
    assert served.engine.healthy()
    assert served.answer(StructuredOutputs(choice=("a", "b")))[2] == "stop"


def test_the_engine_asks_vllm_for_guidance_and_compact_json_unless_told(llama_dir):
    """Built, not started: vLLM's structured-outputs config follows structured_outputs_any_whitespace."""
    for any_whitespace in (False, True):
        engine = create_engine("vllm", str(llama_dir), EngineOptions(
            device="cpu", dtype="float32", structured_outputs_any_whitespace=any_whitespace))
        config = engine.engine_args().structured_outputs_config
        assert config.backend == "guidance" and config.disable_any_whitespace is not any_whitespace
