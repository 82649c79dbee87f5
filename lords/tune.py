"""Tuning ahead of first use (`lords tune`): a model's LoRDS layer shapes, read from its structure alone, each run
through lords_matmul at the row counts a user's calls will have, so that every kernel choice and Triton config is
timed and kept in the user's tuning cache before the first forward; and the export of that tuning in the format
shipped inside the package (lords/kernels/tuned/<GPU name>.json, lords.kernels.autotune).

No weight is read or allocated: the model is built on the meta device from its config.json, and its linears get the
layout of the checkpoint's quantization_config, or for a dense model the one `lords quantize` would give them.
"""

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from torch import nn

from .codebooks import get_codebook
from .config import LoRDSConfig
from .experts import LoRDSExpertWeights
from .kernels import autotune
from .linear import LoRDSLinear
from .packing import row_bytes

# lords_matmul keeps one kernel choice per power-of-two bucket of rows (lords.kernels.forward.m_bucket): every bucket
# from a generated token (1 row) to a 512-token prompt. The decode kernel's configs are keyed by the exact row count,
# so batches of 3, 5, ... rows still time those on first use.
DEFAULT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class LayerShape:
    """What a LoRDS layer's kernels are tuned for: codes of an (out_features, in_features) weight, bits, rank,
    codebook kind, the dtype of the scales B and A, and whether it adds a bias."""

    out_features: int
    in_features: int
    bits: int
    rank: int
    codebook: str
    scale_dtype: torch.dtype
    bias: bool


