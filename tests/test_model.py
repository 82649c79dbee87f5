import copy
import inspect
import time
import warnings
from functools import partial

import pytest
import torch
from torch import nn

import lords
import lords.model as model_module
from lords.factorize import parity_rank, relative_error
from lords.linear import LoRDSLinear
from lords.model import (
    capture_block_inputs,
    channel_second_moments,
    collect_channel_weights,
    find_blocks,
    model_targets,
    recording_input_hessians,
)


def test_quantize_replaces_every_block_linear_and_nothing_else(tiny_llama):
    ids = torch.randint(0, 96, (2, 12))
    reference = tiny_llama(ids).logits
    originals = {name: module.weight.detach().clone() for name, module in tiny_llama.named_modules()
                 if isinstance(module, nn.Linear) and name.startswith("model.layers.")}
    reports = lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=5), progress=False)
    replaced = {name: module for name, module in tiny_llama.named_modules() if isinstance(module, LoRDSLinear)}
    assert sorted(replaced) == sorted(originals) == sorted(report.name for report in reports)
    assert len(replaced) == 2 * 7
    assert isinstance(tiny_llama.lm_head, nn.Linear) and isinstance(tiny_llama.model.embed_tokens, nn.Embedding)
    for report in reports:
        layer, weight = replaced[report.name], originals[report.name]
        assert report.shape == tuple(weight.shape) and report.bits == layer.bits == 4
        assert report.rank == layer.rank == parity_rank(*weight.shape, 32)
        assert report.bits_per_weight == layer.bits_per_weight
        # bit-identical: the same float32 arithmetic; data-free, the objective is ||W - W_hat|| itself
        assert report.weight_error == relative_error(weight, layer.dequantize()).item() == report.error
        assert report.error <= report.error_init + 1e-6
    out = tiny_llama(ids).logits
    # measured 0.104 (4 bits, 5 steps); 0.15 is 1.4x that
    assert ((out - reference).norm() / reference.norm()).item() < 0.15
    with torch.no_grad():  # the quantized model computes with its dequantized weights
        for name, layer in replaced.items():
            parent, _, child = name.rpartition(".")
            dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
            dense.weight.copy_(layer.dequantize())
            setattr(tiny_llama.get_submodule(parent), child, dense)
    assert torch.equal(tiny_llama(ids).logits, out)  # bit-identical


def test_calibration_statistics_steer_the_quantization(tiny_llama):
    """With input channels whose E[x^2] spans four decades (norm weights from 0.1 to 10), the activation-aware
    quantization has a lower activation-weighted error than the data-free one in every layer fed by a norm, and its
    reported error is that weighted error: a walk that computed the statistics but did not use them fails here."""
    with torch.no_grad():
        for block in tiny_llama.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.copy_(10 ** torch.linspace(-1, 1, 64)[torch.randperm(64)])
    ids = torch.randint(0, 96, (4, 16))
    config = lords.LoRDSConfig(bits=3, block_size=32, steps=20)
    stats = collect_channel_weights(tiny_llama, model_targets(tiny_llama, config), ids, 8, progress=False)
    weights = {name: module.weight.detach().clone() for name, module in tiny_llama.named_modules()
               if name in stats}
    free = copy.deepcopy(tiny_llama)
    aware_reports = {r.name: r for r in lords.quantize(tiny_llama, config, calibration=ids, progress=False)}
    lords.quantize(free, config, progress=False)
    for name, weight in weights.items():
        aware = relative_error(weight, tiny_llama.get_submodule(name).dequantize(), stats[name]).item()
        data_free = relative_error(weight, free.get_submodule(name).dequantize(), stats[name]).item()
        assert aware_reports[name].error == aware, name  # bit-identical: the same float32 arithmetic
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert aware < 0.95 * data_free, name  # measured 0.84 to 0.93 times the data-free error


def test_overrides_and_skip_by_pattern(tiny_llama):
    config = lords.LoRDSConfig(
        bits=3, block_size=32, steps=0, skip=["*.v_proj"], overrides={"*.mlp.*": {"bits": 4, "rank": 3}}
    )
    lords.quantize(tiny_llama, config, progress=False)
    block = tiny_llama.model.layers[1]
    assert isinstance(block.self_attn.v_proj, nn.Linear)
    assert block.self_attn.q_proj.bits == 3
    assert (block.mlp.down_proj.bits, block.mlp.down_proj.rank) == (4, 3)


