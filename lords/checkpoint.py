"""Checkpoint folders: model.safetensors + lords_config.json + the model's own config and tokenizer files.

Written to a temporary sibling folder and renamed into place, so an interrupted save never leaves a half-written
checkpoint under the requested name, and an existing folder is only replaced when the caller asks for it.
"""

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from . import __version__
from .config import LoRDSConfig
from .linear import LoRDSLinear
from .model import set_submodule

# 2: codes in lords.packing's segment layout, one row of bytes per output feature (1 was a flat stream).
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "lords_config.json"


class CheckpointError(ValueError):
    pass


def _layer_entries(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bits": module.bits,
            "rank": module.rank,
            "codebook": module.codebook_kind,
            "bias": module.bias is not None,
            "scale_dtype": str(module.scale_b.dtype).removeprefix("torch."),
        }
        for name, module in model.named_modules()
        if isinstance(module, LoRDSLinear)
    }


def _dense_dtype(model: nn.Module) -> str:
    for name, param in model.named_parameters():
        if not name.endswith(("scale_a", "scale_b")):
            return str(param.dtype).removeprefix("torch.")
    return "float32"


def write_folder(folder: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run write(staging) in a temporary sibling folder, then move it into place: a crash never leaves a half-written
    folder under the name, and an existing non-empty folder is replaced only when overwrite is set."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write(staging)
        if folder.exists():
            retired = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(retired)
            staging.rename(folder)
            shutil.rmtree(retired)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save(model: nn.Module, folder: str | Path, config: LoRDSConfig | None = None, tokenizer=None, overwrite: bool = False):
    """Save a LoRDS-quantized model. Refuses a non-empty existing folder unless overwrite=True."""
    layers = _layer_entries(model)
    if not layers:
        raise ValueError("the model has no LoRDSLinear layers; quantize it before saving")

    def write(staging: Path) -> None:
        save_model(model, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "producer": "lords"})
        meta = {
            "format": "lords",
            "format_version": FORMAT_VERSION,
            "lords_version": __version__,
            "dense_dtype": _dense_dtype(model),
            "quantization": config.to_dict() if config is not None else None,
            "layers": layers,
        }
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if getattr(model, "config", None) is not None:
            model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_folder(folder, overwrite, write)


def read_lords_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a lords checkpoint: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    if meta.get("format") != "lords":
        raise CheckpointError(f"{path} is not a lords config (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.get('format_version')!r}; this lords reads version {FORMAT_VERSION}"
            + (" (version 1 packed codes in a layout this lords no longer reads: quantize the model again)"
               if meta.get("format_version") == 1 else "")
        )
    return meta


def load(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved LoRDS model (same outputs as when saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    meta = read_lords_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    model_config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, meta["dense_dtype"]))
    for name, entry in meta["layers"].items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{CONFIG_NAME} names layer {name}, which the model config does not have") from None
        if (original.out_features, original.in_features) != (entry["out_features"], entry["in_features"]):
            raise CheckpointError(
                f"layer {name} is {entry['out_features']}x{entry['in_features']} in {CONFIG_NAME} but "
                f"{original.out_features}x{original.in_features} in the model config"
            )
        module = LoRDSLinear(
            entry["in_features"], entry["out_features"], entry["bits"], entry["rank"], entry["codebook"],
            entry["bias"], getattr(torch, entry["scale_dtype"]),
        )
        set_submodule(model, name, module)
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise CheckpointError(f"cannot load {weights}: it is corrupt, truncated or does not match {CONFIG_NAME}: {error}") from None
    return model.to(device).eval()
