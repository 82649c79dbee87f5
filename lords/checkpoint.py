"""Checkpoint folders: a transformers folder (config.json with a "lords" quantization_config, safetensors shards as
transformers writes them, generation config, tokenizer), so that AutoModelForCausalLM.from_pretrained loads it once
lords is imported (lords.hf). save and load are the thin lords entry points.

Written through lords.atomic (a crash never leaves a half-written checkpoint under the requested name, an existing
folder is only replaced when the caller asks), with every tensor's sha256 in its file's metadata, which loading
verifies (lords.integrity).
"""

import copy
import json
import math
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from . import integrity
from .atomic import recover, write_folder
from .config import LoRDSConfig
from .hf import LAYER_FIELDS, QUANT_METHOD, LoRDSQuantizationConfig, mark_quantized
from .experts import LoRDSExpertWeights
from .linear import LoRDSLinear

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
LEGACY_CONFIG_NAME = "lords_config.json"  # format 2: beside model.safetensors, before the transformers integration
DEFAULT_SHARD_SIZE = "5GB"
# lords.save shows a bar from this size on: smaller checkpoints are written in a few seconds
PROGRESS_BYTES = 1 << 30
SAFETENSORS_DTYPES = {dtype: code for code, dtype in integrity.SAFETENSORS_DTYPES.items()}
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class CheckpointError(ValueError):
    pass


# what transformers raises for a config of wrong field types or values (negative sizes, strings for integers, tensors
# of other shapes than the config's layers): a folder that cannot load, not a bug of the caller
LOAD_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, StrictDataclassError)


def parse_size(size: int | str) -> int:
    """Bytes from 1000000, "500MB", "5GB" or "2GiB" (transformers' max_shard_size)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if match is None:
            raise ValueError(f"shard size must be bytes or a size like '5GB', got {size!r}")
        value = int(float(match.group(1)) * SIZE_UNITS[match.group(2) or "B"])
    if value < 1:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


class ShardedSafetensors:
    """Writes tensors whose names, shapes and dtypes are known in advance into transformers' safetensors layout
    (model.safetensors, or model-0000i-of-0000N.safetensors shards of at most max_shard_size + the index), one tensor
    at a time: every file's header is written first and each tensor goes straight to its offset, so nothing is held
    in memory beyond the tensor being written (the streaming quantizer writes a block as soon as it is done).
    The header holds a placeholder of each tensor's sha256 (lords.integrity), filled in by close()."""

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size):
        limit = parse_size(max_shard_size)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        files = [WEIGHTS_NAME] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.folder, self.specs, self.places, self.pending = folder, specs, {}, set(specs)
        self.weight_map = {name: file for file, members in zip(files, shards) for name in members}
        self.files = dict(zip(files, shards))
        self.digests = dict.fromkeys(specs, integrity.DIGEST_PLACEHOLDER)
        for file, members in self.files.items():
            raw, offset = self._header(members), 0
            for name in members:
                shape, dtype = specs[name]
                self.places[name] = 8 + len(raw) + offset
                offset += math.prod(shape) * dtype.itemsize
            with open(folder / file, "wb") as handle:
                handle.write(len(raw).to_bytes(8, "little") + raw)
                handle.truncate(8 + len(raw) + offset)
        self.total_size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())

    def _header(self, members: list[str]) -> bytes:
        digests = json.dumps({name: self.digests[name] for name in members}, separators=(",", ":"))
        header, offset = {"__metadata__": {"format": "pt", integrity.DIGESTS_KEY: digests}}, 0
        for name in members:
            shape, dtype = self.specs[name]
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
        integrity.check_finite({name: tensor})
        data = integrity.tensor_bytes(tensor)
        with open(self.folder / self.weight_map[name], "r+b") as handle:
            handle.seek(self.places[name])
            handle.write(data)
        self.digests[name] = integrity.digest(data)
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} tensors were never written, e.g. {sorted(self.pending)[:3]}")
        for file, members in self.files.items():
            raw = self._header(members)  # the digests replace placeholders of the same length
            with open(self.folder / file, "r+b") as handle:
                handle.seek(8)
                handle.write(raw)
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {name: entry}) of a safetensors file, its entries checked (lords.integrity)."""
    try:
        start, header, _ = integrity.read_header(path)
    except integrity.IntegrityError as error:
        raise CheckpointError(str(error)) from None
    return start, header


def read_tensor(path: Path, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor of a safetensors file, read with plain file reads: unlike a memory map, nothing of the file stays
    resident once the tensor is freed, so streaming a model through host memory keeps one tensor in it at a time."""
    begin, end = entry["data_offsets"]
    data = bytearray(end - begin)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(data_start + begin)
        if handle.readinto(data) != len(data):
            raise CheckpointError(f"{path} is truncated: {entry} runs past its end")
    dtype = integrity.SAFETENSORS_DTYPES[entry["dtype"]]
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(entry["shape"])


