"""The base a QLoRA adapter was trained against: every quantized weight rounded through bitsandbytes' 4-bit
format and back, in 16 bits.

Two camps merge a QLoRA adapter differently. ``ftserve merge`` by default folds it into the original 16-bit
base, as Unsloth's maintainers advise ("take the QLoRA adapters, and use the original 16bit version"): the
adapter then carries the quantization error ``W16 - dequant(W4)`` it never saw, usually small. ``--into
dequantized`` folds it into ``dequant(W4)``, the weights it was trained against, as Dettmers suggests for the
QLoRA recipe (quantize, merge, convert to bf16); the merged model then computes exactly what the adapter did in
training, up to the final 16-bit rounding. Neither writes a re-quantized 4-bit model.

The adapter folder records the recipe and the quantized modules (``"ftserve": {"quantized_base": ...}``, written
by ``ftserve train --load-in-4bit``); this module rebuilds ``dequant(W4)`` from them, one shard at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..files.adapter_folder import read_adapter
from ..files.checkpoint import resolve_base


def quantized_base_of(adapter: str | os.PathLike) -> dict:
    recipe = read_adapter(adapter).extra.get("quantized_base")
    if not recipe:
        raise ConfigError(f"{adapter}: this adapter was not trained on a 4-bit base (its adapter_config.json "
                          f"records no quantized_base), so there is no dequantized base to merge into; "
                          f"merge it into the base as it is")
    return recipe


def dequantize_like_training(weight: torch.Tensor, recipe: dict) -> torch.Tensor:
    """``dequant(quant(W))`` as bitsandbytes' ``Linear4bit`` computes with it, in the recipe's compute dtype."""
    import bitsandbytes.functional as bnbf

    dtype = getattr(torch, recipe.get("bnb_4bit_compute_dtype", "bfloat16"))
    packed, state = bnbf.quantize_4bit(weight.to(dtype), blocksize=int(recipe.get("blocksize", 64)),
                                       compress_statistics=bool(recipe.get("bnb_4bit_use_double_quant", True)),
                                       quant_type=recipe.get("bnb_4bit_quant_type", "nf4"))
    return bnbf.dequantize_4bit(packed, state).to(dtype)


def write_dequantized_base(base: str | os.PathLike, recipe: dict, out: Path) -> Path:
    """A copy of ``base`` in ``out`` whose quantized modules hold ``dequant(W4)`` (16-bit); other files as they
    are. ``out`` must not exist; the caller removes it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("--into dequantized needs bitsandbytes: pip install 'finetuning-toolkit[qlora]'") from None
    folder = resolve_base(base)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: --into dequantized reads safetensors weights, and there are none")
    wanted = {f"{name}.weight" for name in recipe.get("modules", [])}
    out.mkdir(parents=True)
    found = set()
    for child in folder.iterdir():
        if child.is_file() and child.suffix != ".safetensors":
            shutil.copy2(child, out / child.name)
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key in wanted:
                    tensor = dequantize_like_training(tensor, recipe)
                    found.add(key)
                tensors[key] = tensor
        save_file(tensors, str(out / shard.name), metadata=metadata or {"format": "pt"})
        del tensors
    if wanted - found:
        raise CheckpointError(f"{folder}: lacks weights the adapter's 4-bit base had: {sorted(wanted - found)[:4]}")
    return out
