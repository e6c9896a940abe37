"""Hostile and careless requests against the real server: each is answered, with a 4xx naming the problem, and
harms no other request. One test per failure found by probing the server; the name says the failure.

One server for the module, with a concurrency limit of 4 so that a request left hanging would show as 429s,
and the adapter API on, for path inputs. The last test sends SIGTERM: the process must exit 0.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import openai
import pytest
import torch
from support.processes import ServerProcess

from ftserve.engine.base import SamplingParams
from ftserve.engine.torch.sampling import sample
from ftserve.testing import save_random_adapter

BASE = "base"
LIMIT = 4
VOCAB = 1000  # ftserve.testing's
GREEDY = {"temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    save_random_adapter(llama_dir, "lora", root / "lora", seed=3)
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root, tmp_path_factory):
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--adapter", f"lora={root / 'lora'}",
                          "--max-concurrent-requests", str(LIMIT), "--enable-adapter-api", "--adapter-root",
                          str(root), "--max-model-len", "512"], tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def post(server, route: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + route, content=content, headers={"Content-Type": "application/json"},
                      timeout=60, **kwargs)


def assert_400(response: httpx.Response, *words: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"] or word == error["param"], error
    return error


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def settle(server) -> None:
    """Wait until the server has no request in flight and the engine nothing running or queued."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (metric(server, "ftserve_requests_in_flight") == 0 and metric(server, "ftserve_engine_running_requests")
                == 0 and metric(server, "ftserve_engine_queued_requests") == 0):
            return
        time.sleep(0.05)
    raise AssertionError("requests still in flight after 120 s")


def test_a_fan_out_with_one_refused_prompt_is_answered_400_and_holds_no_slot(server):
    hostile = [
        ({"model": BASE, "prompt": "", "n": 2}, "prompt is empty"),
        ({"model": BASE, "prompt": [[5, 6, 7], [5, 10 ** 9]], "max_tokens": 2}, "outside this model's vocabulary"),
        ({"model": BASE, "prompt": ["the cat", ""], "n": 3, "stream": True}, "prompt is empty"),
        ({"model": "lora", "prompt": [[5, 6], [-1]], "n": 2}, "outside this model's vocabulary"),
        ({"model": BASE, "prompt": [[5, 6], [7]], "max_tokens": 600}, "context"),
    ]
    for _ in range(2):  # twice the concurrency limit: a slot held by any of them would turn the rest into 429s
        for body, words in hostile:
            assert_400(post(server, "/v1/completions", body), words)
    assert_400(post(server, "/v1/chat/completions", {"model": BASE, "n": 2, "messages": [
        {"role": "user", "content": "hi"}], "logit_bias": {str(VOCAB + 5): 1}}), "outside this model's vocabulary")
    assert metric(server, "ftserve_requests_in_flight") == 0
    answer = server.client().completions.create(model=BASE, prompt=["the cat", "a dog"], n=2, max_tokens=3)
    assert len(answer.choices) == 4


def solo(server, model: str = BASE) -> str:
    return server.client().completions.create(model=model, prompt="the cat sees", **GREEDY).choices[0].text


def test_a_tiny_temperature_or_repetition_penalty_fails_nobody_else(server):
    expected = {model: solo(server, model=model) for model in (BASE, "lora")}
    results: dict[str, str] = {}

    def normal(model: str) -> None:
        stream = server.client().completions.create(model=model, prompt="the cat sees", stream=True, **GREEDY)
        results[model] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    threads = [threading.Thread(target=normal, args=(model,)) for model in expected]
    for thread in threads:
        thread.start()
    client = server.client()
    for _ in range(3):  # while the two streams decode
        tiny = client.completions.create(model=BASE, prompt="the cat sees", temperature=1e-45, max_tokens=4)
        assert tiny.choices[0].finish_reason == "length"  # sampled at vLLM's floor of 0.01, not NaN
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=BASE, prompt="the cat", max_tokens=4,
                                      extra_body={"repetition_penalty": 1e-300})
        assert info.value.body["param"] == "repetition_penalty"
    for thread in threads:
        thread.join(120)
    assert results == expected


