"""Log probabilities, echo, penalties and logit_bias through `ftserve serve` and the official `openai` client.

The oracle is transformers run here on the same tiny Llama: log-softmax of its logits over the whole
sequence, and a plain re-implementation of greedy decoding with vLLM's penalties and bias. fp32 on CPU, so
log probabilities agree to 1e-4.
"""

from __future__ import annotations

from collections import Counter
from itertools import accumulate

import httpx
import pytest
import torch
from support.answer_models import MULTI_BYTE_ANSWER, save_multi_byte_model, streamed_chat_bytes
from support.processes import ServerProcess

BASE = "tiny-base"
PROMPT = "the cat sees"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog runs"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
ATOL = 1e-4


class Oracle:
    """transformers' view of the model the server serves."""

    def __init__(self, path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab): row j is the distribution of token j + 1."""
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)

    @torch.no_grad()
    def greedy(self, ids: list[int], steps: int, presence: float = 0.0, frequency: float = 0.0,
               repetition: float = 1.0, bias: dict[int, float] | None = None) -> list[int]:
        """Greedy tokens with vLLM's logit shaping: bias, then the repetition penalty over prompt and output,
        then presence and frequency penalties over the output."""
        out: list[int] = []
        for _ in range(steps):
            logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
            for token, value in (bias or {}).items():
                logits[token] += value
            for token in set(ids + out):
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            for token, count in Counter(out).items():
                logits[token] -= frequency * count + presence
            out.append(int(logits.argmax()))
        return out


def close(got, want) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               atol=ATOL, rtol=0)


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


@pytest.fixture(scope="module")
def booting(llama_dir, tmp_path_factory):
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--max-model-len", "256"],
                         tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def oracle(llama_dir, booting):
    return Oracle(llama_dir)


@pytest.fixture(scope="module")
def server(booting, oracle):
    return booting.wait_ready()


# Completions ----------------------------------------------------------------------------------------------

def test_completion_logprobs_are_the_models_own_with_top_k(server, oracle):
    ids = oracle.encode(PROMPT)
    generated = oracle.greedy(ids, 6)
    rows = oracle.logprobs(ids + generated)[len(ids) - 1:-1]
    response = server.client().completions.create(model=BASE, prompt=PROMPT, max_tokens=6, logprobs=5, **GREEDY)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [oracle.text(t) for t in generated]
    close(logprobs.token_logprobs, [rows[j, t] for j, t in enumerate(generated)])
    for j, (token, top) in enumerate(zip(generated, logprobs.top_logprobs)):
        values, order = rows[j].topk(5)
        # vLLM's dict: the chosen token, then the 5 most likely (the chosen one again: decoding is greedy);
        # tokens with the same text share one key, the later value winning
        want = {oracle.text(t): float(v) for t, v in [(token, rows[j, token]), *zip(order.tolist(), values)]}
        assert list(top) == list(want) and len(top) <= 5 and logprobs.tokens[j] in top
        close(list(top.values()), list(want.values()))
    assert logprobs.text_offset == list(accumulate([0] + [len(t) for t in logprobs.tokens[:-1]]))
    assert response.usage.completion_tokens == 6


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(server, oracle):
    ids = oracle.encode(PROMPT)
    rows = oracle.logprobs(ids)
    response = server.client().completions.create(model=BASE, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                                  temperature=0)
    choice = response.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs.tokens == [oracle.text(t) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    close(logprobs.token_logprobs[1:], [rows[j - 1, ids[j]] for j in range(1, len(ids))])
    for j, top in enumerate(logprobs.top_logprobs[1:], start=1):
        best = int(rows[j - 1].argmax())
        assert oracle.text(ids[j]) in top and oracle.text(best) in top and len(top) <= 2
        close(top[oracle.text(best)], rows[j - 1, best])
    assert logprobs.text_offset == list(accumulate([0] + [len(t) for t in logprobs.tokens[:-1]]))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 0)


def test_echo_of_several_prompts_and_choices_without_logprobs(server, oracle):
    prompts = [PROMPT, "the dog runs"]
    response = server.client().completions.create(model=BASE, prompt=prompts, n=2, max_tokens=0, echo=True)
    assert [c.text for c in response.choices] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert all(c.logprobs is None for c in response.choices)
    assert response.usage.prompt_tokens == sum(len(oracle.encode(p)) for p in prompts)
    assert response.usage.completion_tokens == 0


def test_lm_eval_loglikelihood_request_scores_the_continuation(server, oracle):
    """lm-evaluation-harness's `local-completions` body and its parse_logprobs, verbatim in spirit: token-id
    prompts, echo, logprobs=1, max_tokens=1, and the last (generated) token sliced off."""
    context = oracle.encode("the cat sees the")
    greedy = oracle.greedy(context, 3)
    other = [int(oracle.logprobs(context)[-1].argmin()), *greedy[1:]]
    prompts = [context + greedy, context + other]
    body = {"model": BASE, "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    for choice, ids in zip(choices, prompts):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + 1
        scored = logprobs["token_logprobs"][len(context):-1]
        is_greedy = all(lp == max(top.values()) for lp, top in zip(scored, logprobs["top_logprobs"][len(context):-1]))
        rows = oracle.logprobs(ids)
        close(sum(scored), sum(rows[j - 1, ids[j]] for j in range(len(context), len(ids))))
        want_greedy = all(int(rows[j - 1].argmax()) == ids[j] for j in range(len(context), len(ids)))
        assert is_greedy == want_greedy
        assert choice["text"].startswith(oracle.tokenizer.decode(ids))
    assert [c["index"] for c in choices] == [0, 1]
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_response(server, oracle, echo):
    client = server.client()
    kwargs = dict(model=BASE, prompt=PROMPT, max_tokens=8, logprobs=3, echo=echo, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, field)]
        assert streamed == getattr(whole.logprobs, field), field
    assert len(whole.logprobs.tokens) == 8 + (len(oracle.encode(PROMPT)) if echo else 0)
    assert whole.text.startswith(PROMPT) == echo


# Chat ---------------------------------------------------------------------------------------------------

def test_chat_logprobs_and_top_logprobs(server, oracle):
    ids = oracle.chat_ids(MESSAGES)
    generated = oracle.greedy(ids, 5)
    rows = oracle.logprobs(ids + generated)[len(ids) - 1:-1]
    client = server.client()
    kwargs = dict(model=BASE, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3, **GREEDY)
    response = client.chat.completions.create(**kwargs)
    content = response.choices[0].logprobs.content
    assert [e.token for e in content] == [oracle.text(t) for t in generated]
    close([e.logprob for e in content], [rows[j, t] for j, t in enumerate(generated)])
    for j, entry in enumerate(content):
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        values, order = rows[j].topk(3)
        assert [t.token for t in entry.top_logprobs] == [oracle.text(t) for t in order.tolist()]
        close([t.logprob for t in entry.top_logprobs], values)
        assert all(bytes(t.bytes).decode("utf-8", errors="replace") == t.token for t in entry.top_logprobs)

    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # The repeat finds its prompt's blocks in the prefix cache, so its floats agree to rounding, not bit for bit.
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content]
    close([e.logprob for e in streamed], [e.logprob for e in content])
    close([t.logprob for e in streamed for t in e.top_logprobs], [t.logprob for e in content for t in e.top_logprobs])

    bare = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=3, logprobs=True, **GREEDY)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], [], []]
    plain = client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=3, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_bytes_joined_over_a_stream_are_the_text_with_multi_token_characters(tmp_path):
    """Each token of the answer is one byte of a multi-byte character: its text alone is U+FFFD, and only its
    raw ``bytes`` let a client rebuild the answer (OpenAI's reason for the field)."""
    proc = ServerProcess([str(save_multi_byte_model(tmp_path / "multi_byte")), "--served-model-name", BASE],
                         tmp_path / "server.log").wait_ready()
    try:
        text, joined, tokens = streamed_chat_bytes(proc.client(), BASE)
    finally:
        proc.stop()
    # the answer ends with the end-of-sequence token, which has no text but is one of the tokens, as in vLLM
    assert text == MULTI_BYTE_ANSWER and joined == text.encode() + b"</s>" and tokens[-1] == "</s>"
    assert len(tokens) == len(text.encode()) + 1 and "\ufffd" in tokens


# Logit shaping ------------------------------------------------------------------------------------------

def test_logit_bias_forces_and_bans_tokens(server, oracle):
    ids = oracle.encode(PROMPT)
    last = oracle.logprobs(ids)[-1]
    forced = 8 + int(last[8:].argmin())  # the least likely ordinary token (0..7 are special)
    client = server.client()
    response = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, logprobs=0,
                                         logit_bias={str(forced): 100}, **GREEDY)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [oracle.text(forced)] * 4
    close(logprobs.token_logprobs[0], last[forced])  # the model's own, before the bias
    assert list(logprobs.top_logprobs[0]) == [oracle.text(forced)]

    banned = int(last.argmax())
    want = oracle.greedy(ids, 3, bias={banned: -100})
    assert want[0] != banned
    response = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=3, logprobs=0,
                                         logit_bias={str(banned): -100}, **GREEDY)
    assert response.choices[0].logprobs.tokens == [oracle.text(t) for t in want]


