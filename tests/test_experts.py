import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import lords
from conftest import random_triton_experts, word_tokenizer
from lords.experts import (
    PRIOR_TOKENS, LoRDSExperts, LoRDSExpertWeights, recording_expert_moments, run_experts, shrink_moments,
)
from lords.model import capture_block_inputs, find_blocks


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


@pytest.fixture(params=[tiny_qwen3_moe, tiny_mixtral], ids=["qwen3_moe", "mixtral"])
def moe_model(request):
    return request.param()


CONFIG = lords.LoRDSConfig(bits=4, block_size=32, steps=5)


def test_quantize_replaces_every_expert_weight_and_keeps_routers_dense(moe_model):
    ids = torch.randint(0, 96, (2, 12))
    reference = moe_model(ids).logits
    routers = {name: type(module) for name, module in moe_model.named_modules() if name.endswith("mlp.gate")}
    num_experts = moe_model.model.layers[0].mlp.experts.num_experts
    reports = lords.quantize(moe_model, CONFIG, calibration=torch.randint(0, 96, (4, 16)), progress=False)
    assert len(reports) == 2 * (4 + 2 * num_experts)  # q, k, v, o and each expert's two matrices, per block
    for block in moe_model.model.layers:
        assert isinstance(block.mlp.experts, LoRDSExperts)
        assert isinstance(block.mlp.experts.gate_up_proj, LoRDSExpertWeights)
        assert block.mlp.experts.gate_up_proj.num_experts == num_experts
    dense_3d = [name for name, param in moe_model.named_parameters()
                if param.dim() == 3 and not name.endswith(("scale_b", "scale_a"))]
    assert dense_3d == []
    assert {name: type(moe_model.get_submodule(name)) for name in routers} == routers
    out = moe_model(ids).logits
    assert ((out - reference).norm() / reference.norm()).item() < 0.15  # 0.111 and 0.113 measured


def test_lords_experts_route_as_transformers_eager_forward():
    model = tiny_qwen3_moe()
    original = model.model.layers[0].mlp.experts
    lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
    quantized = model.model.layers[0].mlp.experts
    with torch.no_grad():
        original.gate_up_proj.copy_(quantized.gate_up_proj.dequantize())
        original.down_proj.copy_(quantized.down_proj.dequantize())
    hidden = torch.randn(10, 64)
    top_k_index = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
    top_k_weights = torch.rand(10, 2)
    # bit-identical: the same products on the same dequantized weights
    torch.testing.assert_close(quantized(hidden, top_k_index, top_k_weights),
                               original(hidden, top_k_index, top_k_weights), rtol=0, atol=0)


def test_masked_expert_slots_contribute_nothing():
    """Expert parallelism marks slots of other ranks' experts with the index num_experts."""
    hidden, weights = torch.randn(3, 4), torch.ones(3, 2)
    index = torch.tensor([[0, 2], [2, 2], [1, 0]])
    out = run_experts(hidden, index, weights, 2, lambda expert, x: x * (expert + 1))
    assert torch.equal(out, torch.stack([hidden[0], torch.zeros(4), 3 * hidden[2]]))  # bit-identical


@pytest.mark.parametrize("hessians", [False, True], ids=["moments", "hessians"])
def test_expert_moments_come_from_the_routed_tokens(hessians):
    model = tiny_qwen3_moe()
    _, blocks = find_blocks(model)
    experts = blocks[0].mlp.experts
    inputs = capture_block_inputs(model, blocks[0], torch.randint(0, 96, (3, 10)), batch_size=3)
    seen = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append(args))
    with torch.no_grad(), recording_expert_moments([("experts", experts)], hessians) as moments:
        for args, kwargs in inputs:
            blocks[0](*args, **kwargs)
    handle.remove()
    hidden, top_k_index, _ = seen[0]
    counts = torch.stack([(top_k_index == e).any(dim=1).sum() for e in range(8)])
    routed = [hidden[(top_k_index == e).any(dim=1)].double() for e in range(8)]
    sums = torch.stack([x.T @ x if hessians else x.pow(2).sum(0) for x in routed])
    # float32 sums in another order: 2.4e-7 (hessians) and 1.2e-7 (moments) measured, on values up to 2.1
    torch.testing.assert_close(moments["experts.gate_up_proj"], shrink_moments(sums, counts), rtol=0, atol=1e-6)
    assert moments["experts.down_proj"].shape == ((8, 32, 32) if hessians else (8, 32))


