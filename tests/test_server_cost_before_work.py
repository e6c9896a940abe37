"""A small body that asks for a lot is refused before the work it asks for is built, and a large body is parsed
off the event loop; requests that are large but allowed are served. Against the real server, with the official
`openai` client and httpx.

The server runs with --max-model-len 512 and the engine's default queue (EngineOptions.max_queue).
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import psutil
import pytest
from support.processes import ServerProcess

from ftserve.engine.options import EngineOptions
from ftserve.server.settings import ServerSettings

BASE = "base"
MAX_QUEUE = EngineOptions().max_queue
MAX_MODEL_LEN = 512
MAX_RESPONSE_LOGPROBS = ServerSettings().max_response_logprobs


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--max-model-len", str(MAX_MODEL_LEN)],
                         tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def engine_work(server) -> tuple[float, ...]:
    """What the engine has done so far: steps, prefilled tokens, finished requests, accepted requests."""
    return tuple(metric(server, name) for name in (
        "ftserve_engine_steps_total", "ftserve_engine_prefill_tokens_total", "ftserve_engine_finished_requests_total",
        "ftserve_generation_requests_total"))


def refusal(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_1000_prompts_with_n_64_are_refused_before_any_engine_request_is_built(server):
    rss = psutil.Process(server.proc.pid)
    before, work = rss.memory_info().rss, engine_work(server)
    error = refusal(lambda: server.client().completions.create(
        model=BASE, prompt=[f"prompt {i}" for i in range(1000)], n=64, max_tokens=16))
    assert error.status_code == 400
    assert error.body["param"] == "n" and error.body["code"] == "too_many_choices"
    assert "64000 choices" in error.message and f"max_queue={MAX_QUEUE}" in error.message
    assert engine_work(server) == work  # nothing reached the engine
    assert rss.memory_info().rss - before < 50 * 2 ** 20  # it built 64,000 requests (~800 MB) before


def test_a_fan_out_beyond_the_queue_counts_prompts_times_n(server):
    error = refusal(lambda: server.client().completions.create(model=BASE, prompt=[[1, 5]] * (MAX_QUEUE + 1),
                                                               max_tokens=1))
    assert error.status_code == 400 and error.body["param"] == "prompt"
    assert f"{MAX_QUEUE + 1} choices" in error.message
    error = refusal(lambda: server.client().completions.create(model=BASE, prompt=["a", "b", "c"] * 3, n=128,
                                                               max_tokens=1))
    assert error.status_code == 400 and error.body["param"] == "n" and "9 prompts x n=128" in error.message


def test_echo_with_20_logprobs_and_n_128_is_refused_before_the_response_is_built(server):
    prompt = [5 + i % 900 for i in range(450)]  # 128 x 450 positions x 21 > 2^20
    work = engine_work(server)
    error = refusal(lambda: server.client().completions.create(model=BASE, prompt=prompt, n=128, echo=True,
                                                               logprobs=20, max_tokens=0))
    assert error.status_code == 400 and error.body["param"] == "logprobs"
    assert error.body["code"] == "too_many_logprobs" and f"{MAX_RESPONSE_LOGPROBS:,}" in error.message
    assert engine_work(server) == work
    # The same with one alternative fits, and is served whole.
    answer = server.client().completions.create(model=BASE, prompt=prompt, n=2, echo=True, logprobs=1,
                                                max_tokens=0)
    assert [len(c.logprobs.tokens) for c in answer.choices] == [450, 450]


def test_chat_logprobs_for_n_128_whole_contexts_are_refused_naming_max_tokens(server):
    messages = [{"role": "user", "content": "the cat sees"}]
    error = refusal(lambda: server.client().chat.completions.create(
        model=BASE, messages=messages, n=128, logprobs=True, top_logprobs=20))
    assert error.status_code == 400 and error.body["param"] == "top_logprobs" and "max_tokens" in error.message
    answer = server.client().chat.completions.create(model=BASE, messages=messages, n=2, logprobs=True,
                                                     top_logprobs=20, max_tokens=4, temperature=0)
    assert [len(c.logprobs.content) for c in answer.choices] == [4, 4]


@pytest.mark.parametrize("field, value, words", [
    ("stop", ["a", "b", "c", "d", "e"], "at most 4 stop strings"),
    ("stop_token_ids", list(range(1025)), "at most 1024 items"),
    ("logit_bias", {str(i % 900): 1 for i in range(900)} | {f"0{i}": 1 for i in range(125)}, "at most 1024 items"),
])
def test_lists_that_every_choice_copies_are_bounded(server, field, value, words):
    error = refusal(lambda: server.client().completions.create(model=BASE, prompt="hi", max_tokens=1,
                                                               extra_body={field: value}))
    assert error.status_code == 400 and error.body["param"] == field and words in error.message


def test_each_prompt_is_checked_against_the_context_once_not_per_choice(server):
    error = refusal(lambda: server.client().completions.create(
        model=BASE, prompt=[[5, 6], [7] * (MAX_MODEL_LEN - 10)], n=100, max_tokens=20))
    assert error.status_code == 400 and error.body["code"] == "context_length_exceeded"
    assert "prompt 1 has 502" in error.message


def test_nesting_beyond_64_levels_is_refused_by_name_and_64_is_parsed(server):
    def body(depth: int) -> bytes:
        return json.dumps({"model": BASE, "prompt": "hi", "max_tokens": 1, "unused": "x"}).encode().replace(
            b'"x"', b"[" * (depth - 1) + b"]" * (depth - 1))

    response = httpx.post(server.url + "/v1/completions", content=body(65), timeout=60)
    assert response.status_code == 400 and "65 levels deep" in response.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/completions", content=body(64), timeout=60).status_code == 200


def test_health_answers_while_a_4_mib_body_of_token_ids_is_parsed(server):
    """A flat list of over a million token ids and an escaped surrogate pair (so every value of the body is
    walked in search of a lone surrogate), refused for the context once parsed: about a second of work.

    /health is probed all the while, and the probes answered between the end of the upload and the answer are
    counted, for this body and for one of the same size refused at its first byte (the upload alone). Parsed
    on the event loop, the first would hold every probe back, and count about as many as the second.
    """
    ids = json.dumps({"model": BASE, "prompt": [7] * 1_300_000, "max_tokens": 1, "user": "\U0001f600"}).encode()
    invalid = b"x" + ids[1:]
    events: list[str] = []  # appended by both threads: list.append is atomic
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                assert client.get(server.url + "/health").status_code == 200
                events.append("health")

    def probes_while_answering(raw: bytes, words: str) -> int:
        def body():
            yield raw
            events.append("sent")

        mark = len(events)
        response = httpx.post(server.url + "/v1/completions", content=body(), timeout=120,
                              headers={"Content-Length": str(len(raw))})
        events.append("answered")
        assert response.status_code == 400 and words in response.json()["error"]["message"]
        tail = events[mark:]
        return tail[tail.index("sent"):tail.index("answered")].count("health")

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        counts = []
        for _ in range(3):  # three tries: a loaded machine may starve the probes once
            counts.append((probes_while_answering(ids, "context"), probes_while_answering(invalid, "not valid JSON")))
            if counts[-1][0] > 3 * counts[-1][1] + 20:
                break
        else:
            raise AssertionError(f"/health was held back while the body was parsed: {counts} probes answered "
                                 f"(parsing, refused at once)")
    finally:
        stop.set()
        prober.join()


def test_a_large_fan_out_within_the_limits_is_served(server):
    answer = server.client().completions.create(model=BASE, prompt=[f"the cat {i}" for i in range(8)], n=4,
                                                max_tokens=3, temperature=0.8, seed=1)
    assert len(answer.choices) == 32 and sorted(c.index for c in answer.choices) == list(range(32))
    assert metric(server, "ftserve_requests_in_flight") == 0
