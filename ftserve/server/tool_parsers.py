"""Tool calls read out of a model's text, as vLLM 0.32 reads them: its parsers ``hermes`` and ``llama3_json``
(``tool_choice: "auto"``, chosen by ``--tool-call-parser``) and the JSON array that ``tool_choice: "required"``
constrains an answer to. Pure functions over text, so that vLLM's own parsers can check them as oracles.

The API (stable; tests on the vllm engine compare it with vLLM's parsers):

- ``TOOL_CALL_PARSERS``: the names ``--tool-call-parser`` accepts.
- ``parse_tool_calls(parser, text) -> (content, calls)``: a finished answer. ``calls`` are OpenAI's tool calls,
  ``{"id": "chatcmpl-tool-<16 hex>", "type": "function", "function": {"name", "arguments"}}`` with the arguments
  as JSON text (``json.dumps`` of the parsed value, as vLLM writes them); ``content`` is the text vLLM keeps
  beside them (hermes: what precedes the first call, None when blank; llama3_json: None). Text that holds no
  well-formed call gives ``(text, [])``, as in vLLM, which then answers the text as content.
- ``ToolCallStream(parser)``: ``feed(delta_text) -> delta`` for each piece of a streamed answer, where ``delta``
  is the part of an OpenAI ``choices[].delta`` it makes: ``{"content": ...}``, ``{"tool_calls": [...]}``, both,
  or ``{}``; a call's first delta has ``index``, ``id``, ``type`` and ``function.name``, later ones
  ``index`` and ``function.arguments`` fragments. ``called``: whether any call was sent.
- ``parse_required(text) -> calls`` and ``RequiredCallStream``: the same for ``tool_choice: "required"``, whose
  answer is ``[{"name": ..., "parameters": {...}}, ...]``.

Where a stream differs from vLLM's: ``llama3_json`` sends a call's arguments in one delta once its JSON is
complete (vLLM sends growing fragments from a partial-JSON parse); the joined arguments are the same.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json")

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
HERMES_CALLS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
HERMES_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
HERMES_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')
LLAMA_BOT = "<|python_tag|>"
LLAMA_SEPARATOR = "; "
LLAMA_NAME = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]+)"')  # a call that names itself first, before it is complete
MALFORMED = (ValueError, LookupError, TypeError, RecursionError)  # what a call that is not well formed raises


def new_call_id() -> str:
    """vLLM's ``make_tool_call_id``: ``chatcmpl-tool-`` and 64 random bits in hex."""
    return f"chatcmpl-tool-{uuid.uuid4().int & (2 ** 64 - 1):016x}"


def tool_call(name: Any, arguments: str) -> dict:
    if not isinstance(name, str):
        raise TypeError(f"a tool call's name must be a string; got {type(name).__name__}")
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict]]:
    """The calls in a finished answer, and the content kept beside them (see the module's docstring)."""
    if parser == "hermes":
        return _hermes(text)
    if parser == "llama3_json":
        return _llama3(text)
    raise ValueError(f"unknown tool call parser {parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")


def _hermes(text: str) -> tuple[str | None, list[dict]]:
    if HERMES_START not in text:
        return text, []
    try:
        found = [json.loads(closed or open_) for closed, open_ in HERMES_CALLS.findall(text)]
        calls = [tool_call(obj["name"], dumps(obj["arguments"])) for obj in found]
    except MALFORMED:
        return text, []
    content = text[:text.find(HERMES_START)]
    return (content if content.strip() else None), calls


def _llama3(text: str) -> tuple[str | None, list[dict]]:
    """Every JSON object in the text that starts at a ``{`` past the previous one's end, as vLLM decodes them;
    one that does not decode or lacks its keys voids them all."""
    if LLAMA_BOT not in text and "{" not in text:
        return text, []
    decoder, end, calls = json.JSONDecoder(), -1, []
    for start in (m.start() for m in re.finditer(r"\{", text)):
        if start <= end:
            continue
        try:
            obj, length = decoder.raw_decode(text[start:])
            end = start + length
            calls.append(tool_call(obj["name"], dumps(obj["arguments"] if "arguments" in obj else obj["parameters"])))
        except MALFORMED:
            return text, []
    return (None, calls) if calls else (text, [])