def quantized_tensor_names(model: nn.Module) -> set[str]:
    """The tensors stored as LoRDSLinear (and lords.experts' stacks) hold them (codes, codebook, scales); a LoRDS bias
    is dense like the rest."""
    return {f"{name}.{key}" for name, module in model.named_modules()
            if isinstance(module, (LoRDSLinear, LoRDSExpertWeights))
            for key in ("codes", "codebook", "scale_b", "scale_a")}


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating tensors outside the LoRDS layers (embeddings, norms, lm_head, biases)."""
    quantized = quantized_tensor_names(model)
    for name, tensor in model.state_dict().items():
        if name not in quantized and tensor.is_floating_point():
            return tensor.dtype
    return torch.bfloat16


def storage_dtype(model: nn.Module, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype a checkpoint stores the model's non-quantized tensors in (choose_storage_dtype): the source model's
    dtype is model.source_dtype, which lords.assets.load_pretrained records before computing in float32 on a CPU."""
    return choose_storage_dtype(dtype, (getattr(model, "source_dtype", None), dense_dtype(model)))


def choose_storage_dtype(dtype: torch.dtype | str | None, candidates) -> torch.dtype:
    """The dtype named; else the first 16-bit one of the candidates (the source's, the model's); else bfloat16. So
    float32 is stored only when asked for."""
    if dtype is not None:
        dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype such as bfloat16, float16 or float32, got {dtype!r}")
        return dtype
    for candidate in candidates:
        if candidate in (torch.bfloat16, torch.float16):
            return candidate
    return torch.bfloat16


