"""Chat templates rendered within bounds of time and size: an adapter's template is code the server runs.

transformers renders a chat template in jinja2's immutable sandbox, which keeps a template from reaching
files, private attributes or mutating its inputs, but not from working forever or building gigabytes
(``{% for i in range(99999) %}{% for j in range(99999) %}``, ``{{ 'x' * 10**10 }}``, a macro that calls itself
twice). ``BoundedEnvironment`` is that sandbox, configured from the environment transformers builds (its
filters, globals and extensions, so a template renders byte for byte as ``apply_chat_template`` renders it),
plus a budget per render:

- time: every loop step, call, filter and output chunk checks a deadline. A loop that calls nothing still
  steps: the compiled ``for`` reads its items through ``BoundedEnvironment.iterate``;
- size: an operation that would build a value larger than the budget's limit is refused before it runs
  (``*`` and ``**``, widths in ``ljust``/``center``/``format``/``%``, ``join`` and ``replace``, the ``indent``,
  ``center``, ``batch`` and ``slice`` filters); any other call, filter, ``+`` or ``~`` is checked on its result,
  which is at most a few values of the limit; the output is counted as it is generated.

A render over a bound raises ``TemplateLimitError``, which the server answers 400. The checks run in the
rendering thread: what one C call does between two checks (a bounded value, by the rules above) is the only
work that escapes them.
"""

from __future__ import annotations

import functools
import re
import string
import threading
import time
from typing import Any, Callable

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ServingError

INT_BITS = 1 << 20  # the largest integer a template may build, in bits (a million: about 300,000 digits)
JSON_INDENT = 64  # the widest indent ``tojson`` may use, in characters


class TemplateLimitError(ServingError):
    """A chat template ran past its time or size budget."""

    http_status = 400


class Budget:
    """One render's allowance: a deadline (monotonic seconds) and the largest value or output, in items."""

    def __init__(self, seconds: float, limit: int) -> None:
        self.seconds, self.limit = seconds, limit
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the chat template ran for more than {self.seconds:g} s "
                                     f"(--chat-template-timeout) and was stopped")

    def allow(self, size: int, what: str) -> None:
        if size > self.limit:
            raise TemplateLimitError(f"the chat template would build {what} of {size:,} items, over the limit of "
                                     f"{self.limit:,} (twice --max-request-bytes, plus 1 MiB)")


_active = threading.local()


def budget() -> Budget:
    """The budget of the render running on this thread; outside a render (jinja folds constants while it
    compiles), an expired one, so that folding anything checked is left to run time."""
    return getattr(_active, "budget", None) or Budget(-1.0, 0)


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _checked(value: Any) -> Any:
    budget().allow(_length(value), f"a {type(value).__name__}")
    return value


def _allow_bits(bits: int) -> None:
    if bits > INT_BITS:
        raise TemplateLimitError(f"the chat template would build an integer of about {bits:,} bits, over the "
                                 f"limit of {INT_BITS:,}")


def _widths(spec: str) -> list[int]:
    return [int(digits) for digits in re.findall(r"\d+", spec)]


def _check_widths(specs: list[str], args: tuple, kwargs: dict) -> None:
    """Format specs (``{:>N}``, ``%Nd``) may not ask for a width over the limit; one that takes its width from
    an argument (``{:{w}}``, ``%*d``) may not be given a number over it."""
    numbers = [w for spec in specs for w in _widths(spec)]
    if any("{" in spec or "*" in spec for spec in specs):
        numbers += [v for v in (*args, *kwargs.values()) if isinstance(v, int)]
    budget().allow(max(numbers, default=0), "a formatted field")


def _printf_specs(text: str) -> list[str]:
    return re.findall(r"%[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?", text)


def _format_specs(text: str) -> list[str]:
    return [spec for _, name, spec, _ in string.Formatter().parse(text) if name is not None and spec]


def _lines(text: str) -> int:
    return text.count("\n") + 1


# Size of the result, estimated before the call, of the str methods and filters that can make it much larger
# than their inputs. Each takes the call's arguments, the object (str method) or value (filter) first.
def _width(value, width=0, *args, **kwargs) -> int:
    return max(_length(value), width if isinstance(width, int) else 0)


def _join(sep, items=(), *args, **kwargs) -> int:
    return _length(sep) * _length(items)


def _replace(text, old="", new="", *args, **kwargs) -> int:
    if not all(isinstance(v, str) for v in (text, old, new)):
        return 0
    return len(text) + text.count(old) * len(new)


def _expandtabs(text, tabsize=8, *args, **kwargs) -> int:
    return len(text) + text.count("\t") * tabsize if isinstance(tabsize, int) else 0


def _indent(text, width=4, *args, **kwargs) -> int:
    unit = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    return _length(text) + (_lines(text) if isinstance(text, str) else 1) * unit


