"""Checkpoints that disagree with themselves, and config files parsed without limits, through `ftserve merge`.

A tensor stored in two shards merged silently, taking the copy the index named (transformers reads the one in
the last file), and a shard path leaving the model folder was followed. Now each is refused with one line naming
the tensor and the files; so are a deeply nested or oversized index or config, and a corrupt header entry.
"""

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ftserve.cli import main
from ftserve.errors import CheckpointError
from ftserve.files.checkpoint import open_checkpoint

from support.engine import write_random_adapter

INDEX = "model.safetensors.index.json"
FIRST, SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def adapter(llama_dir, tmp_path_factory):
    return write_random_adapter(llama_dir, tmp_path_factory.mktemp("adapter") / "lora", "lora", seed=0)


def sharded(llama_dir, folder, move=(), extra_in_first=(), index_changes=None):
    """``llama_dir`` as two shards (embeddings and layer 0 in the first); ``extra_in_first`` also stored in the
    first shard, ``move`` stored there but indexed in the second; ``index_changes`` edit the weight_map."""
    shutil.copytree(llama_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    first = {k: v for k, v in tensors.items() if "embed" in k or "layers.0." in k}
    second = {k: v for k, v in tensors.items() if k not in first}
    weight_map = {**{k: FIRST for k in first}, **{k: SECOND for k in second}}
    for name in extra_in_first:
        first[name] = tensors[name]
    for name in move:
        first[name] = second.pop(name)
    save_file(first, folder / FIRST, metadata={"format": "pt"})
    save_file(second, folder / SECOND, metadata={"format": "pt"})
    weight_map.update(index_changes or {})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def merge(base, adapter, out):
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(out)])
    assert not out.exists()
    return result


def refused(result, *words):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for word in words:
        assert word in result.output, result.output
    return result.output


DOWN = "model.layers.1.mlp.down_proj.weight"


def test_a_sharded_checkpoint_that_agrees_with_its_index_merges(tmp_path, llama_dir, adapter):
    result = CliRunner().invoke(main, ["merge", str(sharded(llama_dir, tmp_path / "base")), str(adapter),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_a_tensor_stored_in_two_shards_is_refused_naming_both(tmp_path, llama_dir, adapter):
    base = sharded(llama_dir, tmp_path / "base", extra_in_first=[DOWN])
    refused(merge(base, adapter, tmp_path / "out"), DOWN, "stored twice", FIRST, SECOND, f"the index names {SECOND}")


def test_a_tensor_missing_from_the_index_is_refused(tmp_path, llama_dir, adapter):
    base = sharded(llama_dir, tmp_path / "base")
    tensors = load_file(base / FIRST)
    tensors["model.extra.weight"] = tensors["model.embed_tokens.weight"][:2].clone()
    save_file(tensors, base / FIRST, metadata={"format": "pt"})
    refused(merge(base, adapter, tmp_path / "out"), "model.extra.weight", FIRST, "is not in the index")


def test_an_index_entry_whose_shard_lacks_the_tensor_is_refused(tmp_path, llama_dir, adapter):
    base = sharded(llama_dir, tmp_path / "base", move=[DOWN])
    refused(merge(base, adapter, tmp_path / "out"), DOWN, SECOND, f"it is in {FIRST}")


def test_an_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path, llama_dir, adapter):
    base = sharded(llama_dir, tmp_path / "base", index_changes={"model.ghost.weight": SECOND})
    refused(merge(base, adapter, tmp_path / "out"), "model.ghost.weight", SECOND, "no shard holds it")


def test_an_index_naming_a_missing_shard_is_refused(tmp_path, llama_dir, adapter):
    base = sharded(llama_dir, tmp_path / "base", index_changes={DOWN: "model-gone.safetensors"})
    refused(merge(base, adapter, tmp_path / "out"), "model-gone.safetensors", "missing")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_shard_outside_the_model_folder_is_never_read(tmp_path, llama_dir, adapter, how):
    base = sharded(llama_dir, tmp_path / "base")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(base / SECOND, outside / SECOND)
    name = {"dotdot": f"../elsewhere/{SECOND}", "absolute": str(outside / SECOND), "symlink": SECOND}[how]
    if how == "symlink":
        (base / SECOND).symlink_to(outside / SECOND)
    else:
        index = json.loads((base / INDEX).read_text())
        index["weight_map"] = {k: name if v == SECOND else v for k, v in index["weight_map"].items()}
        (base / INDEX).write_text(json.dumps(index))
    refused(merge(base, adapter, tmp_path / "out"), name, "outside the model folder")


def test_a_hub_cache_snapshot_linking_into_its_blobs_is_read(tmp_path, llama_dir):
    repo = tmp_path / "models--acme--tiny"
    snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in llama_dir.iterdir():
        shutil.copyfile(file, blobs / file.name)
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / file.name, snapshot))
    assert "model.embed_tokens.weight" in open_checkpoint(snapshot).tensors


def test_verify_refuses_a_merged_model_that_disagrees_with_itself(tmp_path, llama_dir, adapter):
    merged = sharded(llama_dir, tmp_path / "merged", extra_in_first=[DOWN])
    result = CliRunner().invoke(main, ["verify", str(llama_dir), str(adapter), str(merged)])
    refused(result, DOWN, "stored twice")


def test_a_header_entry_pointing_past_the_data_is_refused(tmp_path, llama_dir, adapter):
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    raw = (base / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    text = json.dumps(header).encode()
    (base / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    refused(merge(base, adapter, tmp_path / "out"), name, "corrupt")


def test_a_deeply_nested_index_is_refused_not_a_crash(tmp_path, llama_dir, adapter):
    base = sharded(llama_dir, tmp_path / "base")
    index = json.loads((base / INDEX).read_text())
    (base / INDEX).write_text(json.dumps({**index, "metadata": {"x": "[" * 100_000}})[:-3]
                              + "[" * 100_000 + "]" * 100_000 + "}}")
    refused(merge(base, adapter, tmp_path / "out"), INDEX, "levels deep")


@pytest.mark.parametrize("where", ["config", "settings"])
def test_a_deeply_nested_adapter_config_is_refused_by_merge_and_inspect(tmp_path, llama_dir, adapter, where):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    name = {"config": "adapter_config.json", "settings": "ftserve_config.json"}[where]
    config = json.loads((bad / name).read_text())
    (bad / name).write_text(json.dumps(config)[:-1] + ', "deep": ' + "[" * 50_000 + "]" * 50_000 + "}")
    refused(merge(llama_dir, bad, tmp_path / "out"), name, "levels deep")
    refused(CliRunner().invoke(main, ["inspect", str(bad)]), name, "levels deep")


def test_an_oversized_adapter_config_is_refused_unread(tmp_path, llama_dir, adapter):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    with open(bad / "adapter_config.json", "r+b") as f:
        f.truncate(100 * 2**20)  # sparse: 100 MB that cost nothing to write, and must not be read
    refused(CliRunner().invoke(main, ["inspect", str(bad)]), "adapter_config.json", "104,857,600 bytes")


def test_nan_in_an_adapter_config_is_refused_naming_the_field(tmp_path, llama_dir, adapter):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    refused(merge(llama_dir, bad, tmp_path / "out"), "adapter_config.json", "`lora_alpha`", "NaN")


def test_open_checkpoint_raises_the_checkpoint_error_type(tmp_path, llama_dir):
    base = sharded(llama_dir, tmp_path / "base", extra_in_first=[DOWN])
    with pytest.raises(CheckpointError, match="stored twice"):
        open_checkpoint(base)
