"""Merging adapters into a new adapter (ftserve.merge.adapter_merge) against PEFT's ``add_weighted_adapter``:
the same delta per module for every combination type on Llama and GPT-2 (Conv1D) shapes, DARE included (seeded
per module as we are); the written folder loads in PEFT and gives the logits of PEFT's merged adapter; the card's
errors are the recomputed ones; any method's adapter merges through its served form; every refusal writes
nothing."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from ftserve import AdapterFileError, ConfigError
from ftserve.files.adapter_folder import export_adapter, read_adapter
from ftserve.merge.adapter_merge import (DENSE_METHODS, METHODS, keep_largest, merge_to_adapter, module_seed,
                                         run_adapter_merge)
from ftserve.merge.plan import AdapterSpec
from ftserve.testing import peft_dora_model, save_random_adapter, save_tiny_model, tiny_llama

from support.cases import PLAIN_FORM
from support.files import tree_digest
from support.models import MODELS, logits, small_llama

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = (0.7, -0.4)  # a negative weight: PEFT puts its sign on A only
SEED = 3
DENSITY = 0.5
TOL = 1e-6  # relative Frobenius difference of two fp32 deltas computed by the same operations
# `svd` truncates the weighted sum through its factors, PEFT through the dense matrix: each is ~1e-6 from the
# float64 truncation (checked below for ours), and the kept subspace moves by fp32's eps over the relative gap
# between the singular values at the cut (a few hundredths here)
SVD_TOL = 1e-5


def peft_lora(kind: str, path: Path, rank: int, seed: int, targets: list[str] | None = None) -> Path:
    """A LoRA folder written by PEFT, every factor random (B too, so that the delta is not zero)."""
    build, default_targets = MODELS[kind]
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank + seed, target_modules=targets or default_targets,
                        fan_in_fan_out=kind == "gpt2")
    model = get_peft_model(build(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Per model kind: two rank-4 LoRAs, and a rank-6 one (for cat and svd, which take different ranks)."""
    root = tmp_path_factory.mktemp("inputs")
    return {kind: {name: peft_lora(kind, root / f"{kind}-{name}", rank, seed)
                   for name, rank, seed in (("a", 4, 1), ("b", 4, 2), ("wide", 6, 5))} for kind in MODELS}


def peft_merged(kind: str, folders: list[Path], method: str, **options) -> PeftModel:
    """PEFT's model holding the inputs and their merge, adapter "merged".

    PEFT draws DARE's masks from the global generator, module after module in the model's order (and draws the
    new adapter's initial factors before that); ours come from a generator per module. To compare the two, each
    of PEFT's per-module merges starts from ``torch.manual_seed(module_seed(SEED, module))``: the draws inside a
    module are PEFT's own."""
    model = PeftModel.from_pretrained(MODELS[kind][0](), str(folders[0]), adapter_name="in0")
    for i, folder in enumerate(folders[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"in{i}")
    names = {id(module): name for name, module in model.base_model.model.named_modules()}
    lora_model = model.base_model
    for attr in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        def seeded(*args, _merge=getattr(lora_model, attr), **kwargs):
            layer = next(a for a in args if isinstance(a, LoraLayer))
            torch.manual_seed(module_seed(SEED, names[id(layer)]))
            return _merge(*args, **kwargs)
        setattr(lora_model, attr, seeded)
    model.add_weighted_adapter([f"in{i}" for i in range(len(folders))], list(WEIGHTS[:len(folders)]), "merged",
                               combination_type=method, **options)
    return model


@torch.no_grad()
def deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's delta of ``adapter`` per module (in the stored orientation: transposed for Conv1D)."""
    return {name: module.get_delta_weight(adapter) for name, module in model.base_model.model.named_modules()
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, module.adapter_layer_names[0])}


def assert_same_deltas(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol: float = TOL) -> None:
    assert ours.keys() == theirs.keys()
    for name, delta in theirs.items():
        assert delta.norm() > 0, name
        assert float((ours[name] - delta).norm() / delta.norm()) < tol, name


