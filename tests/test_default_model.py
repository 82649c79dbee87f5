"""The packaged default model loads offline and is a real language model on the held-out text."""

import pytest
import torch

from lords import assets
from lords.eval.perplexity import perplexity


@pytest.mark.filterwarnings("ignore")
def test_default_model_is_a_real_lm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = assets.load_pretrained(assets.default_model_path())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) > 100e6
    tokens = assets.heldout_tokens(tokenizer, 1024)
    ppl = perplexity(model, tokens, seq_len=512, batch_size=2, progress=False)
    # random weights would give ~ vocabulary size (49152); the measured value is ~31
    assert ppl < 60
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    # dequantized from its GGUF, so dense: the Hugging Face Trainer must accept it for full fine-tuning
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)
    assert not hasattr(model.config, "quantization_config")
