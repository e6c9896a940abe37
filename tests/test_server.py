"""`ftserve serve` end to end: the real server on 127.0.0.1, the official `openai` client, the real TorchEngine.

One server process for the whole module (it takes ~15 s to come up). Expected texts come from the same
engine called directly, in this process, with the same greedy requests.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from ftserve.engine.base import GenerationRequest, SamplingParams
from ftserve.testing import save_random_adapter

from support.cases import METHODS
from support.processes import ServerProcess

ADAPTERS = METHODS  # one adapter per registered method, served under the method's name
BASE = "tiny-base"
PROMPT = "the cat sees"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog runs"}]
ALT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory) -> Path:
    """--adapter-root: one adapter per method, two spares for the load/unload API, one with its own template."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, method in enumerate(ADAPTERS):
        save_random_adapter(llama_dir, method, root / method, seed)
    save_random_adapter(llama_dir, "lora", root / "extra", 10)
    save_random_adapter(llama_dir, "lora", root / "spare", 11)
    shutil.copytree(root / "lora", root / "templated")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = ALT_TEMPLATE
    tokenizer.save_pretrained(root / "templated")
    return root


@pytest.fixture(scope="module")
def booting(llama_dir, root, tmp_path_factory):
    """The server, started but perhaps not ready yet: it boots while ``expected`` runs the engine here."""
    args = [str(llama_dir), "--served-model-name", BASE, "--enable-adapter-api", "--adapter-root", str(root),
            "--max-request-bytes", str(1024 * 1024), "--max-model-len", "256"]
    for name in [*ADAPTERS, "spare", "templated"]:
        args += ["--adapter", f"{name}={root / name}"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def server(booting, expected):
    return booting.wait_ready()


def engine_outputs(base_dir: Path, root: Path, jobs: dict) -> dict:
    """Run ``{key: (adapter, prompt, SamplingParams)}`` on a TorchEngine built here, directly, as the server's."""
    from ftserve.engine.torch import TorchEngine

    async def main():
        engine = TorchEngine.from_pretrained(base_dir, model_name=BASE, max_model_len=256)
        async with engine:
            for name in {adapter for adapter, _, _ in jobs.values() if adapter}:
                await engine.load_adapter(name, str(root / name))

            async def one(adapter, prompt, params):
                if prompt is None:
                    tokenizer = engine.tokenizer_for(adapter)
                    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
                    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
                chunks = [c async for c in engine.generate(GenerationRequest(prompt, adapter, params))]
                return "".join(c.text for c in chunks), chunks[-1]

            results = [await one(*job) for job in jobs.values()]
        return dict(zip(jobs, results))

    return asyncio.run(main())


MODELS = [BASE, *ADAPTERS, "templated"]


@pytest.fixture(scope="module")
def expected(llama_dir, root, booting):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    jobs = {}
    for model in MODELS:
        adapter = None if model == BASE else model
        jobs[("completion", model)] = (adapter, PROMPT, greedy)
        jobs[("chat", model)] = (adapter, None, greedy)
        jobs[("long", model)] = (adapter, f"a {model} story", SamplingParams(max_tokens=24, temperature=0))
    return engine_outputs(llama_dir, root, jobs)


# The tests --------------------------------------------------------------------------------------------

def test_models_lists_base_and_adapters_like_vllm(server, root, llama_dir):
    cards = {m.id: m.model_dump() for m in server.client().models.list().data}
    assert set(cards) == {BASE, *ADAPTERS, "spare", "templated"}
    assert cards[BASE]["root"] == str(Path(llama_dir).resolve()) and cards[BASE]["parent"] is None
    for name in ADAPTERS:
        card = cards[name]
        assert card["object"] == "model" and card["owned_by"] == "ftserve" and isinstance(card["created"], int)
        assert card["parent"] == BASE and Path(card["root"]) == root / name


def test_adapters_of_every_method_change_the_output(expected):
    texts = {model: expected[("completion", model)][0] for model in [BASE, *ADAPTERS]}
    assert len(set(texts.values())) == len(texts), texts


@pytest.mark.parametrize("model", MODELS)
def test_completion_equals_engine_output(server, expected, model):
    client = server.client()
    want, last = expected[("completion", model)]
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    response = client.completions.create(**kwargs)
    assert response.object == "text_completion" and response.model == model
    assert response.choices[0].text == want and response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == last.prompt_tokens
    assert response.usage.completion_tokens == MAX_TOKENS
    assert response.usage.total_tokens == last.prompt_tokens + MAX_TOKENS

    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("model", MODELS)
def test_chat_equals_engine_output_with_the_right_template(server, expected, model):
    client = server.client()
    want, last = expected[("chat", model)]
    kwargs = dict(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True})
    response = client.chat.completions.create(**kwargs)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant" and response.choices[0].message.content == want
    assert response.usage.prompt_tokens == last.prompt_tokens

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_adapter_chat_template_wins_over_the_base_one(expected):
    assert expected[("chat", "templated")][1].prompt_tokens != expected[("chat", "lora")][1].prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "lora", "prompt": PROMPT, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] >= 1