def options_for(method: str) -> tuple[dict, dict]:
    """(our keyword arguments, PEFT's) for ``method``: a density where it prunes, rank 3 for the SVD ones."""
    ours, theirs = {}, {}
    if method not in ("cat", "linear", "svd"):
        ours["density"] = theirs["density"] = DENSITY
    if method in DENSE_METHODS:
        ours["rank"] = theirs["svd_rank"] = 3
    return ours, theirs


def loaded(folder: Path, kind: str) -> PeftModel:
    """Our folder through PEFT's loader, with no warning but transformers' own deprecation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(MODELS[kind][0](), str(folder), adapter_name="ours")
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" not in str(w.message)] == []
    return model


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_peft_delta_and_logits(method, kind, adapters, tmp_path):
    """cat and the SVD methods take a rank-4 and a rank-6 input; the rest, which combine the factors
    themselves, two rank-4 ones."""
    inputs = adapters[kind]
    folders = [inputs["a"], inputs["wide" if method == "cat" or method in DENSE_METHODS else "b"]]
    ours, theirs = options_for(method)
    result = merge_to_adapter([AdapterSpec(f, w) for f, w in zip(folders, WEIGHTS)], tmp_path / "out",
                              method=method, seed=SEED, **ours)
    reference = peft_merged(kind, folders, method, **theirs)
    mine = loaded(tmp_path / "out", kind)
    assert_same_deltas(deltas(mine, "ours"), deltas(reference, "merged"), SVD_TOL if method == "svd" else TOL)
    reference.set_adapter("merged")
    torch.testing.assert_close(logits(mine), logits(reference), rtol=1e-5, atol=1e-5)
    expected_rank = {"cat": 10, **dict.fromkeys(DENSE_METHODS, 3)}.get(method, 4)
    assert set(result.ranks.values()) == {expected_rank}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (expected_rank, expected_rank, False)


@pytest.mark.parametrize("kind", list(MODELS))
def test_svd_clamp_is_peft_svd_clamp(kind, adapters, tmp_path):
    folders = [adapters[kind]["a"], adapters[kind]["wide"]]
    merge_to_adapter([AdapterSpec(f, w) for f, w in zip(folders, WEIGHTS)], tmp_path / "out", method="ties_svd",
                     rank=5, density=0.7, clamp=0.9)
    reference = peft_merged(kind, folders, "ties_svd", svd_rank=5, density=0.7, svd_clamp=0.9)
    assert_same_deltas(deltas(loaded(tmp_path / "out", kind), "ours"), deltas(reference, "merged"))
    unclamped = deltas(peft_merged(kind, folders, "ties_svd", svd_rank=5, density=0.7), "merged")
    assert any(float((unclamped[name] - delta).norm()) > 1e-4 for name, delta in deltas(reference, "merged").items())


def test_mixed_targets_merge_as_peft_unites_them(tmp_path):
    """PEFT merges adapters of different target lists over the union, each module from the inputs having it."""
    first = peft_lora("llama", tmp_path / "qv", 4, 1, ["q_proj", "v_proj"])
    second = peft_lora("llama", tmp_path / "vd", 4, 2, ["v_proj", "down_proj"])
    for method in ("cat", "ties", "svd"):
        ours, theirs = options_for(method)
        merge_to_adapter([AdapterSpec(first, 0.7), AdapterSpec(second, -0.4)], tmp_path / method, method=method,
                         **ours)
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        if method == "cat":  # v_proj has both inputs' ranks, the others one's: a rank per module, scale 1
            assert config["r"] == 4 and set(config["rank_pattern"]) == {"model.layers.0.self_attn.v_proj",
                                                                        "model.layers.1.self_attn.v_proj"}
            assert set(config["rank_pattern"].values()) == {8} and config["alpha_pattern"] == config["rank_pattern"]
        reference = peft_merged("llama", [first, second], method, **theirs)
        assert_same_deltas(deltas(loaded(tmp_path / method, "llama"), "ours"), deltas(reference, "merged"),
                           SVD_TOL if method == "svd" else TOL)


@pytest.mark.parametrize("method", PLAIN_FORM)
def test_any_method_merges_through_its_served_form(method, adapters, tmp_path):
    """Each method's adapter (ours, every method with an exact plain-LoRA form) merges with a PEFT LoRA as its
    plain-LoRA export does in PEFT."""
    folder = save_random_adapter(small_llama(), method, tmp_path / "in", seed=1, std=0.1, fan_in=True)
    export_adapter(folder, tmp_path / "in-plain")
    other = adapters["llama"]["a"]
    merge_to_adapter([AdapterSpec(folder, 0.7), AdapterSpec(other, -0.4)], tmp_path / "out", method="svd", rank=6)
    reference = peft_merged("llama", [tmp_path / "in-plain", other], "svd", svd_rank=6)
    assert_same_deltas(deltas(loaded(tmp_path / "out", "llama"), "ours"), deltas(reference, "merged"), SVD_TOL)


def test_a_peft_vera_takes_its_layer_sizes_from_the_base(tmp_path):
    """PEFT's VeRA folders do not record each layer's input size, which slices the shared pair: without the base
    that is one line; with it, the merge is that of its plain export."""
    model = get_peft_model(small_llama(), VeraConfig(r=16, target_modules=["q_proj", "v_proj"], save_projection=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
    model.save_pretrained(tmp_path / "vera")
    with pytest.raises(AdapterFileError, match="pass the base model") as caught:
        merge_to_adapter([AdapterSpec(tmp_path / "vera")], tmp_path / "refused", method="cat")
    assert "\n" not in str(caught.value) and not (tmp_path / "refused").exists()
    small_llama().save_pretrained(tmp_path / "base")
    merge_to_adapter([AdapterSpec(tmp_path / "vera", 0.5)], tmp_path / "out", method="cat", base=tmp_path / "base")
    assert_same_deltas(deltas(loaded(tmp_path / "out", "llama"), "ours"),
                       {name: 0.5 * delta for name, delta in deltas(model, "default").items()})


@pytest.mark.parametrize("kind", list(MODELS))
def test_svd_is_the_float64_truncation_of_the_weighted_sum(kind, adapters, tmp_path):
    folders = [adapters[kind]["a"], adapters[kind]["wide"]]
    merge_to_adapter([AdapterSpec(f, w) for f, w in zip(folders, WEIGHTS)], tmp_path / "out", method="svd", rank=3)
    written = read_adapter(tmp_path / "out").lora_factors()
    inputs = [read_adapter(folder).lora_factors() for folder in folders]
    for module, factors in written.items():
        summed = sum(w * f[module].scale * f[module].B.double() @ f[module].A.double() for w, f in zip(WEIGHTS, inputs))
        U, S, Vh = torch.linalg.svd(summed, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert float((factors.low_rank_weight().double() - best).norm() / best.norm()) < TOL, module


def card_errors(folder: Path) -> dict[str, float]:
    rows = re.findall(r"^\| (\S+) \| (\d+) \| ([-+.\deE]+) \|$", (folder / "README.md").read_text(), re.M)
    return {module: float(error) for module, _, error in rows}


@pytest.mark.parametrize("method", ["svd", "linear", "cat"])
def test_card_errors_are_the_recomputed_ones(method, adapters, tmp_path):
    """Against the weighted sum of the input deltas: the combination svd truncates, and what linear and cat
    approximate (cat exactly). Recomputed from PEFT's view of the inputs and of our folder."""
    folders = [adapters["llama"]["a"], adapters["llama"]["b"]]
    result = merge_to_adapter([AdapterSpec(f, w) for f, w in zip(folders, WEIGHTS)], tmp_path / "out",
                              method=method, rank=2 if method == "svd" else None)
    inputs = peft_merged("llama", folders, "cat")
    summed = {name: WEIGHTS[0] * delta for name, delta in deltas(inputs, "in0").items()}
    for name, delta in deltas(inputs, "in1").items():
        summed[name] = summed[name] + WEIGHTS[1] * delta
    written = deltas(loaded(tmp_path / "out", "llama"), "ours")
    recomputed = {name.removeprefix("model."): float((summed[name] - written[name]).norm() / summed[name].norm())
                  for name in summed}
    in_card = {name.removeprefix("model."): error for name, error in card_errors(tmp_path / "out").items()}
    assert in_card.keys() == recomputed.keys() == {m.removeprefix("model.") for m in result.errors}
    for name, error in recomputed.items():
        assert in_card[name] == pytest.approx(error, rel=1e-4, abs=1e-6)
        assert result.errors["model." + name] == pytest.approx(error, rel=1e-4, abs=1e-6)
    if method == "cat":
        assert max(recomputed.values()) < 1e-6
    else:
        assert min(recomputed.values()) > 1e-3  # rank 2 of a rank-8 sum, and linear's cross terms, lose


