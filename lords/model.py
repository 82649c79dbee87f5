"""Walk a Hugging Face causal LM, gather calibration statistics block by block, and replace linears."""

import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from .codebooks import get_codebook
from .config import LoRDSConfig
from .experts import (
    PROJECTIONS, ExpertMatrix, LoRDSExpertWeights, block_experts, expert_list_groups, quantize_experts,
    recording_expert_moments, router_names, run_in_order, shrink_moments,
)
from .factorize import LoRDSFactors, check_weight, lords_quantize, parity_rank, reconstruct, relative_error
from .gptq import lords_gptq_quantize
from .hf import mark_quantized
from .linear import LoRDSLinear


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList holding config.num_hidden_layers modules (model.layers for Llama/Qwen)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    raise ValueError(f"{type(model).__name__} has no ModuleList of decoder blocks; only transformer LMs are supported")


def block_targets(block: nn.Module, prefix: str, config: LoRDSConfig) -> list[tuple[str, nn.Linear]]:
    """The targeted nn.Linear modules of one block. A targeted module that holds a 2-D weight but is not an
    nn.Linear (GPT-2's Conv1D, a custom projection) is an error rather than silently left in full precision.
    MoE routers stay dense (lords.experts.router_names); stacked experts are block_experts'."""
    targets = []
    routers = router_names(block)
    for name, module in block.named_modules():
        full = f"{prefix}.{name}"
        if name in routers or not config.matches(full):
            continue
        if isinstance(module, nn.Linear):
            targets.append((full, module))
        elif _is_linear_like(module):
            raise ValueError(f"module {full} ({type(module).__name__}) matches the targets but is not an nn.Linear")
    return targets


def _is_linear_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and not isinstance(module, (nn.Embedding, LoRDSLinear))
    )


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int):
    """Run the model up to the first block on each calibration batch; return [(args, kwargs)] per batch."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in calibration.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_output(block: nn.Module, args, kwargs) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _recording_inputs(linears: list[nn.Module], reduce: Callable, empty: Callable, expert_groups=()):
    """While open, sum reduce(x) over the (tokens, in_features) inputs x of each linear over the forwards run; the
    dict yielded holds each sum divided by the tokens seen (float32, on the CPU) once the block closes. Linears fed
    the same tensor (q, k, v; gate, up) share one reduction. empty(in_features): the sum when nothing ran.
    expert_groups (lords.experts.expert_list_groups): the same linear of every expert of an expert list, whose means
    are shrunk toward their pooled means (lords.experts.shrink_moments)."""
    sums = {layer: 0.0 for layer in linears}
    counts = dict.fromkeys(linears, 0)
    last = [None, None, 0]  # the input tensor seen last, its reduction (float64) and its rows

    def hook(layer, args):
        x = args[0]
        if last[0] is not x:
            flat = x.reshape(-1, x.shape[-1])
            last[:] = x, reduce(flat).double(), flat.shape[0]
        sums[layer] = sums[layer] + last[1]
        counts[layer] += last[2]

    handles = [layer.register_forward_pre_hook(hook) for layer in set(linears)]
    means: dict[nn.Module, torch.Tensor] = {}
    try:
        yield means
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    for layer in linears:
        total = sums[layer] if counts[layer] else empty(layer.in_features)
        means[layer] = (total / max(counts[layer], 1)).float().cpu()
    for group in expert_groups:
        recorded = [layer for layer in group if layer in counts]
        if recorded:
            shrunk = shrink_moments(torch.stack([means[layer].double() * counts[layer] for layer in recorded]),
                                    torch.tensor([counts[layer] for layer in recorded]))
            means.update(zip(recorded, shrunk))


def recording_channel_moments(linears: list[nn.Module], expert_groups=()):
    """While open, record h_k = E[x_k^2] of each linear's input over the forwards run (the activation-aware column
    weights); the reduction allocates nothing of the activations' size, so the forward costs about what it costs
    without hooks. expert_groups: as in _recording_inputs."""
    return _recording_inputs(
        linears, lambda flat: torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).double().pow(2),
        lambda features: torch.zeros(features, dtype=torch.float64), expert_groups,
    )


def recording_input_hessians(linears: list[nn.Module]):
    """While open, record H = E[x x^T] (in_features^2) of each linear's input: the output error's Hessian, which
    error-feedback codes (lords.gptq) minimise. Its diagonal is recording_channel_moments' h."""
    return _recording_inputs(
        linears, lambda flat: flat.float().T @ flat.float(),
        lambda features: torch.zeros(features, features, dtype=torch.float64),
    )


