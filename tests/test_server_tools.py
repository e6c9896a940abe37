"""Tool calling through `ftserve serve` and the official `openai` client, and the tool call parsers on texts.

The server runs a tiny Llama whose chat template renders tools, calls and results as Hermes-style models do
(``<tool_call>{...}</tool_call>``), with ``--enable-auto-tool-choice --tool-call-parser hermes``. A random model
never writes a call on its own: ``required`` and a named function make it (the answer is decoded under the
tools' schemas), ``auto`` is shown reading a call that a regex constraint (vLLM's ``structured_outputs``) makes
the model write, and the parsers are checked on texts whose calls vLLM 0.32's parsers read the same way.
"""

from __future__ import annotations

import json
import random
import shutil

import httpx
import jsonschema
import pytest
from support.processes import ServerProcess

from ftserve.server.tool_parsers import RequiredCallStream, ToolCallStream, parse_required, parse_tool_calls
from ftserve.server.tools import Tool, required_schema

BASE = "tiny-tools"
GREEDY = {"temperature": 0, "max_tokens": 64}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"enum": [1, 2, 3]}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "the weather in paris"}]
# Hermes-style, as Qwen2.5's template writes calls and results (simplified; tools by name, to fit the context).
TOOL_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for tool in tools %} {{ tool.function.name }}"
    "{% if tool.function.description %} ({{ tool.function.description }}){% endif %}{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|assistant|>{{ message.content or '' }}"
    "{% for call in message.tool_calls %}<tool_call>{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|end|>\n"
    "{% elif message.role == 'tool' %}<|user|><tool_response>{{ message.content }}</tool_response><|end|>\n"
    "{% else %}<|{{ message.role }}|>{{ message.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(llama_dir, tmp_path_factory):
    """The tiny Llama with TOOL_TEMPLATE as its chat template (the file transformers reads it from)."""
    path = tmp_path_factory.mktemp("tools") / "base"
    shutil.copytree(llama_dir, path)
    (path / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Two servers: one with ``auto`` enabled (hermes), one without."""
    logs = tmp_path_factory.mktemp("log")
    common = [str(model_dir), "--served-model-name", BASE, "--max-model-len", "512"]
    auto = ServerProcess([*common, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], logs / "auto.log")
    plain = ServerProcess(common, logs / "plain.log")
    try:
        yield auto.wait_ready(), plain.wait_ready()
    finally:
        auto.stop()
        plain.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def check_calls(calls, names=None) -> list[tuple[str, dict]]:
    """Each call well formed, of a declared function, with arguments valid against its schema."""
    found = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        found.append((call.function.name, arguments))
    assert names is None or [name for name, _ in found] == names
    return found


def streamed(client, **request) -> tuple[dict[int, list[dict]], list[str | None], str]:
    """Per choice: its tool calls joined from the deltas, its finish reason, and all content."""
    calls: dict[int, dict[int, dict]] = {}
    finish, content = {}, ""
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(choice.index, {}).get(delta.index)
                if call is None:  # a call's first delta: its id, type and name
                    assert delta.id.startswith("chatcmpl-tool-") and delta.type == "function" and delta.function.name
                    call = calls[choice.index][delta.index] = {"id": delta.id, "name": delta.function.name,
                                                               "arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                call["arguments"] += delta.function.arguments or ""
    return ({i: [c for _, c in sorted(by_index.items())] for i, by_index in calls.items()},
            [finish[i] for i in sorted(finish)], content)


def as_pairs(calls) -> list[tuple[str, dict]]:
    return [(call["name"], json.loads(call["arguments"])) for call in calls]


# Through the server ---------------------------------------------------------------------------------------

def test_named_function_answers_one_valid_call_streamed_or_not(server):
    client = server.client()
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(model=BASE, messages=ASK, tools=TOOLS, tool_choice=named, **GREEDY)
    choice = response.choices[0]
    [(_, arguments)] = check_calls(choice.message.tool_calls, ["get_weather"])
    assert choice.finish_reason == "stop" and not choice.message.content  # named: "stop", as OpenAI and vLLM

    calls, finish, content = streamed(client, model=BASE, messages=ASK, tools=TOOLS, tool_choice=named, **GREEDY)
    assert as_pairs(calls[0]) == [("get_weather", arguments)] and finish == ["stop"] and not content


@pytest.mark.parametrize("parallel", [True, False])
def test_required_answers_valid_calls_of_declared_functions(server, parallel):
    client = server.client()
    request = dict(model=BASE, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                   n=2, seed=7, temperature=1.0, max_tokens=400)
    response = client.chat.completions.create(**request)
    for choice in response.choices:
        found = check_calls(choice.message.tool_calls)
        assert len(found) >= 1 and (parallel or len(found) == 1)
        assert choice.finish_reason == "tool_calls"

    calls, finish, _ = streamed(client, **request)  # the same seeds: the same answers
    assert finish == ["tool_calls", "tool_calls"]
    assert [as_pairs(calls[i]) for i in range(2)] == [
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
        for choice in response.choices]


def test_auto_reads_the_calls_the_model_writes(server):
    """A regex makes the model write a Hermes call after some text: the hermes parser turns it into a tool call
    and keeps the text before it as content, streamed or not."""
    client = server.client()
    regex = (r'the (sun|moon)\n<tool_call>\{"name": "get_weather", "arguments": '
             r'\{"city": "(Paris|Oslo)", "days": [123]\}\}</tool_call>')
    request = dict(model=BASE, messages=ASK, tools=TOOLS, extra_body={"structured_outputs": {"regex": regex}},
                   temperature=0, max_tokens=200)  # the call is about 100 tokens of the tiny vocabulary
    choice = client.chat.completions.create(**request).choices[0]
    check_calls(choice.message.tool_calls, ["get_weather"])
    assert choice.finish_reason == "tool_calls" and choice.message.content.startswith("the ")

    calls, finish, content = streamed(client, **request)
    assert content == choice.message.content and finish == ["tool_calls"]
    assert as_pairs(calls[0]) == [("get_weather", json.loads(choice.message.tool_calls[0].function.arguments))]


def test_auto_without_a_call_is_plain_content_and_none_is_text(server):
    client = server.client()
    for choice_field in ("auto", "none"):
        choice = client.chat.completions.create(model=BASE, messages=ASK, tools=TOOLS, tool_choice=choice_field,
                                                 **GREEDY).choices[0]
        assert "<tool_call>" not in choice.message.content and choice.message.tool_calls is None
        assert choice.finish_reason in ("stop", "length")


def test_two_turns_with_a_call_and_its_result_render_through_the_template(server, model_dir):
    """The history's assistant call (arguments as JSON text, no content) and the tool's result reach the template
    as transformers' templates expect them (arguments a dict); the prompt is the one transformers renders."""
    from transformers import AutoTokenizer

    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    as_template_sees = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris",
                                                                                              "days": 2}}}]},
                        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    tools = [{"type": "function", "function": {"name": t["function"]["name"], "description": t["function"].get(
        "description"), "parameters": t["function"]["parameters"]}} for t in TOOLS]  # as vLLM passes them
    text = tokenizer.apply_chat_template(as_template_sees, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text and "Tools: get_weather (Weather forecast) get_time" in text
    body = httpx.post(server.url + "/tokenize", json={"model": BASE, "messages": history, "tools": TOOLS}).json()
    assert body["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]

    response = server.client().chat.completions.create(model=BASE, messages=history, tools=TOOLS,
                                                       tool_choice="none", **GREEDY)
    assert response.choices[0].message.content and response.usage.prompt_tokens == body["count"]


BAD = [
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "a schema"}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools.0.function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
      "structured_outputs": {"regex": "a+"}}, "tool_choice"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}],
      "tool_choice": {"type": "function", "function": {"name": "bad"}}}, "tools.1.function.parameters"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"type": "web", "function": {"name": "f"}}]}]},
     "messages.1.tool_calls.0.type"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages.1.tool_calls.0.function.name"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[param for _, param in BAD])
