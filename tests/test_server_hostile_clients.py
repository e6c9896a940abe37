"""Hostile templates and hostile connections against the real server: each is bounded, answered clearly, and
starves no one else; SIGTERM still ends the process.

An adapter folder's chat template is code the server runs: one that loops forever or builds gigabytes used
to hold a rendering worker for good, until chat, the adapter API and shutdown all waited on it. A client that
opens connections and sends nothing, or half a request, used to hold them forever.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.processes import ServerProcess
from transformers import AutoTokenizer

from ftserve.server.templates import TemplateLimitError, render
from ftserve.testing import save_random_adapter

BASE = "base"
CONNECTIONS = 16  # the server's --max-connections
HEADER_TIMEOUT = 3  # and --header-timeout, --body-timeout (seconds)
LIMIT = 1024 * 1024  # --max-request-bytes

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FOREVER = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
HOSTILE = {
    "nested loops": FOREVER,
    "a huge string": "{{ 'x' * 10**10 }}",
    "a huge number": "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "a wide field": "{{ '{:>10000000000}'.format('x') }}{{ '%10000000000d' % 1 }}",
    "a wide method": "{{ 'x'.ljust(10000000000) }}",
    "a wide filter": "{{ 'x'|center(10000000000) }}",
    "join": "{% set s = 'x' * 999999 %}{{ s.join(s) }}",
    "replace": "{% set s = 'x' * 999999 %}{{ s.replace('', s) }}",
    "a long output": "{% for i in range(99999) %}{% for j in range(99999) %}xxxxxxxx{% endfor %}{% endfor %}",
    "a branching macro": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                         "{{ f(0) }}",
    "a recursive loop": "{% for i in range(99999) recursive %}{% if loop.depth < 4 %}{{ loop(range(99999)) }}"
                        "{% endif %}{% endfor %}",
}
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat {{ x }} <|end|>"},
                {"role": "assistant", "content": "sees"}, {"role": "user", "content": "and the dog?"}]


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.mark.parametrize("template", [None, LLAMA3, CHATML], ids=["tiny", "llama3", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_bounded_render_is_byte_identical_to_transformers(tokenizer, template, add_generation_prompt):
    if template is not None:
        tokenizer.chat_template = template
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render(tokenizer, CONVERSATION, add_generation_prompt, 60, LIMIT) == expected


@pytest.mark.parametrize("template", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_template_that_runs_forever_or_builds_gigabytes_is_stopped(tokenizer, template):
    tokenizer.chat_template = template
    with pytest.raises(TemplateLimitError):
        render(tokenizer, CONVERSATION, True, 1.0, LIMIT)


def save_adapter_with_template(llama_dir, path, template: str):
    save_random_adapter(llama_dir, "lora", path, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    save_adapter_with_template(llama_dir, root / "forever", FOREVER)
    save_random_adapter(llama_dir, "lora", root / "plain", seed=4)
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root, tmp_path_factory):
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--adapter", f"forever={root / 'forever'}",
                          "--enable-adapter-api", "--adapter-root", str(root), "--max-model-len", "256",
                          "--chat-template-timeout", "1", "--header-timeout", str(HEADER_TIMEOUT),
                          "--body-timeout", str(HEADER_TIMEOUT), "--max-connections", str(CONNECTIONS),
                          "--max-request-bytes", str(LIMIT)], tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def chat(server, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4})


def test_a_template_that_loops_forever_is_400_and_the_next_request_is_answered(server):
    response = chat(server, "forever")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "chat_template_limit"
    assert "--chat-template-timeout" in response.json()["error"]["message"]
    assert chat(server, BASE).status_code == 200


def test_more_stuck_renders_than_workers_starve_neither_health_nor_the_adapter_api(server):
    hostile = 12  # three times the render workers
    with ThreadPoolExecutor(hostile) as pool:
        answers = [pool.submit(chat, server, "forever") for _ in range(hostile)]
        health = httpx.get(server.url + "/health", timeout=60)
        loaded = httpx.post(server.url + "/v1/load_lora_adapter", timeout=60,
                            json={"lora_name": "plain", "lora_path": "plain"})
        completion = httpx.post(server.url + "/v1/completions", timeout=60,
                                json={"model": "plain", "prompt": "the cat", "max_tokens": 2})
        statuses = sorted(answer.result().status_code for answer in answers)
    assert health.status_code == 200, health.text
    assert loaded.status_code == 200, loaded.text
    assert completion.status_code == 200, completion.text
    assert set(statuses) <= {400, 429}, statuses  # stopped, or refused a worker: never left waiting
    assert httpx.get(server.url + "/health").status_code == 200
    assert chat(server, BASE).status_code == 200


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket timeout is only a safety net)."""
    sock.settimeout(120)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer (headers and the Content-Length they declare), the connection left open."""
    sock.settimeout(120)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_an_idle_connection_is_closed_after_the_header_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        assert read_all(idle) == b""


HALF_SENT = {
    "inside its headers": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty", b"--header-timeout"),
    "inside its body": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"model\": ", b"--body-timeout"),
}


@pytest.mark.parametrize("sent, flag", list(HALF_SENT.values()), ids=list(HALF_SENT))
def test_a_request_that_stops_half_sent_gets_408_and_is_closed(server, sent, flag):
    with socket.create_connection(("127.0.0.1", server.port)) as half:
        half.sendall(sent)
        answer = read_all(half)
    assert answer.startswith(b"HTTP/1.1 408") and flag in answer


def test_a_declared_content_length_over_the_limit_is_413_before_the_body_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        answer = read_answer(sock)  # while the body has not started
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_connections_beyond_the_bound_are_refused_with_503(server):
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"--max-connections" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 120  # the server sees the held ones close, then serves again
    while httpx.get(server.url + "/health", timeout=60).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_sigterm_exits_0_after_all_of_the_above(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0


def test_sigterm_ends_the_server_within_its_shutdown_timeout_while_a_render_is_stuck(llama_dir, root, tmp_path):
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--adapter", f"forever={root / 'forever'}",
                          "--chat-template-timeout", "3600", "--shutdown-timeout", "1"],
                         tmp_path / "server.log").wait_ready()
    try:
        answers = []
        stuck = threading.Thread(target=lambda: answers.append(chat_or_error(proc)), daemon=True)
        stuck.start()
        deadline = time.monotonic() + 120
        while "ftserve_prompt_renders_running 1.0" not in httpx.get(proc.url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()


def chat_or_error(server) -> int | str:
    try:
        return chat(server, "forever").status_code
    except httpx.TransportError as exc:
        return type(exc).__name__

