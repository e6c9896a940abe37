"""Merge requests: what to merge, by which method, with which parameters; read from mergekit's YAML recipe or
built from the command line's flags, checked in full before any model is read.

A recipe is mergekit's (``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source: base``), plus ``random_seed`` (mergekit takes it as
``--random-seed``; its YAML loader ignores the key). Each ``model`` is a model folder, a hub id in the local
cache, ``model+adapter`` (mergekit's ``model+lora``) or a bare adapter folder (``base_model`` + that adapter).

A parameter value is a scalar, a gradient or a list of filters, resolved per tensor as mergekit resolves it
(``resolve_param``): a gradient ``[v_0, ..., v_m]`` is read at ``t = i / (L - 1)`` for layer ``i`` of ``L``
(``t = 1`` when ``L = 1``; ``t = 0`` for tensors outside the layers: embeddings, final norm, head), linearly
between the two nearest of its ``m + 1`` evenly spaced points (booleans take the point at or below ``t``); a
filter list ``[{filter: self_attn, value: ...}, {value: ...}]`` gives the first entry whose ``filter`` is a
substring of the tensor name (no filter, or ``*``: every tensor). A model's own setting comes first, then the
shared ``parameters:``, then the method's default.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..files.adapter_folder import ADAPTER_CONFIG
from ..files.hub import resolve_folder
from .methods import REQUIRED, ModelMergeMethod, Param, get_merge_method

ParamValue = float | bool | list   # scalar; a gradient [v0, v1, ...]; or mergekit's [{"filter": str, "value": ...}]

KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "random_seed")
NOT_SUPPORTED = {
    "slices": "mergekit's layer slicing (slices:) is not supported; merge whole models with models:",
    "modules": "mergekit's per-module recipes (modules:) are not supported; merge whole models with models:",
    "tokenizer": "tokenizer: (a merged vocabulary) is not supported; the base's tokenizer is copied "
                 "(tokenizer_source: base)",
    "chat_template": "chat_template: is not supported; the base's tokenizer files, chat template included, are "
                     "copied",
}
DTYPES = ("float32", "float16", "bfloat16")
BOOLEANS = {**dict.fromkeys(("true", "yes", "on", "t", "y", "1", "1.0"), True),
            **dict.fromkeys(("false", "no", "off", "f", "n", "0", "0.0"), False)}
LAYER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class InputModel:
    text: str                  # as written (recipe `model:` or command line)
    model: str | None          # model folder or hub id; None = the request's base (a bare adapter folder)
    adapter: str | None        # adapter folder applied on top (mergekit `model+lora`, our `base+adapter`)
    params: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class MergeRequest:
    method: str
    base: str | None           # base_model
    inputs: list[InputModel]
    params: dict[str, ParamValue]   # shared `parameters:`
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    tokenizer_source: str | None = None   # only "base" (or None) is supported
    text: str = ""             # the recipe as given, or one written from flags (request_yaml)

    @property
    def base_index(self) -> int | None:
        """Which input is the base itself (listed among ``models``, or added as mergekit adds it), if any."""
        return next((i for i, m in enumerate(self.inputs) if m.adapter is None and m.model == self.base), None)


def read_recipe(path: str | os.PathLike) -> MergeRequest:
    """The request a mergekit YAML recipe describes; ConfigError (one line, naming the file and the problem)
    for anything we do not support or that is wrong, before any model is read."""
    where = os.fspath(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the recipe ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{where}: a recipe is a YAML mapping (merge_method:, models:, ...); "
                          f"this file holds {_kind(recipe)}")
    try:
        return _check(_base_as_input(_from_recipe(recipe, text)))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _base_as_input(request: MergeRequest) -> MergeRequest:
    """mergekit merges a base_model that a base-less method (``linear``) does not list as one more input, with
    the shared parameters only."""
    if request.base is None or request.base_index is not None or get_merge_method(request.method).needs_base:
        return request
    if "weight" not in request.params:
        raise ConfigError(f"{request.method} does not use base_model, so mergekit merges {request.base} as one more "
                          f"model, and it has no weight: list it under models: with a weight, or leave base_model out")
    request.inputs.append(InputModel(request.base, request.base, None, {}))
    return request


def request_from_flags(method: str, base: str, inputs: list[str], weights: list[float] | None = None,
                       density: float | None = None, lambda_: float | None = None, t: float | None = None,
                       seed: int = 0, dtype: str | None = None) -> MergeRequest:
    """The request ``ftserve merge BASE INPUT... --method ... --weights ... --density ... --lambda ... --t ...``
    describes: one weight per input (default 1 where the method takes a weight), the other values shared."""
    if weights is not None and len(weights) != len(inputs):
        raise ConfigError(f"--weights gives {len(weights)} weight(s) for {len(inputs)} input(s); give one per "
                          f"input, e.g. --weights {','.join(['0.5'] * len(inputs))}")
    merge_method = get_merge_method(method)
    takes_weight = any(p.name == "weight" for p in merge_method.params)
    models = []
    for i, text in enumerate(inputs):
        params = {"weight": float(weights[i])} if weights is not None else {"weight": 1.0} if takes_weight else {}
        models.append(_input(text, params, f"input {text!r}"))
    shared = {name: float(value) for name, value in (("density", density), ("lambda", lambda_), ("t", t))
              if value is not None}
    request = _check(MergeRequest(method, base, models, shared, dtype=dtype, seed=seed, tokenizer_source="base"))
    request.text = request_yaml(request)
    return request


def request_yaml(request: MergeRequest) -> str:
    """``mergekit_config.yml``: the recipe mergekit reads as this request. For a method that does not use a base
    (``linear``) and a base that is not among the inputs, ``base_model`` is left out (mergekit would merge it as
    one more input) and adapters are written ``base+adapter``."""
    write_base = request.base is not None and (get_merge_method(request.method).needs_base
                                               or request.base_index is not None)
    recipe: dict = {"merge_method": request.method}
    if write_base:
        recipe["base_model"] = request.base
    recipe["models"] = [{"model": _reference(m, request.base), **({"parameters": m.params} if m.params else {})}
                        for m in request.inputs]
    if request.params:
        recipe["parameters"] = request.params
    for key in ("dtype", "out_dtype"):
        if getattr(request, key):
            recipe[key] = getattr(request, key)
    if request.tokenizer_source and write_base:
        recipe["tokenizer_source"] = request.tokenizer_source
    recipe["random_seed"] = request.seed
    return yaml.dump(recipe, Dumper=_RecipeDumper, sort_keys=False)


def resolve_param(value: ParamValue, tensor_name: str, num_layers: int) -> object:
    """``value`` for ``tensor_name`` in a model of ``num_layers`` layers, as mergekit resolves it (module
    docstring); None when no filter matches (the next setting, or the method's default, applies)."""
    index = layer_index(tensor_name)
    if index is None:
        t = 0.0
    else:
        t = index / (num_layers - 1) if num_layers > 1 else 1.0
    return _evaluate(value, tensor_name, t)


def resolve_params(request: MergeRequest, tensor_name: str, num_layers: int
                   ) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Every parameter of the request's method for ``tensor_name``: per input (in ``request.inputs`` order; the
    base of a method that takes task vectors against it gets none) and shared, with mergekit's precedence (the
    model's own setting, then ``parameters:``, then the method's default). ConfigError naming the tensor when a
    required one has no value there (a filter list that misses it)."""
    method = get_merge_method(request.method)

    def value(param, settings: list[dict], where: str) -> object:
        for setting in settings:
            if param.name in setting:
                found = resolve_param(setting[param.name], tensor_name, num_layers)
                if found is not None:
                    return found
        if param.default is REQUIRED:
            raise ConfigError(f"{method.name} needs {param.name!r} for {tensor_name} ({where}); no setting gives it "
                              f"one there: add a filter-less entry {{value: ...}}")
        return param.default

    shared = {p.name: value(p, [request.params], "parameters:") for p in method.params if not p.per_input}
    per_input = [{} if method.needs_base and i == request.base_index else
                 {p.name: value(p, [m.params, request.params], m.text) for p in method.params if p.per_input}
                 for i, m in enumerate(request.inputs)]
    return per_input, shared


def layer_index(tensor_name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.3.mlp.up_proj.weight`` -> 3, ``transformer.h.0.attn...``
    -> 0): the first all-digit part of its dotted name; None for tensors outside the layers."""
    found = LAYER.search(tensor_name)
    return int(found.group(1)) if found else None