@torch.no_grad()
def channel_second_moments(block: nn.Module, linears: list[nn.Linear], inputs,
                           recorder=None) -> dict[nn.Module, torch.Tensor]:
    """The recorder's statistic of each linear's input over the calibration batches (default: E[x^2], with the
    moments of expert lists' linears shrunk toward their pooled moments)."""
    recording = recorder(linears) if recorder else recording_channel_moments(linears, expert_list_groups(block))
    with recording as moments:
        for args, kwargs in inputs:
            block_output(block, args, kwargs)
    return moments


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    rank: int | None  # None for block-wise baselines
    bits_per_weight: float
    error_init: float  # the objective's relative error after the SVD init (activation-weighted if calibrated)
    error: float  # the same after refinement
    weight_error: float  # plain ||W - W_hat|| / ||W||
    seconds: float


def lords_linear_group(
    names, linears, config, channel_weights, device, progress=None
) -> list[tuple[LoRDSLinear, LayerReport]]:
    """Quantize same-shaped linears sharing one config together (one batched refinement) into LoRDSLinear;
    progress(layers) after every refinement step (lords.factorize.refine_scales). channel_weights: E[x^2] of each
    layer's input (in,), or with codes="gptq" E[x x^T] (in, in), whose diagonal weighs the refinement."""
    start = time.perf_counter()
    for name, layer in zip(names, linears):
        check_weight(layer.weight, name)
    weight = torch.stack([layer.weight.detach() for layer in linears]).to(device=device, dtype=torch.float32)
    channels = None
    if channel_weights is not None:
        channels = torch.stack(channel_weights).to(device)
    out_features, in_features = weight.shape[-2:]
    rank = layer_rank(config, out_features, in_features)
    codebook = get_codebook(config.codebook, config.bits).to(device)
    scale_dtype = getattr(torch, config.scale_dtype)
    if config.codes == "gptq":
        factors = lords_gptq_quantize(
            weight, codebook, config.block_size, rank, channels, config.steps, config.lr, config.refit_rounds,
            config.exact_init, scale_dtype, config.seed, progress,
        )
    else:
        factors = lords_quantize(
            weight, codebook, config.block_size, rank, config.steps, config.lr, channels, config.exact_init,
            scale_dtype, config.seed, progress,
        )
    approx = reconstruct(factors.scale_b.float() @ factors.scale_a.float(), factors.codes, codebook)
    weight_error = relative_error(weight, approx)
    for i, name in enumerate(names):
        if not torch.isfinite(approx[i]).all():  # finite weights whose scales overflow scale_dtype
            raise ValueError(f"quantizing {name} gave NaN or Inf values (its largest weight is "
                             f"{weight[i].abs().max().item():.3g}; scale_dtype {config.scale_dtype} cannot hold its "
                             "scales)")
    seconds = (time.perf_counter() - start) / len(linears)
    results = []
    for i, (name, layer) in enumerate(zip(names, linears)):
        home = layer.weight.device
        one = LoRDSFactors(
            factors.scale_b[i].to(home), factors.scale_a[i].to(home), factors.codes[i].to(home),
            factors.error_init[i], factors.error[i],
        )
        module = LoRDSLinear.from_factors(one, config.bits, config.codebook, layer.bias)
        report = LayerReport(
            name, (out_features, in_features), config.bits, rank, module.bits_per_weight,
            factors.error_init[i].item(), factors.error[i].item(), weight_error[i].item(), seconds,
        )
        results.append((module, report))
    return results


