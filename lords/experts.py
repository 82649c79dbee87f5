"""LoRDS experts of mixture-of-experts models: each expert's matrices stored as LoRDS codes and low-rank scales,
stacked over the experts.

transformers 5 keeps the experts of an MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, ...) in one
module with two 3-D parameters, gate_up_proj (E, 2I, H) and down_proj (E, H, I), called as
experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) by the block after its router.
LoRDSExperts takes that module's place with the same call and the same routing; its gate_up_proj and down_proj are
LoRDSExpertWeights, E LoRDS matrices of one shape stacked, which quantize_experts makes in stacks of experts (the
refinement batches same-shaped matrices, and an expert stack is exactly that).

The older layout, a ModuleList of expert MLPs made of nn.Linear (Mixtral before transformers 5, remote-code models),
needs no module of its own: its linears are ordinary targets, replaced by LoRDSLinear and refined in same-shaped
stacks like any other. Only their calibration needs shrink_moments.

Routers stay dense, always (router_names): inside an MoE block (a module with an `experts` child), every other child
that holds a weight of its own (Mixtral's and Qwen's `gate`, Qwen2-MoE's `shared_expert_gate`, DeepSeek's router)
is a router. It is small (E x H), and an error in it changes which experts run, not only by how much.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .codebooks import check_bits, get_codebook
from .factorize import bits_per_weight
from .linear import LoRDSLinear, kernel_path, lords_forward, reference_weight
from .packing import pack_codes, row_bytes

PROJECTIONS = ("gate_up_proj", "down_proj")
# An expert's E[x^2] is shrunk toward the moments of all the block's routed tokens by this many pseudo-tokens
# (shrink_moments): an expert that saw no calibration token gets the pooled moments, one that saw a few hundred
# essentially its own.
PRIOR_TOKENS = 32
# The flags of transformers' use_experts_implementation that LoRDSExperts computes: [gate; up] concatenated, (out, in)
# per expert, no biases, no per-expert norm. gpt-oss (transposed, interleaved, with biases) is not among them.
SUPPORTED_LAYOUT = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
                    "has_post_expert_norm": False}


def run_experts(hidden_states, top_k_index, top_k_weights, num_experts: int, expert_mlp: Callable) -> torch.Tensor:
    """The routing of transformers' experts modules (their eager forward): each token's output is the sum over its
    top-k experts of weight * expert_mlp(expert, tokens). Experts run in ascending order on the tokens routed to
    them; an index >= num_experts (a slot masked out by expert parallelism) contributes nothing."""
    output = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        if expert >= num_experts:
            continue
        token, slot = torch.where(top_k_index == expert)
        result = expert_mlp(expert, hidden_states[token]) * top_k_weights[token, slot, None]
        output.index_add_(0, token, result.to(output.dtype))
    return output


class LoRDSExpertWeights(nn.Module):
    """E LoRDS matrices of one shape (out_features x in_features): packed codes (E, n, bytes), one codebook, scales
    scale_b (E, n, r) and scale_a (E, r, m). Calling it with an expert index multiplies by that expert's matrix."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bits: int, rank: int,
                 codebook: str = "nf", scale_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        check_bits(bits)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.bits, self.rank, self.codebook_kind = bits, rank, codebook
        self.backend = "auto"  # as LoRDSLinear.backend
        self.register_buffer("codes", torch.zeros(num_experts, out_features, row_bytes(in_features, bits),
                                                  dtype=torch.uint8, device=device))
        self.register_buffer("codebook", get_codebook(codebook, bits).to(device))
        self.scale_b = nn.Parameter(torch.zeros(num_experts, out_features, rank, dtype=scale_dtype, device=device))
        self.scale_a = nn.Parameter(torch.zeros(num_experts, rank, in_features, dtype=scale_dtype, device=device))
        self.dense_weight = None  # (E, n, m), set by lords.dense_weights for a run of CPU inference

    @classmethod
    def from_linears(cls, layers: list[LoRDSLinear]) -> "LoRDSExpertWeights":
        """The stack of same-shaped LoRDSLinear layers (one per expert, in expert order, without bias)."""
        first = layers[0]
        stack = cls(len(layers), first.in_features, first.out_features, first.bits, first.rank, first.codebook_kind,
                    first.scale_b.dtype, first.codes.device)
        with torch.no_grad():
            for expert, layer in enumerate(layers):
                stack.codes[expert].copy_(layer.codes)
                stack.scale_b[expert].copy_(layer.scale_b)
                stack.scale_a[expert].copy_(layer.scale_a)
        return stack

    @torch.no_grad()
    def set_factors(self, scale_b: torch.Tensor, scale_a: torch.Tensor, codes: torch.Tensor) -> None:
        """Store new scales and (unpacked, E x n x m) codes of the same shapes."""
        self.codes.copy_(pack_codes(codes.reshape(-1, self.in_features), self.bits).view_as(self.codes))
        self.scale_b.copy_(scale_b)
        self.scale_a.copy_(scale_a)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (E, n, m) weights."""
        return torch.stack([reference_weight(self.codes[e], self.codebook, self.scale_b[e], self.scale_a[e],
                                             self.bits, dtype) for e in range(self.num_experts)])

    @property
    def bits_per_weight(self) -> float:
        scale_bits = torch.finfo(self.scale_b.dtype).bits
        return bits_per_weight(self.out_features, self.in_features, self.bits, self.rank, scale_bits)

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        dense_weight = None if self.dense_weight is None else self.dense_weight[expert]
        return lords_forward(x, self.codes[expert], self.codebook, self.scale_b[expert], self.scale_a[expert],
                             self.bits, None, self.backend, dense_weight)

    def grouped(self, x: torch.Tensor, experts: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """Row t of x (T, in_features) through each of its experts experts[t] (T, k) -> (T, k, out_features), every
        row in one kernel launch (lords.kernels.grouped_matmul; pairs: lords.kernels.route_pairs of experts)."""
        from .kernels import ops

        return ops.grouped_matmul(x, experts, self.codes, self.codebook, self.scale_b, self.scale_a, self.bits, pairs)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, rank={self.rank}, codebook={self.codebook_kind}")


class LoRDSExperts(nn.Module):
    """In place of a transformers experts module: the same call and routing (run_experts), each expert
    down_proj(act(gate) * up) with [gate; up] = gate_up_proj(x). The projections are LoRDSExpertWeights, or during
    quantization-aware training lords.qat.QATExpertWeights (any module called as projection(x, expert))."""

    def __init__(self, original: nn.Module, gate_up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.num_experts = original.num_experts
        self.act_fn = original.act_fn
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def expert_mlp(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, expert).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up, expert)

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        if self.runs_grouped(hidden_states, top_k_index):
            return self.grouped_forward(hidden_states, top_k_index, top_k_weights)
        return run_experts(hidden_states, top_k_index, top_k_weights, self.num_experts, self.expert_mlp)

    def runs_grouped(self, hidden_states, top_k_index) -> bool:
        """Inference through the Triton kernels: every (token, expert) pair in two launches (gate_up, then down), for a
        few tokens or many (lords.kernels.grouped_matmul chooses the kernel), reading only the experts hit and never
        asking the host which experts those are. Training, and the torch backend, run one expert at a time."""
        projections = (self.gate_up_proj, self.down_proj)
        needs_grad = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(param.requires_grad for param in self.parameters()))
        return not needs_grad and all(isinstance(projection, LoRDSExpertWeights) and projection.dense_weight is None
                                      and kernel_path(projection.backend, hidden_states) != "torch"
                                      for projection in projections)

    def grouped_forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """run_experts' routing with every (token, expert) pair at once: token t through each of its experts
        top_k_index[t], and each token's output the sum of its pairs' outputs weighted by top_k_weights."""
        from . import kernels

        tokens, k = top_k_index.shape
        routed = top_k_index < self.num_experts  # a slot masked out by expert parallelism contributes nothing
        experts = torch.where(routed, top_k_index, 0)
        # the pairs sorted by expert once, for both launches: down's pairs are gate_up's, one a row
        pairs = kernels.route_pairs(experts, self.num_experts)
        gate, up = self.gate_up_proj.grouped(hidden_states, experts, pairs).chunk(2, dim=-1)
        hidden = (self.act_fn(gate) * up).reshape(tokens * k, -1)
        out = self.down_proj.grouped(hidden, experts.reshape(-1, 1), pairs).view(tokens, k, -1)
        weights = top_k_weights * routed
        return (out * weights[..., None].to(out.dtype)).sum(1).to(hidden_states.dtype)


def check_experts_layout(name: str, module: nn.Module) -> None:
    """An experts module of another layout than SUPPORTED_LAYOUT is an error, never quantized wrongly."""
    unsupported = [f"{flag}={getattr(module, flag)}" for flag, wanted in SUPPORTED_LAYOUT.items()
                   if getattr(module, flag, wanted) != wanted]
    if unsupported:
        raise ValueError(f"experts module {name} ({type(module).__name__}) has a layout lords does not quantize "
                         f"({', '.join(unsupported)}); add {name + '.*'!r} to LoRDSConfig.skip to keep its experts "
                         "dense")


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: 3-D gate_up_proj and down_proj parameters."""
    return all(isinstance(getattr(module, part, None), nn.Parameter) and getattr(module, part).dim() == 3
               for part in PROJECTIONS)