def test_n_seed_stop_and_top_p(server, expected):
    client = server.client()
    sampled = dict(model="vera", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3)
    first = client.completions.create(**sampled)
    again = client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert first.usage.prompt_tokens == again.usage.prompt_tokens

    full = expected[("long", "delta-lora")][0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.completions.create(model="delta-lora", prompt="a delta-lora story", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"

    batch = client.completions.create(model="lora-fa", prompt=[PROMPT, "a lora-fa story"], max_tokens=24, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == expected[("long", "lora-fa")][0]


def test_64_concurrent_streams_while_adapters_load_and_unload(server, root, expected):
    """Every stream completes with its own adapter's text while the API loads one adapter and unloads another."""
    models = list(ADAPTERS)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(model):
            stream = await client.completions.create(model=model, prompt=f"a {model} story", max_tokens=24,
                                                     temperature=0, stream=True)
            return model, "".join([c.choices[0].text async for c in stream if c.choices])

        async def manage():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                await asyncio.sleep(0.05)
                load = await http.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "extra"})
                unload = await http.post("/v1/unload_lora_adapter", json={"lora_name": "spare"})
                return load, unload

        results = await asyncio.gather(*[one(models[i % len(models)]) for i in range(64)], manage())
        await client.close()
        return results[:-1], results[-1]

    outputs, (load, unload) = asyncio.run(main())
    assert load.status_code == 200 and load.text == "Success: LoRA adapter 'extra' added successfully."
    assert unload.status_code == 200 and "removed successfully" in unload.text
    assert len(outputs) == 64
    for model, text in outputs:
        assert text == expected[("long", model)][0], model
    ids = {m.id for m in server.client().models.list().data}
    assert "extra" in ids and "spare" not in ids
    assert server.client().completions.create(model="extra", prompt=PROMPT, max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="spare", prompt=PROMPT, max_tokens=2)


# Errors: OpenAI's error object, the right status, and a server that carries on -----------------------------

def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def test_unknown_model_is_404_with_the_error_object(server):
    client = server.client()
    for call in (lambda: client.completions.create(model="nope", prompt=PROMPT),
                 lambda: client.chat.completions.create(model="nope", messages=MESSAGES)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.status_code == 404
        assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
        assert "nope" in info.value.body["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": "lora", "prompt": PROMPT, "temperature": 5}, "temperature"),
    ({"model": "lora", "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"model": "lora"}, "prompt"),
    ({"prompt": PROMPT}, "model"),
    ({"model": "lora", "prompt": PROMPT, "n": "many"}, "n"),
    ({"model": "lora", "prompt": PROMPT, "presence_penalty": 3.0}, "presence_penalty"),
])
def test_invalid_completion_body_is_400_naming_the_field(server, body, param):
    error = error_of(response := httpx.post(server.url + "/v1/completions", json=body))
    assert response.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"


def test_invalid_chat_body_through_the_client_is_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="lora", messages=[])
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="lora", messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "messages.0.role"