def _tag_overlap(text: str, tag: str) -> int:
    """How many of ``tag``'s first characters end ``text`` (a tag that may still be arriving)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except MALFORMED:
        return False


class ToolCallStream:
    """One streamed answer read by a ``tool_choice: "auto"`` parser (see the module's docstring)."""

    def __init__(self, parser: str) -> None:
        if parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool call parser {parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
        self.parser = parser
        self.text = ""
        self.sent_content = 0  # hermes: how much of the text went out as content
        self.names: list[str | None] = []  # each call's name once sent
        self.arguments: list[str] = []  # each call's arguments sent so far
        self.called = False

    def feed(self, delta_text: str) -> dict:
        self.text += delta_text
        if self.parser == "hermes":
            content, calls = self._hermes()
        elif self.text.startswith(LLAMA_BOT) or self.text.startswith("{"):
            content, calls = None, self._llama3()
        else:
            content, calls = delta_text, []
        self.called = self.called or bool(calls)
        return {**({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}

    def _call(self, index: int, name: str | None = None, arguments: str | None = None) -> list[dict]:
        """The delta of call ``index``: its header when ``name`` is given, else an arguments fragment."""
        while len(self.names) <= index:
            self.names.append(None)
            self.arguments.append("")
        if name is not None:
            self.names[index] = name
            return [{"index": index, "type": "function", "id": new_call_id(), "function": {"name": name}}]
        self.arguments[index] += arguments
        return [{"index": index, "function": {"arguments": arguments}}]

    def _hermes(self) -> tuple[str | None, list[dict]]:
        """vLLM's Hermes2ProToolParser.extract_tool_calls_streaming: content before the first ``<tool_call>``
        (holding back what may be the start of one), then each call's name once whole and its arguments' raw
        text as it grows (less the brace that closes the call, once the call's JSON is complete)."""
        text = self.text
        end = text.index(HERMES_START) if HERMES_START in text else len(text) - _tag_overlap(text, HERMES_START)
        content = None
        if end > self.sent_content:
            content, self.sent_content = text[self.sent_content:end], end
        calls: list[dict] = []
        for index, (body, complete) in enumerate(self._hermes_bodies()):
            if index >= len(self.names) or self.names[index] is None:
                name = HERMES_NAME.search(body)
                if not name:
                    break
                calls += self._call(index, name=name.group(1))
            found = HERMES_ARGUMENTS.search(body)
            if not found:
                continue
            arguments = body[found.end():]
            if complete:
                arguments = arguments.rstrip()
                arguments = arguments[:-1].rstrip() if arguments.endswith("}") else arguments
            if len(arguments) > len(self.arguments[index]):
                calls += self._call(index, arguments=arguments[len(self.arguments[index]):])
                self.arguments[index] = arguments
        return content, calls

    def _hermes_bodies(self) -> list[tuple[str, bool]]:
        """Each ``<tool_call>`` region's JSON text and whether it is complete."""
        text, bodies, position = self.text, [], 0
        while (start := text.find(HERMES_START, position)) != -1:
            begin = start + len(HERMES_START)
            close = text.find(HERMES_END, begin)
            if close != -1:
                bodies.append((text[begin:close].strip(), True))
                position = close + len(HERMES_END)
                continue
            raw = text[begin:]
            raw = raw[:len(raw) - _tag_overlap(raw, HERMES_END)].strip()
            bodies.append((raw, bool(raw) and _is_json(raw)))
            break
        return bodies

    def _llama3(self) -> list[dict]:
        """Objects separated by ``; `` after an optional ``<|python_tag|>``: a call's header once its name is
        whole, its arguments once its JSON is complete."""
        text, decoder, calls = self.text, json.JSONDecoder(), []
        start, index = len(LLAMA_BOT) if text.startswith(LLAMA_BOT) else 0, 0
        while start < len(text):
            try:
                obj, length = decoder.raw_decode(text[start:])
            except MALFORMED:
                obj, length = None, 0
            if not isinstance(obj, dict):
                name = LLAMA_NAME.match(text, start)
                if name and (index >= len(self.names) or self.names[index] is None):
                    calls += self._call(index, name=name.group(1))
                break
            name, arguments = obj.get("name"), obj.get("arguments", obj.get("parameters"))
            if not isinstance(name, str) or not ("arguments" in obj or "parameters" in obj):
                break
            if index >= len(self.names) or self.names[index] is None:
                calls += self._call(index, name=name)
            if not self.arguments[index]:
                calls += self._call(index, arguments=dumps(arguments))
            start, index = start + length + len(LLAMA_SEPARATOR), index + 1
        return calls


def parse_required(text: str) -> list[dict]:
    """The calls of a ``tool_choice: "required"`` answer, ``[{"name", "parameters"}, ...]``; none unless all of
    it is well formed (an answer ``max_tokens`` cut), as vLLM's ``list[FunctionDefinition]`` validation."""
    try:
        items = json.loads(text)
    except MALFORMED:
        return []
    if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str)
            and isinstance(item.get("parameters"), (dict, type(None))) for item in items):
        return []
    return [tool_call(item["name"], dumps(item.get("parameters"))) for item in items]


class _Span:
    """Where one call of a required answer sits: its name once whole, the offsets of its parameters' value."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.name_end: int | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None

    @property
    def ready(self) -> bool:
        return self.name is not None and self.args_start is not None

    def ready_at(self, length: int) -> bool:
        """Whether the text's first ``length`` characters already made this call streamable."""
        return self.ready and self.name_end <= length and self.args_start < length


KEY, COLON, VALUE, IN_STRING, IN_CONTAINER, IN_SCALAR, AFTER = range(7)


def _required_spans(text: str) -> list[_Span]:
    """vLLM's ``_scan_required_tool_calls``: one string- and nesting-aware pass over a (partial) answer that
    finds each element of the top-level array, its name and its parameters' span. Offsets are the same for any
    prefix of the text, so one scan tells what a shorter text had already shown."""
    spans: list[_Span] = []
    depth, in_string, escaped, string_start = 0, False, False, 0
    current: _Span | None = None
    expect, key, value_start = KEY, None, 0

    def end_value(position: int) -> None:
        nonlocal expect
        if key == "parameters":
            current.args_end = position
        elif key == "name" and expect == IN_STRING:
            try:
                current.name, current.name_end = json.loads(text[value_start:position]), position
            except ValueError:
                current.name = None
        expect = AFTER

    def start_value(position: int, state: int) -> None:
        nonlocal expect, value_start
        value_start = position
        if key == "parameters":
            current.args_start = position
        expect = state

    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 2 and current is not None:
                    if expect == KEY:
                        key, expect = text[string_start + 1:i], COLON
                    elif expect == IN_STRING:
                        end_value(i + 1)
            continue
        if ch == '"':
            in_string, string_start = True, i
            if depth == 2 and current is not None and expect == VALUE:
                start_value(i, IN_STRING)
            continue
        if ch in "{[":
            if depth == 0 and ch != "[" or depth == 1 and ch != "{":
                return spans
            if depth == 1:
                current = _Span()
                spans.append(current)
                expect, key = KEY, None
            elif depth == 2 and current is not None and expect == VALUE:
                start_value(i, IN_CONTAINER)
            depth += 1
            continue
        if ch in "}]":
            if depth == 2 and current is not None and expect == IN_SCALAR:
                end_value(i)
            depth -= 1
            if depth == 2 and current is not None and expect == IN_CONTAINER:
                end_value(i + 1)
            elif depth == 1:
                current = None
            elif depth <= 0:
                return spans
            continue
        if depth != 2 or current is None:
            continue
        if ch == ":":
            expect = VALUE if expect == COLON else expect
        elif ch == ",":
            if expect == IN_SCALAR:
                end_value(i)
            expect, key = KEY, None
        elif ch.isspace():
            if expect == IN_SCALAR:
                end_value(i)
        elif expect == VALUE:
            start_value(i, IN_SCALAR)
    return spans


class RequiredCallStream:
    """A streamed ``tool_choice: "required"`` answer as vLLM's ``extract_required_tool_call_streaming`` sends
    it: each call once its name is whole and its parameters have begun (id, name and the arguments so far),
    then new arguments text as it comes."""

    def __init__(self) -> None:
        self.text = ""
        self.called = False

    def feed(self, delta_text: str) -> dict:
        sent, self.text = len(self.text), self.text + delta_text
        calls = []
        for index, span in enumerate(_required_spans(self.text)):
            if not span.ready:
                break
            end = span.args_end if span.args_end is not None else len(self.text)
            if span.ready_at(sent):
                if self.text[min(end, sent):end]:
                    calls.append({"index": index, "function": {"arguments": self.text[min(end, sent):end]}})
                continue
            calls.append({"index": index, "type": "function", "id": new_call_id(),
                          "function": {"name": span.name, "arguments": self.text[span.args_start:end]}})
        self.called = self.called or bool(calls)
        return {"tool_calls": calls} if calls else {}