def test_channel_statistics_match_direct_computation(tiny_llama):
    ids = torch.randint(0, 96, (3, 10))
    _, blocks = find_blocks(tiny_llama)
    inputs = capture_block_inputs(tiny_llama, blocks[0], ids, batch_size=2)
    assert sum(args[0].shape[0] for args, _ in inputs) == 3
    q_proj = blocks[0].self_attn.q_proj
    stats = channel_second_moments(blocks[0], [q_proj], inputs)
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64)))
    tiny_llama(ids)
    handle.remove()
    direct = torch.cat(seen).double().pow(2).mean(dim=0).float()
    assert torch.allclose(stats[q_proj], direct, rtol=2e-6, atol=0)  # float32 sums: 2.6e-7 measured


def test_input_hessians_match_direct_computation_and_their_diagonal_is_the_channel_moments(tiny_llama):
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(tiny_llama)
    inputs = capture_block_inputs(tiny_llama, blocks[0], ids, batch_size=2)
    up_proj = blocks[0].mlp.up_proj
    hessian = channel_second_moments(blocks[0], [up_proj], inputs, recording_input_hessians)[up_proj]
    seen = []
    handle = up_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64).double()))
    tiny_llama(ids)
    handle.remove()
    flat = torch.cat(seen)
    assert hessian.shape == (64, 64)
    # float32 sums: 1.2e-7 measured (2.4e-7 without SIMD), and 1.8e-7 relative on the diagonal
    torch.testing.assert_close(hessian, (flat.T @ flat / flat.shape[0]).float(), rtol=0, atol=1e-6)
    moments = channel_second_moments(blocks[0], [up_proj], inputs)[up_proj]
    torch.testing.assert_close(hessian.diagonal(), moments, rtol=1e-6, atol=0)


def test_gptq_codes_walk_the_quantized_blocks_and_lower_each_layers_output_error(tiny_llama, capsys):
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    config = lords.LoRDSConfig(bits=3, block_size=32, steps=10, codes="gptq")
    seen = []  # the inputs block 1 is calibrated on must come from the quantized block 0
    original = model_module.quantize_targets

    def recording(model, targets, *args, **kwargs):
        seen.append([type(module).__name__ for name, module in model.named_modules() if name.endswith("_proj")])
        return original(model, targets, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "quantize_targets", recording)
        reports = lords.quantize(tiny_llama, config, calibration=ids, progress=False)
    assert seen[1][:7] == ["LoRDSLinear"] * 7 and seen[1][7:] == ["Linear"] * 7
    assert len(reports) == 14 and all(r.error < r.error_init for r in reports)
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_calibrated_quantization_lowers_activation_weighted_error(tiny_llama):
    ids = torch.randint(0, 96, (4, 16))
    reports = lords.quantize(
        tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=10), calibration=ids, progress=False
    )
    assert len(reports) == 14 and all(r.error <= r.error_init + 1e-6 for r in reports)


def test_unsupported_layer_is_named():
    class Conv1DLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1DLike()

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])

    with pytest.raises(ValueError, match=r"layers\.0\.proj \(Conv1DLike\) matches the targets but is not an nn.Linear"):
        lords.quantize(Toy(), lords.LoRDSConfig(steps=0), progress=False)


def test_bad_calibration_is_named(tiny_llama):
    with pytest.raises(ValueError, match="calibration must be integer token ids"):
        lords.quantize(tiny_llama, lords.LoRDSConfig(steps=0), calibration=torch.randn(2, 8), progress=False)


def test_same_shaped_layers_are_refined_as_one_stack(tiny_llama, monkeypatch):
    import lords.model as walker

    stacks = []
    original = walker.lords_linear_group

    def spy(names, *args, **kwargs):
        stacks.append(len(names))
        return original(names, *args, **kwargs)

    monkeypatch.setattr(walker, "lords_linear_group", spy)
    lords.quantize(tiny_llama, lords.LoRDSConfig(steps=1, block_size=32), progress=False)
    # q/o (64x64), k/v (32x64), gate/up (128x64), down (64x128), each from both blocks
    assert sorted(stacks) == [2, 4, 4, 4]


