"""Names a person can type: a base given as a path is served under its folder's name (or --served-model-name),
the path as given still reaches it, and a 404 for a name that is not served suggests the closest served ones."""

from __future__ import annotations

import shutil

import openai
import pytest
from support.engine import write_random_adapter
from support.processes import ServerProcess

FOLDER = "My-Base-1B"  # a folder name as a person would type it


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(llama_dir, work / "models" / FOLDER)
    write_random_adapter(llama_dir, work / "adapters" / "sql", "lora+", seed=0)
    proc = ServerProcess([f"./models/{FOLDER}/", "--adapter", "sql=adapters/sql"], work / "server.log", cwd=work)
    try:
        yield proc.wait_ready(), work
    finally:
        proc.stop()


def ask(server, model: str) -> str:
    return server.client().completions.create(model=model, prompt="the cat", max_tokens=4, temperature=0).model


def test_a_base_given_as_a_path_is_listed_under_its_folder_name(server):
    proc, _ = server
    assert [m.id for m in proc.client().models.list().data] == [FOLDER, "sql"]
    assert ask(proc, FOLDER) == FOLDER


def test_the_path_as_given_and_its_absolute_form_still_name_the_base(server):
    proc, work = server
    for alias in (f"./models/{FOLDER}/", str(work / "models" / FOLDER)):
        ask(proc, alias)  # answered, not 404


@pytest.mark.parametrize("typo,meant", [("my-base-1b", FOLDER), ("sqll", "sql"), ("SQL", "sql")])
def test_an_unknown_model_404_suggests_the_closest_served_names(server, typo, meant):
    proc, _ = server
    with pytest.raises(openai.NotFoundError) as info:
        ask(proc, typo)
    assert info.value.body["code"] == "model_not_found" and f"Did you mean `{meant}`" in info.value.body["message"]


def test_a_name_close_to_nothing_gets_no_suggestion(server):
    proc, _ = server
    with pytest.raises(openai.NotFoundError) as info:
        ask(proc, "qwen-72b-chat")
    assert "Did you mean" not in info.value.body["message"]