def test_context_overflow_is_400_without_traceback(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="lora", prompt=PROMPT, max_tokens=10_000)
    assert "context" in info.value.body["message"] and "Traceback" not in info.value.body["message"]


def test_malformed_json_and_huge_body_leave_the_server_well(server):
    for raw in (b'{"model": "lora", "prompt": ', b"\xff\xfe", b"[1, 2]", b""):
        response = httpx.post(server.url + "/v1/completions", content=raw,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400, raw
        error_of(response)
    huge = b'{"model": "lora", "prompt": "' + b"a" * (8 * 1024 * 1024) + b'"}'
    response = httpx.post(server.url + "/v1/completions", content=huge, timeout=60)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as info:
        server.client().completions.create(model="lora", prompt="a " * 600_000)
    assert info.value.status_code == 413
    assert server.client().completions.create(model="lora", prompt=PROMPT, max_tokens=2).choices


def test_unknown_route_is_an_error_object(server):
    response = httpx.get(server.url + "/v1/nothing")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_adapter_paths_are_confined_to_the_adapter_root(server, root, llama_dir, tmp_path):
    outside = save_random_adapter(llama_dir, "lora", tmp_path / "outside", 3)
    (root / "link").symlink_to(outside, target_is_directory=True)
    try:
        for path in ("../outside", "lora/../../outside", str(outside), "/etc", "link"):
            response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
            assert response.status_code == 403, path
            assert error_of(response)["code"] == "path_outside_adapter_root"
    finally:
        (root / "link").unlink()
    assert "evil" not in {m.id for m in server.client().models.list().data}


def test_adapter_api_errors(server, root):
    post = lambda route, body: httpx.post(server.url + route, json=body, timeout=60)  # noqa: E731
    missing = post("/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": "no-such-folder"})
    assert missing.status_code == 400 and "no-such-folder" in error_of(missing)["message"]
    twice = post("/v1/load_lora_adapter", {"lora_name": "lora", "lora_path": "lora"})
    assert twice.status_code == 400 and "already loaded" in error_of(twice)["message"]
    unnamed = post("/v1/load_lora_adapter", {"lora_path": "lora"})
    assert unnamed.status_code == 400 and error_of(unnamed)["param"] == "lora_name"
    absent = post("/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert absent.status_code == 404 and error_of(absent)["param"] == "lora_name"
    inside = post("/v1/load_lora_adapter", {"lora_name": "by-abs-path", "lora_path": str(root / "vera")})
    assert inside.status_code == 200
    assert post("/v1/unload_lora_adapter", {"lora_name": "by-abs-path"}).status_code == 200


def test_metrics_in_prometheus_text(server):
    server.client().completions.create(model="lora-fa", prompt=PROMPT, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['ftserve_generation_requests_total{model="lora-fa"}'] >= 1
    assert lines['ftserve_http_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert lines['ftserve_request_errors_total{route="/v1/completions",status="404"}'] >= 1
    assert lines['ftserve_prompt_tokens_total{model="lora-fa"}'] >= 1
    assert lines['ftserve_generation_tokens_total{model="lora-fa"}'] >= 3
    assert lines['ftserve_request_latency_seconds_count{route="/v1/completions"}'] >= 1
    assert lines['ftserve_time_to_first_token_seconds_bucket{le="+Inf",route="/v1/completions"}'] >= 1
    assert lines["ftserve_queue_depth"] == 0 and lines["ftserve_requests_in_flight"] == 0
    assert lines["ftserve_loaded_adapters"] == len({m.id for m in server.client().models.list().data}) - 1
    assert "# TYPE ftserve_request_latency_seconds histogram" in text


LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf")]
TTFT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf")]
METRICS = {  # family: type, label names of its samples (a histogram's buckets add "le")
    "ftserve_http_requests": ("counter", {"route", "status"}),
    "ftserve_request_errors": ("counter", {"route", "status"}),
    "ftserve_generation_requests": ("counter", {"model"}),
    "ftserve_prompt_tokens": ("counter", {"model"}),
    "ftserve_generation_tokens": ("counter", {"model"}),
    "ftserve_request_latency_seconds": ("histogram", {"route"}),
    "ftserve_time_to_first_token_seconds": ("histogram", {"route"}),
    "ftserve_requests_in_flight": ("gauge", set()),
    "ftserve_queue_depth": ("gauge", set()),
    "ftserve_adapter_loads_on_first_use": ("counter", set()),
    "ftserve_loaded_adapters": ("gauge", set()),
    "ftserve_prompt_renders_running": ("gauge", set()),
}


def test_metrics_parse_with_their_names_labels_types_and_buckets(server):
    """What Prometheus' own parser reads from /metrics: exactly these families (no ``_created`` ones), the
    engine's stats as ``ftserve_engine_<key>``, counters exposed as ``<name>_total``."""
    from prometheus_client.parser import text_string_to_metric_families

    server.client().chat.completions.create(model="lora", messages=MESSAGES, max_tokens=2)
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    engine = {name: f for name, f in families.items() if name.startswith("ftserve_engine_")}
    assert set(families) - set(engine) == set(METRICS)
    for name, (kind, labels) in METRICS.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            bucket = sample.name == name + "_bucket"
            assert set(sample.labels) == labels | ({"le"} if bucket else set()), sample
            assert kind != "counter" or sample.name == name + "_total", sample
    for name, bounds in [("ftserve_request_latency_seconds", LATENCY_BUCKETS),
                         ("ftserve_time_to_first_token_seconds", TTFT_BUCKETS)]:
        les = [float(s.labels["le"]) for s in families[name].samples
               if s.name == name + "_bucket" and s.labels["route"] == "/v1/chat/completions"]
        assert les == bounds, name
    assert engine["ftserve_engine_steps"].type == "counter"
    assert engine["ftserve_engine_queued_requests"].type == "gauge"
    for name, family in engine.items():
        (sample,) = family.samples
        assert (family.type == "counter") == sample.name.endswith("_total"), sample


def test_tokenize_and_detokenize_as_vllm(server, llama_dir, root):
    """POST /tokenize (a prompt, or messages through the model's own chat template) and /detokenize give what
    the tokenizer gives; an adapter with its own template tokenizes with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    templated = AutoTokenizer.from_pretrained(root / "templated")
    ids = tokenizer(PROMPT)["input_ids"]
    body = httpx.post(server.url + "/tokenize", json={"model": BASE, "prompt": PROMPT}).json()
    assert body == {"count": len(ids), "max_model_len": 256, "tokens": ids, "token_strs": None}
    body = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False,
                                                      "return_token_strs": True}).json()
    plain = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert body["tokens"] == plain and body["token_strs"] == tokenizer.convert_ids_to_tokens(plain)
    for model, tok in (("lora", tokenizer), ("templated", templated)):
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        body = httpx.post(server.url + "/tokenize", json={"model": model, "messages": MESSAGES}).json()
        assert body["tokens"] == tok(text, add_special_tokens=False)["input_ids"], model
    assert tokenizer.chat_template != templated.chat_template
    assert httpx.post(server.url + "/detokenize", json={"model": "lora", "tokens": ids}).json() == {
        "prompt": tokenizer.decode(ids)}

    for route, body, status, param in (
            ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, 400, "prompt"),
            ("/tokenize", {"model": "nope", "prompt": PROMPT}, 404, "model"),
            ("/detokenize", {"tokens": [1, 10 ** 6]}, 400, "tokens"),
            ("/detokenize", {"tokens": "abc"}, 400, "tokens")):
        response = httpx.post(server.url + route, json=body)
        assert response.status_code == status and error_of(response)["param"] == param, (route, body)