def test_a_row_whose_shaped_scores_overflow_fails_alone():
    """float16 logits near their top plus a bias overflow to +inf on row 0 only: row 1 still gets its token."""
    logits = torch.zeros(2, 8, dtype=torch.float16)
    logits[0, 3] = 65_500.0
    logits[1, 5] = 10.0
    params = [SamplingParams(temperature=0, logit_bias={3: 100.0}), SamplingParams(temperature=0.7, seed=1)]
    generators = [None, torch.Generator().manual_seed(1)]
    tokens, logprobs, failures = sample(logits, params, generators, [([1], [], frozenset())] * 2)
    assert tokens == [None, 5] and failures[1] is None
    assert "NaN or infinite" in failures[0]


@pytest.mark.parametrize("name, body, words", [
    ("an integer too long to convert", b'{"model": "base", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
     ["max_tokens", "digits"]),
    ("nesting deeper than the parser goes", b'{"model": "base", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     ["nested", "at most 64"]),
    ("a NaN literal", b'{"model": "base", "prompt": "x", "temperature": NaN}', ["temperature", "NaN"]),
    ("a lone surrogate in a prompt", b'{"model": "base", "prompt": "the \\ud800 cat"}', ["prompt", "surrogate"]),
    ("a lone surrogate in a chat message",
     b'{"model": "base", "messages": [{"role": "user", "content": "hi \\udfff"}]}', ["messages.0.content"]),
    ("a seed beyond 64 bits", {"model": "base", "prompt": "x", "seed": 2 ** 64}, ["seed"]),
    ("a seed below -2^63", {"model": "base", "prompt": "x", "seed": -2 ** 63 - 1}, ["seed"]),
    ("echo of token ids far outside the vocabulary", {"model": "base", "prompt": [5, 10 ** 30], "echo": True,
                                                      "max_tokens": 0}, ["outside this model's vocabulary"]),
    ("echo of a negative token id", {"model": "base", "prompt": [[5, 6], [-7]], "echo": True, "logprobs": 1},
     ["outside this model's vocabulary"]),
    ("a huge max_tokens", {"model": "base", "prompt": "x", "max_tokens": 10 ** 40}, ["context"]),
    ("stop_token_ids outside the vocabulary, banned by min_tokens",
     {"model": "base", "prompt": "x", "min_tokens": 1, "stop_token_ids": [5, -324009, 10 ** 15]},
     ["stop_token_ids", "outside this model's vocabulary"]),
    ("a boolean for a token id", {"model": "base", "prompt": [[5, False]]}, ["prompt"]),
    ("a number for a boolean", {"model": "base", "prompt": "x", "echo": 0}, ["echo"]),
    ("a huge top_k", {"model": "base", "prompt": "x", "top_k": 10 ** 40, "max_tokens": 1}, []),
    ("a long logit_bias key", {"model": "base", "prompt": "x", "logit_bias": {"9" * 18: 1}},
     ["outside this model's vocabulary"]),
    ("a logit_bias key too long to convert", {"model": "base", "prompt": "x", "logit_bias": {"9" * 5000: 1}},
     ["logit_bias", "outside every vocabulary"]),
])
def test_malformed_values_are_400_not_500(server, name, body, words):
    response = post(server, "/v1/chat/completions" if b"messages" in (body if isinstance(body, bytes) else b"")
                    else "/v1/completions", body)
    if name == "a huge top_k":  # top_k larger than the vocabulary keeps every token, as vLLM
        assert response.status_code == 200, response.text
        return
    assert_400(response, *words)


def test_path_components_too_long_for_the_file_system_are_400(server):
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "long", "lora_path": "a" * 300 + "/x"})
    assert_400(response, "File name too long")
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "long", "lora_path": "a" * 300})
    assert_400(response, "File name too long")


