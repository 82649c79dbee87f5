"""Multiplicative PEFT: freeze the codes, train the scales B, A of LoRDSLinear layers (spec §6).

The update C[codes] * (B'A' - BA) can have full rank although B'A' - BA has rank <= 2r, and there is nothing to
merge afterwards: the trained B', A' are the layer's scales and inference runs the same code at the same cost.
An adapter is just the trained scales, saved with a fingerprint of the frozen codes they belong to.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import integrity
from .atomic import write_folder
from .experts import LoRDSExpertWeights
from .linear import LoRDSLinear

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
PARTS = ("scale_b", "scale_a")
ADAPTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def lords_layers(model: nn.Module) -> dict[str, LoRDSLinear | LoRDSExpertWeights]:
    """The LoRDS layers by name: LoRDSLinear, and the expert stacks of MoE blocks (whose scales train the same way)."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (LoRDSLinear, LoRDSExpertWeights))}
    if not layers:
        raise ValueError("the model has no LoRDSLinear layers; quantize it (or load a lords checkpoint) first")
    return layers


def mark_trainable(model: nn.Module, parts: tuple[str, ...] = PARTS) -> int:
    """Freeze everything but the chosen scales (both, only scale_b or only scale_a) of every LoRDSLinear.

    The trained scales are kept in float32 while training (bf16 would swallow small Adam steps). Returns the number
    of trainable floats.
    """
    unknown = set(parts) - set(PARTS)
    if not parts or unknown:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    for param in model.parameters():
        param.requires_grad_(False)
    count = 0
    for layer in lords_layers(model).values():
        for part in parts:
            param = getattr(layer, part)
            param.data = param.data.float()
            param.requires_grad_(True)
            count += param.numel()
    return count


def codes_fingerprint(model: nn.Module) -> str:
    """sha256 over every layer's name, shape, bit width and packed codes: what an adapter must be applied to."""
    digest = hashlib.sha256()
    for name, layer in lords_layers(model).items():
        digest.update(f"{name}:{layer.out_features}x{layer.in_features}:{layer.bits}:{layer.rank};".encode())
        digest.update(layer.codes.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None, overwrite: bool = False) -> Path:
    """Write only the trainable scales (a few MB) plus a config naming the base and its codes fingerprint."""
    tensors = {
        f"{name}.{part}": getattr(layer, part).detach().to(torch.bfloat16).contiguous()
        for name, layer in lords_layers(model).items()
        for part in PARTS
        if getattr(layer, part).requires_grad
    }
    if not tensors:
        raise ValueError("no trainable scales: call mark_trainable(model) before training and saving")
    meta = {
        "format": "lords-adapter",
        "format_version": ADAPTER_FORMAT_VERSION,
        "base": base,
        "codes_sha256": codes_fingerprint(model),
    }

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata=integrity.digest_metadata(tensors))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))

    return write_folder(folder, overwrite, write)


def load_adapter(model: nn.Module, folder: str | Path, verify: bool = True) -> nn.Module:
    """Put an adapter's scales into its base model, after checking the base is the one it was trained on and that
    every tensor is a scale of one of its layers, of the layer's exact shape: nothing is copied unless all of it
    fits (an adapter never holds codes or codebooks: those are the base's). verify: check the file's digests."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder} is not a readable lords adapter: {error}") from None
    if (not isinstance(meta, dict) or meta.get("format") != "lords-adapter"
            or meta.get("format_version") != ADAPTER_FORMAT_VERSION or not isinstance(meta.get("codes_sha256"), str)):
        raise ValueError(f"{folder / ADAPTER_CONFIG} is not a lords adapter of format version {ADAPTER_FORMAT_VERSION}")
    if meta["codes_sha256"] != codes_fingerprint(model):
        raise ValueError(f"adapter {folder} was trained on other codes (base {meta.get('base')!r}); it does not fit "
                         "this model")
    path = folder / ADAPTER_WEIGHTS
    try:
        if verify:
            integrity.warn_unchecked(integrity.verify_files([path]))
        tensors = load_file(str(path))
    except (OSError, SafetensorError, integrity.IntegrityError) as error:
        raise ValueError(f"cannot read adapter {path}: {error}") from None
    layers = lords_layers(model)
    targets = {}
    for key, value in sorted(tensors.items()):
        name, _, part = key.rpartition(".")
        if part not in PARTS:
            raise ValueError(f"adapter tensor {key} is not a scale ({' or '.join(PARTS)}); an adapter holds only "
                             "trained scales, never codes or codebooks")
        if name not in layers:
            raise ValueError(f"adapter tensor {key} names layer {name}, which the model does not have")
        param = getattr(layers[name], part)
        if value.shape != param.shape or value.dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter tensor {key} is {value.dtype} {tuple(value.shape)}, the model expects a "
                             f"floating {tuple(param.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"adapter tensor {key} holds NaN or Inf values")
        targets[key] = (param, value)
    if not targets:
        raise ValueError(f"adapter {path} holds no tensors")
    with torch.no_grad():
        for param, value in targets.values():
            param.copy_(value.to(param.dtype))
    return model