def test_one_adapter_svd_is_its_truncation(adapters, tmp_path):
    """PEFT would turn one input into `linear`; we do what is asked: the error is the dropped singular values'."""
    folder = adapters["llama"]["wide"]
    result = merge_to_adapter([AdapterSpec(folder)], tmp_path / "out", method="svd", rank=2)
    for module, factors in read_adapter(folder).lora_factors().items():
        S = torch.linalg.svdvals(factors.low_rank_weight())
        assert result.errors[module] == pytest.approx(float(S[2:].norm() / S.norm()), rel=1e-4)
        assert result.ranks[module] == 2


def test_magnitude_ties_at_the_cut_are_kept_in_flat_index_order():
    """k = int(0.5 * 8) = 4: 5 and -3 are above the cut, then two of the four 2's, the first two in flat order."""
    x = torch.tensor([[1.0, -3.0, 2.0, -2.0], [2.0, 0.0, 5.0, 2.0]])
    assert torch.equal(keep_largest(x, 0.5), torch.tensor([[0.0, -3.0, 2.0, -2.0], [0.0, 0.0, 5.0, 0.0]]))
    assert torch.equal(keep_largest(x, 0.1), torch.zeros_like(x))  # int(0.8) = 0, as PEFT
    assert keep_largest(x, 1.0) is x