def test_non_finite_weight_names_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj contains NaN or Inf"):
        lords.quantize(tiny_llama, lords.LoRDSConfig(steps=0, block_size=32), progress=False)


def test_format_report_lays_out_each_layer_and_the_total():
    reports = [model_module.LayerReport("model.layers.0.mlp.down_proj", (64, 128), 4, 3, 4.25, 0.1234, 0.0567,
                                        0.0789, 1.25),
               model_module.LayerReport("model.layers.0.mlp.up_proj", (128, 64), 3, None, 3.5, 0.5, 0.25, 0.125, 0.5)]
    lines = model_module.format_report(reports).splitlines()
    assert lines[0] == f"{'layer':<44} {'shape':>12} {'bits':>4} {'rank':>4} {'bpw':>6} {'err init':>9} {'err':>8} " \
                       f"{'w err':>8} {'sec':>6}"
    assert lines[1] == f"{'model.layers.0.mlp.down_proj':<44} {'64x128':>12} {4:>4} {3:>4} {4.25:>6.3f} " \
                       f"{0.1234:>9.4f} {0.0567:>8.4f} {0.0789:>8.4f} {1.25:>6.1f}"
    assert lines[2].split()[1:4] == ["128x64", "3", "-"]  # out x in; a block-wise baseline has no rank
    # 16,384 weights of each layer: (4.25 + 3.5) / 2 bits per weight, seconds summed
    assert lines[3] == "2 layers, 0.0M weights, 3.875 bits/weight, 1.8 s"
    assert len(lines) == 4 and model_module.format_report([]) == lines[0]


def test_find_blocks_takes_the_list_of_num_hidden_layers_modules(tiny_llama):
    """Another ModuleList registered first (a vision tower, extra heads) is not taken for the decoder blocks."""
    wrapper = nn.Module()
    wrapper.extra = nn.ModuleList([nn.Linear(4, 4)] * 3)
    wrapper.model = tiny_llama.model
    wrapper.config = tiny_llama.config
    name, blocks = find_blocks(wrapper)
    assert name == "model.layers" and blocks is tiny_llama.model.layers
    del wrapper.config  # without a config, the first non-empty list
    assert find_blocks(wrapper)[0] == "extra"


def test_plan_layers_is_what_quantize_makes(tiny_llama):
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=0, scale_dtype="float16",
                               overrides={"*.mlp.down_proj": {"bits": 3, "rank": 5}}, skip=["*.self_attn.v_proj"])
    plan = model_module.plan_layers(tiny_llama, config)
    lords.quantize(tiny_llama, config, progress=False)
    made = {name: {"bits": layer.bits, "rank": layer.rank, "codebook": layer.codebook_kind,
                   "scale_dtype": str(layer.scale_b.dtype).removeprefix("torch.")}
            for name, layer in tiny_llama.named_modules() if isinstance(layer, LoRDSLinear)}
    assert plan == made and len(plan) == 2 * 6
    assert plan["model.layers.1.mlp.down_proj"] == {"bits": 3, "rank": 5, "codebook": "nf", "scale_dtype": "float16"}
    assert plan["model.layers.0.self_attn.q_proj"]["rank"] == parity_rank(64, 64, 32)


def test_scale_dtype_and_exact_init_reach_every_layer(tiny_llama, monkeypatch):
    seen = []
    real = model_module.lords_quantize

    def spy(*args, **kwargs):
        seen.append((args[7], args[8]))  # exact_init, scale_dtype
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "lords_quantize", spy)
    lords.quantize(tiny_llama, lords.LoRDSConfig(block_size=32, steps=0, exact_init=True, scale_dtype="float16"),
                   progress=False)
    assert seen and set(seen) == {(True, torch.float16)}
    assert {layer.scale_a.dtype for layer in tiny_llama.modules() if isinstance(layer, LoRDSLinear)} == {
        torch.float16}


def test_quantize_marks_a_transformers_model_for_save_pretrained(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(block_size=32, steps=0), progress=False)
    assert tiny_llama.is_quantized and tiny_llama.config.quantization_config.quant_method == "lords"
    assert type(tiny_llama.hf_quantizer).__name__ == "LoRDSHfQuantizer"


