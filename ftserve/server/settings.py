"""ServerSettings: what the HTTP server needs besides the engine, each flag of it declared once.

Kept apart from the app (no FastAPI here), so ``ftserve serve --help`` reads these declarations without
importing the server's libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.declare import setting
from ..engine.options import EngineOptionsError
from .tool_parsers import TOOL_CALL_PARSERS

MIB = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"  # loopback: reachable from this machine only, unless told otherwise
DEFAULT_PORT = 8000
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"


@dataclass
class ServerSettings:
    """The fields declared with ``setting`` are ``ftserve serve``'s flags (their help says what each does);
    the others are filled by whoever starts the server: ``served_model_name`` (the base's name in requests) and
    ``model_path`` (its folder, /v1/models' ``root``), which the CLI takes from BASE."""

    served_model_name: str = "base"
    model_path: str = ""
    base_aliases: tuple[str, ...] = ()  # other names of the base in requests (its path), never listed
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on every /v1 route
    enable_adapter_api: bool = setting(
        False, "Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root).")
    adapter_root: Path | None = setting(
        None, "The only folder the adapter API, and adapter resolution, may load from.")
    enable_adapter_resolution: bool = setting(
        False, "A request whose `model` names a folder under --adapter-root that is not loaded loads it first, "
               "checked as the adapter API checks it.")
    max_request_bytes: int = setting(4 * MIB, "Larger request bodies are answered 413.", minimum=1024)
    max_concurrent_requests: int = setting(
        256, "Completion and chat requests served at once; more are answered 429 with Retry-After.", minimum=1)
    chat_template_timeout: float = setting(
        5.0, "Seconds a chat template may render (longer: 400), and a render may wait for a free worker "
             "(longer: 429).", minimum=0, open_minimum=True)
    render_workers: int = 4  # threads rendering chat templates and tokenizing at once (workers.py)
    header_timeout: float = setting(
        10.0, "Seconds a client has to send a request line and headers; then the connection is closed.",
        minimum=0, open_minimum=True)
    body_timeout: float = setting(
        30.0, "Seconds a request body may pause between two parts; then 408 and the connection is closed.",
        minimum=0, open_minimum=True)
    max_connections: int = setting(1000, "Open HTTP connections; a new one beyond them is answered 503 and closed.",
                                   minimum=1)
    max_response_logprobs: int = 2 ** 20  # log probabilities one response may hold, alternatives included (cost.py)
    enable_auto_tool_choice: bool = setting(
        False, "Let chat requests use tool_choice \"auto\" (the default when they send tools): the model answers "
               "freely and --tool-call-parser reads tool calls out of its text.")
    tool_call_parser: str | None = setting(
        None, "How tool calls are written in the model's text, for tool_choice \"auto\": hermes "
              "(<tool_call>{...}</tool_call>, Qwen and Hermes models) or llama3_json (Llama 3.x).",
        choices=TOOL_CALL_PARSERS)

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise EngineOptionsError("enable_auto_tool_choice", "needs tool_call_parser: the parser that reads tool "
                                                                "calls out of the model's text")

    @property
    def max_template_chars(self) -> int:
        """The longest prompt (and value) a chat template may build: the messages fit in a request body, and a
        template may repeat them once, around its own text."""
        return 2 * self.max_request_bytes + MIB
