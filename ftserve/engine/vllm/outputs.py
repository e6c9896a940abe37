"""What crosses between ftserve and vLLM per request: our SamplingParams to vLLM's, vLLM's outputs to chunks.

Ours is the contract. vLLM gets token ids (the front end tokenized the prompt) and is built without a
tokenizer, so every piece of text, and every stop string, comes from the same streaming detokenizer as on the
torch engine (``TextStream``); vLLM gets the stop token ids the front end settled on (end of sequence unless
``ignore_eos``, and ``stop_token_ids``) and none of its own, so ``min_tokens`` holds them all back, as ours.

Log probabilities: vLLM reports, per token, a dict of the sampled token and the ``k`` most likely tokens, each
with its rank (1: most likely) and its raw log probability (before penalties, bias and temperature, as ours);
``TokenLogprobs.top`` keeps the ``k`` of rank at most ``k``, most likely first. Prompt log probabilities come
once, in the first output (DELTA), with None for the first token, as ours.
"""

from __future__ import annotations

from typing import Any

from ..base import SamplingParams, TokenLogprobs
from .constraints import vllm_params


def vllm_sampling_params(params: SamplingParams, stop_ids: frozenset[int]) -> Any:
    """vLLM's SamplingParams with our meanings, streaming deltas (RequestOutputKind.DELTA); the constraint as
    vLLM's StructuredOutputsParams (constraints.py)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1, max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
        top_p=params.top_p, top_k=params.top_k, seed=params.seed, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias) or None, logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
        stop_token_ids=sorted(stop_ids), ignore_eos=True, detokenize=False, skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=None if params.structured_outputs is None else vllm_params(params.structured_outputs))


def token_logprobs(token_id: int, entries: dict, k: int) -> TokenLogprobs:
    """One position's vLLM logprobs dict (token id -> Logprob) as ours."""
    chosen = entries[token_id]
    ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k))
    return TokenLogprobs(token_id=token_id, logprob=float(chosen.logprob), rank=int(chosen.rank or 1),
                         top=[(t, float(logprob)) for _, t, logprob in ranked[:k]])


def sample_logprobs(token_ids: list[int], logprobs, k: int) -> list[TokenLogprobs]:
    return [token_logprobs(t, entries, k) for t, entries in zip(token_ids, logprobs)]


def prompt_logprobs(prompt: list[int], logprobs, k: int) -> list[TokenLogprobs | None]:
    return [None if entries is None else token_logprobs(t, entries, k) for t, entries in zip(prompt, logprobs)]


def stat_logger_factory(counters: "EngineCounters"):
    """A vLLM per-engine stat logger (called on the front-end process at every engine step) that counts steps,
    prompt tokens prefilled, prefix-cache queries and hits (tokens, as vLLM counts them) and preemptions into
    ``counters``, and keeps the KV cache's last usage fraction."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepCounter(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.counters = counters

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if iteration_stats is not None:
                self.counters.steps += 1
                self.counters.prefill_tokens += int(iteration_stats.num_prompt_tokens)
                self.counters.preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0))
            if scheduler_stats is not None:
                self.counters.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:  # the increments of this update, as vLLM's own loggers sum them
                    self.counters.prefix_cache_queries += int(prefix.queries)
                    self.counters.prefix_cache_hits += int(prefix.hits)

        def log_engine_initialized(self) -> None:
            pass

    return StepCounter


class EngineCounters:
    """vLLM's counters and gauges for the engine's stats (EngineStats); the queue is the engine base's."""

    def __init__(self) -> None:
        self.running = 0  # producing output
        self.finished = 0
        self.generated = 0
        self.steps = 0
        self.prefill_tokens = 0
        self.preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.kv_cache_usage = 0.0  # fraction of vLLM's KV blocks in use at the last step