def test_dare_is_reproducible_by_seed_and_drops_as_asked(adapters, tmp_path):
    folders = [adapters["llama"]["a"], adapters["llama"]["b"]]
    specs = [AdapterSpec(f, w) for f, w in zip(folders, WEIGHTS)]
    for name, seed in (("one", 7), ("again", 7), ("other", 8)):
        merge_to_adapter(specs, tmp_path / name, method="dare_linear", density=0.3, seed=seed)
    one, again, other = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "again", "other"))
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)
    # each input keeps ~30% of its values, times 1 / 0.3: an element of A' is zero where both inputs dropped it
    factors = read_adapter(folders[0]).lora_factors()
    zero = sum(int((t == 0).sum()) for k, t in one.items() if k.endswith("lora_A.weight"))
    total = sum(t.numel() for k, t in one.items() if k.endswith("lora_A.weight"))
    assert zero / total == pytest.approx(0.7 ** 2, abs=0.03)
    module, first = next(iter(factors.items()))
    kept = one[f"base_model.model.{module}.lora_A.weight"]
    assert kept.abs().max() > first.A.abs().max()  # rescaled by 1 / density


def refusal_cases(tmp: Path, adapters: dict) -> dict[str, tuple[list[AdapterSpec], dict, type, str]]:
    a, b, wide = (adapters["llama"][n] for n in ("a", "b", "wide"))
    dora = tmp / "dora"
    peft_dora_model(small_llama(), rank=4, targets=["q_proj"]).save_pretrained(dora)
    other_shape = tmp / "other-shape"  # hidden 128, where the others' is 64
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(other_shape)
    other_base = tmp / "other-base"
    peft_lora("llama", other_base, 4, 2)
    config = json.loads((other_base / "adapter_config.json").read_text())
    (other_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    config = json.loads((b / "adapter_config.json").read_text())
    named = tmp / "named"
    peft_lora("llama", named, 4, 3)
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/one"}))
    two = [AdapterSpec(a), AdapterSpec(b)]
    return {
        "unknown-method": (two, dict(method="slerp"), ConfigError, "unknown method 'slerp'"),
        "rank-0": (two, dict(method="svd", rank=0), ConfigError, "rank=0"),
        "density-0": (two, dict(method="ties", density=0.0), ConfigError, "outside (0, 1]"),
        "density-above-1": (two, dict(method="dare_ties_svd", density=1.5), ConfigError, "outside (0, 1]"),
        "density-missing": (two, dict(method="magnitude_prune"), ConfigError, "needs a density"),
        "density-not-taken": (two, dict(method="cat", density=0.5), ConfigError, "does not take density"),
        "rank-not-taken": (two, dict(method="ties", density=0.5, rank=2), ConfigError, "does not take rank"),
        "seed-negative": (two, dict(method="dare_linear", density=0.5, seed=-1), ConfigError, "seed=-1"),
        "clamp-outside": (two, dict(method="svd", clamp=1.5), ConfigError, "clamp=1.5"),
        "sign-method": (two, dict(method="ties", density=0.5, majority_sign_method="mean"), ConfigError,
                        "majority_sign_method"),
        "unequal-ranks": ([AdapterSpec(a), AdapterSpec(wide)], dict(method="ties", density=0.5), ConfigError,
                          "same rank"),
        "dora": ([AdapterSpec(a), AdapterSpec(dora)], dict(method="svd"), AdapterFileError, "m / ||W + s B A||"),
        "other-shapes": ([AdapterSpec(a), AdapterSpec(other_shape)], dict(method="cat"), AdapterFileError,
                         "not for the same model"),
        "other-bases": ([AdapterSpec(named), AdapterSpec(other_base)], dict(method="cat"), AdapterFileError,
                        "records base"),
        "no-adapter": ([], dict(method="cat"), ConfigError, "at least one adapter"),
    }


def test_every_refusal_is_one_line_and_writes_nothing(adapters, tmp_path):
    cases = refusal_cases(tmp_path, adapters)
    for name, (specs, options, error, words) in cases.items():
        out = tmp_path / f"out-{name}"
        with pytest.raises(error) as caught:
            merge_to_adapter(specs, out, **options)
        assert words in str(caught.value) and "\n" not in str(caught.value), name
        assert not out.exists() and not list(tmp_path.glob(f".out-{name}*")), name


@pytest.mark.parametrize("kind", list(MODELS))
def test_base_checks_shapes_and_is_recorded(kind, adapters, tmp_path):
    """Given, the base is checked (a wider model's weights do not fit) and recorded; GPT-2 stores them
    transposed."""
    folders = [AdapterSpec(adapters[kind]["a"]), AdapterSpec(adapters[kind]["b"])]
    wrong = save_tiny_model(tmp_path / "wide-base", kind)  # the conftest size, twice the adapters' width
    with pytest.raises(AdapterFileError, match="stores its weight as"):
        merge_to_adapter(folders, tmp_path / "refused", method="cat", base=wrong)
    assert not (tmp_path / "refused").exists()
    right = tmp_path / "base"
    MODELS[kind][0]().save_pretrained(right)
    merge_to_adapter(folders, tmp_path / "out", method="ties_svd", density=0.5, base=right)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(right)


def test_run_adapter_merge_returns_the_lines_to_print_and_leaves_inputs_alone(adapters, tmp_path):
    texts = [f"{adapters['gpt2']['a']}:0.5", str(adapters["gpt2"]["wide"])]
    before = [tree_digest(adapters["gpt2"][name]) for name in ("a", "wide")]
    lines = run_adapter_merge(texts, tmp_path / "out", method="ties_svd", rank=4, density=0.5)
    assert lines[0].startswith("merged 2 adapter(s) by ties_svd (weights=[0.5, 1.0], density=0.5")
    assert "rank 4" in lines[0] and "relative error" in lines[1]
    assert read_adapter(tmp_path / "out").config.method == "lora"
    assert [tree_digest(adapters["gpt2"][name]) for name in ("a", "wide")] == before
    written = tree_digest(tmp_path / "out")
    with pytest.raises(ConfigError, match="already exists"):
        run_adapter_merge(texts, tmp_path / "out", method="cat")
    assert tree_digest(tmp_path / "out") == written
    plain = [str(adapters["gpt2"][name]) for name in ("a", "wide")]
    with pytest.raises(ConfigError, match="not both"):
        run_adapter_merge(texts, tmp_path / "other", weights=[0.5, 1.0], method="cat")
    with pytest.raises(ConfigError, match="one per adapter"):
        run_adapter_merge(plain, tmp_path / "other", weights=[0.5], method="cat")
    lines = run_adapter_merge(plain, tmp_path / "out", weights=[0.5, 1.0], method="cat", force=True)
    assert lines[0].startswith("merged 2 adapter(s) by cat (weights=[0.5, 1.0])") and "rank 10" in lines[0]
    assert tree_digest(tmp_path / "out") != written
