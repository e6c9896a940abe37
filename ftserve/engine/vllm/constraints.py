"""Structured outputs on vLLM: our ``StructuredOutputs`` as vLLM's ``StructuredOutputsParams``, checked first.

vLLM runs the constraint itself: its engine is built with the ``guidance`` backend (llguidance, the library the
torch engine uses) and compact JSON unless ``structured_outputs_any_whitespace`` (``config``), and compiles each
request's grammar on a thread of its engine core. What it does with a bad or huge constraint is not what the
contract asks, so every constraint is checked here first, off the event loop (``check``):

* vLLM's front end validates a constraint on the event loop when the request is added (its
  ``SamplingParams.verify``: llguidance's ``validate_grammar``, unbounded), and its core then compiles it for
  the tokenizer, unbounded too; both grow faster than the schema (seconds for thousands of properties). Here
  the grammar vLLM would compile (its own ``serialize_guidance_grammar``) is validated first under llguidance's
  limits, at most MAX_GRAMMAR_SYMBOLS symbols, which keeps vLLM's event-loop validation and its compile of
  whatever passes short; vLLM's own checks then run here too. So whatever vLLM would refuse is refused before
  it is queued, as a RequestError naming the field (``structured_outputs.json ...``), within CHECK_TIMEOUT_S;
* a grammar vLLM's core fails to compile, or cannot follow (a recursive schema whose Earley items pass
  llguidance's limit at some token), ends the request with finish reason ``error`` and vLLM logs why; the
  engine raises it out of the stream as a RequestError naming the field (``grammar_failed``).
"""

from __future__ import annotations

from typing import Any

from ..base import StructuredOutputs
from ..errors import RequestError

MAX_GRAMMAR_SYMBOLS = 20_000  # llguidance's grammar size (symbols in productions): ~2,500 flat JSON properties
CHECK_TIMEOUT_S = 10.0  # a check that takes longer is refused (a backstop: MAX_GRAMMAR_SYMBOLS bounds it)


def config(any_whitespace: bool) -> Any:
    """vLLM's structured-outputs config: the guidance backend, JSON compact unless ``any_whitespace``."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="guidance", disable_any_whitespace=not any_whitespace)


def kind(spec: StructuredOutputs) -> str:
    """The one field of ``spec`` that is set (STRUCTURED_KINDS), or a RequestError."""
    try:
        return spec.kind()
    except ValueError as exc:
        raise RequestError(f"structured_outputs: {exc}") from None


def field(spec: StructuredOutputs) -> str:
    """The request field a constraint came in, as messages name it: ``structured_outputs.json``."""
    return f"structured_outputs.{kind(spec)}"


def vllm_params(spec: StructuredOutputs) -> Any:
    """vLLM's StructuredOutputsParams for ``spec`` (its field names are ours, STRUCTURED_KINDS)."""
    from vllm.sampling_params import StructuredOutputsParams

    name = kind(spec)
    value = getattr(spec, name)
    return StructuredOutputsParams(**{name: list(value) if name == "choice" else value})


def check(spec: StructuredOutputs, sampling: Any, llm: Any) -> None:
    """Refuse ``spec`` (in ``sampling``, vLLM's SamplingParams for ``llm``, an AsyncLLM) unless vLLM compiles
    it within MAX_GRAMMAR_SYMBOLS: a RequestError naming the field and saying why, in llguidance's or vLLM's
    words. Blocking: run it on a thread."""
    import llguidance
    from vllm.exceptions import VLLMClientError
    from vllm.v1.structured_output.backend_guidance import serialize_guidance_grammar
    from vllm.v1.structured_output.request import get_structured_output_key

    name = field(spec)
    config = llm.vllm_config.structured_outputs_config
    try:
        key = get_structured_output_key(sampling.structured_outputs)
        grammar = serialize_guidance_grammar(*key, config.disable_any_whitespace)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise RequestError(f"{name} is invalid: {exc}") from None
    limits = llguidance.LLParserLimits(max_grammar_size=MAX_GRAMMAR_SYMBOLS)
    error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=limits)
    if "grammar size" in error:
        raise RequestError(f"{name} is too large: its grammar has more than {MAX_GRAMMAR_SYMBOLS} symbols "
                           f"(about {MAX_GRAMMAR_SYMBOLS // 8} JSON properties); split the request or simplify it")
    if error:
        raise RequestError(f"{name} does not compile: {error.strip()}")
    try:
        sampling.verify(llm.model_config, None, config, llm.input_processor.tokenizer)
    except (ValueError, VLLMClientError) as exc:
        raise RequestError(f"{name} is refused by vLLM: {exc}") from None


def grammar_failed(spec: StructuredOutputs, tokens: int) -> RequestError:
    """The error of a constrained request vLLM's core ended with finish reason ``error``: its grammar did not
    compile there, or could not follow the output (llguidance's parser limits), as vLLM's engine log says."""
    return RequestError(f"{field(spec)} failed in vLLM's engine after {tokens} tokens: it did not compile there, or "
                        f"is too complex to follow (vLLM's engine log says which); simplify the constraint")
