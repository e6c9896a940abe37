"""Chat messages as a request sends them and as the chat template sees them, as vLLM hands them over.

An assistant message may hold ``tool_calls`` (and no content), a tool's result names the call it answers in
``tool_call_id``. The template sees each call's arguments as a dict, as transformers' chat templates expect
(OpenAI's clients send them as JSON text), and the messages' text, calls, ``tool_call_id`` and ``name``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CalledFunction(_Body):
    name: str
    arguments: str | dict[str, Any] | None = None


class AssistantToolCall(_Body):
    """A call in an assistant message of the history (OpenAI's ``ChatCompletionMessageToolCall``)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction

    def template_form(self) -> dict:
        """As transformers' chat templates expect it: the arguments a dict. A string that is not a JSON object
        becomes ``{}``, as vLLM coerces it (the history must stay renderable on every later turn)."""
        arguments = self.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments else {}
            except ValueError:
                arguments = {}
        call = {"type": "function", "function": {"name": self.function.name,
                                                  "arguments": arguments if isinstance(arguments, dict) else {}}}
        return call if self.id is None else {"id": self.id, **call}


class ChatMessage(_Body):
    """A message of the conversation (see the module's docstring)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    def template_form(self, index: int) -> dict[str, Any]:
        """The message as the chat template sees it, as vLLM hands it over: its text, the assistant's calls with
        their arguments as dicts (an empty list dropped), a tool result's ``tool_call_id``, the ``name``."""
        message: dict[str, Any] = {"role": self.role, "content": self.text(index)}
        if self.role == "assistant" and self.tool_calls:
            message["tool_calls"] = [call.template_form() for call in self.tool_calls]
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self, index: int) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported (got type {part.get('type')!r})",
                               param=f"messages.{index}.content", code="unsupported_content")
            texts.append(part["text"])
        return "".join(texts)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template receives them (``messages=`` of ``apply_chat_template``)."""
    return [m.template_form(i) for i, m in enumerate(messages)]