def save(model: nn.Module, folder: str | Path, config: LoRDSConfig | None = None, tokenizer=None,
         overwrite: bool = False, dtype: torch.dtype | str | None = None,
         max_shard_size: int | str = DEFAULT_SHARD_SIZE, progress: bool = True) -> Path:
    """Save a LoRDS-quantized model as a transformers folder that from_pretrained (after `import lords`) loads.

    Args:
        config: the LoRDSConfig it was quantized with, recorded in config.json (not needed to load).
        tokenizer: saved beside the model when given.
        overwrite: replace a non-empty existing folder (refused otherwise).
        dtype: storage dtype of the tensors that are not quantized (storage_dtype: by default the source's bf16 or
            fp16, never a silent float32). The model in memory is not changed.
        max_shard_size: larger checkpoints are split into model-0000i-of-0000N.safetensors + index, as transformers
            does.
        progress: a bar in bytes while the tensors are written, for checkpoints of PROGRESS_BYTES or more.

    Example::

        lords.quantize(model, lords.LoRDSConfig(bits=4), calibration=tokens)
        lords.save(model, "model-lords-4bit", tokenizer=tokenizer, max_shard_size="2GB")
        model = AutoModelForCausalLM.from_pretrained("model-lords-4bit", device_map="auto")
    """
    if not any(isinstance(module, (LoRDSLinear, LoRDSExpertWeights)) for module in model.modules()):
        raise ValueError("the model has no LoRDSLinear layers; quantize it before saving")
    stored = storage_dtype(model, dtype)
    mark_quantized(model, config)
    tensors = unique_tensors(model)
    specs = checkpoint_specs(model, stored)

    def write(staging: Path) -> None:
        writer = ShardedSafetensors(staging, specs, max_shard_size)
        with tqdm(total=writer.total_size, desc="saving", unit="B", unit_scale=True,
                  disable=not progress or writer.total_size < PROGRESS_BYTES) as bar:
            for name, tensor in tensors.items():
                shape, dtype = specs[name]
                writer.write(name, tensor.detach().to(dtype))
                bar.update(math.prod(shape) * dtype.itemsize)
        writer.close()
        write_model_config(model, staging, stored)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_folder(folder, overwrite, write)


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied weight (lm_head = embed_tokens) once, under its first name, as transformers saves."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def checkpoint_specs(model: nn.Module, stored: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a checkpoint of the model holds (the model may be on the meta device):
    LoRDS tensors as the layers hold them, other floating tensors in the stored dtype."""
    quantized = quantized_tensor_names(model)
    return {name: (tuple(tensor.shape),
                   tensor.dtype if name in quantized or not tensor.is_floating_point() else stored)
            for name, tensor in unique_tensors(model).items()}


def write_model_config(model: nn.Module, folder: Path, stored: torch.dtype) -> None:
    """config.json (with the model's quantization_config and the dtype of its stored tensors) and
    generation_config.json, as save_pretrained writes them."""
    model_config = copy.deepcopy(model.config)
    model_config.dtype = stored
    model_config.architectures = [type(model).__name__]
    model_config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _config_file(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} is corrupt: not a JSON object")
    return values


def is_checkpoint(folder: str | Path) -> bool:
    """A lords checkpoint: config.json with a "lords" quantization_config, or a format-2 lords_config.json."""
    folder = Path(folder)
    quantization = _config_file(folder).get("quantization_config") or {}
    return (isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD
            or (folder / LEGACY_CONFIG_NAME).is_file())


def written_by_lords(folder: str | Path) -> bool:
    """Whether a folder's safetensors files were written by lords (integrity digests in their metadata, or LoRDS
    layers' tensors), whatever its config files say: only their headers are read."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            _, header, metadata = integrity.read_header(path)
        except (OSError, integrity.IntegrityError):
            continue  # a broken file is reported by whichever loader reads it
        if integrity.DIGESTS_KEY in metadata or any(name.endswith((".scale_b", ".codes")) for name in header):
            return True
    return False


def check_not_stripped(folder: str | Path) -> None:
    """Refuse a folder of lords tensors whose config lost the lords quantization_config (or lords_config.json):
    transformers would load it as a dense model and random-initialise every quantized linear."""
    if not is_checkpoint(folder) and written_by_lords(folder):
        raise CheckpointError(
            f"{folder} holds tensors written by lords but its config.json has no quantization_config with "
            f"quant_method {QUANT_METHOD!r} (nor a {LEGACY_CONFIG_NAME}); it would load with random weights: "
            "restore the config.json that lords saved with it")


def legacy_quantization_config(folder: Path) -> LoRDSQuantizationConfig:
    """The quantization_config of a format-2 checkpoint (lords_config.json), whose tensors have today's names."""
    path = folder / LEGACY_CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: not a JSON object")
    version = meta.get("format_version")
    if version == 1:
        raise CheckpointError(f"{path} has format_version 1: its codes are packed in a layout this lords no longer "
                              "reads; quantize the model again")
    if meta.get("format") != "lords" or version != 2:
        raise CheckpointError(f"{path} is not a lords config this lords reads (format={meta.get('format')!r}, "
                              f"format_version={version!r})")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers or not all(isinstance(entry, dict) for entry in layers.values()):
        raise CheckpointError(f"{path}: 'layers' must map layer names to their fields, got {layers!r:.80}")
    try:
        return LoRDSQuantizationConfig({name: {key: entry.get(key) for key in LAYER_FIELDS}
                                        for name, entry in layers.items()}, meta.get("quantization"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def load(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         verify: bool = True, **kwargs):
    """Load a lords checkpoint: AutoModelForCausalLM.from_pretrained(folder, device_map=device, dtype=dtype).

    device: a device for the whole model, or "auto" (or a device_map dict) to spread it over the GPUs and the CPU.
    dtype: the non-quantized tensors' dtype; by default float32 on the CPU (lords' CPU convention, as
    lords.assets.load_pretrained does for dense models) and the stored dtype elsewhere ("auto").
    verify: check every tensor against the sha256 stored at save, and floating tensors for NaN/Inf, in a thread
        that overlaps the load, and each quantized layer's output on the first forward (lords.integrity); False skips
        both, for trusted files.
    Further keyword arguments go to from_pretrained (max_memory, ...). Format-2 checkpoints (lords_config.json)
    load as well; a folder that is not a lords checkpoint is refused.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    recover(folder)
    check_not_stripped(folder)
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a lords checkpoint: its config.json has no quantization_config with "
                              f"quant_method {QUANT_METHOD!r}")
    config = None
    on_cpu = isinstance(device, (str, torch.device)) and str(device) != "auto" and torch.device(device).type == "cpu"
    dtype = dtype or (torch.float32 if on_cpu else "auto")
    try:
        if (folder / LEGACY_CONFIG_NAME).is_file():
            config = AutoConfig.from_pretrained(folder)
            config.quantization_config = legacy_quantization_config(folder).to_dict()
        with integrity.verification(verify):
            model = AutoModelForCausalLM.from_pretrained(folder, config=config, device_map=device, dtype=dtype,
                                                         **kwargs)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"cannot load {folder}: a weights file is corrupt, truncated or missing: {error}") from None
    except LOAD_ERRORS as error:
        raise CheckpointError(f"cannot load {folder}: {error}") from None
    model.source_dtype = _stored_dtype(folder)
    return model.eval()


def _stored_dtype(folder: Path) -> torch.dtype | None:
    values = _config_file(folder)
    stored = values.get("dtype") or values.get("torch_dtype")
    return getattr(torch, stored, None) if isinstance(stored, str) else None
