"""Shared fixtures: tiny models and a tokenizer built locally; never the network."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ftserve.engine.options import EngineOptions  # noqa: E402
from ftserve.testing import build_tokenizer, save_tiny_model, tiny_gpt2, tiny_llama, toy_sentences  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to a busy machine

# FTSERVE_TEST_PREFIX_CACHING=0 runs the suite with prefix caching off by default (what a test passes explicitly
# still holds): the tokens must be the same either way, and .ci/run re-runs the engine tests so.
PREFIX_CACHING = os.environ.get("FTSERVE_TEST_PREFIX_CACHING", "1")
if PREFIX_CACHING not in ("0", "1"):
    raise pytest.UsageError(f"FTSERVE_TEST_PREFIX_CACHING must be 0 or 1; got {PREFIX_CACHING!r}")


@pytest.fixture(autouse=True)
def prefix_caching_default(monkeypatch):
    """Under FTSERVE_TEST_PREFIX_CACHING=0, an EngineOptions built without ``enable_prefix_caching`` has it off."""
    if PREFIX_CACHING == "1":
        return
    init = EngineOptions.__init__

    def without_prefix_caching(self, *args, **keywords):
        keywords.setdefault("enable_prefix_caching", False)
        init(self, *args, **keywords)

    monkeypatch.setattr(EngineOptions, "__init__", without_prefix_caching)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning makes
    every small op thousands of times slower: a module that another may have left multi-threaded asks for one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny Llama-shaped model (head_dim 32) and tokenizer saved as a Hugging Face folder. Read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2-shaped model (Conv1D projections) and tokenizer saved as a Hugging Face folder. Read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("gpt2") / "base", "gpt2")


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def hub_cache(tmp_path, llama_dir, monkeypatch):
    """An offline hub cache that holds one repo, acme/tiny-llama, as huggingface_hub lays it out."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(llama_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """An offline datasets cache holding one hub dataset, someone/toy-rows (48 ``text`` rows), in the layout
    ``load_dataset`` leaves after downloading it (``someone___toy-rows/default/0.0.0/<commit>``), written by
    datasets' own json builder; returns its rows. Offline, ``load_dataset("someone/toy-rows")`` reads it back
    through datasets' Cache builder."""
    import datasets.config
    from datasets.data_files import DataFilesDict
    from datasets.load import configure_builder_class
    from datasets.packaged_modules.json.json import Json, JsonConfig

    rows = [{"text": s} for s in toy_sentences(48)]
    source = tmp_path / "downloaded" / "train.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = tmp_path / "datasets"
    files = DataFilesDict.from_patterns({"train": [str(source)]})
    builder_class = configure_builder_class(Json, [JsonConfig(name="default", data_files=files)], "default", "toy-rows")
    builder = builder_class(cache_dir=str(cache), dataset_name="toy-rows", config_name="default", hash="0" * 40)
    # A hub download's builder has the repo id, which puts the namespace in the folder name; given to the
    # constructor it would insist that the data files be hf:// paths of that repo, so it is set after.
    builder.repo_id = "someone/toy-rows"
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    source.unlink()  # nothing left to read but the cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return rows