def test_experts_with_few_tokens_fall_back_to_the_pooled_moments():
    sums = torch.tensor([[4.0, 8.0], [0.0, 0.0], [1000.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([2.0, 0.0, 1000.0])
    pooled = sums.sum(0) / counts.sum()
    moments = shrink_moments(sums, counts)
    # the equalities are bit-identical: the same float64 formula, rounded once to float32
    assert torch.equal(moments[1], pooled.float())  # no token: the pooled moments
    assert torch.equal(moments[0], ((sums[0] + PRIOR_TOKENS * pooled) / (2 + PRIOR_TOKENS)).float())
    assert abs(moments[2, 0].item() - 1.0) < 3e-4  # many tokens: nearly its own E[x^2] = 1 (6.2e-5 off measured)
    assert torch.equal(shrink_moments(torch.zeros(2, 3), torch.zeros(2)), torch.ones(2, 3))


def test_expert_hessians_shrink_toward_the_pooled_hessian_and_start_at_the_identity():
    sums = torch.stack([torch.diag(torch.tensor([4.0, 8.0])), torch.zeros(2, 2), torch.ones(2, 2) * 1000]).double()
    counts = torch.tensor([2.0, 0.0, 1000.0])
    pooled = sums.sum(0) / counts.sum()
    hessians = shrink_moments(sums, counts)
    # bit-identical, as the moments above
    assert torch.equal(hessians[1], pooled.float())
    assert torch.equal(hessians[0], ((sums[0] + PRIOR_TOKENS * pooled) / (2 + PRIOR_TOKENS)).float())
    assert torch.equal(shrink_moments(torch.zeros(2, 3, 3), torch.zeros(2)), torch.eye(3).expand(2, 3, 3))


def test_unsupported_expert_layouts_are_named():
    model = tiny_qwen3_moe()
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(ValueError, match=r"experts module model\.layers\.1\.mlp\.experts \(Qwen3MoeExperts\) has a "
                                         r"layout lords does not quantize \(is_transposed=True\); add "
                                         r"'model\.layers\.1\.mlp\.experts\.\*' to LoRDSConfig\.skip"):
        lords.quantize(model, CONFIG, progress=False)
    lords.quantize(model, lords.LoRDSConfig(steps=0, block_size=32, skip=["model.layers.1.mlp.experts.*"]),
                   progress=False)
    assert isinstance(model.model.layers[0].mlp.experts, LoRDSExperts)
    assert isinstance(model.model.layers[1].mlp.experts.gate_up_proj, nn.Parameter)


@pytest.mark.parametrize("codes", ["nearest", "gptq"])
def test_a_non_finite_expert_weight_is_refused_before_anything_changes(codes):
    """Block 1's bad expert is found before block 0 is quantized, also by the error-feedback walk."""
    model = tiny_qwen3_moe()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.experts\.down_proj contains NaN or Inf values"):
        lords.quantize(model, replace(CONFIG, codes=codes), calibration=torch.randint(0, 96, (2, 8)),
                       progress=False)
    assert not any(isinstance(module, (lords.LoRDSLinear, LoRDSExperts)) for module in model.modules())


def test_targeting_one_projection_of_the_experts_is_refused():
    model = tiny_qwen3_moe()
    with pytest.raises(ValueError, match=r"the targets match only one of model\.layers\.0\.mlp\.experts\.gate_up_proj "
                                         r"and model\.layers\.0\.mlp\.experts\.down_proj"):
        lords.quantize(model, lords.LoRDSConfig(steps=0, skip=["*.experts.down_proj"]), progress=False)


def test_overrides_reach_the_expert_projections():
    model = tiny_qwen3_moe()
    lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=0,
                                            overrides={"*.experts.down_proj": {"bits": 3, "rank": 2}}), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert (experts.gate_up_proj.bits, experts.down_proj.bits, experts.down_proj.rank) == (4, 3, 2)


@pytest.fixture(params=[tiny_qwen3_moe, tiny_mixtral], ids=["qwen3_moe", "mixtral"])
def quantized_moe(request):
    model = request.param()
    lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    return model


def test_save_load_gives_identical_logits(quantized_moe, tmp_path):
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = quantized_moe(ids).logits
    lords.save(quantized_moe, tmp_path / "moe", dtype=torch.float32)
    loaded = lords.load(tmp_path / "moe")
    assert isinstance(loaded.model.layers[1].mlp.experts, LoRDSExperts)
    original = quantized_moe.model.layers[1].mlp.experts.down_proj
    for key in ("codes", "codebook", "scale_b", "scale_a"):
        assert torch.equal(getattr(loaded.model.layers[1].mlp.experts.down_proj, key), getattr(original, key))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
        with lords.dense_weights(loaded):
            assert loaded.model.layers[1].mlp.experts.down_proj.dense_weight.shape == original.dequantize().shape
            assert torch.equal(loaded(ids).logits, before)  # bit-identical: the weight the per-call path makes
        assert loaded.model.layers[1].mlp.experts.down_proj.dense_weight is None
    # transformers' own save_pretrained writes the same tensors (its reverse MoE conversion would split them)
    from transformers import AutoModelForCausalLM

    quantized_moe.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits,
                           before)


def test_a_missing_expert_tensor_is_an_error(quantized_moe, tmp_path):
    from safetensors.torch import load_file, save_file

    lords.save(quantized_moe, tmp_path / "moe")
    tensors = load_file(tmp_path / "moe" / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.gate_up_proj.scale_a"]
    save_file(tensors, tmp_path / "moe" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj\.scale_a is missing"):
        lords.load(tmp_path / "moe")


def test_peft_trains_the_experts_scales_and_adapters_hold_them(tmp_path):
    from lords.peft import codes_fingerprint, load_adapter, mark_trainable, save_adapter
    from lords.train import finetune

    quantized_moe = tiny_qwen3_moe()
    lords.quantize(quantized_moe, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    count = mark_trainable(quantized_moe)
    stacks = [m for m in quantized_moe.modules() if isinstance(m, LoRDSExpertWeights)]
    linears = [m for m in quantized_moe.modules() if isinstance(m, lords.LoRDSLinear)]
    assert count == (sum(m.rank * (m.in_features + m.out_features) for m in linears)
                     + sum(m.num_experts * m.rank * (m.in_features + m.out_features) for m in stacks))
    codes = codes_fingerprint(quantized_moe)
    before = [stack.scale_b.detach().clone() for stack in stacks]
    finetune(quantized_moe, torch.arange(96).repeat(10), steps=3, lr=1e-2, seq_len=16, progress=False)
    assert codes_fingerprint(quantized_moe) == codes
    assert all(not torch.equal(stack.scale_b, old) for stack, old in zip(stacks, before))
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        expected = quantized_moe(ids).logits
    folder = save_adapter(quantized_moe, tmp_path / "adapter")
    with torch.no_grad():
        for stack in stacks:
            stack.scale_b.zero_()
    load_adapter(quantized_moe, folder)
    with torch.no_grad():
        # the adapter's bf16 scales: 2.5e-3 at most measured, on logits of mean size 0.13
        assert torch.allclose(quantized_moe(ids).logits, expected, atol=1e-2, rtol=0)


def test_qat_covers_the_experts():
    from lords.qat import QATExpertWeights, export_qat, prepare_qat, qat_parameter_groups
    from lords.train import finetune

    model = tiny_qwen3_moe()
    ids = torch.randint(0, 96, (2, 12))
    prepare_qat(model, lords.LoRDSConfig(bits=3, block_size=32, steps=2), progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, QATExpertWeights) and experts.gate_up_proj.weight.shape == (8, 64, 64)
    groups = qat_parameter_groups(model, lr=1e-3)
    assert any(param is experts.down_proj.weight for param in groups[0]["params"])
    for param in model.parameters():
        param.requires_grad_(False)
    for group in groups:
        for param in group["params"]:
            param.requires_grad_(True)
    before = experts.down_proj.weight.detach().clone()
    finetune(model, torch.arange(96).repeat(10), steps=2, seq_len=16, progress=False, param_groups=groups)
    assert not torch.equal(experts.down_proj.weight, before)
    with torch.no_grad():
        trained = model(ids).logits
    export_qat(model, scale_dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, LoRDSExpertWeights)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained)  # bit-identical: float32 scales, the QAT forward's weights


def test_streaming_an_moe_folder_matches_the_in_memory_path_bit_for_bit(tmp_path):
    from lords.stream import ModelSource, open_source, quantize_to_folder

    model = tiny_qwen3_moe()
    calibration = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "dense")  # transformers 5 writes the experts one by one
    word_tokenizer().save_pretrained(tmp_path / "dense")
    source, _ = open_source(tmp_path / "dense")
    assert isinstance(source, ModelSource)  # so transformers stacks them as it reads
    streamed = quantize_to_folder(source, tmp_path / "streamed", CONFIG, calibration, device="cpu",
                                  dtype=torch.float32, progress=False)
    in_memory = lords.quantize(model, CONFIG, calibration=calibration, device="cpu", progress=False)
    lords.save(model, tmp_path / "in_memory", config=CONFIG, dtype=torch.float32)
    assert sorted((r.name, r.error) for r in streamed) == sorted((r.name, r.error) for r in in_memory)
    from test_stream import assert_same_checkpoints

    assert_same_checkpoints(tmp_path / "streamed", tmp_path / "in_memory")


class ListMoE(nn.Module):
    """The older layout: a router nn.Linear and a ModuleList of expert MLPs; expert 3 is never routed to."""

    def __init__(self, hidden: int, width: int, num_experts: int = 4, top_k: int = 2):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts)
        with torch.no_grad():
            self.gate.bias[3] = -1e4
        self.experts = nn.ModuleList(
            Qwen3MoeMLP(type("Config", (), {"hidden_size": hidden, "hidden_act": "silu"}), width)
            for _ in range(num_experts))
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)  # transformers' initializer_range, as the other blocks

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, index = self.gate(flat).softmax(dim=-1).topk(self.top_k, dim=-1)
        out = run_experts(flat, index, weights / weights.sum(-1, keepdim=True), len(self.experts),
                          lambda expert, x: self.experts[expert](x))
        return out.view_as(hidden_states)


