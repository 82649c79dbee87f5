"""lords: Low-Rank Decomposed Scaling for 2-4 bit LLM quantization and adaptation.

Importing lords registers quant_method "lords" with transformers (lords.hf), so that
AutoModelForCausalLM.from_pretrained loads lords checkpoints.
"""

__version__ = "0.1.0"

from .config import LoRDSConfig  # noqa: E402
from .linear import LoRDSLinear, dense_weights  # noqa: E402
from .hf import LoRDSQuantizationConfig  # noqa: E402
from .model import precompile_kernels, quantize  # noqa: E402
from .checkpoint import load, save  # noqa: E402

__all__ = ["LoRDSConfig", "LoRDSLinear", "LoRDSQuantizationConfig", "quantize", "precompile_kernels", "save", "load",
           "dense_weights", "__version__"]
