"""Adapter folders: PEFT's layout on disk, clear AdapterFileErrors for every kind of bad folder, a base model left
exactly as it was after a failed load, and saves that leave no half-written or temporary folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftserve import AdapterFileError, FineTuningConfig, FineTuningModel, export_adapter, load_adapter, read_adapter
from ftserve.files.atomic import HOST_TAG, atomic_output_dir
from ftserve.testing import randomise_adapter

from support.cases import METHODS, start_step
from support.models import TOY_IDS, logits, small_gpt2, small_llama
from support.training import train

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = "adapter_model.safetensors"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def make_adapter(path, method: str = "lora", **kwargs) -> FineTuningModel:
    model = FineTuningModel(small_llama(), FineTuningConfig(method=method, lora_r=4, target_modules=TARGETS, **kwargs))
    randomise_adapter(model, seed=0)
    model.save_adapter(path)
    return model


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "adapter"
    make_adapter(path)
    return path


@pytest.fixture
def folder(good_folder, tmp_path):
    """A private copy of a valid LoRA folder, to damage."""
    return shutil.copytree(good_folder, tmp_path / "adapter")


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed load must leave alone: module objects, parameter tensors, requires_grad flags."""
    return {"modules": {name: id(m) for name, m in model.named_modules()},
            "params": {name: (id(p), p.data_ptr(), p.requires_grad) for name, p in model.named_parameters()}}


def fresh_base() -> torch.nn.Module:
    base = small_llama()
    base.model.embed_tokens.weight.requires_grad_(False)  # a mixed pattern of flags, to see it restored exactly
    return base


# On-disk layout --------------------------------------------------------------------------------------

