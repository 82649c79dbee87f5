"""PaST skill vectors (spec: hd_pissa_past.md): the parameter delta of a source model's later training stage,
carried into another model of the same base as theta_target + lambda * v.

A skill file is safetensors: one float32 delta per shared parameter, plus metadata saying where it came from.
Targets may be dense or LoRDS-quantized; a LoRDSLinear takes its shifted weight by re-fitting B, A (and its codes)
from its current scales, and the cost is reported as the relative error to the shifted dense weight.
"""

import json
import math
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import integrity
from .atomic import write_file
from .factorize import LOW_RANK, assign_codes, reconstruct, refine_scales, relative_error
from .linear import LoRDSLinear

FORMAT = "lords-skill"
FORMAT_VERSION = 1


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a float32 dense tensor; a LoRDSLinear contributes its dequantized weight."""
    state = {name: p.detach().float() for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, LoRDSLinear):
            state.pop(f"{name}.scale_b"), state.pop(f"{name}.scale_a")
            state[f"{name}.weight"] = module.dequantize(torch.float32)
    return state


def extract(base: nn.Module, tuned: nn.Module) -> dict[str, torch.Tensor]:
    """v = tuned - base over every parameter both hold; the two must be the same architecture."""
    base_state, tuned_state = dense_state(base), dense_state(tuned)
    shared = base_state.keys() & tuned_state.keys()
    if not shared:
        raise ValueError("the two models share no parameter names: they are not the same architecture")
    missing = sorted(base_state.keys() ^ tuned_state.keys())
    if missing:
        raise ValueError(f"the models' parameters differ ({len(missing)} names, e.g. {missing[:3]}); "
                         "a skill vector needs one architecture")
    deltas = {}
    for name in sorted(shared):
        if base_state[name].shape != tuned_state[name].shape:
            raise ValueError(f"parameter {name} is {tuple(base_state[name].shape)} in the base but "
                             f"{tuple(tuned_state[name].shape)} in the tuned model")
        deltas[name] = (tuned_state[name] - base_state[name].to(tuned_state[name].device)).cpu().contiguous()
    return deltas


def save_skill(deltas: dict[str, torch.Tensor], path: str | Path, provenance: dict, overwrite: bool = False) -> Path:
    """Write the skill file, with each tensor's digest, crash-safe (lords.atomic); an existing file is replaced only
    with overwrite and only if it is a skill file."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "created": time.strftime("%Y-%m-%d %H:%M"),
                "provenance": json.dumps(provenance), **integrity.digest_metadata(deltas)}
    return write_file(path, overwrite, lambda staging: save_file(deltas, str(staging), metadata=metadata),
                      replaceable=is_skill_file)


def is_skill_file(path: str | Path) -> bool:
    try:
        return integrity.read_header(path)[2].get("format") == FORMAT
    except (OSError, integrity.IntegrityError):
        return False


def load_skill(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(deltas, provenance) of a skill file; a file of another kind is refused with its name. verify: check the
    digests (lords.integrity)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(f"{path} is not a lords skill file of format version {FORMAT_VERSION}")
            if verify:
                integrity.warn_unchecked(integrity.verify_files([path]))
            deltas = {name: handle.get_tensor(name) for name in handle.keys()}
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (OSError, RuntimeError, SafetensorError, integrity.IntegrityError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read skill file {path}: {error}") from None  # missing, truncated, corrupt, foreign
    return deltas, provenance


@torch.no_grad()
def refit(layer: LoRDSLinear, weight: torch.Tensor, steps: int = 100) -> tuple[float, float]:
    """Fit the layer's B, A and codes to a new dense weight, starting from its current scales.

    Returns the relative error to `weight` before the re-fit (old scales, codes re-assigned) and after.
    """
    target = weight.float()[None]
    codebook = layer.codebook.float()
    start = [layer.scale_b.detach().float()[None], layer.scale_a.detach().float()[None]]
    (scale_b, scale_a), error_start, _ = refine_scales(target, codebook, start, LOW_RANK, steps)
    scale_b, scale_a = scale_b.to(layer.scale_b.dtype), scale_a.to(layer.scale_a.dtype)
    scale = scale_b.float() @ scale_a.float()
    codes = assign_codes(target, scale, codebook)
    error = relative_error(target, reconstruct(scale, codes, codebook))
    layer.set_factors(scale_b[0], scale_a[0], codes[0])
    return error_start.item(), error.item()


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The names and shapes dense_state gives, without dequantizing anything."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, LoRDSLinear):
            shapes.pop(f"{name}.scale_b"), shapes.pop(f"{name}.scale_a")
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
    return shapes


def check_skill_fits(model: nn.Module, deltas: dict[str, torch.Tensor], subset: bool = False) -> list[str]:
    """Refuse a skill that is not exactly the target's parameters with their shapes, or holds NaN/Inf; with subset, a
    skill covering only some of them is accepted. Returns the target's parameters it leaves untouched."""
    shapes = parameter_shapes(model)
    unknown = sorted(deltas.keys() - shapes.keys())
    if unknown:
        raise ValueError(f"the skill holds {len(unknown)} parameters the model lacks (e.g. {unknown[:3]}): "
                         "it was extracted from another architecture")
    for name, delta in deltas.items():
        if tuple(delta.shape) != shapes[name]:
            raise ValueError(f"skill tensor {name} is {tuple(delta.shape)}, the model's is {shapes[name]}")
        if not delta.is_floating_point() or not torch.isfinite(delta).all():
            raise ValueError(f"skill tensor {name} is not a finite floating tensor")
    untouched = sorted(shapes.keys() - deltas.keys())
    if untouched and not subset:
        raise ValueError(f"the skill does not cover {len(untouched)} of the model's {len(shapes)} parameters (e.g. "
                         f"{untouched[:3]}): it was extracted from another architecture; pass subset=True "
                         "(--allow-subset) to apply it to the parameters it has")
    return untouched


@torch.no_grad()
def apply_skill(model: nn.Module, deltas: dict[str, torch.Tensor], scale: float = 1.0, refit_steps: int = 100,
                subset: bool = False) -> dict:
    """theta += scale * v, in place. Dense parameters move exactly; LoRDSLinear layers are re-fitted. The skill must
    cover the model exactly (check_skill_fits; subset=True accepts fewer parameters), and all of it is checked before
    anything moves.

    Returns {layer name: (error before re-fit, after)} for the LoRDS layers.
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    check_skill_fits(model, deltas, subset)
    params = dict(model.named_parameters())
    lords_layers = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, LoRDSLinear)}
    errors = {}
    for name, delta in deltas.items():
        if name in lords_layers:
            layer = lords_layers[name]
            shifted = layer.dequantize(torch.float32) + scale * delta.to(layer.codes.device)
            errors[name.removesuffix(".weight")] = refit(layer, shifted, refit_steps)
            continue
        param = params[name]
        param.add_((scale * delta.float()).to(device=param.device, dtype=param.dtype))
    return errors


def layer_cosines(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine similarity of two deltas, parameter by parameter, over the names both hold."""
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise ValueError("the two skill files share no parameter names")
    return {name: nn.functional.cosine_similarity(first[name].flatten().double(), second[name].flatten().double(),
                                                  dim=0).item() for name in shared}