def _count(value, count=0, *args, **kwargs) -> int:
    return count if isinstance(count, int) else 0


METHOD_SIZES: dict[str, Callable[..., int]] = {
    "ljust": _width, "rjust": _width, "center": _width, "zfill": _width, "expandtabs": _expandtabs,
    "join": _join, "replace": _replace,
}
FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": _width, "indent": _indent, "replace": _replace, "join": lambda items, d="", *a, **k: _join(d, items),
    "batch": _count, "slice": _count,
}


def _bounded_filter(name: str, func: Callable) -> Callable:
    size = FILTER_SIZES.get(name)

    @functools.wraps(func)  # keeps jinja's pass_context / pass_eval_context marks
    def bounded(*args, **kwargs):
        current = budget()
        current.tick()
        first = 0 if getattr(func, "jinja_pass_arg", None) is None else 1  # after the context jinja passes
        value, rest = args[first], args[first + 1:]
        if size is not None:
            current.allow(size(value, *rest, **kwargs), f"the output of `{name}`")
        if name == "format" and isinstance(value, str):
            _check_widths(_printf_specs(value), rest, kwargs)
        if name == "tojson":
            indent = kwargs.get("indent", rest[1] if len(rest) > 1 else None)
            if _length(indent) > JSON_INDENT or isinstance(indent, int) and indent > JSON_INDENT:
                raise TemplateLimitError(f"`tojson` indents at most {JSON_INDENT} characters; got {indent!r:.40}")
        return _checked(func(*args, **kwargs))

    return bounded


class _SteppingCodeGenerator(CodeGenerator):
    """Compiles ``{% for x in items %}`` as a loop over ``environment.iterate(items)``."""

    def visit_For(self, node: nodes.For, frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("iterate"), [node.iter], [], None, None)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.concat(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox that checks the current ``Budget`` (see the module's docstring)."""

    code_generator_class = _SteppingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def iterate(self, items):
        current = budget()
        for item in items:
            current.tick()
            yield item

    def concat(self, text):
        return _checked(text)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        current = budget()
        current.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") in METHOD_SIZES:
            current.allow(METHOD_SIZES[__obj.__name__](owner, *args, **kwargs), f"the result of `{__obj.__name__}`")
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level steps as the first did
            args = (__self.iterate(args[0]), *args[1:])
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        specs = _format_specs(value.__self__)

        @functools.wraps(sandboxed)
        def bounded(*args, **kwargs):
            named = args[0] if value.__name__ == "format_map" and args and isinstance(args[0], dict) else kwargs
            _check_widths(specs, args, named)
            return sandboxed(*args, **kwargs)

        return bounded

    def call_binop(self, context, operator: str, left, right):
        current = budget()
        current.tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints:
                _allow_bits(left.bit_length() + right.bit_length())
            elif isinstance(right, int) and _length(left) or isinstance(left, int) and _length(right):
                current.allow(_length(left) * right if isinstance(right, int) else _length(right) * left,
                              f"a repeated {type(left if _length(left) else right).__name__}")
        elif operator == "**" and ints and right > 0 and abs(left) > 1:
            _allow_bits(left.bit_length() * right)
        elif operator == "+":
            current.allow(_length(left) + _length(right), f"a {type(left).__name__}")
        elif operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            _check_widths(_printf_specs(left), values, right if isinstance(right, dict) else {})
        return _checked(super().call_binop(context, operator, left, right))


@functools.cache
def environment() -> BoundedEnvironment:
    """Ours, set up as transformers sets up its own (read from the one it builds, so that a new transformers'
    filters and globals come along; the test of identical output guards the rest)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    reference = _compile_jinja_template("").environment
    env = BoundedEnvironment(trim_blocks=reference.trim_blocks, lstrip_blocks=reference.lstrip_blocks,
                             keep_trailing_newline=reference.keep_trailing_newline,
                             extensions=[type(extension) for extension in reference.extensions.values()])
    env.globals.update(reference.globals)
    env.filters.update({name: _bounded_filter(name, func) for name, func in reference.filters.items()})
    return env


@functools.lru_cache(maxsize=64)
def _compiled(source: str):
    return environment().from_string(source)


def render(tokenizer, conversation: list[dict], add_generation_prompt: bool, seconds: float, limit: int,
           tools: list[dict] | None = None) -> str:
    """``tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=...)``,
    within ``seconds`` and with no value or output over ``limit`` items; TemplateLimitError past either. The tools
    reach the template as they are, as vLLM passes them: a template that does not use them ignores them."""
    _active.budget = current = Budget(seconds, limit)
    try:
        template = _compiled(tokenizer.get_chat_template())
        chunks, size = [], 0
        for chunk in template.generate(messages=conversation, tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map):
            size += len(chunk)
            current.allow(size, "a prompt")
            current.tick()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _active.budget = None