def test_saved_lora_folder_has_peft_keys_config_and_metadata(good_folder):
    config = json.loads((good_folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == \
        ("LORA", 4, 16.0, ["q_proj", "v_proj"])
    assert config["fan_in_fan_out"] is False and "ftserve" not in config  # PEFT warns about keys it lacks
    assert json.loads((good_folder / "ftserve_config.json").read_text())["method"] == "lora"
    with safe_open(str(good_folder / WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert len(keys) == 2 * 2 * 2
    assert {f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight"} <= keys
    assert (good_folder / "README.md").is_file()


def test_gpt2_folder_records_fan_in_fan_out(tmp_path):
    model = FineTuningModel(small_gpt2(), FineTuningConfig(lora_r=4, target_modules=["c_attn"]))
    model.save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]
    assert load_file(str(tmp_path / "a" / WEIGHTS))[
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)


def test_vera_folder_saves_the_shared_pair_once(tmp_path):
    make_adapter(tmp_path / "vera", method="vera")
    tensors = load_file(str(tmp_path / "vera" / WEIGHTS))
    assert tensors["base_model.vera_A"].shape == (4, 64) and tensors["base_model.vera_B"].shape == (64, 4)
    assert sum("vera_A" in k for k in tensors) == 1
    assert json.loads((tmp_path / "vera" / "adapter_config.json").read_text())["peft_type"] == "VERA"


# Bad folders ----------------------------------------------------------------------------------------

def _drop_tensor(folder):
    tensors = load_file(str(folder / WEIGHTS))
    del tensors[f"{Q0}.lora_B.weight"]
    save_file(tensors, str(folder / WEIGHTS))


def _reshape_tensor(folder):
    tensors = load_file(str(folder / WEIGHTS))
    tensors[f"{Q0}.lora_A.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(folder / WEIGHTS))


def _unknown_tensor(folder):
    tensors = load_file(str(folder / WEIGHTS))
    tensors[f"{Q0}.lora_magnitude_vector"] = torch.zeros(64)
    save_file(tensors, str(folder / WEIGHTS))


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _pickle_only(folder):
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "ftserve_config.json").unlink()  # so PEFT's fields are read
    return edit


BAD_FOLDERS = [
    ("missing_tensor", _drop_tensor, "q_proj.lora_B.weight is missing"),
    ("shape_mismatch", _reshape_tensor, "lora_A.weight has shape (3, 64), this model needs (4, 64)"),
    ("unknown_tensor", _unknown_tensor, "tensors this lora adapter cannot use"),
    ("missing_config", lambda f: (f / "adapter_config.json").unlink(), "missing adapter_config.json"),
    ("invalid_json", lambda f: (f / "adapter_config.json").write_text("{\"r\": 4,"), "not valid JSON"),
    ("config_rank_zero", _edit_config(r=0), "lora_r must be an integer >= 1"),
    ("config_unknown_type", _edit_config(peft_type="LOHA"), "peft_type 'LOHA' is not supported"),
    ("truncated_safetensors", _truncate, "corrupt or unreadable safetensors file"),
    ("pickle_only", _pickle_only, "refusing to unpickle"),
    ("no_weights", lambda f: (f / WEIGHTS).unlink(), "missing adapter_model.safetensors"),
]


@pytest.mark.parametrize("case, damage, message", BAD_FOLDERS, ids=[c for c, _, _ in BAD_FOLDERS])
def test_bad_folder_is_refused_and_the_base_model_is_untouched(case, damage, message, folder):
    damage(folder)
    base = fresh_base()
    before = snapshot(base)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(base, folder)
    assert message in str(info.value)
    assert str(folder) in str(info.value)
    assert snapshot(base) == before


def test_adapter_for_another_model_is_refused_and_the_base_untouched(folder):
    base = small_gpt2()
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match="does not fit this model.*lacks or that are not linear"):
        FineTuningModel.from_pretrained(base, folder)
    assert snapshot(base) == before


def test_no_such_folder(tmp_path):
    with pytest.raises(AdapterFileError, match="no such adapter folder"):
        read_adapter(tmp_path / "nowhere")


class Payload:
    """Stands for arbitrary code in a pickle: torch.load(weights_only=True) must refuse to build it."""


def test_pickle_is_read_only_when_allowed_and_only_with_weights_only(folder):
    _pickle_only(folder)
    reference = logits(load_adapter(small_llama(), folder, allow_pickle=True))
    assert (reference - logits(small_llama())).abs().max() > 1e-3
    torch.save({"payload": Payload()}, folder / "adapter_model.bin")
    base = fresh_base()
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match="cannot be read safely"):
        load_adapter(base, folder, allow_pickle=True)
    assert snapshot(base) == before


def test_vera_folder_with_a_missing_or_small_pair_is_refused(tmp_path):
    make_adapter(tmp_path / "vera", method="vera")
    tensors = load_file(str(tmp_path / "vera" / WEIGHTS))
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"}, str(tmp_path / "vera" / WEIGHTS))
    with pytest.raises(AdapterFileError, match="base_model.vera_B is missing"):
        load_adapter(small_llama(), tmp_path / "vera")
    save_file({**tensors, "base_model.vera_A": tensors["base_model.vera_A"][:, :32].contiguous()},
              str(tmp_path / "vera" / WEIGHTS))
    base = fresh_base()
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match="model needs at least"):
        load_adapter(base, tmp_path / "vera")
    assert snapshot(base) == before


def test_delta_lora_folder_without_its_training_state_is_refused(tmp_path):
    make_adapter(tmp_path / "delta", method="delta-lora", delta_start_step=0)
    (tmp_path / "delta" / "delta_lora_state.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="Delta-LoRA adapter without delta_lora_state.safetensors"):
        load_adapter(small_llama(), tmp_path / "delta")


# Saving ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora+", "delta-lora"])
def test_a_folder_written_before_the_settings_file_still_loads_exactly(method, tmp_path):
    """Older folders keep our settings under the "ftserve" key of adapter_config.json."""
    model = make_adapter(tmp_path / "adapter", method, loraplus_lr_ratio=4.0) if method == "lora+" else \
        make_adapter(tmp_path / "adapter", method, delta_start_step=3)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["ftserve"] = json.loads((tmp_path / "adapter" / "ftserve_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter" / "ftserve_config.json").unlink()
    assert read_adapter(tmp_path / "adapter").config == model.config
    torch.testing.assert_close(logits(load_adapter(small_llama(), tmp_path / "adapter")), logits(model),
                               rtol=0, atol=0)


def test_the_recorded_base_is_absolute_so_peft_loads_the_adapter_from_another_folder(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    small_llama().save_pretrained("base")
    model = FineTuningModel(AutoModelForCausalLM.from_pretrained("base"),
                            FineTuningConfig(lora_r=4, target_modules=TARGETS))
    randomise_adapter(model, seed=0)
    model.save_adapter("adapter")
    recorded = json.loads(Path("adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-5, atol=1e-5)
    hub_id = FineTuningModel(small_llama(), FineTuningConfig(target_modules=TARGETS,
                                                             base_model_name_or_path="acme/tiny-llama"))
    assert hub_id.config.base_model_name_or_path == "acme/tiny-llama"  # no such folder here: a hub id, as given


def test_save_into_a_fresh_path_leaves_no_temporary_folders(tmp_path):
    model = make_adapter(tmp_path / "out" / "adapter")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]
    assert sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir()) == \
        ["README.md", "adapter_config.json", WEIGHTS, "ftserve_config.json"]
    randomise_adapter(model, seed=9)  # re-saving a checkpoint into the same folder replaces its files
    model.save_adapter(tmp_path / "out" / "adapter")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]
    torch.testing.assert_close(logits(load_adapter(small_llama(), tmp_path / "out" / "adapter")), logits(model),
                               rtol=0, atol=0)


def test_a_failed_save_writes_nothing(tmp_path, monkeypatch):
    import ftserve.files.adapter_folder

    model = FineTuningModel(small_llama(), FineTuningConfig(target_modules=TARGETS))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ftserve.files.adapter_folder, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_adapter(tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def scratch(out: Path, kind: str, pid: int, host: str = HOST_TAG, rand: str = "0123abcd") -> Path:
    folder = out.parent / f".{out.name}.{kind}-{pid}-{host}-{rand}"
    folder.mkdir()
    (folder / "part.safetensors").write_bytes(b"half")
    return folder


def test_a_dead_writers_leftovers_are_removed_and_a_live_writers_never(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    dead = dead_pid()
    gone = [scratch(out, "tmp", dead), scratch(out, "old", dead, rand="89abcdef")]
    kept = [scratch(out, "tmp", os.getpid()),  # a concurrent writer in this very process
            scratch(out, "tmp", dead, host="ffffff" if HOST_TAG != "ffffff" else "000000"),  # another host's pid
            scratch(tmp_path / "merged2", "tmp", dead)]  # another output's
    (tmp_path / ".merged.tmp-0123abcd").mkdir()  # not named by us: cannot tell, so left alone
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert (out / "model.safetensors").read_bytes() == b"new"
    assert not any(p.exists() for p in gone)
    assert all((p / "part.safetensors").exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["merged", ".merged.tmp-0123abcd"] + [p.name for p in kept])


def test_a_writer_killed_between_its_two_renames_gets_the_old_output_put_back(tmp_path):
    out = tmp_path / "merged"
    dead = dead_pid()
    old = scratch(out, "old", dead)  # the previous output, moved aside
    scratch(out, "tmp", dead)  # the new one, never moved in
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        with atomic_output_dir(out):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert (out / "part.safetensors").read_bytes() == b"half" and not old.exists()


def test_every_file_and_folder_is_synced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        for name in ("a.safetensors", "config.json", "sub/tokenizer.json"):
            (tmp / name).write_text(name)
    written = [str(tmp / name) for name in ("a.safetensors", "config.json", "sub", "sub/tokenizer.json")]
    assert sorted(synced[:-2]) == sorted(written)  # named by the temporary path: synced before the rename
    assert synced[-2:] == [str(tmp), str(tmp_path)]
    synced.clear()
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert synced == [str(tmp / "config.json"), str(tmp), str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "{}"


def test_save_onto_a_file_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("not a folder")
    model = FineTuningModel(small_llama(), FineTuningConfig(target_modules=TARGETS))
    with pytest.raises(AdapterFileError, match="exists and is not a folder"):
        model.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a folder"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# Export as plain LoRA -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_exported_plain_lora_gives_the_same_logits(method, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FineTuningModel(small_llama(), FineTuningConfig(method=method, lora_r=4, target_modules=TARGETS,
                                                                **start_step(method, 1)))
    randomise_adapter(model, seed=3)
    train(model, model.create_optimizer(lr=1e-2), TOY_IDS, steps=3)
    model.save_adapter(tmp_path / "adapter")
    if model.method.row_scaled:  # no plain LoRA computes its row scale: refused, nothing written
        with pytest.raises(AdapterFileError, match="no plain-LoRA export"):
            export_adapter(tmp_path / "adapter", tmp_path / "plain")
        assert not (tmp_path / "plain").exists()
        return
    export_adapter(tmp_path / "adapter", tmp_path / "plain")
    plain = read_adapter(tmp_path / "plain")
    assert plain.config.method == "lora" and plain.raw_config["peft_type"] == "LORA"
    assert {f.rank for f in plain.lora_factors().values()} == {f.rank for f in model.lora_factors().values()}
    torch.testing.assert_close(logits(load_adapter(small_llama(), tmp_path / "plain")), logits(model),
                               rtol=1e-5, atol=1e-5)
