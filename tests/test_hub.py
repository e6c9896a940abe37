"""One resolver turns "a local folder or a Hugging Face Hub repo id" into a folder, for bases and adapters alike;
the hub answers offline from a local cache (conftest's ``hub_cache``)."""

from pathlib import Path

import pytest

from ftserve.files.checkpoint import resolve_base
from ftserve.engine.frontend import resolve_adapter_path
from ftserve.engine.errors import AdapterLoadError
from ftserve.errors import CheckpointError, FtserveError
from ftserve.files.hub import resolve_folder

# (caller, the error type it raises, the word its messages use)
CALLERS = [(resolve_base, CheckpointError, "model"), (resolve_adapter_path, AdapterLoadError, "adapter")]
IDS = ["base", "adapter"]


@pytest.mark.parametrize("resolve, error, what", CALLERS, ids=IDS)
def test_a_local_folder_is_used_as_is_even_when_shaped_like_a_hub_id(resolve, error, what, tmp_path, monkeypatch):
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("acme/tiny") == Path("acme/tiny")
    assert resolve(str(tmp_path / "acme")) == tmp_path / "acme"
    assert resolve("~/acme/tiny") == tmp_path / "acme" / "tiny"


@pytest.mark.parametrize("resolve, error, what", CALLERS, ids=IDS)
@pytest.mark.parametrize("name", ["./missing", "/no/such/folder", "~/missing", "a/b/c"])
def test_a_missing_path_is_an_error_naming_it_not_a_hub_lookup(resolve, error, what, name, hub_cache):
    with pytest.raises(error) as info:
        resolve(name)
    assert str(info.value) == f"{name}: no such {what} folder"


@pytest.mark.parametrize("resolve, error, what", CALLERS, ids=IDS)
def test_a_file_is_not_a_folder(resolve, error, what, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(error, match=f"weights.bin: a file, not a {what} folder"):
        resolve(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("resolve, error, what", CALLERS, ids=IDS)
def test_hub_ids_resolve_from_the_offline_cache_and_missing_ones_fail_clearly(resolve, error, what, hub_cache):
    assert resolve("acme/tiny-llama") == hub_cache
    with pytest.raises(error) as missing:
        resolve("acme/missing")
    message = str(missing.value)
    assert message.startswith("acme/missing: no such folder, and the Hugging Face hub cannot provide it "
                              "(LocalEntryNotFoundError: ")
    assert "\n" not in message
    with pytest.raises(error, match=f"bad id!!: no such folder, and not a valid Hugging Face {what} id"):
        resolve("bad id!!")


def test_callers_keep_their_own_error_family_and_the_default_is_the_base_one(tmp_path):
    with pytest.raises(FtserveError, match="./missing: no such model folder") as info:
        resolve_folder("./missing", "model")
    assert type(info.value) is FtserveError
    assert issubclass(AdapterLoadError, FtserveError) and issubclass(CheckpointError, FtserveError)