@torch.no_grad()
def collect_channel_weights(
    model: nn.Module, targets: list[tuple[str, nn.Linear]], calibration: torch.Tensor, batch_size: int, progress: bool,
    experts: list[tuple[str, nn.Module]] = (),
) -> dict[str, torch.Tensor]:
    """E[x_k^2] of every target's input, measured block by block (peak memory: one block's activations); for each
    stacked-experts module (lords.experts), per expert from its routed tokens, by projection name.

    The statistics come from the unquantized model, as in AWQ: they weigh the error of each input channel by how
    much signal flows through it.
    """
    check_calibration(calibration)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calibration, batch_size)
    names = {layer: name for name, layer in targets}
    weights = {}
    for block in tqdm(blocks, desc="calibration statistics", disable=not progress):
        linears = [layer for layer in block.modules() if layer in names]
        own_experts = [(name, module) for name, module in experts if any(module is m for m in block.modules())]
        # one forward: statistics and outputs
        with (torch.no_grad(), recording_channel_moments(linears, expert_list_groups(block)) as moments,
              recording_expert_moments(own_experts) as expert_moments):
            inputs = next_inputs(block, inputs)
        weights.update({names[layer]: value for layer, value in moments.items()})
        weights.update(expert_moments)
    return weights


def check_calibration(calibration: torch.Tensor) -> None:
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"calibration must be integer token ids of shape (N, L), got {calibration.dtype} "
                         f"{tuple(calibration.shape)}")