def _evaluate(value: ParamValue, tensor_name: str, t: float) -> object:
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], dict):
        for entry in value:
            if entry.get("filter") in (None, "*") or entry["filter"] in tensor_name:
                return _evaluate(entry["value"], tensor_name, t)
        return None
    if any(isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    low = int(scaled)
    high = min(len(value) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * value[low] + frac * value[high]


def _from_recipe(recipe: dict, text: str) -> MergeRequest:
    for key in recipe:
        if key in NOT_SUPPORTED:
            raise ConfigError(NOT_SUPPORTED[key])
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r} (mergekit would ignore it); a recipe holds "
                              f"{', '.join(KEYS)}")
    method = recipe.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError("merge_method: is missing or not a name; give one, e.g. merge_method: ties")
    source = recipe.get("tokenizer_source")
    if source not in (None, "base"):
        raise ConfigError(f"tokenizer_source: {source!r} is not supported; only tokenizer_source: base (the "
                          f"base's tokenizer is copied)")
    base = recipe.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"base_model: is {_kind(base)}; give a model folder or hub id")
    models = recipe.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("models: is missing or empty; list the models to merge (models: [{model: DIR}, ...])")
    inputs = [_recipe_input(entry, i) for i, entry in enumerate(models)]
    seed = recipe.get("random_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"random_seed: {seed!r} is not a whole number >= 0")
    return MergeRequest(method, base, inputs, _mapping(recipe.get("parameters"), "parameters:"),
                        dtype=recipe.get("dtype"), out_dtype=recipe.get("out_dtype"), seed=seed,
                        tokenizer_source=source, text=text)


def _recipe_input(entry: object, i: int) -> InputModel:
    where = f"models[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each entry is a mapping with model: and parameters:; got {_kind(entry)}")
    if not isinstance(entry.get("model"), str):
        raise ConfigError(f"{where}: model: is {_kind(entry.get('model'))}; give a folder, hub id or MODEL+ADAPTER")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise ConfigError(f"{where} ({entry['model']}): unknown key(s) {', '.join(extra)} (mergekit would ignore "
                          f"them); an entry holds model: and parameters:")
    return _input(entry["model"], _mapping(entry.get("parameters"), f"{where} ({entry['model']}) parameters:"),
                  f"{where} ({entry['model']})")