def test_the_list_layout_quantizes_its_expert_linears_and_an_unrouted_expert_gets_the_pooled_moments(tiny_llama):
    from lords.model import collect_channel_weights, model_targets

    for block in tiny_llama.model.layers:
        block.mlp = ListMoE(64, 32)
    ids = torch.randint(0, 96, (2, 12))
    reference = tiny_llama(ids).logits
    calibration = torch.randint(0, 96, (4, 16))
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=5)
    seen = []
    handle = tiny_llama.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    stats = collect_channel_weights(tiny_llama, model_targets(tiny_llama, config), calibration, 8, False)
    handle.remove()
    # every token goes to two experts, none to expert 3: the pooled moments are E[x^2] over all tokens
    pooled = seen[0].reshape(-1, 64).double().pow(2).mean(dim=0).float()
    # float32 sums in another order: 2.4e-7 relative measured
    torch.testing.assert_close(stats["model.layers.0.mlp.experts.3.gate_proj"], pooled, rtol=1e-6, atol=0)
    assert not torch.allclose(stats["model.layers.0.mlp.experts.0.gate_proj"], pooled, rtol=1e-2)
    reports = lords.quantize(tiny_llama, config, calibration=calibration, progress=False)
    assert len(reports) == 2 * (4 + 4 * 3)
    for block in tiny_llama.model.layers:
        assert type(block.mlp.gate) is nn.Linear  # the router stays dense
        assert all(isinstance(getattr(expert, name), lords.LoRDSLinear) for expert in block.mlp.experts
                   for name in ("gate_proj", "up_proj", "down_proj"))
    out = tiny_llama(ids).logits
    assert ((out - reference).norm() / reference.norm()).item() < 0.15  # 0.098 measured