def next_inputs(block: nn.Module, inputs: list) -> list:
    """The next block's [(args, kwargs)]: this block's outputs in place of its hidden states, the rest unchanged."""
    return [((block_output(block, args, kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]


def model_targets(model: nn.Module, config: LoRDSConfig) -> list[tuple[str, nn.Linear]]:
    """The targeted nn.Linear modules of every decoder block, in order."""
    prefix, blocks = find_blocks(model)
    return [t for index, block in enumerate(blocks) for t in block_targets(block, f"{prefix}.{index}", config)]


def model_experts(model: nn.Module, config: LoRDSConfig) -> list[tuple[str, nn.Module]]:
    """The targeted stacked-experts modules of every decoder block, in order (lords.experts.block_experts)."""
    prefix, blocks = find_blocks(model)
    return [t for index, block in enumerate(blocks) for t in block_experts(block, f"{prefix}.{index}", config)]


def layer_rank(config: LoRDSConfig, out_features: int, in_features: int) -> int:
    return config.rank or parity_rank(out_features, in_features, config.block_size)


def plan_layers(model: nn.Module, config: LoRDSConfig) -> dict[str, dict]:
    """What quantize will make of each target (lords.hf's layer entries), without quantizing anything: the streaming
    quantizer lays out its output from it before the first block is read."""
    plan = {}
    for name, layer in model_targets(model, config):
        own = config.for_module(name)
        plan[name] = {"bits": own.bits, "rank": layer_rank(own, layer.out_features, layer.in_features),
                      "codebook": own.codebook, "scale_dtype": own.scale_dtype}
    for name, experts in model_experts(model, config):
        for part in PROJECTIONS:
            own = config.for_module(f"{name}.{part}")
            count, out_features, in_features = getattr(experts, part).shape
            plan[f"{name}.{part}"] = {"bits": own.bits, "rank": layer_rank(own, out_features, in_features),
                                      "codebook": own.codebook, "scale_dtype": own.scale_dtype, "experts": count}
    return plan


def quantize_targets(
    model: nn.Module,
    targets: list[tuple[str, nn.Linear]],
    config: LoRDSConfig,
    quantize_group: Callable,
    stats: dict[str, torch.Tensor] | None = None,
    max_batch_numel: int = 2**27,
    bar=None,
    run_stacks: Callable = run_in_order,
) -> list[LayerReport]:
    """Replace the targets (names relative to model) by quantize_group's modules, in place.

    quantize_group(names, linears, config, channel_weights) -> [(module, LayerReport)] handles same-shaped linears
    sharing one config. Layers are independent, so same-shaped ones are refined together in stacks of up to
    max_batch_numel weights: on a GPU one step over a stack costs little more than over one small layer.
    stats: E[x^2] of each target's input by name (activation-aware), or None (data-free).
    run_stacks(quantize_group, stacks) -> each stack's results: in turn here by default, or split over the processes
    of torch.distributed (lords.distributed.SplitStacks).
    """
    check_targets(targets)  # before any layer is replaced: the caller's model is never left half-quantized
    groups: dict[tuple, list[tuple[str, nn.Linear]]] = {}
    for name, layer in targets:
        key = (tuple(layer.weight.shape), repr(config.for_module(name).to_dict()))
        groups.setdefault(key, []).append((name, layer))
    stacks = []
    for members in groups.values():
        per_stack = max(1, max_batch_numel // members[0][1].weight.numel())
        for first in range(0, len(members), per_stack):
            names = [name for name, _ in members[first : first + per_stack]]
            linears = [layer for _, layer in members[first : first + per_stack]]
            channel_weights = None if stats is None else [stats[name] for name in names]
            stacks.append((names, linears, config.for_module(names[0]), channel_weights))
    reports, modules = [], {}
    for (names, *_), results in zip(stacks, run_stacks(quantize_group, stacks)):
        for name, (module, report) in zip(names, results):
            modules[name] = module
            reports.append(report)
        if bar is not None:
            bar.update(len(names))
            bar.set_postfix(error=f"{sum(r.error for r in reports) / len(reports):.4f}")
    for name, module in modules.items():  # all layers quantized: only now is the model changed
        set_submodule(model, name, module)
    order = {name: index for index, (name, _) in enumerate(targets)}
    reports = sorted(reports, key=lambda report: order[report.name])
    warn_outliers(reports)
    return reports


def check_targets(targets: list[tuple[str, nn.Linear]]) -> None:
    for name, layer in targets:
        check_weight(layer.weight, name)


OUTLIER_RATIO = 3.0  # a layer's weight error this many times its peers' median is worth a look


# Modules whose frames count as lords' own for a warning's line: lords, and mutmut's trampolines, which wrap every
# function of a module under mutation testing (tests/mutate.py), so that a warning lands on the same line there.
INTERNAL_MODULES = ("lords", "mutmut.mutation.trampoline")


def stacklevel_outside_lords(frame) -> int:
    """The warnings.warn stacklevel, for a warning raised in `frame`, of the line that called into lords: the caller
    of the outermost lords frame on the stack (decorators' frames between lords' own, torch.no_grad's, do not stop
    the walk), so that a warning raised deep in a walk points at the user's call."""
    level, outermost = 1, 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if any(name == module or name.startswith(module + ".") for module in INTERNAL_MODULES):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1


def warn_outliers(reports: list[LayerReport]) -> None:
    """Warn about layers whose weight error is far above the median of the layers quantized with them."""
    errors = sorted(report.weight_error for report in reports)
    if len(errors) < 4:
        return
    median = errors[len(errors) // 2]
    for report in reports:
        if report.weight_error > OUTLIER_RATIO * median:
            warnings.warn(f"{report.name}: relative weight error {report.weight_error:.4f} is "
                          f"{report.weight_error / median:.1f}x the median of the other layers ({median:.4f})",
                          stacklevel=stacklevel_outside_lords(sys._getframe()))


def matrix_count(targets: list, experts: list) -> int:
    """The matrices a walk quantizes, what its progress bar counts: each target, and each expert of each projection
    of the stacked-experts modules."""
    return len(targets) + sum(module.gate_up_proj.shape[0] + module.down_proj.shape[0] for _, module in experts)


def walk_blocks(
    model: nn.Module,
    config: LoRDSConfig,
    quantize_group: Callable,
    calibration: torch.Tensor | None = None,
    *,
    batch_size: int = 8,
    max_batch_numel: int = 2**27,
    progress: bool = True,
    stack_experts: Callable = LoRDSExpertWeights.from_linears,
) -> list[LayerReport]:
    """Replace the targeted linears of the decoder blocks, in place (quantize_targets over all blocks at once, so
    that same-shaped linears of every block share stacks), then the stacked experts of MoE blocks
    (lords.experts.quantize_experts: quantize_group's per-expert modules become one projection by stack_experts).

    With calibration token ids (N, L), channel_weights are E[x^2] of each linear's input (activation-aware), and of
    each expert's input over the tokens routed to it; with config.codes == "gptq", E[x x^T] measured block by block
    on the quantized model (walk_blocks_with_feedback), per expert from its routed tokens likewise.
    """
    targets = model_targets(model, config)
    experts = model_experts(model, config)
    # before minutes of calibration
    check_targets(targets + [(f"{name}.{part}", ExpertMatrix(getattr(module, part)))
                             for name, module in experts for part in PROJECTIONS])
    if config.codes == "gptq":
        return walk_blocks_with_feedback(model, config, quantize_group, calibration, batch_size=batch_size,
                                         max_batch_numel=max_batch_numel, progress=progress,
                                         stack_experts=stack_experts)
    stats = None if calibration is None else collect_channel_weights(
        model, targets, calibration, batch_size, progress, experts)
    with tqdm(total=matrix_count(targets, experts), desc="quantizing layers", disable=not progress) as bar:
        # experts first, replaced only after the linears (which quantize_targets replaces once all are done): an
        # error in either leaves the model as it was
        expert_reports, replacements = quantize_experts(experts, config, quantize_group, stack_experts, stats,
                                                        max_batch_numel, bar)
        warn_outliers(expert_reports)
        reports = quantize_targets(model, targets, config, quantize_group, stats, max_batch_numel, bar)
    for name, module in replacements.items():
        model.set_submodule(name, module)
    return reports + expert_reports


def check_feedback_calibration(config: LoRDSConfig, calibration: torch.Tensor | None) -> None:
    if calibration is None:
        raise ValueError(f"codes={config.codes!r} needs calibration data: it minimises the error of the layers' "
                         "outputs on calibration inputs")
    check_calibration(calibration)


@torch.no_grad()
def walk_blocks_with_feedback(
    model: nn.Module,
    config: LoRDSConfig,
    quantize_group: Callable,
    calibration: torch.Tensor | None,
    *,
    batch_size: int = 8,
    max_batch_numel: int = 2**27,
    progress: bool = True,
    stack_experts: Callable = LoRDSExpertWeights.from_linears,
) -> list[LayerReport]:
    """GPTQ's walk: block by block, E[x x^T] of each target's input is measured on the outputs of the blocks already
    quantized (of each expert's input, over the tokens routed to it, shrunk as lords.experts.shrink_moments does),
    the block's targets and experts are quantized with it (channel_weights of quantize_group), and the quantized
    block makes the next block's inputs. Each block's error then becomes an input that the next blocks correct for.
    Same-shaped targets share stacks within a block only."""
    check_feedback_calibration(config, calibration)
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calibration, batch_size)
    reports = []
    total = matrix_count(model_targets(model, config), model_experts(model, config))
    with tqdm(total=total, desc="quantizing blocks (feedback)", disable=not progress) as bar:
        for index, block in enumerate(blocks):
            own = block_targets(block, f"{prefix}.{index}", config)
            own_experts = block_experts(block, f"{prefix}.{index}", config)
            with recording_expert_moments(own_experts, hessians=True) as stats:
                hessians = channel_second_moments(block, [layer for _, layer in own], inputs,
                                                  recording_input_hessians)
            stats.update({name: hessians[layer] for name, layer in own})
            expert_reports, replacements = quantize_experts(own_experts, config, quantize_group, stack_experts, stats,
                                                            max_batch_numel, bar)
            warn_outliers(expert_reports)
            reports += quantize_targets(model, own, config, quantize_group, stats, max_batch_numel, bar)
            for name, module in replacements.items():
                model.set_submodule(name, module)
            reports += expert_reports
            inputs = next_inputs(block, inputs)
    return reports


def quantize(
    model: nn.Module,
    config: LoRDSConfig | None = None,
    calibration: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[LayerReport]:
    """Replace the targeted nn.Linear modules of the decoder blocks by LoRDSLinear, and the experts of
    mixture-of-experts blocks by lords.experts.LoRDSExperts (routers stay dense), in place.

    calibration: token ids (N, L); when given, the refinement weighs input channels by E[x^2] (activation-aware).
    With config.codes == "gptq" (calibration required) codes are assigned with error feedback, block by block on the
    outputs of the blocks already quantized (walk_blocks_with_feedback).
    device: where the refinement runs (default: CUDA when present); same-shaped layers run batched.
    A transformers model is then marked quantized (lords.hf.mark_quantized), so that save_pretrained writes a
    folder from_pretrained loads.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = config or LoRDSConfig()
    reports = walk_blocks(
        model, config, partial(lords_linear_group, device=device), calibration, batch_size=batch_size,
        progress=progress,
    )
    if getattr(model, "config", None) is not None and hasattr(model, "save_pretrained"):
        mark_quantized(model, config)
    return reports


def kernel_launches(model: nn.Module, rows=(1, 16, 2048), dtype: torch.dtype | None = None) -> list[tuple]:
    """The Triton kernel launches the model's LoRDS layers may make at these row counts (batch x tokens a forward)
    with activations in dtype (default: a transformers model's dtype, else bf16); lords.kernels.precompile's
    layer_launches for every layer."""
    from .kernels.precompile import layer_launches

    dtype = dtype or getattr(model, "dtype", torch.bfloat16)
    return [launch for module in model.modules() if isinstance(module, LoRDSLinear)
            for launch in layer_launches(module.out_features, module.in_features, module.rank, module.bits,
                                         module.codebook, rows, dtype, module.scale_b.dtype, module.bias is not None)]


def precompile_kernels(
    model: nn.Module, rows=(1, 16, 2048), dtype: torch.dtype | None = None, workers: int | None = None
) -> float:
    """Compile those kernels (kernel_launches) in parallel processes before the first forward, which otherwise
    compiles every autotune config one by one; lords.kernels.precompile. Returns the seconds taken (0 without CUDA)."""
    from .kernels.precompile import precompile

    return precompile(kernel_launches(model, rows, dtype), workers)


def format_report(reports: list[LayerReport]) -> str:
    lines = [f"{'layer':<44} {'shape':>12} {'bits':>4} {'rank':>4} {'bpw':>6} {'err init':>9} {'err':>8} "
             f"{'w err':>8} {'sec':>6}"]
    for r in reports:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        rank = "-" if r.rank is None else r.rank
        lines.append(
            f"{r.name:<44} {shape:>12} {r.bits:>4} {rank:>4} {r.bits_per_weight:>6.3f} {r.error_init:>9.4f} "
            f"{r.error:>8.4f} {r.weight_error:>8.4f} {r.seconds:>6.1f}"
        )
    total = sum(r.shape[0] * r.shape[1] for r in reports)
    if total:
        bpw = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / total
        seconds = sum(r.seconds for r in reports)
        lines.append(f"{len(reports)} layers, {total / 1e6:.1f}M weights, {bpw:.3f} bits/weight, {seconds:.1f} s")
    return "\n".join(lines)