def meta_model(path: str | Path, config: LoRDSConfig | None = None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of a folder (from config.json, or a .gguf file's header) on the meta device, its linears replaced by
    empty LoRDS layers: those of a lords checkpoint's quantization_config, or for a dense model those `lords quantize`
    with config (default LoRDSConfig()) would make."""
    from transformers import AutoConfig

    from .assets import gguf_file
    from .checkpoint import LEGACY_CONFIG_NAME, check_not_stripped, is_checkpoint, legacy_quantization_config
    from .hf import LoRDSQuantizationConfig, replace_linears
    from .model import plan_layers
    from .stream import empty_model

    path = Path(path)
    gguf = gguf_file(path) if path.is_dir() else None
    if not (path / "config.json").is_file() and gguf is None:
        raise FileNotFoundError(f"{path} is not a model folder (no config.json nor .gguf file); give a model or lords "
                                "checkpoint folder")
    check_not_stripped(path)
    model_config = AutoConfig.from_pretrained(path, gguf_file=gguf)
    if (path / LEGACY_CONFIG_NAME).is_file():
        layers = legacy_quantization_config(path).layers
    elif is_checkpoint(path):
        layers = LoRDSQuantizationConfig.from_dict(model_config.quantization_config).layers
    else:
        layers = None
    model_config = copy.deepcopy(model_config)
    if hasattr(model_config, "quantization_config"):  # the structure only: no quantizer of transformers' own
        del model_config.quantization_config
    model = empty_model(model_config, dtype)
    replace_linears(model, layers if layers is not None else plan_layers(model, config or LoRDSConfig()))
    return model


def layer_shapes(model: nn.Module) -> dict[LayerShape, list[str]]:
    """Each distinct LoRDS layer shape of a model and the names of the layers (or stacks of experts) that have it."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRDSLinear, LoRDSExpertWeights)):
            shape = LayerShape(module.out_features, module.in_features, module.bits, module.rank,
                               module.codebook_kind, module.scale_b.dtype, getattr(module, "bias", None) is not None)
            shapes.setdefault(shape, []).append(name)
    return shapes


def format_shapes(shapes: dict[LayerShape, list[str]]) -> str:
    lines = [f"{'out x in':>13} {'bits':>4} {'rank':>5} {'codebook':>8} {'scales':>8} {'bias':>4} {'layers':>6}"]
    for shape, names in shapes.items():
        lines.append(f"{f'{shape.out_features}x{shape.in_features}':>13} {shape.bits:>4} {shape.rank:>5} "
                     f"{shape.codebook:>8} {str(shape.scale_dtype).removeprefix('torch.'):>8} "
                     f"{'yes' if shape.bias else 'no':>4} {len(names):>6}")
    return "\n".join(lines)


def tune(shapes, rows=DEFAULT_ROWS, dtype: torch.dtype = torch.bfloat16, device="cuda") -> float:
    """Compile (lords.kernels.precompile, in parallel) and then time every kernel and config lords_matmul may use
    for these layer shapes at these row counts, with activations in dtype, on random inputs: the choices land in the
    user's tuning cache. The shipped tuning is set aside, so that everything is measured here. Returns the seconds
    taken."""
    from .kernels import lords_matmul
    from .kernels.precompile import layer_launches, precompile

    if not torch.cuda.is_available():
        raise ValueError("tuning needs a CUDA GPU; none is available here")
    started, shipped = time.perf_counter(), autotune.SHIPPED_TUNING
    launches = [launch for shape in shapes
                for launch in layer_launches(shape.out_features, shape.in_features, shape.rank, shape.bits,
                                             get_codebook(shape.codebook, shape.bits), rows, dtype, shape.scale_dtype,
                                             shape.bias)]
    autotune.SHIPPED_TUNING = False
    try:
        precompile(launches)
        with torch.no_grad():
            for shape in shapes:
                n, k = shape.out_features, shape.in_features
                codes = torch.randint(0, 256, (n, row_bytes(k, shape.bits)), dtype=torch.uint8, device=device)
                codebook = get_codebook(shape.codebook, shape.bits).to(device)
                scale_b = torch.randn(n, shape.rank, dtype=shape.scale_dtype, device=device) / shape.rank ** 0.5
                scale_a = torch.randn(shape.rank, k, dtype=shape.scale_dtype, device=device)
                bias = torch.randn(n, dtype=dtype, device=device) if shape.bias else None
                for m in rows:
                    lords_matmul(torch.randn(m, k, dtype=dtype, device=device), codes, codebook, scale_b, scale_a,
                                 shape.bits, bias)
    finally:
        autotune.SHIPPED_TUNING = shipped
    torch.cuda.synchronize(device)
    return time.perf_counter() - started


def current_tuning(device_name: str) -> dict:
    """This process's tuning in the shipped format: lords_matmul's kernel choices and each autotuned kernel's config
    per Triton tuning key, whether timed here or read from the user's cache."""
    from . import kernels

    return {"format": autotune.TUNING_FORMAT, "gpu": device_name, "triton": triton.__version__,
            "torch": torch.__version__,
            "choices": {repr(key): choice for key, choice in kernels._choices.items()},
            "configs": {launcher.autotuner.base_fn.__name__: {repr(key): autotune.config_entry(config)
                                                                for key, config in launcher.autotuner.cache.items()}
                        for launcher in autotune.LAUNCHERS if launcher.autotuner.cache}}


def existing_tuning(path: str | Path, device_name: str) -> dict | None:
    """The tuning already in an export file, which the export adds to; an error for a file that is not one, or
    holds another GPU's tuning. Checked before tuning, so that a bad --export fails at once."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"--export {path}: not a file")
    tuning = autotune.read_tuning(path)
    if tuning["gpu"] != device_name:
        raise ValueError(f"--export {path}: it holds tuning for {tuning['gpu']!r}, not this GPU ({device_name!r}); "
                         "export to another file")
    return tuning


def export_tuning(path: str | Path, device_name: str) -> dict:
    """Write this process's tuning (current_tuning) to path, added to what a tuning file of this GPU there holds
    (this run's entries win); written whole or not at all. Returns what was written."""
    from .atomic import write_file

    tuning = current_tuning(device_name)
    old = existing_tuning(path, device_name)
    if old is not None:
        tuning["choices"] = {**old["choices"], **tuning["choices"]}
        tuning["configs"] = {kernel: {**old["configs"].get(kernel, {}), **tuning["configs"].get(kernel, {})}
                             for kernel in {**old["configs"], **tuning["configs"]}}
    write_file(path, True, lambda staging: staging.write_text(json.dumps(tuning, indent=1, sort_keys=True) + "\n"),
               replaceable=lambda existing: True)  # existing_tuning has checked it is this GPU's tuning file
    return tuning