def _input(text: str, params: dict, where: str) -> InputModel:
    """``text`` as mergekit's ModelReference reads it (``model`` or ``model+lora``), a bare adapter folder too;
    every local path must exist, every hub id be in the local cache."""
    if Path(text).expanduser().exists():
        parts = [text]
    else:
        parts = text.split("+")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"{where}: cannot read {text!r}; write MODEL, ADAPTER or MODEL+ADAPTER")
    if any("@" in part and not Path(part).expanduser().exists() for part in parts):
        raise ConfigError(f"{where}: {text!r}: revisions (@REV) are not supported; give the folder of that "
                          f"revision")
    kinds = [_folder_kind(part, where) for part in parts]
    if len(parts) == 2:
        if kinds != ["model", "adapter"]:
            raise ConfigError(f"{where}: in {text!r}, {parts[0]!r} must be a model and {parts[1]!r} an adapter "
                              f"folder (with {ADAPTER_CONFIG})")
        return InputModel(text, parts[0], parts[1], params)
    if kinds[0] == "adapter":
        return InputModel(text, None, text, params)
    return InputModel(text, text, None, params)


def _folder_kind(name: str, where: str) -> str:
    """"adapter" for a folder with adapter_config.json, "model" for any other folder or hub id (only its JSON
    files are fetched here; offline, the local cache answers)."""
    try:
        folder = resolve_folder(name, "model or adapter", allow_patterns=["*.json"], error=ConfigError)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return "adapter" if (folder / ADAPTER_CONFIG).is_file() else "model"


def _check(request: MergeRequest) -> MergeRequest:
    """Every rule a request must meet before any model is read (see read_recipe); values made canonical."""
    method = get_merge_method(request.method)
    if request.base is not None:
        joined = "+" in request.base and not Path(request.base).expanduser().exists()
        if joined or _folder_kind(request.base, "base_model") != "model":
            raise ConfigError(f"base_model {request.base}: must be a model, not an adapter or model+adapter; "
                              f"merge the adapter into its base first (ftserve merge) and give that folder")
    elif method.needs_base:
        raise ConfigError(f"{method.name} needs base_model: (task vectors are taken against it)")
    for m in request.inputs:
        if m.model is None and request.base is None:
            raise ConfigError(f"{m.text} is an adapter folder, so it needs base_model: (or write MODEL+{m.text})")
    seen: dict[tuple, str] = {}
    for m in request.inputs:
        key = (_identity(m.model or request.base), m.adapter and _identity(m.adapter))
        if key in seen:
            raise ConfigError(f"{m.text} and {seen[key]} are the same model; list each model once")
        seen[key] = m.text
    count = len(request.inputs) + (method.needs_base and request.base_index is None)
    if count < method.min_inputs or method.max_inputs is not None and count > method.max_inputs:
        wanted = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs else
                  f"at least {method.min_inputs}" if method.max_inputs is None else
                  f"{method.min_inputs} to {method.max_inputs}")
        raise ConfigError(f"{method.name} merges {wanted} models, the base counted; got {count}"
                          + (" (slerp: the base and exactly one other)" if method.name == "slerp" else ""))
    params = {p.name: p for p in method.params}
    for i, m in enumerate(request.inputs):
        for name in m.params:
            where = f"{m.text}: parameter {name!r}"
            if i == request.base_index and method.needs_base:
                raise ConfigError(f"{where}: the base takes no parameters in {method.name} (mergekit would ignore "
                                  f"it); remove it")
            if name in params and not params[name].per_input:
                raise ConfigError(f"{where} is shared by all models in {method.name}; give it under parameters:")
        m.params = {name: _value(method, params, name, value, f"{m.text}: parameter {name!r}")
                    for name, value in m.params.items()}
    request.params = {name: _value(method, params, name, value, f"parameters: {name!r}")
                      for name, value in request.params.items()}
    for p in method.params:
        if p.default is not REQUIRED or p.name in request.params:
            continue
        if not p.per_input:
            raise ConfigError(f"{method.name} needs {p.name!r}; give it under parameters:")
        for i, m in enumerate(request.inputs):
            if p.name not in m.params and not (method.needs_base and i == request.base_index):
                raise ConfigError(f"{method.name} needs {p.name!r} for every model; {m.text} has none")
    request.dtype = _dtype(request.dtype, "dtype")
    request.out_dtype = _dtype(request.out_dtype, "out_dtype")
    return request


