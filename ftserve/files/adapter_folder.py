"""Adapter folders in PEFT's layout: read, validate, save, load onto a model, export as plain LoRA.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's keys
(``base_model.model.<module>.lora_A.weight``, ``...vera_lambda_b``, ``base_model.vera_A``), so PEFT,
transformers and vLLM read it. Our exact settings (method, every hyperparameter, steps done) live in a file of
their own beside it, ``ftserve_config.json``, so PEFT loads the folder without a warning about a key it does not
know. A method PEFT has no type for (Delta-LoRA) names a side file: the weights file is then its exact
plain LoRA and the training state sits beside it (``delta_lora_state.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..config import EXTRA_KEY, FineTuningConfig
from ..errors import AdapterFileError, ConfigError
from ..methods import LoraFactors, get_method, variant_refusal
from .atomic import OUTPUT_FILE_MODE, atomic_output_dir, fsync
from .strict_json import read_json_file

ADAPTER_CONFIG = "adapter_config.json"
SETTINGS = "ftserve_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PREFIX = "base_model.model."
# adapter_config.json and ftserve_config.json hold a few settings, and a rank or size per module at most: a few
# KB, a few hundred KB for the largest models. A file past this is not an adapter config, and is not read.
MAX_CONFIG_BYTES = 4 * 2**20
SHARED_PREFIX = "base_model."


@dataclass
class AdapterFolder:
    """The parsed contents of an adapter folder, without a model."""

    path: Path
    config: FineTuningConfig
    raw_config: dict
    modules: dict[str, dict[str, Tensor]]
    shared: dict[str, Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # our settings (ftserve_config.json)

    def in_features(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.extra.get("module_in_features") or {}).items()}

    def lora_factors(self, in_features: dict[str, int] | None = None) -> dict[str, LoraFactors]:
        """The served form of every module (exact plain-LoRA factors, with a row-scaled method's magnitude).
        VeRA needs each layer's input size (recorded by us).

        Sizes are checked before anything is built from them (``check_ranks``, and the method's own
        ``export_shared``), so a small file cannot make us allocate what its config declares."""
        method = get_method(self.config.method)
        sizes = {**self.in_features(), **(in_features or {})}
        self.check_ranks(sizes)
        try:
            shared = method.export_shared(self.config, self.modules, self.shared, sizes)
        except AdapterFileError as exc:
            raise AdapterFileError(f"{self.path}: {exc}") from None
        except ValueError as exc:
            raise AdapterFileError(f"{self.path}: {exc}; pass the base model") from None
        factors = {}
        for name, state in self.modules.items():
            try:
                factors[name] = method.export_factors(state, shared, self.config, name, sizes.get(name))
            except AdapterFileError as exc:  # the saved tensors disagree with each other
                raise AdapterFileError(f"{self.path}: {exc}") from None
            except ValueError as exc:
                raise AdapterFileError(f"{self.path}: {exc}; pass the base model to supply layer sizes") from None
        return factors


    def check_ranks(self, in_features: dict[str, int], max_rank: int | None = None) -> None:
        """Refuse a module whose rank exceeds ``max_rank`` (an engine's ``max_lora_rank``) or ``d_out + d_in``.

        A rank beyond ``min(d_out, d_in)`` adds nothing to the delta; the looser ``d_out + d_in`` leaves room
        for VeRA's customary large ranks while keeping a module's factors within a few times the size of the
        weight it adapts, however large a rank the files declare."""
        method = get_method(self.config.method)
        for name, state in self.modules.items():
            d_out, d_in, rank = method.state_shape(state)
            d_in = d_in or in_features.get(name)
            if max_rank is not None and rank > max_rank:
                raise AdapterFileError(f"{self.path}: rank {rank} on {name} exceeds the engine's max_lora_rank "
                                       f"{max_rank}; start the engine with max_lora_rank >= {rank}")
            if d_in is not None and rank > d_out + d_in:
                raise AdapterFileError(f"{self.path}: rank {rank} on {name}, a {d_out} x {d_in} layer, is more "
                                       f"than its {d_out + d_in} rows and columns together; the adapter is "
                                       f"corrupt or not for this model")


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterFolder:
    """Parse and check an adapter folder; AdapterFileError names what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such adapter folder")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"{path}: missing {ADAPTER_CONFIG}; not a PEFT adapter folder")
    raw = _read_json(config_path)
    # Back-compatibility: a folder written before ftserve_config.json keeps our settings under EXTRA_KEY.
    extra = raw.get(EXTRA_KEY) if isinstance(raw, dict) else None
    if (path / SETTINGS).is_file():
        extra = _read_json(path / SETTINGS)
        if not isinstance(extra, dict):
            raise AdapterFileError(f"{path / SETTINGS}: expected a JSON object")
    try:
        config = config_from_dict({**raw, EXTRA_KEY: extra} if extra and isinstance(raw, dict) else raw)
    except ConfigError as exc:
        raise AdapterFileError(f"{config_path}: {exc}") from None
    method = get_method(config.method)
    tensors = _read_tensors(path, allow_pickle)
    if method.side_file and (path / method.side_file).exists():
        tensors = _load_safetensors(path / method.side_file)
    elif method.side_file:
        raise AdapterFileError(f"{path}: {method.title} adapter without {method.side_file}, which holds its exact "
                               f"training state; use `ftserve export` output to serve it as a plain LoRA instead")
    shared_names = {SHARED_PREFIX + key: key for key in method.shared_keys}
    suffixes = sorted(method.saved_keys, key=len, reverse=True)
    modules: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in tensors.items():
        if key in shared_names:
            shared[shared_names[key]] = tensor
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            unknown.append(key)
            continue
        modules.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[suffix] = tensor
    if unknown:
        raise AdapterFileError(f"{path}: tensors this {config.method} adapter cannot use: {unknown[:3]}"
                               f"{' ...' if len(unknown) > 3 else ''}")
    if not modules:
        raise AdapterFileError(f"{path}: {ADAPTER_WEIGHTS} holds no adapter tensors")
    return AdapterFolder(path, config, raw, modules, shared, extra or {})


def _read_json(file: Path):
    return read_json_file(file, max_bytes=MAX_CONFIG_BYTES, error=AdapterFileError)


def config_from_dict(raw: dict) -> FineTuningConfig:
    """Our own exact config when we wrote the folder (under EXTRA_KEY), PEFT's fields otherwise."""
    ours = (raw.get(EXTRA_KEY) or {}).get("config") if isinstance(raw, dict) else None
    if not ours:
        return FineTuningConfig.from_peft_dict(raw)
    config = FineTuningConfig.from_dict(ours)
    refusal = variant_refusal(raw, config.adapter_method)  # PEFT would read the folder as another method
    if refusal:
        raise ConfigError(refusal)
    return config


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    weights = path / ADAPTER_WEIGHTS
    if weights.is_file():
        return _load_safetensors(weights)
    if (path / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise AdapterFileError(f"{path}: only a pickled {ADAPTER_PICKLE}; refusing to unpickle it. Convert it "
                                   f"to safetensors, or allow pickles (read with weights_only=True)")
        try:
            return torch.load(path / ADAPTER_PICKLE, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapterFileError(f"{path / ADAPTER_PICKLE}: cannot be read safely ({exc})") from None
    raise AdapterFileError(f"{path}: missing {ADAPTER_WEIGHTS}")


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{file}: corrupt or unreadable safetensors file ({exc})") from None


# Exporting ---------------------------------------------------------------------------------------

def row_scaled_reason(config: FineTuningConfig) -> str:
    """Why a row-scaled adapter (LoraFactors.magnitude set) has no plain-LoRA export, in one line."""
    return (f"a {config.adapter_method.title} adapter (method {config.method}) scales each output row by "
            f"m / ||W + s B A||, which depends on the base weight, so no plain LoRA computes it; merge it into "
            f"the base model (`ftserve merge`) or serve it on the torch engine instead")


def plain_lora(factors: dict[str, LoraFactors], config: FineTuningConfig, targets: list[str],
               fan_in_fan_out: bool) -> tuple[dict, dict[str, Tensor]]:
    """A PEFT LoRA (config, tensors) computing exactly ``scale * B @ A`` per module.

    When every module shares one rank and scale, that is ``lora_alpha = scale * r`` with ``use_rslora`` off, so
    readers that ignore rsLoRA or rank patterns compute the right update. Otherwise each scale is baked into B
    and ``lora_alpha = r`` per module (``alpha_pattern`` mirrors ``rank_pattern``).
    """
    kinds = {(f.rank, f.scale) for f in factors.values()}
    tensors: dict[str, Tensor] = {}
    if len(kinds) == 1:
        (r, scale), = kinds
        lora_config = dict(lora_r=r, lora_alpha=scale * r)
        baked = False
    else:
        r = Counter(f.rank for f in factors.values()).most_common(1)[0][0]
        ranks = {name: f.rank for name, f in factors.items() if f.rank != r}
        lora_config = dict(lora_r=r, lora_alpha=float(r), rank_pattern=ranks,
                           alpha_pattern={k: float(v) for k, v in ranks.items()})
        baked = True
    for name, f in factors.items():
        tensors[PREFIX + f"{name}.lora_A.weight"] = f.A.float().contiguous()
        tensors[PREFIX + f"{name}.lora_B.weight"] = (f.B.float() * f.scale if baked else f.B.float()).contiguous()
    plain = FineTuningConfig(method="lora", target_modules=targets,
                             base_model_name_or_path=config.base_model_name_or_path, **lora_config)
    peft_config = plain.to_peft_dict(targets, fan_in_fan_out, {"config": dataclasses.asdict(plain)})
    return peft_config, tensors


def export_adapter(src: str | os.PathLike, dst: str | os.PathLike, in_features: dict[str, int] | None = None,
                   force: bool = False) -> AdapterFolder:
    """Write any method's adapter folder as an exact plain PEFT LoRA; returns the source folder. A row-scaled
    method's adapter has none: AdapterFileError says why and what to do instead."""
    folder = read_adapter(src)
    if folder.config.adapter_method.row_scaled:
        raise AdapterFileError(f"{src}: no plain-LoRA export: {row_scaled_reason(folder.config)}")
    factors = folder.lora_factors(in_features)
    fan_in_fan_out = bool(folder.raw_config.get("fan_in_fan_out", False))
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    peft_config, tensors = plain_lora(factors, folder.config, targets, fan_in_fan_out)
    peft_config[EXTRA_KEY]["exported_from"] = folder.config.method
    write_adapter_folder(dst, peft_config, {ADAPTER_WEIGHTS: tensors}, force=force, replace_whole=True)
    return folder


# Writing a folder --------------------------------------------------------------------------------

def write_adapter_folder(path: str | os.PathLike, peft_config: dict, files: dict[str, dict[str, Tensor]],
                         force: bool = True, replace_whole: bool = False) -> None:
    """Write config, tensors and a model card. ``peft_config[EXTRA_KEY]``, our settings, goes to a file of its
    own, so PEFT reads a config with only its keys. A new folder appears whole; in an existing one (re-saving a
    checkpoint) each file is replaced atomically and other files are left alone."""
    path = Path(path)
    peft_config = dict(peft_config)
    ours = peft_config.pop(EXTRA_KEY, None)
    target_exists = path.exists()
    if target_exists and not path.is_dir():
        raise AdapterFileError(f"{path} exists and is not a folder")
    with atomic_output_dir(path if replace_whole or not target_exists else
                           path.parent / f".{path.name}.staging", force=force) as tmp:
        for name, tensors in files.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name),
                      metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        if ours is not None:
            (tmp / SETTINGS).write_text(json.dumps(ours, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_model_card(peft_config, ours or {}))
        for child in tmp.iterdir():
            child.chmod(OUTPUT_FILE_MODE)
    if target_exists and not replace_whole:
        staging = path.parent / f".{path.name}.staging"
        for child in staging.iterdir():
            os.replace(child, path / child.name)
        fsync(path)
        staging.rmdir()


def _model_card(peft_config: dict, ours: dict) -> str:
    method = ours.get("exported_from") or ours.get("method", "lora")
    return (f"---\nlibrary_name: peft\nbase_model: {peft_config.get('base_model_name_or_path')}\n---\n\n"
            f"# Adapter ({method})\n\nWritten by ftserve {ours.get('version', '')} in PEFT's format "
            f"(peft_type {peft_config['peft_type']}, r={peft_config.get('r')}, targets "
            f"{peft_config.get('target_modules')}).\n\nLoad it with `peft.PeftModel.from_pretrained(base, path)` or "
            f"`ftserve.load_adapter(base, path)`.\n")