@pytest.mark.parametrize("entry, message", [
    ({"bits": 4, "rank": 1, "codebook": "nf", "scale_dtype": "bfloat16", "experts": 0}, "experts must be a positive"),
    ({"bits": 4, "rank": 1, "codebook": "nf", "experts": 8}, r"expected the fields .* \(and 'experts' for a stack"),
])
def test_bad_experts_entries_are_named(entry, message):
    from lords.hf import LoRDSQuantizationConfig

    with pytest.raises(ValueError, match=message):
        LoRDSQuantizationConfig({"model.layers.0.mlp.experts.down_proj": entry})


def test_a_checkpoint_naming_one_projection_or_another_expert_count_is_refused(quantized_moe, tmp_path):
    import json

    lords.save(quantized_moe, tmp_path / "moe")
    path = tmp_path / "moe" / "config.json"
    config = json.loads(path.read_text())
    layers = config["quantization_config"]["layers"]
    layers["model.layers.0.mlp.experts.gate_up_proj"]["experts"] += 1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.experts\.gate_up_proj has \d+ experts, the "
                                         r"model \d+"):
        lords.load(tmp_path / "moe")
    del layers["model.layers.0.mlp.experts.gate_up_proj"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names one projection of the experts model\.layers\.0\.mlp\.experts but not "
                                         r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        lords.load(tmp_path / "moe")


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture
def tiled_calls(monkeypatch):
    """The calls of the grouped tiled kernel (lords.kernels.grouped_tiled_matmul) made while a test runs."""
    pytest.importorskip("triton")
    import lords.kernels

    class Calls(list):
        pairs: list  # the sorted pairs each call was handed (lords.kernels.route_pairs), or None

    calls, kernel = Calls(), lords.kernels.grouped_tiled_matmul
    calls.pairs = []

    def recorded(x, experts, codes, codebook, scale_b, scale_a, bits, pairs=None):
        calls.append(tuple(experts.shape))
        calls.pairs.append(pairs)
        return kernel(x, experts, codes, codebook, scale_b, scale_a, bits, pairs)

    monkeypatch.setattr(lords.kernels, "grouped_tiled_matmul", recorded)
    return calls


def test_a_few_tokens_run_grouped_through_either_kernel_and_equal_the_torch_loop(monkeypatch, tiled_calls):
    """Inference through the kernels: every (token, expert) pair in two grouped launches, through the decode kernel
    for a few pairs and the tiled kernel for more (the bound lowered here to run it on the same tokens), each equal to
    the torch reference's loop over the experts hit (a masked slot, index num_experts, included); with gradients,
    the loop."""
    import lords.kernels

    experts, reference = random_triton_experts(48, 20)
    generator = torch.Generator().manual_seed(0)
    hidden, top_k_weights = torch.randn(4, 48, generator=generator), torch.rand(4, 2, generator=generator)
    top_k_index = torch.tensor([[0, 2], [2, 3], [1, 0], [2, 1]])
    with torch.no_grad():
        assert experts.runs_grouped(hidden, top_k_index) and not reference.runs_grouped(hidden, top_k_index)
        expected = reference(hidden, top_k_index, top_k_weights)
        decoded = experts(hidden, top_k_index, top_k_weights)
        assert tiled_calls == []
        monkeypatch.setattr(lords.kernels, "GROUPED_DECODE_MAX_PAIRS", 7)  # 8 pairs: the tiled kernel
        tiled = experts(hidden, top_k_index, top_k_weights)
        assert tiled_calls == [(4, 2), (8, 1)]  # gate_up on the tokens, down on the pairs
    # float32 sums in another order: measured 2.5e-7 (decode) and 2.0e-7 (tiled)
    assert relative_error(decoded, expected) < 2e-6 and relative_error(tiled, expected) < 2e-6
    assert not experts.runs_grouped(hidden, top_k_index)  # gradients enabled, the scales train


def test_prefill_runs_the_grouped_tiled_kernel_and_equals_the_torch_loop(tiled_calls):
    """130 tokens at top-2 (260 pairs, beyond the decode kernel's bound) through the module: the tiled kernel once
    per projection, equal to the torch reference's loop; expert 1 gets no token, a few slots are masked."""
    experts, reference = random_triton_experts(32, 16)
    generator = torch.Generator().manual_seed(0)
    hidden, top_k_weights = torch.randn(130, 32, generator=generator), torch.rand(130, 2, generator=generator)
    top_k_index = torch.tensor([0, 2])[torch.randint(0, 2, (130, 2), generator=generator)]
    top_k_index[::40, 1] = 3
    with torch.no_grad():
        out = experts(hidden, top_k_index, top_k_weights)
        expected = reference(hidden, top_k_index, top_k_weights)
    assert tiled_calls == [(130, 2), (260, 1)]
    # the pairs sorted once for both projections, as the kernel sorts them itself (slots of expert 3, masked, go to 0)
    from lords.kernels import GROUPED_PAD_ROWS, sort_by_expert

    first, second = tiled_calls.pairs
    assert first is second
    assert torch.equal(first, sort_by_expert(torch.where(top_k_index < 3, top_k_index, 0).reshape(-1), 3,
                                             GROUPED_PAD_ROWS))
    assert relative_error(out, expected) < 2e-6  # measured 2.0e-7


def test_the_triton_paths_of_the_experts_equal_the_torch_reference():
    """Each expert's matrices go through LoRDSLinear's dispatch: the kernels under Triton's interpreter on the CPU."""
    pytest.importorskip("triton")

    class Original(nn.Module):
        num_experts, act_fn = 3, nn.SiLU()

    def random_stack(out_features, in_features):
        stack = LoRDSExpertWeights(3, in_features, out_features, bits=4, rank=2, scale_dtype=torch.float32)
        stack.set_factors(torch.rand(3, out_features, 2), torch.rand(3, 2, in_features),
                          torch.randint(0, 16, (3, out_features, in_features)))
        return stack

    torch.manual_seed(0)
    experts = LoRDSExperts(Original(), random_stack(40, 48), random_stack(48, 20))
    hidden, top_k_index, top_k_weights = torch.randn(5, 48), torch.tensor([[0, 2]] * 3 + [[2, 1]] * 2), torch.rand(5, 2)
    with torch.no_grad():
        expected = experts(hidden, top_k_index, top_k_weights)
        for backend in ("triton", "fused"):
            experts.gate_up_proj.backend = experts.down_proj.backend = backend
            # float32 sums in another order: 1.9e-6 (2 threads) to 2.9e-6 (4) measured, on outputs up to 15
            torch.testing.assert_close(experts(hidden, top_k_index, top_k_weights), expected, rtol=0, atol=1e-5)


def test_error_feedback_codes_quantize_experts_on_the_quantized_blocks_and_beat_nearest_codes():
    """codes="gptq" on a MoE model: each expert's codes minimise its output error over the tokens routed to it, from
    the outputs of the blocks already quantized; the experts' output error on those tokens is below what nearest
    codes on the same scales' refinement leave, and every expert matrix gets a report."""
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = tiny_qwen3_moe()
    block_inputs = {}
    dense.model.layers[1].mlp.experts.register_forward_pre_hook(
        lambda _module, args: block_inputs.setdefault("block 1", args))
    with torch.no_grad():
        dense(ids)

    def experts_error(codes):
        model = tiny_qwen3_moe()
        reports = lords.quantize(model, lords.LoRDSConfig(bits=3, block_size=32, steps=10, codes=codes),
                                 calibration=ids, progress=False)
        experts = model.model.layers[1].mlp.experts
        assert isinstance(experts, LoRDSExperts)
        with torch.no_grad():
            expected = dense.model.layers[1].mlp.experts(*block_inputs["block 1"])
            out = experts(*block_inputs["block 1"])
        return ((out - expected).norm() / expected.norm()).item(), reports

    feedback, reports = experts_error("gptq")
    nearest, _ = experts_error("nearest")
    # 2 blocks x (4 attention linears + 8 experts x 2 projections)
    assert len(reports) == 40 and len({report.name for report in reports}) == 40
    assert feedback < nearest  # 0.170 against 0.279 measured
