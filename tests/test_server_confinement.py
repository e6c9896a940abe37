"""--adapter-root holds for every file an adapter folder holds, not only for the folder named.

A folder inside the root whose weights, config, Delta-LoRA state or tokenizer file is a symlink to a file
outside it used to be followed, loaded and served. Each case here puts a valid file outside the root and links
to it, so only the link is wrong: a refusal is the check, not a corrupt file. One server for the module, with
one slot and one cached adapter, so that loading one adapter evicts the others and using them reads them again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai
import pytest
from support.processes import ServerProcess

from ftserve.testing import save_random_adapter

BASE = "tiny-base"


@pytest.fixture(scope="module")
def sources(llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapter folders outside the root, copied in (with one file made a link) by each test."""
    out = tmp_path_factory.mktemp("sources")
    templated = save_random_adapter(llama_dir, "lora", out / "templated", 1)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(templated)
    return {"lora": save_random_adapter(llama_dir, "lora", out / "lora", 0),
            "delta": save_random_adapter(llama_dir, "delta-lora", out / "delta", 2), "templated": templated}


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("root")


def link_out(folder: Path, file: str, outside: Path) -> None:
    """Move ``folder/file`` outside the root and leave a symlink to it in its place."""
    target = outside / f"{folder.name}-{file.replace('/', '-')}"
    shutil.move(folder / file, target)
    (folder / file).symlink_to(target)


def trusted_folder(sources, root, outside) -> Path:
    folder = shutil.copytree(sources["lora"], root.parent / "startup")
    link_out(folder, "adapter_model.safetensors", outside)
    return folder


@pytest.fixture(scope="module")
def server(llama_dir, sources, root, outside, tmp_path_factory):
    args = [str(llama_dir), "--served-model-name", BASE, "--enable-adapter-api", "--adapter-root", str(root),
            "--max-model-len", "128", "--max-loras", "1", "--max-cpu-loras", "1",
            "--adapter", f"startup={trusted_folder(sources, root, outside)}"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def load(server, name: str, path: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)


def complete(server, model: str) -> str:
    response = server.client().completions.create(model=model, prompt="the cat", max_tokens=4, temperature=0)
    return response.choices[0].text


def assert_refused(server, response: httpx.Response, name: str, file: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "path_outside_adapter_root" and error["type"] == "permission_error"
    assert error["param"] == "lora_path"  # the field that named the folder, whichever layer refused it
    assert file in error["message"] and "outside the adapter root" in error["message"]
    assert name not in {m.id for m in server.client().models.list().data}
    assert complete(server, BASE)  # the server still serves


@pytest.mark.parametrize("source, file", [
    ("lora", "adapter_model.safetensors"),
    ("lora", "adapter_config.json"),
    ("delta", "delta_lora_state.safetensors"),
    ("templated", "tokenizer.json"),
    ("templated", "tokenizer_config.json"),
    ("templated", "chat_template.jinja"),
])
def test_a_file_symlinked_outside_the_root_is_refused_403(server, sources, root, outside, source, file):
    name = f"{source}-{file.split('.')[0]}"
    folder = shutil.copytree(sources[source], root / name)
    link_out(folder, file, outside)
    assert_refused(server, load(server, name, name), name, file)


def test_a_weights_file_symlinked_outside_the_root_is_refused_403_by_absolute_path(server, sources, root, outside):
    folder = shutil.copytree(sources["lora"], root / "by-abs")
    link_out(folder, "adapter_model.safetensors", outside)
    assert_refused(server, load(server, "by-abs", str(folder)), "by-abs", "adapter_model.safetensors")


def test_a_file_in_a_subfolder_symlinked_outside_the_root_is_refused_403(server, sources, root, outside):
    folder = shutil.copytree(sources["lora"], root / "nested")
    (folder / "extra").mkdir()
    shutil.copy(sources["lora"] / "adapter_config.json", folder / "extra" / "notes.json")
    link_out(folder, "extra/notes.json", outside)
    assert_refused(server, load(server, "nested", "nested"), "nested", "extra/notes.json")


def test_a_subfolder_symlinked_outside_the_root_is_refused_403(server, sources, root, outside):
    folder = shutil.copytree(sources["lora"], root / "linked-sub")
    (outside / "sub").mkdir()
    (folder / "sub").symlink_to(outside / "sub", target_is_directory=True)
    assert_refused(server, load(server, "linked-sub", "linked-sub"), "linked-sub", "sub")


def test_a_dangling_symlink_leading_out_is_refused_403(server, sources, root, outside):
    folder = shutil.copytree(sources["lora"], root / "dangling")
    (folder / "chat_template.jinja").symlink_to(outside / "never-written.jinja")
    assert_refused(server, load(server, "dangling", "dangling"), "dangling", "chat_template.jinja")


def test_a_symlink_that_stays_inside_the_root_loads(server, sources, root):
    shared = root / "shared"
    shared.mkdir()
    folder = shutil.copytree(sources["lora"], root / "inside-link")
    shutil.move(folder / "adapter_model.safetensors", shared / "weights.safetensors")
    (folder / "adapter_model.safetensors").symlink_to(shared / "weights.safetensors")
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a cycle inside the root ends the walk
    assert load(server, "inside-link", "inside-link").status_code == 200
    assert complete(server, "inside-link") != complete(server, BASE)


def test_a_file_swapped_for_an_outside_symlink_after_loading_is_refused_when_read_again(server, sources, root,
                                                                                         outside):
    """The check holds on every read: an evicted adapter is read again from its folder on its next use."""
    folder = shutil.copytree(sources["lora"], root / "swapped")
    shutil.copytree(sources["delta"], root / "evictor")
    assert load(server, "swapped", "swapped").status_code == 200
    served = complete(server, "swapped")
    assert load(server, "evictor", "evictor").status_code == 200  # --max-cpu-loras 1: evicts "swapped"
    link_out(folder, "adapter_model.safetensors", outside)  # same bytes, now through a link leading out
    with pytest.raises(openai.PermissionDeniedError) as refused:
        complete(server, "swapped")
    assert refused.value.code == "path_outside_adapter_root"
    assert "adapter_model.safetensors" in refused.value.message
    assert complete(server, "evictor") and complete(server, BASE)
    (folder / "adapter_model.safetensors").unlink()  # put the file back: it serves again
    shutil.copy(outside / "swapped-adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert complete(server, "swapped") == served


def test_adapters_given_at_startup_are_trusted_with_links_leading_out(server):
    """--adapter NAME=PATH is the operator's own choice: no root applies, on the first read or a later one."""
    assert complete(server, "startup") != complete(server, BASE)