def router_names(block: nn.Module) -> set[str]:
    """The routers of a block's MoE layers (names relative to the block): the children of a module with an `experts`
    child, other than the experts, that hold a weight of their own (the module docstring's rule)."""
    routers = set()
    for name, module in block.named_modules():
        if "experts" not in dict(module.named_children()):
            continue
        for child_name, child in module.named_children():
            if child_name != "experts" and isinstance(getattr(child, "weight", None), torch.Tensor):
                routers.add(f"{name}.{child_name}" if name else child_name)
    return routers


def block_experts(block: nn.Module, prefix: str, config) -> list[tuple[str, nn.Module]]:
    """The targeted stacked-experts modules of one block, by full name. Both projections are quantized or neither:
    a config that targets one without the other is an error."""
    found = []
    for name, module in block.named_modules():
        if not is_stacked_experts(module):
            continue
        full = f"{prefix}.{name}"
        matched = [config.matches(f"{full}.{part}") for part in PROJECTIONS]
        if not any(matched):
            continue
        if not all(matched):
            raise ValueError(f"the targets match only one of {full}.gate_up_proj and {full}.down_proj; lords "
                             "quantizes an experts module's two projections together (skip both or neither)")
        check_experts_layout(full, module)
        found.append((full, module))
    return found


def expert_list_groups(block: nn.Module) -> list[list[nn.Linear]]:
    """For each expert list of the block (the older layout: a ModuleList `experts` of same-shaped expert MLPs), the
    same nn.Linear of every expert, one list per linear of an expert (w1 of experts 0..E-1, then w2, ...)."""
    groups = []
    for module in block.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and len(experts) > 0:
            paths = [path for path, layer in experts[0].named_modules() if isinstance(layer, nn.Linear)]
            groups += [[expert.get_submodule(path) for expert in experts] for path in paths]
    return groups