def test_bad_tools_are_400_naming_the_field_and_the_server_is_unharmed(server, fields, param):
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": BASE, "messages": ASK, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert server.client().chat.completions.create(model=BASE, messages=ASK, max_tokens=2).usage.completion_tokens == 2


def test_auto_needs_the_server_flag_as_in_vllm(servers):
    """tools without tool_choice mean "auto"; a server started without --enable-auto-tool-choice refuses it."""
    plain = servers[1]
    for fields in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
        response = httpx.post(plain.url + "/v1/chat/completions", json={"model": BASE, "messages": ASK, **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
        assert "--enable-auto-tool-choice" in response.json()["error"]["message"]
    response = httpx.post(plain.url + "/v1/chat/completions",
                          json={"model": BASE, "messages": ASK, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2})
    assert response.status_code == 200


def test_auto_tool_choice_flag_needs_a_parser(model_dir):
    from click.testing import CliRunner

    from ftserve.cli import main

    result = CliRunner().invoke(main, ["serve", str(model_dir), "--enable-auto-tool-choice"])
    assert result.exit_code == 2 and "--tool-call-parser" in result.output


# The parsers on texts -------------------------------------------------------------------------------------

def pairs(calls: list[dict]) -> list[tuple[str, str]]:
    return [(call["function"]["name"], call["function"]["arguments"]) for call in calls]


# (parser, text, content, calls): what vLLM 0.32's Hermes2ProToolParser / Llama3JsonToolParser return.
PARSED = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","days":2}}\n'
               '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
     "Let me check.\n", [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"zone": "UTC"}')]),
    ("hermes", '  \n<tool_call>{"name": "f", "arguments": {"s": "\\u00e9t\\u00e9"}}', None, [("f", '{"s": "été"}')]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', '<tool_call>{"name": "f"}</tool_call>', []),
    ("hermes", "a<tool_call>{not json}</tool_call>", "a<tool_call>{not json}</tool_call>", []),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "arguments": {}}', None,
     [("f", '{"x": 1}'), ("g", "{}")]),
    ("llama3_json", 'Sure: {"name": "f", "parameters": {"a": [1, {"b": 2}]}} done', None,
     [("f", '{"a": [1, {"b": 2}]}')]),
    ("llama3_json", '{"x": 1}', '{"x": 1}', []),
    ("llama3_json", "plain text", "plain text", []),
]


