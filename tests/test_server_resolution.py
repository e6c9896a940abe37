"""Adapters loaded on first use (--enable-adapter-resolution): a request whose `model` names a folder under
--adapter-root that is not loaded loads it, with the load API's confinement and checks.

One real server for the module, talked to with the `openai` client. Its oracle for "served with that adapter"
is the same folder loaded at start under another name (--lora-modules): the same greedy text, and another
text than the base model's.
"""

from __future__ import annotations

import shutil
import threading

import httpx
import openai
import pytest
from support.processes import ServerProcess

from ftserve.testing import save_random_adapter

BASE = "tiny-base"
PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def root(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("resolution_root")
    save_random_adapter(llama_dir, "lora", root / "team" / "a", 1, std=0.5)
    save_random_adapter(llama_dir, "vera", root / "b", 2, std=0.5)
    from transformers import AutoTokenizer

    # Its own tokenizer makes its load take long enough (~0.1 s) for concurrent first requests to overlap it.
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(root / "b")
    (root / "not-an-adapter").mkdir()
    (root / "not-an-adapter" / "notes.txt").write_text("hello")
    corrupt = shutil.copytree(root / "b", root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    outside = tmp_path_factory.mktemp("outside")
    save_random_adapter(llama_dir, "lora", outside / "elsewhere", 3)
    (root / "link-out").symlink_to(outside / "elsewhere")
    leaky = shutil.copytree(root / "b", root / "leaky")
    (leaky / "adapter_model.safetensors").unlink()
    shutil.copy(root / "b" / "adapter_model.safetensors", outside / "weights.safetensors")
    (leaky / "adapter_model.safetensors").symlink_to(outside / "weights.safetensors")
    return root


@pytest.fixture(scope="module")
def server(llama_dir, root, tmp_path_factory):
    log = tmp_path_factory.mktemp("resolution_log") / "server.log"
    proc = ServerProcess([str(llama_dir), "--served-model-name", BASE, "--adapter-root", str(root),
                          "--enable-adapter-resolution", "--lora-modules", f"ref-a={root / 'team' / 'a'}",
                          "--lora-modules", f"ref-b={root / 'b'}", "--max-loras", "2", "--max-cpu-loras", "3"], log)
    yield proc.wait_ready()
    proc.stop()


def complete(server, model: str) -> str:
    response = server.client().completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    return response.choices[0].text


def loads_on_first_use(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("ftserve_adapter_loads_on_first_use_total "):
            return float(line.split()[1])
    raise AssertionError("ftserve_adapter_loads_on_first_use_total is missing from /metrics")


def served_names(server) -> list[str]:
    return [card.id for card in server.client().models.list().data]


def error_of(server, model: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        complete(server, model)
    return info.value


def test_a_request_for_a_folder_under_the_root_loads_it_and_gets_its_answer(server):
    assert "team/a" not in served_names(server)
    before = loads_on_first_use(server)
    text = complete(server, "team/a")
    assert text == complete(server, "ref-a") != complete(server, BASE)
    assert "team/a" in served_names(server)
    chat = server.client().chat.completions.create(model="team/a", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0)
    assert chat.choices[0].message.content is not None
    assert loads_on_first_use(server) == before + 1  # loaded once; the chat found it loaded


def test_concurrent_first_requests_for_one_adapter_share_one_load(server):
    before = loads_on_first_use(server)
    texts, errors = [], []
    clients = [server.client() for _ in range(6)]
    for client in clients:  # connected before the barrier, so the six requests arrive together
        client.models.list()
    barrier = threading.Barrier(len(clients))

    def ask(client) -> None:
        barrier.wait()
        try:
            response = client.completions.create(model="b", prompt=PROMPT, max_tokens=8, temperature=0)
            texts.append(response.choices[0].text)
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(texts) == 6
    assert set(texts) == {complete(server, "ref-b")}
    assert loads_on_first_use(server) == before + 1


@pytest.mark.parametrize("model, words", [
    ("../outside", "`..` is not allowed"),
    ("link-out", "resolves (through a symlink) outside the root"),
    ("/etc", "it is outside the root"),
])
def test_names_that_escape_the_root_are_refused_as_the_load_api_refuses_paths(server, model, words):
    error = error_of(server, model)
    assert error.status_code == 403
    body = error.body
    assert body["code"] == "path_outside_adapter_root" and body["param"] == "model" and words in body["message"]
    assert model not in served_names(server)


def test_a_file_of_the_folder_linked_outside_the_root_is_refused(server):
    error = error_of(server, "leaky")
    assert error.status_code == 403 and "outside the adapter root" in error.body["message"]
    assert error.body["param"] == "model"
    assert "leaky" not in served_names(server)


@pytest.mark.parametrize("model, words", [
    ("not-an-adapter", "is a folder but not an adapter: it has no adapter_config.json"),
    ("no-such-folder", "no adapter of that name is loaded and"),
])
def test_a_name_that_is_no_adapter_folder_is_404_with_the_reason(server, model, words):
    error = error_of(server, model)
    assert error.status_code == 404 and error.body["code"] == "model_not_found" and words in error.body["message"]


def test_a_corrupt_adapter_is_refused_as_the_load_api_refuses_it_and_the_next_request_retries(server):
    before = loads_on_first_use(server)
    for _ in range(2):
        error = error_of(server, "corrupt")
        assert error.status_code == 400 and "corrupt" in error.body["message"] and error.body["param"] == "model"
    assert loads_on_first_use(server) == before + 2  # a failed load is not remembered: each request tries
    assert complete(server, "ref-b") == complete(server, "b")  # the others are undisturbed


def test_a_typo_of_the_base_name_is_a_404_that_suggests_it_even_with_resolution_on(server):
    error = error_of(server, "tiny-bace")
    assert error.status_code == 404 and "Did you mean `tiny-base`?" in error.body["message"]