def shrink_moments(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E[x^2] per expert (E, m), or E[x x^T] (E, m, m), from the sums over each expert's routed tokens (same shape)
    and their counts (E,), shrunk toward the pooled statistic of all of them by PRIOR_TOKENS pseudo-tokens; the
    data-free statistic (ones, or the identity) when no token was routed at all."""
    sums, counts = sums.double(), counts.double().view(-1, *[1] * (sums.dim() - 1))
    if counts.sum() == 0:
        empty = torch.ones(sums.shape[1]) if sums.dim() == 2 else torch.eye(sums.shape[1])
        return empty.expand(sums.shape).clone().float()
    pooled = sums.sum(dim=0) / counts.sum()
    return ((sums + PRIOR_TOKENS * pooled) / (counts + PRIOR_TOKENS)).float()


def _sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().pow(2)


def _sum_of_products(x: torch.Tensor) -> torch.Tensor:
    return (x.float().T @ x.float()).double()


@contextmanager
def recording_expert_moments(experts: list[tuple[str, nn.Module]], hessians: bool = False
                             ) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the dense experts modules run run_experts (the eager routing) and record, per expert, E[x^2] of
    each projection's input over the tokens routed to it (hessians=True: E[x x^T], which error-feedback codes
    minimise); the dict yielded holds them once the block closes, by projection name (f"{experts name}.gate_up_proj":
    (E, H) or (E, H, H), ".down_proj": (E, I) or (E, I, I)), shrunk by shrink_moments."""
    records = {}
    reduce = _sum_of_products if hessians else _sum_of_squares

    def recording_forward(module, sums, counts, hidden_states, top_k_index, top_k_weights):
        def expert_mlp(expert, x):
            gate, up = F.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
            hidden = module.act_fn(gate) * up
            counts[expert] += x.shape[0]
            sums["gate_up_proj"][expert] += reduce(x)
            sums["down_proj"][expert] += reduce(hidden)
            return F.linear(hidden, module.down_proj[expert])

        return run_experts(hidden_states, top_k_index, top_k_weights, module.num_experts, expert_mlp)

    for name, module in experts:
        # kept where the experts run: one copy to the host per block, not per expert and batch
        device = module.gate_up_proj.device
        sums = {}
        for part in PROJECTIONS:
            count, _, features = getattr(module, part).shape
            shape = (count, features, features) if hessians else (count, features)
            sums[part] = torch.zeros(shape, dtype=torch.float64, device=device)
        counts = torch.zeros(module.num_experts, dtype=torch.float64, device=device)
        records[name] = (sums, counts)
        module.forward = partial(recording_forward, module, sums, counts)
    moments: dict[str, torch.Tensor] = {}
    try:
        yield moments
    finally:
        for _, module in experts:
            del module.forward
    for name, (sums, counts) in records.items():
        moments.update({f"{name}.{part}": shrink_moments(sums[part].cpu(), counts.cpu()) for part in PROJECTIONS})


@dataclass
class ExpertMatrix:
    """One expert's matrix, as the group quantizers of lords.model read a linear (weight, bias)."""

    weight: torch.Tensor
    bias: None = None


def run_in_order(quantize_group: Callable, stacks: list[tuple]) -> Iterator[list]:
    """Each stack (names, linears, config, channel_weights) quantized in turn, in this process: how lords.model.
    quantize_targets and quantize_experts run their stacks unless told otherwise (lords.distributed.SplitStacks)."""
    return (quantize_group(*stack) for stack in stacks)


def quantize_experts(experts: list[tuple[str, nn.Module]], config, quantize_group: Callable,
                     stack: Callable = LoRDSExpertWeights.from_linears, stats: dict | None = None,
                     max_batch_numel: int = 2**27, bar=None,
                     run_stacks: Callable = run_in_order) -> tuple[list, dict[str, LoRDSExperts]]:
    """The LoRDSExperts that replace each named experts module, and the reports, one per expert matrix (named
    f"{projection}.{expert}"); the caller replaces the modules, once everything it quantizes is done. Each
    projection's experts go to quantize_group (as lords.model.quantize_targets calls it, through run_stacks) in
    stacks of up to max_batch_numel weights, with the config that applies to the projection's name and, when stats
    are given, each expert's moments; stack(per-expert modules) makes the projection."""
    stacks, places = [], []  # places: the (experts module, projection) of each stack
    for name, module in experts:
        for part in PROJECTIONS:
            full = f"{name}.{part}"
            weight = getattr(module, part)
            per_stack = max(1, max_batch_numel // weight[0].numel())
            for first in range(0, weight.shape[0], per_stack):
                chosen = range(first, min(first + per_stack, weight.shape[0]))
                channel_weights = None if stats is None else list(stats[full][first : chosen.stop])
                stacks.append(([f"{full}.{e}" for e in chosen], [ExpertMatrix(weight[e]) for e in chosen],
                               config.for_module(full), channel_weights))
                places.append((name, part))
    reports, modules = [], {place: [] for place in places}
    for place, results in zip(places, run_stacks(quantize_group, stacks)):
        modules[place] += [expert_module for expert_module, _ in results]
        reports += [report for _, report in results]
        if bar is not None:
            bar.update(len(results))
    replacements = {name: LoRDSExperts(module, **{part: stack(modules[(name, part)]) for part in PROJECTIONS})
                    for name, module in experts}
    return reports, replacements
