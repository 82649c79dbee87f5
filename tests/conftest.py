import os

# Kernel tests run in Triton's interpreter on the CPU; set before any test imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import re

import pytest
import torch


def exactly(message: str) -> str:
    """A pytest.raises pattern that matches this whole message and nothing else."""
    return f"^{re.escape(message)}$"


@pytest.fixture(autouse=True)
def no_tuning_cache(monkeypatch):
    """No test reads or writes tuning results on disk: a choice stored by one test, or by an earlier run, would answer
    the next. The test of that cache turns it back on, in a folder of its own."""
    from lords.kernels import autotune

    monkeypatch.setattr(autotune, "TUNING_CACHE", False)


@pytest.fixture
def tiny_llama():
    """A 2-block Llama built from a config (random weights, no download), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def word_tokenizer():
    """A word-level tokenizer of 96 tokens built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("<unk> the a of to and in is was for on news said".split())}
    vocab.update({f"w{i}": len(vocab) + i for i in range(96 - len(vocab))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>")


@pytest.fixture
def model_folder(tiny_llama, tmp_path):
    """A tiny Llama plus a word-level tokenizer built here, saved like a Hugging Face model folder."""
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def random_triton_experts(hidden_size, width):
    """LoRDSExperts of 3 random 4-bit experts (float32 scales) on the Triton kernels, and a copy on the torch
    reference."""
    import copy

    from torch import nn

    from lords.experts import LoRDSExperts, LoRDSExpertWeights

    class Original(nn.Module):
        num_experts, act_fn = 3, nn.SiLU()

    def random_stack(out_features, in_features, seed):
        generator = torch.Generator().manual_seed(seed)
        stack = LoRDSExpertWeights(3, in_features, out_features, bits=4, rank=2, scale_dtype=torch.float32)
        stack.set_factors(torch.rand(3, out_features, 2, generator=generator),
                          torch.rand(3, 2, in_features, generator=generator),
                          torch.randint(0, 16, (3, out_features, in_features), generator=generator))
        return stack

    experts = LoRDSExperts(Original(), random_stack(2 * width, hidden_size, 0), random_stack(hidden_size, width, 1))
    reference = copy.deepcopy(experts)
    experts.gate_up_proj.backend = experts.down_proj.backend = "triton"
    return experts, reference
