"""Checkpoint integrity: a sha256 of every tensor's bytes, stored in its safetensors file's metadata at save and
checked at load, so that a flipped byte in the codes, a scale or the embedding is refused with the tensor's name
instead of loading a model that produces wrong or NaN outputs. Floating tensors are also checked finite, which
catches a NaN in a file written without digests (by transformers' save_pretrained or an older lords).

The check reads each file once with plain reads in a background thread (hashlib releases the GIL), so that it
overlaps transformers' own load; lords.load(verify=False) skips it for trusted files (benchmarks/integrity.py
measures the cost).
"""

import contextvars
import hashlib
import json
import threading
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy
import torch

DIGESTS_KEY = "lords_sha256"  # safetensors metadata: JSON {tensor name: sha256 hex of its bytes}
DIGEST_PLACEHOLDER = "0" * 64  # same length as a digest: a header written first keeps its size once filled in
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

_verify = contextvars.ContextVar("lords_verify", default=True)


class IntegrityError(ValueError):
    pass


def tensor_bytes(tensor: torch.Tensor):
    """The tensor's bytes as safetensors stores them (little-endian, row-major), as a numpy uint8 array."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The metadata entry that records every tensor's digest (for safetensors' save_file)."""
    check_finite(tensors)
    return {DIGESTS_KEY: json.dumps({name: digest(tensor_bytes(tensor)) for name, tensor in tensors.items()})}


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Nothing non-finite is written: a NaN saved is a NaN loaded later, far from its cause."""
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            raise IntegrityError(f"tensor {name} holds NaN or Inf values; refusing to save it")


def check_first_outputs(layers: dict[str, torch.nn.Module]) -> None:
    """Each layer checks its output on its first forward and then unhooks itself: non-finite values out of finite
    inputs raise IntegrityError naming the layer. The load check sees finite stored tensors only; scales whose
    product overflows (scale_b @ scale_a) show only here. One reduction per layer, once; not inside a CUDA-graph
    capture or torch.compile's tracing, where the check cannot read the result (the hook is then dropped)."""
    for name, layer in layers.items():
        handles = []

        def check(module, inputs, output, name=name, handles=handles):
            handles.pop().remove()
            if torch.compiler.is_compiling() or (output.is_cuda and torch.cuda.is_current_stream_capturing()):
                return
            x = inputs[0]
            if bool(torch.isfinite(x).all()) and not bool(torch.isfinite(output).all()):
                raise IntegrityError(f"{name} gives NaN or Inf outputs for finite inputs on the model's first forward: "
                                     f"its scales or codebook overflow {output.dtype} (the checkpoint is damaged or "
                                     "was written from a diverged model)")

        handles.append(layer.register_forward_hook(check))


# the exponent bits of each floating dtype, as unsigned integers of its width: all ones for Inf and NaN
EXPONENT_MASKS = {torch.bfloat16: (numpy.uint16, 0x7F80), torch.float16: (numpy.uint16, 0x7C00),
                  torch.float32: (numpy.uint32, 0x7F800000), torch.float64: (numpy.uint64, 0x7FF0000000000000)}


def all_finite(tensor: torch.Tensor) -> bool:
    return finite_bytes(tensor_bytes(tensor), tensor.dtype)


def finite_bytes(data, dtype: torch.dtype) -> bool:
    """Whether a tensor's bytes hold no NaN or Inf (True for integer dtypes). The exponent bits are tested as
    integers in numpy: torch.isfinite ran at 2-5 M values/s on the shared 2-core CPU (its threads contend), this at
    about 3 G values/s."""
    if dtype not in EXPONENT_MASKS or not len(data):
        return True
    kind, mask = EXPONENT_MASKS[dtype]
    return not ((numpy.frombuffer(data, dtype=kind) & kind(mask)) == kind(mask)).any()