def test_plan_layers_names_the_experts_projections():
    from test_experts import tiny_qwen3_moe

    model = tiny_qwen3_moe()
    plan = model_module.plan_layers(model, lords.LoRDSConfig(bits=4, block_size=32))
    experts = {name: entry for name, entry in plan.items() if ".experts." in name}
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts.{part}" for i in (0, 1)
                               for part in ("down_proj", "gate_up_proj")]
    assert experts["model.layers.0.mlp.experts.gate_up_proj"] == {
        "bits": 4, "rank": parity_rank(64, 64, 32), "codebook": "nf", "scale_dtype": "bfloat16", "experts": 8}


def test_format_report_counts_weights_in_millions():
    """2.95M weights: 2.95 rounds up to 3.0 (a divisor off by one would give 2.9)."""
    report = model_module.LayerReport("m.down_proj", (2950, 1000), 4, 7, 4.2, 0.1, 0.05, 0.07, 2.0)
    assert model_module.format_report([report]).splitlines()[-1] == "1 layers, 3.0M weights, 4.200 bits/weight, 2.0 s"


def test_a_bf16_model_is_refined_in_float32(tiny_llama):
    """The stacks are refined in float32 whatever the model's dtype: a bf16 model gets the codes and scales of its
    float32 copy (the same values)."""
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=3)
    bf16 = copy.deepcopy(tiny_llama).bfloat16()
    fp32 = copy.deepcopy(bf16).float()
    lords.quantize(bf16, config, progress=False)
    lords.quantize(fp32, config, progress=False)
    for name, layer in bf16.named_modules():
        if isinstance(layer, LoRDSLinear):
            twin = fp32.get_submodule(name)
            assert torch.equal(layer.codes, twin.codes), name
            assert torch.equal(layer.scale_b, twin.scale_b) and torch.equal(layer.scale_a, twin.scale_a), name


def test_biased_linears_keep_their_bias():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    biases = {}
    with torch.no_grad():  # transformers starts biases at zero, which a dropped bias would match
        for name, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.normal_()
                biases[name] = layer.bias.detach().clone()
    lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    assert len(biases) == 7
    for name, bias in biases.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRDSLinear) and torch.equal(layer.bias, bias), name


class RecordingBar:
    """tqdm's part that lords.model uses, recording what it is told."""
    bars: list["RecordingBar"] = []

    def __init__(self, iterable=None, total=None, desc=None, disable=False):
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.n, self.postfix = 0, None
        RecordingBar.bars.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count):
        self.n += count

    def set_postfix(self, **fields):
        self.postfix = fields


def test_the_progress_bar_counts_every_layer_and_shows_the_mean_error(tiny_llama, monkeypatch):
    monkeypatch.setattr(model_module, "tqdm", RecordingBar)
    RecordingBar.bars = []
    reports = lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=True)
    bar = next(bar for bar in RecordingBar.bars if bar.desc == "quantizing layers")
    assert bar.n == bar.total == len(reports) == 14
    assert bar.postfix == {"error": f"{sum(r.error for r in reports) / len(reports):.4f}"}


def test_gptq_codes_take_the_configs_scale_dtype_seed_and_init(tiny_llama):
    """codes="gptq" hands the config's scale dtype and init to the factorization (the seed draws only the extra
    directions of a rank above the kept singular values, which a parity rank here never needs)."""
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))

    def quantized(**settings):
        model = copy.deepcopy(tiny_llama)
        config = lords.LoRDSConfig(bits=4, block_size=32, steps=2, codes="gptq", **settings)
        lords.quantize(model, config, calibration=ids, progress=False)
        return model.model.layers[0].self_attn.q_proj

    plain = quantized()
    assert plain.scale_b.dtype == torch.bfloat16 and quantized(scale_dtype="float16").scale_b.dtype == torch.float16
    assert torch.equal(quantized().scale_a, plain.scale_a)  # deterministic for one seed
    assert not torch.equal(quantized(exact_init=True).scale_a, plain.scale_a)


def test_each_report_times_its_layer(tiny_llama):
    """A group's refinement time shared by its layers: positive, and summing to less than the whole call."""
    start = time.perf_counter()
    reports = lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    elapsed = time.perf_counter() - start
    assert all(report.seconds > 0 for report in reports)
    assert sum(report.seconds for report in reports) < elapsed


# --- the walk's plumbing, each piece against what it must pass on (issue 27's surviving mutants) -----------------

