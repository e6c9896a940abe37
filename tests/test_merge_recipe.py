"""Merge requests (ftserve.merge.request): mergekit's YAML recipes read as mergekit reads them, every parameter
resolved per tensor as mergekit's planner resolves it (mergekit itself is the oracle), what we do not support
refused by name in one line before any model is read, and the flags building the same request as a recipe."""

import shutil
from pathlib import Path

import pytest
import yaml

from ftserve.errors import ConfigError
from ftserve.merge.request import (InputModel, MergeRequest, layer_index, read_recipe, request_from_flags,
                                   request_yaml, resolve_param, resolve_params)
from ftserve.testing import tiny_gpt2, tiny_llama

LAYER_COUNTS = (1, 2, 3, 5)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny checkpoints (config and weights: mergekit's planner reads both) ``llama{L}-{base,a,b}`` for each
    layer count L and ``gpt2-3-{base,a,b}``."""
    root = tmp_path_factory.mktemp("models")
    for layers in LAYER_COUNTS:
        tiny_llama(vocab_size=16, hidden=8, layers=layers, heads=2, intermediate=16).save_pretrained(
            root / f"llama{layers}-base")
    tiny_gpt2(vocab_size=16, hidden=8, layers=3, heads=2).save_pretrained(root / "gpt2-3-base")
    for base in list(root.iterdir()):
        for name in ("a", "b"):
            shutil.copytree(base, root / base.name.replace("base", name))
    return root


@pytest.fixture
def folders(tmp_path, monkeypatch) -> Path:
    """A working folder holding model folders (a config.json each: no weights, nothing here reads them) base, a,
    b, c and adapter folders lora1, lora2 (an adapter_config.json each); recipes name them relative to it."""
    for name in ("base", "a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    for name in ("lora1", "lora2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe(folder: Path, text: str) -> Path:
    path = folder / "merge.yaml"
    path.write_text(text)
    return path


def merge_of(request: MergeRequest) -> tuple:
    """What a request merges, a bare adapter folder spelled base+adapter (request_yaml writes it so)."""
    inputs = [(m.model or request.base, m.adapter, m.params) for m in request.inputs]
    return (request.method, request.base, inputs, request.params, request.dtype, request.out_dtype, request.seed)


def mergekit_resolution(text: str) -> dict[str, tuple[dict, dict]]:
    """Per output tensor, mergekit's own resolved (shared, per-input by model) parameters, from its planner."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions()
    LoaderCache().setup(options)
    reference = config.base_model or config.models[0].model
    planner = MergePlanner(config, get_architecture_info(config, options), options=options,
                           out_model_config=reference.config())
    planner._plan()
    return {weight.name: (dict(task.parameters), {str(m): dict(p) for m, p in task.input_parameters.items()})
            for weight, task in planner._tensors}


# Recipes as mergekit's README and examples write them; {arch} picks the tiny checkpoints.
RESOLUTION_RECIPES = {
    "ties-gradients-and-filters": """
merge_method: ties
base_model: {arch}-base
models:
  - model: {arch}-base
  - model: {arch}-a
    parameters:
      weight: [0, 0.5, 0.3, 1]
      density: [{{filter: self_attn, value: [0.2, 0.9]}}, {{filter: mlp, value: 0.5}}]
  - model: {arch}-b
    parameters: {{weight: 0.3}}
parameters:
  density: 0.7
  normalize: [true, false, true]
  int8_mask: 1
  rescale: "no"
  lambda: 1e-1
dtype: bfloat16
""",
    "slerp-filters": """
merge_method: slerp
base_model: {arch}-base
models:
  - model: {arch}-base
  - model: {arch}-a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "dare-ties-seeded": """
merge_method: dare_ties
base_model: {arch}-base
models:
  - model: {arch}-a
    parameters: {{weight: 0.6, density: [0.9, 0.3]}}
  - model: {arch}-b
    parameters:
      weight: {{filter: "*", value: [1, 2]}}
      density: {{filter: mlp, value: 0.53}}
parameters: {{density: 0.25, rescale: true}}
random_seed: 7
""",
    "linear-base-as-input": """
merge_method: linear
base_model: {arch}-base
models:
  - model: {arch}-a
    parameters: {{weight: [1, 0]}}
  - model: {arch}-b
parameters: {{weight: 0.5, normalize: false}}
""",
    "task-arithmetic": """
merge_method: task_arithmetic
base_model: {arch}-base
models:
  - model: {arch}-a
    parameters: {{weight: [{{filter: layers.0., value: 2}}, {{filter: h.0., value: 3}}, {{value: [0.25, 0.75]}}]}}
  - model: {arch}-b
    parameters: {{weight: -0.5}}
parameters: {{lambda: 0.8}}
""",
    "della": """
merge_method: della
base_model: {arch}-base
models:
  - model: {arch}-a
    parameters: {{weight: 1, density: 0.6, epsilon: [0.1, 0.3]}}
  - model: {arch}-b
    parameters: {{weight: 1, density: 0.4}}
""",
}
ARCHS = [f"llama{layers}" for layers in LAYER_COUNTS] + ["gpt2-3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", RESOLUTION_RECIPES)
def test_every_parameter_resolves_per_tensor_as_mergekits_planner_resolves_it(name, arch, models, monkeypatch):
    """Gradients over the layers (embeddings, final norm and head read t = 0; a one-layer model's layer t = 1),
    filters in order, a model's own setting before ``parameters:`` before the default: equal, tensor by
    tensor, to what mergekit's planner hands its merge method; and the recipe request_yaml writes means the same
    to mergekit."""
    text = RESOLUTION_RECIPES[name].format(arch=arch)
    monkeypatch.chdir(models)
    request = read_recipe(recipe(models, text))
    expected = mergekit_resolution(text)
    assert mergekit_resolution(request_yaml(request)) == expected
    num_layers = int(arch.removeprefix("llama").removeprefix("gpt2-"))
    assert expected
    for tensor, (shared, per_model) in expected.items():
        per_input, ours_shared = resolve_params(request, tensor, num_layers)
        assert ours_shared == shared, tensor
        if request.base_index is None:  # mergekit adds the base to the inputs it merges; a request keeps it apart
            assert per_model.pop(request.base) == {}
        assert {m.text: p for m, p in zip(request.inputs, per_input)} == per_model, tensor


def test_a_linear_base_not_listed_is_merged_as_one_more_input_as_mergekit_does(folders):
    request = read_recipe(recipe(folders, "merge_method: linear\nbase_model: base\nmodels:\n"
                                          "  - model: a\n    parameters: {weight: 2}\nparameters: {weight: 1}\n"))
    assert [(m.model, m.params) for m in request.inputs] == [("a", {"weight": 2.0}), ("base", {})]
    assert request.base_index == 1
    with pytest.raises(ConfigError, match="linear does not use base_model, so mergekit merges base as one more "
                                          "model, and it has no weight"):
        read_recipe(recipe(folders, "merge_method: linear\nbase_model: base\nmodels:\n  - model: a\n"
                                    "    parameters: {weight: 2}\n"))


@pytest.mark.parametrize("value, tensor, num_layers, expected", [
    (0.3, "model.layers.4.mlp.up_proj.weight", 8, 0.3),
    ([0.0, 1.0], "model.layers.2.mlp.up_proj.weight", 5, 0.5),
    ([0.0, 1.0], "model.embed_tokens.weight", 5, 0.0),
    ([0.0, 1.0], "lm_head.weight", 5, 0.0),
    ([0.0, 1.0], "model.layers.0.mlp.up_proj.weight", 1, 1.0),
    ([0.0, 0.5, 0.3, 0.7, 1.0], "model.layers.1.self_attn.q_proj.weight", 3, 0.3),
    ([True, False], "model.layers.1.self_attn.q_proj.weight", 3, True),
    ([True, False], "model.layers.2.self_attn.q_proj.weight", 3, False),
    ([{"filter": "mlp", "value": 0.2}], "model.layers.1.self_attn.q_proj.weight", 3, None),
    ([{"filter": "mlp", "value": 0.2}, {"value": [1.0, 3.0]}], "model.layers.1.self_attn.q_proj.weight", 3, 2.0),
    ([{"filter": "*", "value": 0.9}, {"value": 0.1}], "model.norm.weight", 3, 0.9),
])
def test_resolve_param_against_mergekits_evaluate_setting(value, tensor, num_layers, expected):
    """The cases by hand, and mergekit's ``evaluate_setting`` at the t its planner gives the layer."""
    from mergekit.config import ConditionalParameter, evaluate_setting
    from pydantic import TypeAdapter

    assert resolve_param(value, tensor, num_layers) == expected
    index = layer_index(tensor)
    t = 0 if index is None else index / (num_layers - 1) if num_layers > 1 else 1
    setting = [ConditionalParameter(**e) for e in value] if isinstance(value, list) and isinstance(
        value[0], dict) else value
    kind = bool if expected is not None and isinstance(expected, bool) else float
    assert evaluate_setting(tensor, setting, t, validate=TypeAdapter(kind).validate_python) == expected


@pytest.mark.parametrize("tensor, index", [
    ("model.layers.3.mlp.up_proj.weight", 3), ("model.layers.12.self_attn.q_proj.weight", 12),
    ("transformer.h.0.attn.c_attn.weight", 0), ("model.layers.3.block_sparse_moe.experts.5.w1.weight", 3),
    ("model.embed_tokens.weight", None), ("model.norm.weight", None), ("lm_head.weight", None),
    ("transformer.wte.weight", None), ("transformer.ln_f.bias", None),
])
def test_layer_index_reads_the_layer_from_the_tensor_name(tensor, index):
    assert layer_index(tensor) == index


EXAMPLES = {
    "ties": """
models:
  - model: a
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: b
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: c
    parameters: {density: 0.33, weight: [{filter: mlp, value: 0.5}, {value: 0}]}
merge_method: ties
base_model: base
parameters: {normalize: true, int8_mask: true}
dtype: float16
""",
    "dare_ties": """
merge_method: dare_ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.53}
  - model: b+lora1
    parameters: {weight: 0.5, density: 0.53}
random_seed: 42
tokenizer_source: base
dtype: bfloat16
out_dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: base
models:
  - model: base
  - model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "linear": """
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 0.3}
merge_method: linear
dtype: float16
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - model: lora1
    parameters: {weight: 0.7}
  - model: base+lora2
    parameters: {weight: 0.3}
parameters: {lambda: 1.2}
""",
    "breadcrumbs": """
merge_method: breadcrumbs_ties
base_model: base
models:
  - model: a
    parameters: {weight: 1, density: 0.9, gamma: 0.01}
  - model: b
    parameters: {weight: 1, density: 0.9, gamma: 0.02}
""",
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_mergekits_example_recipes_read_and_written_back_loadable_by_mergekit(name, folders):
    """Each recipe is read; request_yaml writes one that mergekit's loader accepts and that reads back as the
    same request (a bare adapter folder written as base+adapter, since mergekit knows only that form)."""
    from mergekit.config import MergeConfiguration

    request = read_recipe(recipe(folders, EXAMPLES[name]))
    assert request.text == EXAMPLES[name]
    written = request_yaml(request)
    config = MergeConfiguration.model_validate(yaml.safe_load(written))
    assert config.merge_method == request.method
    again = read_recipe(recipe(folders, written))
    assert merge_of(again) == merge_of(request)


def test_a_required_parameter_no_filter_gives_a_tensor_is_named_when_resolved(folders):
    request = read_recipe(recipe(folders, TIES.replace("weight: 1", "weight: [{filter: mlp, value: 1}]")))
    assert resolve_params(request, "model.layers.0.mlp.up_proj.weight", 2)[0] == [{"weight": 1.0, "density": 0.5}]
    with pytest.raises(ConfigError, match=r"ties needs 'weight' for model.norm.weight \(a\); no setting gives it "
                                          r"one there"):
        resolve_params(request, "model.norm.weight", 2)


def test_a_filter_entry_may_say_filter_null_as_mergekit_allows(folders):
    request = read_recipe(recipe(folders, TIES + "parameters: {lambda: [{filter: null, value: [1, 2]}]}\n"))
    assert request.params == {"lambda": [{"value": [1.0, 2.0]}]}


def test_model_adapter_and_bare_adapter_inputs(folders):
    request = read_recipe(recipe(folders, EXAMPLES["dare_ties"]))
    assert request.inputs == [InputModel("a", "a", None, {"weight": 0.5, "density": 0.53}),
                              InputModel("b+lora1", "b", "lora1", {"weight": 0.5, "density": 0.53})]
    assert (request.seed, request.dtype, request.out_dtype, request.tokenizer_source) == (
        42, "bfloat16", "float32", "base")
    request = read_recipe(recipe(folders, EXAMPLES["task_arithmetic"]))
    assert [(m.model, m.adapter) for m in request.inputs] == [(None, "lora1"), ("base", "lora2")]
    assert request.base_index is None
    assert "model: base+lora1" in request_yaml(request)


def test_a_hub_id_in_the_local_cache_is_a_model_and_a_missing_one_is_refused(folders, hub_cache):
    request = read_recipe(recipe(folders, "merge_method: task_arithmetic\nbase_model: acme/tiny-llama\n"
                                          "models:\n  - model: acme/tiny-llama+lora1\n    parameters: {weight: 1}\n"))
    assert request.inputs[0].model == "acme/tiny-llama"
    with pytest.raises(ConfigError, match="acme/missing: no such folder, and the Hugging Face hub cannot provide "
                                          "it"):
        read_recipe(recipe(folders, "merge_method: linear\nmodels:\n  - model: acme/missing\n"
                                    "    parameters: {weight: 1}\n"))


TIES = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n"
REFUSALS = {
    "not-a-mapping": ("- model: a\n", "a recipe is a YAML mapping"),
    "yaml-error": ("merge_method: [ties\n", "not valid YAML"),
    "slices": ("merge_method: slerp\nslices:\n  - sources: []\n", "layer slicing (slices:) is not supported"),
    "modules": ("merge_method: linear\nmodules: {}\n", "per-module recipes (modules:) are not supported"),
    "unknown-key": (TIES + "normalise: true\n", "unknown key 'normalise' (mergekit would ignore it)"),
    "tokenizer-union": (TIES + "tokenizer_source: union\n", "tokenizer_source: 'union' is not supported"),
    "tokenizer": (TIES + "tokenizer: {source: base}\n", "tokenizer: (a merged vocabulary) is not supported"),
    "chat-template": (TIES + "chat_template: chatml\n", "chat_template: is not supported"),
    "unknown-method": (TIES.replace("ties", "tiez"), "unknown merge method 'tiez'"),
    "mergekit-method-we-lack": (TIES.replace("ties", "model_stock"), "merge method 'model_stock' is mergekit's, "
                                                                        "but ftserve does not support it"),
    "parameter-not-taken": (TIES + "parameters: {t: 0.5}\n", "'t' is not a ties parameter (mergekit would "
                                                             "ignore it)"),
    "per-model-typo": (TIES.replace("density", "densty"), "'densty' is not a ties parameter"),
    "shared-given-per-model": (TIES.replace("weight: 1", "weight: 1, normalize: false"),
                               "'normalize' is shared by all models in ties; give it under parameters:"),
    "density-zero": (TIES.replace("0.5", "0"), "0.0 is outside (0, 1]; mergekit would silently drop the whole"),
    "density-above-one": (TIES.replace("0.5", "1.5"), "1.5 is outside (0, 1]; mergekit would silently treat it "
                                                      "as no pruning"),
    "density-gradient-point": (TIES.replace("0.5", "[0.5, 1.2]"), "1.2 is outside (0, 1]"),
    "density-in-a-filter": (TIES + "parameters: {density: [{filter: mlp, value: -0.1}]}\n",
                            "-0.1 is outside (0, 1]"),
    "nested-gradient": (TIES.replace("0.5", "[[0.5, 1]]"), "a list is a gradient of numbers"),
    "filter-typo": (TIES.replace("0.5", "[{filters: mlp, value: 0.5}]"), "each filter entry is {filter: NAME"),
    "filter-in-filter": (TIES.replace("0.5", "[{filter: mlp, value: {value: 0.5}}]"),
                         "a filter's value is a number or a gradient"),
    "empty-gradient": (TIES.replace("0.5", "[]"), "a list is a gradient of numbers"),
    "not-a-number": (TIES.replace("0.5", "half"), "'half' is not a number"),
    "not-a-bool": (TIES + "parameters: {normalize: 'maybe'}\n", "'maybe' is not true or false"),
    "two-is-not-a-bool": (TIES + "parameters: {normalize: 2}\n", "2 is not true or false"),
    "missing-model": (TIES.replace("model: a", "model: ./nowhere"), "./nowhere: no such model or adapter folder"),
    "missing-adapter": (TIES.replace("model: a", "model: a+./nolora"), "./nolora: no such model or adapter folder"),
    "a-file": (TIES.replace("model: a", "model: merge.yaml"), "merge.yaml: a file, not a model or adapter folder"),
    "adapter-plus-model": (TIES.replace("model: a", "model: lora1+a"), "'lora1' must be a model and 'a' an "
                                                                        "adapter folder"),
    "two-pluses": (TIES.replace("model: a", "model: a+lora1+lora2"), "cannot read 'a+lora1+lora2'"),
    "revision": (TIES.replace("model: a", "model: acme/tiny@main"), "revisions (@REV) are not supported"),
    "duplicate": (TIES + "  - model: ./a\n    parameters: {weight: 1}\n", "./a and a are the same model"),
    "adapter-twice": (TIES.replace("model: a", "model: lora1") + "  - model: base+lora1\n    parameters: "
                      "{weight: 1}\n", "base+lora1 and lora1 are the same model"),
    "no-models": ("merge_method: ties\nbase_model: base\n", "models: is missing or empty"),
    "model-entry-not-a-mapping": (TIES + "  - b\n", "models[1]: each entry is a mapping with model:"),
    "model-as-mapping": (TIES + "  - model: {model: b, lora: lora1}\n", "models[1]: model: is a dict"),
    "model-entry-key": (TIES.replace("    parameters", "    parameter"), "unknown key(s) parameter"),
    "no-base": (TIES.replace("base_model: base\n", ""), "ties needs base_model:"),
    "adapter-without-base": ("merge_method: linear\nmodels:\n  - model: lora1\n    parameters: {weight: 1}\n",
                             "lora1 is an adapter folder, so it needs base_model:"),
    "adapter-as-base": (TIES.replace("base_model: base", "base_model: lora1"), "base_model lora1: must be a "
                                                                                "model"),
    "joined-base": (TIES.replace("base_model: base", "base_model: base+lora1"),
                    "base_model base+lora1: must be a model, not an adapter or model+adapter"),
    "slerp-two-others": ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: a\n  - model: b\n"
                         "parameters: {t: 0.5}\n", "slerp merges exactly 2 models, the base counted; got 3"),
    "slerp-no-t": ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: a\n", "slerp needs 't'"),
    "weight-missing": (TIES.replace("weight: 1, ", ""), "ties needs 'weight' for every model; a has none"),
    "base-with-parameters": (TIES + "  - model: base\n    parameters: {weight: 1}\n",
                             "the base takes no parameters in ties"),
    "dtype": (TIES + "dtype: int8\n", "dtype: 'int8' is not supported"),
    "seed": (TIES + "random_seed: -1\n", "random_seed: -1 is not a whole number"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_what_we_do_not_support_or_is_wrong_is_refused_in_one_line_naming_it(name, folders):
    text, message = REFUSALS[name]
    path = recipe(folders, text)
    with pytest.raises(ConfigError) as info:
        read_recipe(path)
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_a_missing_recipe_file_is_named(folders):
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read the recipe"):
        read_recipe(folders / "nowhere.yaml")


def test_flags_build_the_request_the_same_recipe_gives(folders):
    request = request_from_flags("ties", "base", ["a", "lora1", "b+lora2"], [0.6, 0.3, 0.1], density=0.5,
                                 lambda_=0.9, seed=3, dtype="bfloat16")
    from_recipe = read_recipe(recipe(folders, request.text))
    assert request == MergeRequest("ties", "base", [InputModel("a", "a", None, {"weight": 0.6}),
                                                   InputModel("lora1", None, "lora1", {"weight": 0.3}),
                                                   InputModel("b+lora2", "b", "lora2", {"weight": 0.1})],
                                   {"density": 0.5, "lambda": 0.9}, dtype="bfloat16", seed=3,
                                   tokenizer_source="base", text=request.text)
    assert merge_of(from_recipe) == merge_of(request)
    slerp = request_from_flags("slerp", "base", ["a"], t=0.25)
    assert (slerp.inputs, slerp.params, slerp.seed) == ([InputModel("a", "a", None, {})], {"t": 0.25}, 0)


def test_flags_default_to_weight_one_and_a_linear_base_is_not_merged(folders):
    request = request_from_flags("linear", "base", ["lora1", "a"])
    assert [m.params for m in request.inputs] == [{"weight": 1.0}, {"weight": 1.0}]
    assert "base_model" not in request.text and "model: base+lora1" in request.text
    again = read_recipe(recipe(folders, request.text))
    assert [(m.model, m.adapter) for m in again.inputs] == [("base", "lora1"), ("a", None)]


@pytest.mark.parametrize("keywords, message", [
    (dict(method="linear", density=0.5), "'density' is not a linear parameter"),
    (dict(method="ties", weights=[1.0]), "--weights gives 1 weight(s) for 2 input(s)"),
    (dict(method="ties", density=2.0), "2.0 is outside (0, 1]"),
    (dict(method="slerp"), "slerp merges exactly 2 models, the base counted; got 3"),
    (dict(method="bogus"), "unknown merge method 'bogus'"),
])
def test_flags_are_refused_as_the_recipe_would_be(keywords, message, folders):
    with pytest.raises(ConfigError) as info:
        request_from_flags(base="base", inputs=["a", "b"], **keywords)
    assert message in str(info.value)