@pytest.mark.parametrize("parser, text, content, calls", PARSED)
def test_parsers_read_texts_as_vllm(parser, text, content, calls):
    found_content, found = parse_tool_calls(parser, text)
    assert (found_content, pairs(found)) == (content, calls)
    assert all(call["id"].startswith("chatcmpl-tool-") and call["type"] == "function" for call in found)


def pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 10))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def joined(deltas: list[dict]) -> tuple[str, list[tuple[str, object]]]:
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] not in calls:
                assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
                calls[call["index"]] = [call["function"]["name"], ""]
            else:
                assert "id" not in call and "name" not in call["function"]
            calls[call["index"]][1] += call["function"].get("arguments", "")
    return content, [(name, json.loads(arguments)) for _, (name, arguments) in sorted(calls.items())]


@pytest.mark.parametrize("parser, text, content, calls", [case for case in PARSED if case[3]])
@pytest.mark.parametrize("seed", range(8))
def test_streamed_calls_join_to_the_parsed_ones(parser, text, content, calls, seed):
    """However the text is cut into deltas, the deltas join to the calls of the whole text; hermes sends the
    content before the first call; llama3_json, as vLLM's, reads calls only from a text that starts as one, and
    streams any other as content."""
    stream = ToolCallStream(parser)
    tag = "<|python_tag|>" if text.startswith("<|python_tag|>") else ""  # one token in Llama's vocabulary
    deltas = [stream.feed(tag), *(stream.feed(piece) for piece in pieces(text[len(tag):], seed))]
    streamed_content, streamed_calls = joined(deltas)
    if parser == "llama3_json" and not text.startswith(("{", "<|python_tag|>")):
        assert (streamed_content, streamed_calls, stream.called) == (text, [], False)
        return
    assert streamed_calls == [(name, json.loads(arguments)) for name, arguments in calls] and stream.called
    assert streamed_content == (content or text[:text.index("<tool_call>")] if parser == "hermes" else "")


def test_hermes_holds_back_what_may_start_a_call_and_sends_no_text_after_calls():
    """As vLLM's hermes parser streams: a possible ``<tool_call>`` start waits, the arguments' raw text grows
    less the brace closing the call, and text after the calls is not sent."""
    stream = ToolCallStream("hermes")
    assert stream.feed("Sure <tool") == {"content": "Sure "}
    assert stream.feed("_call>") == {}
    header, fragment = stream.feed('{"name": "f", "arguments": {"x"')["tool_calls"]
    assert header == {"index": 0, "type": "function", "id": header["id"], "function": {"name": "f"}}
    assert fragment == {"index": 0, "function": {"arguments": '{"x"'}}
    assert stream.feed(": 1}}</tool_call> and more") == {"tool_calls": [{"index": 0,
                                                                      "function": {"arguments": ": 1}"}}]}


REQUIRED = ('[{"name":"get_weather","parameters":{"city":"Oslo","days":1}},'
            '{"name":"get_time","parameters":{"zone":"C]}"}}]')


@pytest.mark.parametrize("seed", range(8))
def test_required_stream_joins_to_the_parsed_calls(seed):
    stream = RequiredCallStream()
    _, calls = joined([stream.feed(piece) for piece in pieces(REQUIRED, seed)])
    assert calls == [(name, json.loads(arguments)) for name, arguments in pairs(parse_required(REQUIRED))]
    assert calls == [("get_weather", {"city": "Oslo", "days": 1}), ("get_time", {"zone": "C]}"})]
    assert parse_required(REQUIRED[:-1]) == [] and parse_required('[{"name": 1, "parameters": {}}]') == []


def test_required_schema_is_vllms():
    defs = {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "$defs": {"point": {"type": "array"}}}
    tools = [Tool.model_validate(t) for t in [*TOOLS, {"function": {"name": "empty"}},
                                               {"function": {"name": "plot", "parameters": defs}}]]
    schema = required_schema(tools, parallel=False)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert schema["$defs"] == {"point": {"type": "array"}}
    assert [v["properties"]["name"] for v in schema["items"]["anyOf"]] == [
        {"type": "string", "enum": [name]} for name in ("get_weather", "get_time", "empty", "plot")]
    assert schema["items"]["anyOf"][2]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert all(v["required"] == ["name", "parameters"] and v["additionalProperties"] is False
               for v in schema["items"]["anyOf"])
    assert "$defs" not in schema["items"]["anyOf"][3]["properties"]["parameters"]
    assert "maxItems" not in required_schema(tools, parallel=True)