def test_min_tokens_holds_back_a_stop_token_through_the_client(server, oracle):
    """vLLM's ``min_tokens`` extra: the stop token that ends greedy output at its second token is banned until
    five tokens are out."""
    ids = oracle.encode(PROMPT)
    stop = oracle.greedy(ids, 2)[1]
    client = server.client()
    ended = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                      extra_body={"stop_token_ids": [stop]})
    held = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                     extra_body={"stop_token_ids": [stop], "min_tokens": 5})
    assert ended.usage.completion_tokens == 2 and ended.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens >= 5
    assert oracle.text(stop) not in held.choices[0].logprobs.tokens[:5]


@pytest.mark.parametrize("penalty, direction", [
    ({"frequency_penalty": 2.0}, -1),
    ({"presence_penalty": 0.1}, -1),
    ({"repetition_penalty": 1.06}, -1),
    # negative: repeating is rewarded, per occurrence or once, so the two outputs differ
    ({"frequency_penalty": -0.15}, +1),
    ({"presence_penalty": -0.15}, +1),
])
def test_penalties_change_greedy_output_as_vllm_does(server, oracle, penalty, direction):
    ids = oracle.encode(PROMPT)
    plain = oracle.greedy(ids, 12)
    want = oracle.greedy(ids, 12, presence=penalty.get("presence_penalty", 0.0),
                         frequency=penalty.get("frequency_penalty", 0.0),
                         repetition=penalty.get("repetition_penalty", 1.0))
    assert (repeats(want) > repeats(plain)) - (repeats(want) < repeats(plain)) == direction
    extra = {**GREEDY["extra_body"], **{k: v for k, v in penalty.items() if k == "repetition_penalty"}}
    openai_fields = {k: v for k, v in penalty.items() if k != "repetition_penalty"}
    response = server.client().completions.create(model=BASE, prompt=PROMPT, max_tokens=12, logprobs=0,
                                                  temperature=0, extra_body=extra, **openai_fields)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [oracle.text(t) for t in want]
    rows = oracle.logprobs(ids + want)[len(ids) - 1:-1]
    close(logprobs.token_logprobs, [rows[j, t] for j, t in enumerate(want)])  # before the penalties


# Refusals -----------------------------------------------------------------------------------------------

CHAT = {"model": BASE, "messages": MESSAGES}
COMPLETION = {"model": BASE, "prompt": PROMPT}


@pytest.mark.parametrize("route, body, param", [
    ("completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("completions", {**COMPLETION, "logprobs": -1}, "logprobs"),
    ("completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("completions", {**COMPLETION, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {**COMPLETION, "logit_bias": {"-3": 1}}, "logit_bias"),
    ("completions", {**COMPLETION, "logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {**COMPLETION, "frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {**COMPLETION, "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {**COMPLETION, "suffix": "x"}, "suffix"),
    ("chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {**CHAT, "logit_bias": {"5": -101}}, "logit_bias"),
    ("chat/completions", {**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
])
def test_out_of_range_fields_are_400_naming_the_field(server, route, body, param):
    response = httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_logit_bias_outside_the_vocabulary_is_400(server):
    response = httpx.post(server.url + "/v1/completions", json={**COMPLETION, "logit_bias": {"100000": 5}})
    assert response.status_code == 400 and "100000" in response.json()["error"]["message"]