def read_header(path: str | Path) -> tuple[int, dict, dict]:
    """(offset of the data, {name: entry}, metadata) of a safetensors file, with a clear error for a file that is
    not one (truncated, crafted, or another format)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
            raise IntegrityError(f"{path} is not a safetensors file (truncated, or its header length is wrong)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IntegrityError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        check_entry(path, name, entry, size - 8 - length)
    return 8 + length, header, metadata


def check_entry(path: Path, name: str, entry, data_size: int) -> None:
    valid = (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
             and isinstance(entry.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
             and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
             and all(isinstance(d, int) for d in entry["data_offsets"]))
    if not valid:
        raise IntegrityError(f"{path}: the header entry of tensor {name} is malformed: {entry!r}")
    begin, end = entry["data_offsets"]
    count = 1
    for dim in entry["shape"]:
        count *= dim
    if not 0 <= begin <= end or end - begin != count * SAFETENSORS_DTYPES[entry["dtype"]].itemsize:
        raise IntegrityError(f"{path}: tensor {name}'s offsets {entry['data_offsets']} do not fit its shape and dtype")
    if end > data_size:
        raise IntegrityError(f"{path} is truncated: tensor {name} runs past its end")


def stored_digests(path: Path, names: Iterable[str], metadata: dict) -> dict[str, str] | None:
    """The file's digests by tensor name, or None for a file written without them."""
    if DIGESTS_KEY not in metadata:
        return None
    try:
        digests = json.loads(metadata[DIGESTS_KEY])
    except (TypeError, json.JSONDecodeError):
        raise IntegrityError(f"{path}: the {DIGESTS_KEY} metadata is corrupt") from None
    if not isinstance(digests, dict) or set(digests) != set(names):
        raise IntegrityError(f"{path}: the {DIGESTS_KEY} metadata does not list exactly the file's tensors")
    return digests


def verify_file(path: str | Path) -> bool:
    """Check every tensor of a safetensors file against its digest and, if floating, for NaN/Inf; raise
    IntegrityError naming the first that fails. Returns whether the file had digests."""
    path = Path(path)
    start, header, metadata = read_header(path)
    digests = stored_digests(path, header, metadata)
    with open(path, "rb", buffering=0) as handle:
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            data = bytearray(end - begin)
            handle.seek(start + begin)
            if handle.readinto(data) != len(data):
                raise IntegrityError(f"{path} is truncated: tensor {name} runs past its end")
            if digests is not None and digest(data) != digests[name]:
                raise IntegrityError(f"{path}: tensor {name} does not match its sha256 digest (the file is corrupt)")
            if not finite_bytes(data, SAFETENSORS_DTYPES[entry["dtype"]]):
                raise IntegrityError(f"{path}: tensor {name} holds NaN or Inf values")
    return digests is not None


def verify_files(paths: Iterable[str | Path]) -> list[str]:
    """verify_file on each; returns the names of the files without digests (written by transformers'
    save_pretrained or an older lords), whose tensors were only checked finite."""
    return [Path(path).name for path in paths if not verify_file(path)]


def warn_unchecked(names: list[str]) -> None:
    if names:
        warnings.warn(f"{', '.join(names)} carry no lords integrity digests (not written by lords); their tensors "
                      "were only checked finite", stacklevel=3)


class BackgroundVerification:
    """verify_files in a thread started now; result() waits for it and raises what it found."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths, self.error, self.unchecked = [Path(path) for path in paths], None, []
        self.thread = threading.Thread(target=self._run, name="lords-verify", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.unchecked = verify_files(self.paths)
        except (OSError, IntegrityError) as error:
            self.error = error

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        warn_unchecked(self.unchecked)


def verification_enabled() -> bool:
    return _verify.get()


@contextmanager
def verification(enabled: bool):
    """Within the block, loads of lords checkpoints through from_pretrained verify (or skip) the digests."""
    token = _verify.set(enabled)
    try:
        yield
    finally:
        _verify.reset(token)
