"""lords: Low-Rank Decomposed Scaling for 2-4 bit LLM quantization and adaptation.

Importing lords registers quant_method "lords" with transformers (lords.hf), so that
AutoModelForCausalLM.from_pretrained loads lords checkpoints. The public names below load on first use.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

_PUBLIC = {
    "LoRDSConfig": "config", "LoRDSLinear": "linear", "dense_weights": "linear", "LoRDSQuantizationConfig": "hf",
    "quantize": "model", "precompile_kernels": "model", "save": "checkpoint", "load": "checkpoint",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'lords' has no attribute {name!r}")


# The `lords` command imports this package only to reach lords.cli, whose --help must not wait seconds for torch
# and transformers; its commands import what they use (loading a checkpoint registers lords.hf on the way).
if not sys.argv or os.path.basename(sys.argv[0]) != "lords":
    from . import hf  # noqa: E402,F401  (registers quant_method "lords" with transformers)