def _value(method: ModelMergeMethod, params: dict, name: str, value: object, where: str) -> ParamValue:
    """``value`` checked and made canonical: floats for float parameters (YAML's ``1e-3`` is a string: mergekit
    reads it as a number, so do we), a filter list always a list of {filter?, value} mappings."""
    if name not in params:
        raise ConfigError(f"{where} is not a {method.name} parameter (mergekit would ignore it); it takes "
                          f"{', '.join(params) or 'none'}")
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        out = []
        for entry in value:
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry or not isinstance(entry.get("filter", ""), (str, type(None))):
                raise ConfigError(f"{where}: each filter entry is {{filter: NAME, value: V}} or {{value: V}}; got "
                                  f"{entry}")
            inner = entry["value"]
            if isinstance(inner, (dict, list)) and not _is_gradient(inner):
                raise ConfigError(f"{where}: a filter's value is a number or a gradient [v0, v1, ...]; got {inner}")
            given = {"filter": entry["filter"]} if entry.get("filter") is not None else {}
            out.append({**given, "value": _scalars(params[name], inner, where)})
        return out
    if isinstance(value, list) and not _is_gradient(value):
        raise ConfigError(f"{where}: a list is a gradient of numbers [v0, v1, ...] or a list of filters "
                          f"[{{filter: self_attn, value: ...}}, {{value: ...}}]; got {value}")
    return _scalars(params[name], value, where)


def _is_gradient(value: object) -> bool:
    return isinstance(value, list) and bool(value) and not any(isinstance(e, (dict, list)) for e in value)


def _scalars(param: Param, value: object, where: str) -> ParamValue:
    if isinstance(value, list):
        return [_scalar(param, v, where) for v in value]
    return _scalar(param, value, where)


def _scalar(param: Param, value: object, where: str) -> float | bool:
    """One value as mergekit's (pydantic's) lax reading takes it: for a boolean, 0/1 and yes/no/on/off too."""
    if param.kind is bool:
        if isinstance(value, bool):
            return value
        spelled = str(value).strip().lower() if isinstance(value, (str, int, float)) else None
        if spelled not in BOOLEANS:
            raise ConfigError(f"{where}: {value!r} is not true or false")
        return BOOLEANS[spelled]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    value = float(value)
    if param.name == "density" and not 0 < value <= 1:
        raise ConfigError(f"{where}: {value} is outside (0, 1]; mergekit would silently "
                          + ("treat it as no pruning" if value > 1 else "drop the whole task vector")
                          + "; give a fraction of the delta to keep, e.g. 0.5")
    return value


def _mapping(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} is {_kind(value)}; give a mapping of parameter names to values")
    return dict(value)


def _dtype(value: object, key: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise ConfigError(f"{key}: {value!r} is not supported; give one of {', '.join(DTYPES)}")
    return name


def _identity(name: str) -> str:
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _reference(m: InputModel, base: str | None) -> str:
    if m.adapter is None:
        return m.model
    return f"{m.model or base}+{m.adapter}"


def _kind(value: object) -> str:
    return "nothing" if value is None else f"a {type(value).__name__} ({str(value)[:40]})"


class _RecipeDumper(yaml.SafeDumper):
    """Gradients in flow style (``t: [0, 0.5, 1]``), as mergekit writes them."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=not any(isinstance(e, (dict, list)) for e in data)))
