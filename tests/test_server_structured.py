"""Structured outputs through `ftserve serve` and the official `openai` client: OpenAI's ``response_format``
(json_object, json_schema, and the client's ``chat.completions.parse`` with a pydantic model) and vLLM's
``structured_outputs`` extra (json, regex, choice, grammar), on both routes, streamed and not, mixed with
unconstrained requests and adapters; and every bad constraint answered 400 naming its field.

The model is a random tiny Llama: what it says is noise, so every schema here bounds its answer (enums,
``maxLength``, ``maxItems``) and an answer must parse and validate whenever it finished (``stop``); only
``max_tokens`` may cut one (``length``).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from support.processes import ServerProcess

from ftserve.testing import save_random_adapter

BASE = "tiny-base"
ADAPTERS = ("a1", "a2", "a3", "a4")
MESSAGES = [{"role": "user", "content": "describe the cat"}]
GREEDY = {"temperature": 0}

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "vip": {"type": "boolean"}},
                  "required": ["age", "vip"], "additionalProperties": False}},
        "required": ["name", "owner"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["none", "some"]},
                            {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "level": {"enum": [1, 2, 3]}},
        "required": ["code", "level"], "additionalProperties": False},
}


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    name: str = Field(max_length=6)
    friendly: bool


@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(ADAPTERS):
        save_random_adapter(llama_dir, "lora", root / name, seed + 20)
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root, tmp_path_factory):
    args = [str(llama_dir), "--served-model-name", BASE, "--max-model-len", "256"]
    for name in ADAPTERS:
        args += ["--adapter", f"{name}={root / name}"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def check_json(text: str, finish: str, schema: dict | None) -> None:
    """A finished answer parses (and validates against ``schema``); a cut one was cut by max_tokens."""
    assert finish in ("stop", "length"), finish
    if finish == "stop":
        value = json.loads(text)
        assert isinstance(value, dict)
        if schema is not None:
            jsonschema.validate(value, schema)


# response_format ------------------------------------------------------------------------------------------

def test_parse_with_a_pydantic_model_returns_the_parsed_object(server):
    client = server.client()
    response = client.chat.completions.parse(model=BASE, messages=MESSAGES, response_format=Pet, max_tokens=64,
                                             **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate_greedy_and_sampled(server, name):
    client, schema = server.client(), SCHEMAS[name]
    for extra in (GREEDY, {"temperature": 1.0, "seed": 7, "n": 2}):
        response = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96,
                                                  response_format=json_schema_format(schema), **extra)
        for choice in response.choices:
            check_json(choice.message.content, choice.finish_reason, schema)
            assert choice.finish_reason == "stop"  # every schema here bounds its answer well within 96 tokens


def test_json_object_on_completions_and_chat_and_compact_by_default(server):
    client = server.client()
    chat = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=48,
                                          response_format={"type": "json_object"}, **GREEDY)
    check_json(chat.choices[0].message.content, chat.choices[0].finish_reason, None)
    completion = client.completions.create(model=BASE, prompt="the cat", max_tokens=48,
                                           extra_body={"response_format": {"type": "json_object"}}, **GREEDY)
    text = completion.choices[0].text
    assert text.startswith("{")
    check_json(text, completion.choices[0].finish_reason, None)
    nested = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96,
                                            response_format=json_schema_format(SCHEMAS["nested"]), **GREEDY)
    content = nested.choices[0].message.content
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', content)
    assert not re.search(r"\s", outside_strings), content  # --structured-outputs-any-whitespace is off


def test_streamed_json_schema_answer_joins_into_a_valid_document(server):
    client = server.client()
    schema = SCHEMAS["nested"]
    stream = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96, stream=True,
                                            response_format=json_schema_format(schema), **GREEDY)
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    solo = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96,
                                          response_format=json_schema_format(schema), **GREEDY)
    assert "".join(parts) == solo.choices[0].message.content
    check_json("".join(parts), finish, schema)


def test_logprobs_and_stop_strings_keep_working_under_a_constraint(server):
    client = server.client()
    response = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96, logprobs=True,
                                              top_logprobs=2, response_format=json_schema_format(SCHEMAS["array"]),
                                              **GREEDY)
    choice = response.choices[0]
    check_json(choice.message.content, choice.finish_reason, SCHEMAS["array"])
    assert len(choice.logprobs.content) == response.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    cut = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96, stop=['"tags"'],
                                         response_format=json_schema_format(SCHEMAS["array"]), **GREEDY)
    assert cut.choices[0].message.content == "{" and cut.choices[0].finish_reason == "stop"


# vLLM's structured_outputs ------------------------------------------------------------------------------

def test_choice_regex_and_grammar_on_both_routes(server):
    client = server.client()
    choices = ["yes", "no", "maybe not"]
    for seed in range(3):
        chat = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=16, seed=seed,
                                              extra_body={"structured_outputs": {"choice": choices}})
        assert chat.choices[0].message.content in choices
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    completion = client.completions.create(model=BASE, prompt="the cat", max_tokens=16, **GREEDY,
                                           extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, completion.choices[0].text)
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/'
    gbnf = 'root ::= "(" num ("+" num)? ")"\nnum ::= [0-9]'
    for grammar, check in ((lark, r"\([0-9](\+[0-9])*\)"), (gbnf, r"\([0-9](\+[0-9])?\)")):
        answer = client.completions.create(model=BASE, prompt="sum", max_tokens=24, **GREEDY,
                                           extra_body={"structured_outputs": {"grammar": grammar}})
        if answer.choices[0].finish_reason == "stop":
            assert re.fullmatch(check, answer.choices[0].text), answer.choices[0].text
    as_json = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=96, **GREEDY,
                                             extra_body={"structured_outputs": {"json": SCHEMAS["pattern"]}})
    check_json(as_json.choices[0].message.content, as_json.choices[0].finish_reason, SCHEMAS["pattern"])


def test_mixed_batch_equals_each_request_alone(server):
    """Four adapters, half of the requests constrained: sent together (one batch) and one by one, the same."""
    client = server.client()
    jobs = []
    for i, adapter in enumerate(ADAPTERS * 2):
        extra = {"response_format": json_schema_format(SCHEMAS[sorted(SCHEMAS)[i % 4]])} if i % 2 else {}
        jobs.append(dict(model=adapter, messages=[{"role": "user", "content": f"item {i}"}], max_tokens=48,
                         **GREEDY, **extra))

    def ask(job):
        return client.chat.completions.create(**job).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    alone = [ask(job) for job in jobs]
    assert together == alone
    for job, text in zip(jobs, alone):
        if "response_format" in job:
            json.loads(text)


# Bad constraints ----------------------------------------------------------------------------------------

def _refused(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def test_bad_constraints_are_400s_naming_the_field(server):
    client = server.client()

    def chat(**extra):
        return lambda: client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=8, **extra)

    cases = [
        (chat(response_format={"type": "json_schema"}), "response_format"),
        (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
         "response_format.json_schema.schema"),
        (chat(response_format=json_schema_format({"type": "object", "properties": {"a": {"type": "wat"}}})),
         "response_format.json_schema.schema"),
        (chat(response_format=json_schema_format({"type": "object", "minProperties": "x"})),
         "response_format.json_schema.schema"),
        (chat(extra_body={"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs.regex"),
        (chat(extra_body={"structured_outputs": {"grammar": 'root ::= ( "yes" '}}), "structured_outputs.grammar"),
        (chat(extra_body={"structured_outputs": {"choice": []}}), "structured_outputs.choice"),
        (chat(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs"),
        (chat(extra_body={"structured_outputs": {"structural_tag": "{}"}}), "structured_outputs.structural_tag"),
        (chat(response_format={"type": "json_object"}, extra_body={"structured_outputs": {"regex": "a"}}),
         "structured_outputs"),
    ]
    for call, param in cases:
        error = _refused(call)
        assert error.body["param"] == param, (param, error.body)
        assert error.body["message"]


def test_pathological_constraints_are_refused_or_served_and_others_carry_on(server):
    """A schema nested past the body's 64 levels, one of 10,000 properties (over the engine's bound on a
    constraint's size) and a backtracking regex: the first two refused (400), the regex served, while a plain
    request running beside them finishes as if alone. (The time a refusal takes is measured by
    benchmarks/hostile_load.py, not here: no timings in tests.)"""
    client = server.client()

    def nested(levels: int) -> dict:
        schema: dict = {"type": "integer"}
        for _ in range(levels):
            schema = {"type": "object", "properties": {"x": schema}, "required": ["x"],
                      "additionalProperties": False}
        return schema

    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10000)}}
    alone = client.completions.create(model=BASE, prompt="the dog", max_tokens=40, **GREEDY,
                                      extra_body={"ignore_eos": True}).choices[0].text
    beside: dict = {}

    def plain():
        beside["text"] = client.completions.create(model=BASE, prompt="the dog", max_tokens=40, **GREEDY,
                                                   extra_body={"ignore_eos": True}).choices[0].text

    thread = threading.Thread(target=plain)
    thread.start()
    deep = _refused(lambda: client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=8, response_format=json_schema_format(nested(300))))
    assert "nested" in deep.body["message"]
    error = _refused(lambda: client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=8, response_format=json_schema_format(wide)))
    assert error.body["param"] == "response_format.json_schema.schema"
    within = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=200, **GREEDY,
                                            response_format=json_schema_format(nested(25)))
    check_json(within.choices[0].message.content, within.choices[0].finish_reason, nested(25))
    redos = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=8, **GREEDY,
                                           extra_body={"structured_outputs": {"regex": "(a+)+b"}})
    assert re.fullmatch("(a+)+b", redos.choices[0].message.content) or redos.choices[0].finish_reason == "length"
    thread.join()
    assert beside["text"] == alone