def test_block_output_is_the_hidden_states_of_a_tuple_or_the_tensor():
    class TupleBlock(nn.Module):
        def forward(self, hidden, scale=1.0):
            return hidden * scale, "attention weights"

    hidden = torch.randn(2, 3, 4)
    assert torch.equal(model_module.block_output(TupleBlock(), (hidden,), {"scale": 2.0}), hidden * 2)
    assert torch.equal(model_module.block_output(nn.Identity(), (hidden,), {}), hidden)


def test_next_inputs_keep_every_argument_after_the_hidden_states():
    class TwoArgumentBlock(nn.Module):
        def forward(self, hidden, bias, *, scale):
            return hidden * scale + bias

    hidden, bias = torch.randn(2, 4), torch.randn(4)
    [(args, kwargs)] = model_module.next_inputs(TwoArgumentBlock(), [((hidden, bias), {"scale": 3.0})])
    assert torch.equal(args[0], hidden * 3 + bias) and args[1] is bias and kwargs == {"scale": 3.0}


def test_captured_block_inputs_come_in_batches_and_carry_no_cache(tiny_llama):
    """The captured inputs feed every block in turn: a KV cache in them would grow with each block run."""
    from transformers.cache_utils import Cache

    ids = torch.randint(0, 96, (5, 8), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(tiny_llama)
    captured = capture_block_inputs(tiny_llama, blocks[0], ids, batch_size=2)
    assert [args[0].shape[0] for args, _ in captured] == [2, 2, 1]
    assert not any(isinstance(value, Cache) for _, kwargs in captured for value in kwargs.values())


def test_find_blocks_passes_over_an_empty_module_list_and_names_a_model_without_blocks():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.ModuleList()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    assert find_blocks(Model())[0] == "layers"
    with pytest.raises(ValueError) as error:
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
    assert str(error.value) == "Sequential has no ModuleList of decoder blocks; only transformer LMs are supported"


def test_gptq_codes_without_calibration_are_refused_by_their_whole_message(tiny_llama):
    with pytest.raises(ValueError) as error:
        lords.quantize(tiny_llama, lords.LoRDSConfig(steps=0, codes="gptq"), progress=False)
    assert str(error.value) == ("codes='gptq' needs calibration data: it minimises the error of the layers' outputs "
                                "on calibration inputs")


def test_kernel_launches_take_the_models_dtype_else_bfloat16(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
    assert {launch[7] for launch in model_module.kernel_launches(tiny_llama, rows=(1,))} == {torch.float32}
    plain = nn.Sequential(LoRDSLinear(64, 32, 4, 2))
    assert {launch[7] for launch in model_module.kernel_launches(plain, rows=(1,))} == {torch.bfloat16}


def test_precompile_kernels_compiles_the_models_launches(tiny_llama, monkeypatch):
    import lords.kernels.precompile as precompile_module

    calls = []
    monkeypatch.setattr(precompile_module, "precompile", lambda launches, workers: calls.append((launches, workers))
                        or 1.5)
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
    assert model_module.precompile_kernels(tiny_llama, rows=(1, 16), dtype=torch.float16, workers=3) == 1.5
    assert calls == [(model_module.kernel_launches(tiny_llama, (1, 16), torch.float16), 3)]


def linear_of(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize("codes", ["nearest", "gptq"])
def test_lords_linear_group_reports_each_refinement_step_and_names_a_bad_weight(codes):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    steps = []
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=3, codes=codes)
    channels = [torch.eye(64) if codes == "gptq" else torch.ones(64)]
    model_module.lords_linear_group(["up"], [linear_of(weight)], config, channels, "cpu", progress=steps.append)
    assert len(steps) == 3 * (config.refit_rounds + 1 if codes == "gptq" else 1) and set(steps) == {1}
    weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.up_proj contains NaN or Inf values"):
        model_module.lords_linear_group(["model.layers.0.mlp.up_proj"], [linear_of(weight)], config, None, "cpu")


def test_gptq_codes_draw_the_extra_rank_directions_from_the_seed():
    """A rank above the block statistics' singular values (2 blocks of 32, rank 4) starts its extra directions at
    random (lords.factorize.svd_init): one seed gives one result, another seed another."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))

    def scale_a(seed):
        config = lords.LoRDSConfig(bits=4, block_size=32, rank=4, steps=1, codes="gptq", seed=seed)
        [(module, _)] = model_module.lords_linear_group(["up"], [linear_of(weight)], config, [torch.eye(64)], "cpu")
        return module.scale_a

    assert torch.equal(scale_a(1), scale_a(1)) and not torch.equal(scale_a(1), scale_a(2))


def test_plan_layers_applies_an_override_of_an_experts_projection():
    from test_experts import tiny_qwen3_moe

    config = lords.LoRDSConfig(bits=4, block_size=32, overrides={"*.experts.down_proj": {"bits": 3}})
    plan = model_module.plan_layers(tiny_qwen3_moe(), config)
    assert plan["model.layers.0.mlp.experts.down_proj"]["bits"] == 3
    assert plan["model.layers.0.mlp.experts.gate_up_proj"]["bits"] == 4


def test_calibration_runs_in_batches_of_batch_size(tiny_llama):
    """batch_size bounds what one forward holds (8 by default), for the statistics and for the feedback walk."""
    ids = torch.randint(0, 96, (17, 8), generator=torch.Generator().manual_seed(0))

    def batches(run, codes="nearest"):
        model = copy.deepcopy(tiny_llama)
        seen = []
        model.model.embed_tokens.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
        run(model, lords.LoRDSConfig(bits=4, block_size=32, steps=0, codes=codes))
        return seen

    assert batches(lambda model, config: lords.quantize(model, config, ids, progress=False)) == [8, 8, 1]
    assert batches(lambda model, config: lords.quantize(model, config, ids, batch_size=3, progress=False)) == [
        3, 3, 3, 3, 3, 2]
    assert batches(lambda model, config: lords.quantize(model, config, ids, batch_size=5, progress=False),
                   "gptq") == [5, 5, 5, 2]
    group = partial(model_module.lords_linear_group, device="cpu")
    assert batches(lambda model, config: model_module.walk_blocks(model, config, group, ids, progress=False)) == [
        8, 8, 1]


def bars_of(run) -> dict[str, bool]:
    """{bar description: whether it was disabled} for the bars lords.model opened during run()."""
    RecordingBar.bars = []
    run()
    return {bar.desc: bar.disable for bar in RecordingBar.bars}


def test_progress_bars_show_by_default_and_only_when_asked(tiny_llama, monkeypatch):
    monkeypatch.setattr(model_module, "tqdm", RecordingBar)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=0)
    group = partial(model_module.lords_linear_group, device="cpu")
    assert bars_of(lambda: lords.quantize(copy.deepcopy(tiny_llama), config)) == {"quantizing layers": False}
    assert bars_of(lambda: lords.quantize(copy.deepcopy(tiny_llama), config, progress=False)) == {
        "quantizing layers": True}
    assert bars_of(lambda: lords.quantize(copy.deepcopy(tiny_llama), config, calibration=ids, progress=True)) == {
        "calibration statistics": False, "quantizing layers": False}
    gptq = lords.LoRDSConfig(bits=4, block_size=32, steps=0, codes="gptq")
    assert bars_of(lambda: lords.quantize(copy.deepcopy(tiny_llama), gptq, calibration=ids, progress=True)) == {
        "quantizing blocks (feedback)": False}
    assert bars_of(lambda: model_module.walk_blocks(copy.deepcopy(tiny_llama), config, group)) == {
        "quantizing layers": False}


def test_stacks_hold_at_most_max_batch_numel_weights_in_the_feedback_walk_too(tiny_llama):
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    for codes in ("nearest", "gptq"):
        stacks = []

        def group(names, *args):
            stacks.append(len(names))
            return model_module.lords_linear_group(names, *args, device="cpu")

        config = lords.LoRDSConfig(bits=4, block_size=32, steps=0, codes=codes)
        model_module.walk_blocks(copy.deepcopy(tiny_llama), config, group, ids, max_batch_numel=1, progress=False)
        assert stacks == [1] * 14, codes


def test_same_shaped_layers_under_different_overrides_keep_their_own_config(tiny_llama):
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=0,
                               overrides={"model.layers.0.self_attn.q_proj": {"bits": 3}})
    lords.quantize(tiny_llama, config, progress=False)
    assert tiny_llama.model.layers[0].self_attn.q_proj.bits == 3
    assert tiny_llama.model.layers[1].self_attn.q_proj.bits == 4


def test_quantize_records_its_config_and_marks_only_transformers_models(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=3, block_size=32, steps=0), progress=False)
    assert tiny_llama.config.quantization_config.quantization["bits"] == 3

    class WithConfig(nn.Module):  # a config but no save_pretrained: nothing to mark
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {})()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 64)) for _ in range(2)])

    class WithSavePretrained(WithConfig):  # save_pretrained but no config
        def __init__(self):
            super().__init__()
            del self.config

        def save_pretrained(self, folder):
            raise AssertionError("not called")

    for model in (WithConfig(), WithSavePretrained()):
        lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
        assert isinstance(model.layers[0][0], LoRDSLinear) and not hasattr(model, "hf_quantizer")


def test_channel_moments_of_bf16_inputs_accumulate_in_float32():
    layer = nn.Linear(64, 8).bfloat16()
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    with model_module.recording_channel_moments([layer]) as moments:
        layer(x)
    expected = x.double().pow(2).mean(0)
    # through a float32 norm: 1.6e-6 measured; through a bfloat16 one, 5.9e-3
    assert ((moments[layer].double() - expected).abs() / expected).max() < 1e-5


def test_a_linear_that_never_ran_gets_a_zero_hessian():
    layer = nn.Linear(6, 3)
    with recording_input_hessians([layer]) as hessians:
        pass
    assert hessians[layer].shape == (6, 6) and hessians[layer].dtype == torch.float32
    assert not hessians[layer].any()


@pytest.mark.parametrize("codes", ["nearest", "gptq"])
def test_an_outlier_warning_points_at_the_line_that_called_lords(tiny_llama, monkeypatch, codes):
    """Raised deep in either block walk (the error-feedback one runs under torch.no_grad, whose wrapper frame sits
    between lords' own), the warning names the user's line."""
    monkeypatch.setattr(model_module, "OUTLIER_RATIO", 1.0)  # every layer above the median is named
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        lords.quantize(tiny_llama, lords.LoRDSConfig(bits=2, block_size=32, steps=2, codes=codes), calibration=ids,
                       progress=False)
    named = [warning for warning in caught if "the median of the other layers" in str(warning.message)]
    assert named and {(warning.filename, warning.lineno) for warning in named} == {(__file__, line)}


def test_four_layers_are_enough_to_name_an_outlier_at_more_than_three_times_the_median():
    from lords.model import LayerReport, warn_outliers

    def warned(errors):
        reports = [LayerReport(f"layer{i}", (4, 4), 4, 1, 4.5, e, e, e, 0.0) for i, e in enumerate(errors)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_outliers(reports)
        return caught

    [warning] = warned([0.25, 0.25, 0.25, 1.0])
    assert str(warning.message) == ("layer3: relative weight error 1.0000 is 4.0x the median of the other layers "
                                    "(0.2500)")
    assert warning.filename == __file__  # the caller's line, outside lords
    assert warned([0.25, 0.25, 0.25, 0.75]) == []  # exactly three times the median: not an outlier
    [warning] = warned([0.1, 0.1, 0.2, 0.5, 0.5, 1.6])  # the median is the upper middle value, 0.5
    assert str(warning.message).endswith("3.2x the median of the other layers (0.5000)")
    assert warned([0.1, 0.1, 1.0]) == []  # three layers: too few to call one an outlier


def test_the_progress_bar_counts_every_expert_matrix_and_calibration_reaches_the_experts(monkeypatch):
    from test_experts import tiny_qwen3_moe

    monkeypatch.setattr(model_module, "tqdm", RecordingBar)
    RecordingBar.bars = []
    config = lords.LoRDSConfig(bits=4, block_size=32, steps=2)
    data_free = tiny_qwen3_moe()
    lords.quantize(data_free, config, progress=True)
    bar = next(bar for bar in RecordingBar.bars if bar.desc == "quantizing layers")
    # 2 blocks x (4 attention linears + 8 experts x 2 projections)
    assert bar.n == bar.total == 40
    calibrated = tiny_qwen3_moe()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    lords.quantize(calibrated, config, calibration=ids, progress=False)
    experts = [model.model.layers[0].mlp.experts.gate_up_proj for model in (data_free, calibrated)]
    assert not torch.equal(experts[0].scale_a, experts[1].scale_a)  # E[x^2] of the routed tokens weighs them