def raw_exchange(url: str, requests: list[bytes]) -> list[bytes]:
    """Send each request on one keep-alive connection and read its whole answer (Content-Length framed)."""
    host, port = url.removeprefix("http://").split(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        reader = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                byte = reader.read(1)
                assert byte, f"connection closed after {head!r}"
                head += byte
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            answers.append(head + reader.read(length))
    return answers


def http_post(route: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


FAULTY_SERVER = textwrap.dedent("""
    import asyncio, logging, sys
    from ftserve.engine.torch import TorchEngine
    from ftserve.server.run import serve
    from ftserve.server.serving import ServerSettings

    class FaultyEngine(TorchEngine):
        '''The real engine with one fault injected: the prompt "boom" raises an error no handler expects.'''

        def generate(self, request):
            if request.prompt in ("boom", self.prompt_ids("boom")):  # the server hands the engine ids
                raise RuntimeError("injected fault")
            return super().generate(request)

    logging.basicConfig(level="INFO")
    engine = FaultyEngine.from_pretrained(sys.argv[1], model_name="base")
    asyncio.run(serve(engine, ServerSettings("base", sys.argv[1]), port=int(sys.argv[2]), log_level="warning"))
""")


def test_a_500_is_counted_logged_once_and_leaves_the_connection_usable(llama_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", FAULTY_SERVER, str(llama_dir), str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.2)
        boom, fine = raw_exchange(url, [http_post("/v1/completions", {"model": "base", "prompt": "boom"}),
                                        http_post("/v1/completions", {"model": "base", "prompt": "the cat",
                                                                      "max_tokens": 2})])
        assert boom.startswith(b"HTTP/1.1 500") and b'"code":"internal_error"' in boom.replace(b" ", b"")
        assert fine.startswith(b"HTTP/1.1 200") and b'"completion_tokens":2' in fine.replace(b" ", b"")
        metrics = httpx.get(url + "/metrics").text
        assert 'ftserve_http_requests_total{route="/v1/completions",status="500"} 1' in metrics
        assert 'ftserve_request_errors_total{route="/v1/completions",status="500"} 1' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    text = log.read_text()
    assert text.count("Traceback") == 1 and "injected fault" in text


def test_a_non_streaming_request_is_cancelled_when_its_client_disconnects(server):
    settle(server)
    before = metric(server, "ftserve_engine_generated_tokens_total")
    # 512 choices of 400 tokens: far more work than the server can do before it sees the client leave.
    body = {"model": BASE, "prompt": [[5, 6, 7]] * 4, "n": 128, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(http_post("/v1/completions", body))
    deadline = time.monotonic() + 60
    while metric(server, "ftserve_engine_generated_tokens_total") == before:  # it is running
        assert time.monotonic() < deadline
        time.sleep(0.02)
    sock.close()
    settle(server)
    assert metric(server, "ftserve_engine_generated_tokens_total") - before < 512 * 400
    assert 'status="499"' in httpx.get(server.url + "/metrics").text  # counted as the client's leaving
    assert solo(server) == solo(server)


def test_openapi_json_describes_the_request_models_the_server_validates_with(server):
    from ftserve.server.protocol import CompletionRequest

    document = httpx.get(server.url + "/openapi.json").json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    schema = document["components"]["schemas"]["CompletionRequest"]
    assert schema == CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}") | {
        "$defs": schema.get("$defs")} if "$defs" in schema else schema
    seed = next(s for s in schema["properties"]["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-2 ** 63, 2 ** 63 - 1)
    errors = document["paths"]["/v1/chat/completions"]["post"]["responses"]["default"]
    assert errors["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_sigterm_exits_0_after_all_of_the_above(server):
    """Last in this module: nothing above left a request hanging, so the server drains and exits."""
    settle(server)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
