"""Tool calling on /v1/chat/completions, as vLLM 0.32's server does it and OpenAI's clients read it.

The request: ``tools`` (``[{"type": "function", "function": {"name", "description", "parameters", "strict"}}]``,
``parameters`` a JSON schema of an object; absent, any object), ``tool_choice`` and ``parallel_tool_calls``
(default true). ``tool_choice`` defaults to ``"auto"`` when tools are given, else ``"none"``, as in vLLM:

- ``"none"``: the tools reach the chat template; the answer is text.
- a function, ``{"type": "function", "function": {"name": N}}``: the answer is decoded under N's parameters
  schema (``StructuredOutputs(json=...)``) and becomes one call of N with that text as its arguments; the
  finish reason stays ``stop``, as OpenAI and vLLM answer a named choice.
- ``"required"``: the answer is decoded under vLLM's schema of an array of ``{"name", "parameters"}`` calls
  (``required_schema``: at least one, at most one when ``parallel_tool_calls`` is false), each a declared
  function with arguments valid against its schema; finish reason ``tool_calls``.
- ``"auto"``: the model answers freely and the parser named by ``--tool-call-parser`` reads calls out of its
  text (tool_parsers.py); refused unless the server runs with ``--enable-auto-tool-choice``, as in vLLM.

A call's ``id`` is ``chatcmpl-tool-<16 hex>`` and its arguments are JSON text. With ``parallel_tool_calls``
false only the first call is kept. Streaming sends OpenAI's ``tool_calls`` deltas (``ChoiceStream``).

Refused with a 400 naming the field: an empty ``tools``; a function name that is not 1-64 letters, digits,
``_`` or ``-`` (OpenAI's rule), or is declared twice; ``parameters`` that is not a schema of an object;
``tool_choice`` other than these four, naming an undeclared function, given without ``tools``, or forcing a
call alongside another output constraint (``response_format``, ``structured_outputs``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool

from ..engine.base import SamplingParams, StructuredOutputs
from .errors import APIError
from .tool_parsers import RequiredCallStream, ToolCallStream, parse_required, parse_tool_calls, tool_call

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
ANY_OBJECT = {"type": "object", "properties": {}}  # vLLM's schema for a function declared without parameters


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def template_form(self) -> dict:
        """What the chat template sees, as vLLM passes it (``strict`` only where given)."""
        function = self.function.model_dump(exclude={"strict"} if self.function.strict is None else set())
        return {"type": "function", "function": function}


def template_tools(tools: list[Tool] | None) -> list[dict] | None:
    """``tools`` as the chat template receives them (``tools=`` of transformers' ``apply_chat_template``)."""
    return [tool.template_form() for tool in tools or ()] or None


def _refuse(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def check_tools(tools: list[Tool] | None) -> None:
    if tools is None:
        return
    if not tools:
        raise _refuse("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                      "entirely.", "tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name, parameters = tool.function.name, tool.function.parameters
        if not FUNCTION_NAME.fullmatch(name):
            raise _refuse(f"Invalid function name {name[:80]!r}: it must be 1 to 64 letters, digits, underscores "
                          f"or dashes.", f"tools.{i}.function.name")
        if name in seen:
            raise _refuse(f"The function {name!r} is declared twice in `tools`.", f"tools.{i}.function.name")
        seen.add(name)
        if parameters is not None and parameters.get("type", "object") != "object":
            raise _refuse(f"Invalid schema for function {name!r}: `parameters` must be a JSON schema of "
                          f"`\"type\": \"object\"`; got `\"type\": {json.dumps(parameters['type'])[:80]}`.",
                          f"tools.{i}.function.parameters")
        if not isinstance((parameters or {}).get("$defs", {}), dict):
            raise _refuse(f"`$defs` in the parameters of function {name!r} must be an object.",
                          f"tools.{i}.function.parameters")


@dataclass(frozen=True)
class ToolCalling:
    """What a chat request asks of tools: ``choice`` is "none", "auto", "required" or "function" (``name``
    forced); ``parser``: the server's ``--tool-call-parser``, for "auto"."""

    choice: str = "none"
    tools: tuple[Tool, ...] = ()
    name: str | None = None
    parallel: bool = True
    parser: str | None = None
    constraint: StructuredOutputs | None = field(default=None, compare=False)

    @classmethod
    def of(cls, tools: list[Tool] | None, tool_choice: Any, parallel_tool_calls: bool | None, *,
           auto_enabled: bool, parser: str | None, other_constraint: str | None = None) -> "ToolCalling":
        """The request's tool calling, checked (400 naming the field); ``other_constraint``: the field of an
        output constraint the request also sets, if any."""
        check_tools(tools)
        choice, name = tool_choice, None
        if choice is None:
            choice = "auto" if tools else "none"
        if choice == "none":
            return cls(tools=tuple(tools or ()))
        if tools is None:
            raise _refuse("When using `tool_choice`, `tools` must be set.", "tool_choice")
        if isinstance(choice, dict):
            name, choice = _named(choice, tools), "function"
        elif choice not in ("auto", "required"):
            raise _refuse(f"Invalid value for `tool_choice`: {str(choice)[:80]!r}. Only a named function, \"none\", "
                          f"\"auto\" or \"required\" are supported.", "tool_choice")
        if choice == "auto" and not (auto_enabled and parser):
            raise _refuse('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                          "tool_choice")
        if choice != "auto" and other_constraint:
            raise _refuse(f"`tool_choice` {json.dumps(tool_choice)[:80]} constrains the answer to tool calls; it "
                          f"cannot be combined with `{other_constraint}`.", "tool_choice")
        parallel = parallel_tool_calls is not False
        constraint = None
        if choice == "function":
            constraint = StructuredOutputs(json=next(t for t in tools if t.function.name == name).function.parameters
                                           or ANY_OBJECT)
        elif choice == "required":
            constraint = StructuredOutputs(json=required_schema(tools, parallel))
        return cls(choice, tuple(tools), name, parallel, parser, constraint)

    @property
    def param(self) -> str | None:
        """The request field the tool constraint comes from: the named function's parameters, or all tools."""
        if self.choice == "function":
            return f"tools.{[t.function.name for t in self.tools].index(self.name)}.function.parameters"
        return "tools" if self.choice == "required" else None

    def constrain(self, params: SamplingParams) -> SamplingParams:
        return params if self.constraint is None else dataclasses.replace(params, structured_outputs=self.constraint)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """A finished choice's ``message`` and ``finish_reason``, as vLLM builds them."""
        content: str | None = text
        calls: list[dict] = []
        if self.choice == "function":
            calls, content = ([tool_call(self.name, text)] if text.strip() else []), ""
        elif self.choice == "required":
            calls, content = parse_required(text), ""
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        elif self.choice == "auto":
            content, calls = parse_tool_calls(self.parser, text)
            finish_reason = "tool_calls" if calls else finish_reason
        calls = calls if self.parallel else calls[:1]
        return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}, finish_reason

    def stream(self) -> "ChoiceStream":
        return ChoiceStream(self)


def _named(choice: dict, tools: list[Tool]) -> str:
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    if choice.get("type", "function") != "function":
        raise _refuse(f"Invalid `type` in `tool_choice`: {str(choice.get('type'))[:80]!r}. {usage}",
                      "tool_choice.type")
    function = choice.get("function")
    if not isinstance(function, dict):
        raise _refuse(f"Invalid value for `function` in `tool_choice`. {usage}", "tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _refuse(f"Invalid `name` in `function` in `tool_choice`. {usage}", "tool_choice.function.name")
    if all(tool.function.name != name for tool in tools):
        raise _refuse(f"The tool specified in `tool_choice` ({name[:80]!r}) does not match any of the specified "
                      f"`tools`", "tool_choice")
    return name


def required_schema(tools: list[Tool], parallel: bool) -> dict:
    """vLLM's schema for ``tool_choice: "required"``: an array of at least one call (one at most without
    parallel calls), each ``{"name": <a declared name>, "parameters": <its schema>}``; the functions' ``$defs``
    gathered at the root, where their ``$ref``s point. 400 if two functions define one name differently.

    Each call also says ``additionalProperties: false``, which vLLM's schema leaves out: its default grammar
    backend (xgrammar) allows no undeclared property anyway, llguidance follows JSON schema and would let a model
    add keys after ``parameters`` until ``max_tokens``."""
    variants, definitions = [], {}
    for tool in tools:
        parameters = dict(tool.function.parameters or {})
        for name, schema in parameters.pop("$defs", {}).items():
            if definitions.setdefault(name, schema) != schema:
                raise _refuse(f"Tool definition {name!r} has multiple schemas, which is not supported.", "tools")
        variants.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                        "parameters": parameters or ANY_OBJECT},
                         "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema


class ChoiceStream:
    """One streamed choice: ``step(delta_text, finish_reason) -> (delta, finish_reason)``, the delta OpenAI's
    ``choices[].delta`` carries (``{}`` when there is nothing to send), as vLLM streams each tool choice."""

    def __init__(self, calling: ToolCalling) -> None:
        self.calling = calling
        self.reader = ToolCallStream(calling.parser) if calling.choice == "auto" else \
            RequiredCallStream() if calling.choice == "required" else None
        self.named_sent = False

    def step(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        if self.calling.choice == "none":
            delta = {"content": text} if text else {}
        elif self.calling.choice == "function":
            delta = {"tool_calls": [self._named(text)]} if text else {}
        else:
            delta = self.reader.feed(text) if text else {}
        if not self.calling.parallel and "tool_calls" in delta:
            calls = [call for call in delta.pop("tool_calls") if call["index"] == 0]
            delta.update({"tool_calls": calls} if calls else {})
        if finish_reason == "stop" and self.reader is not None and self.reader.called:
            finish_reason = "tool_calls"
        return delta, finish_reason

    def _named(self, text: str) -> dict:
        if self.named_sent:
            return {"index": 0, "function": {"arguments": text}}
        self.named_sent = True
        call = tool_call(self.calling.name, text)
        return {"index": 0, **call}
