"""Quantization over the processes of torch.distributed (`torchrun --nproc-per-node N lords quantize ...`).

Every process walks the decoder blocks in order, as one process would (lords.stream.walk_blocks: it reads each block
and runs the calibration forwards, a small share of the time next to the refinement), and so forms the same
refinement stacks from the same statistics. SplitStacks gives each stack to one process, which refines it while the
others refine theirs, then sends the quantized layer to every process. The stacks are those of one process, each
refined whole by the same code, so the checkpoint is the one-process checkpoint bit for bit on the same kind of
device; every process holds every quantized layer afterwards, as error-feedback codes (codes="gptq") need to run
the quantized block, and one process writes the checkpoint (lords.stream.quantize_to_folder).

The other split, one block per process in a pipeline, would change nothing in the results either, but a block's
calibration inputs are the previous block's outputs: each process would wait for all the blocks before its own, or
receive their activations, and a model's blocks rarely divide evenly over the processes.
"""

import torch
import torch.distributed as dist
from torch import nn

from .linear import LoRDSLinear
from .model import layer_rank


def world_size() -> int:
    """The processes of an initialised torch.distributed group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in it (0 without one)."""
    return dist.get_rank() if world_size() > 1 else 0


class SplitStacks:
    """run_stacks of lords.model.quantize_targets and lords.experts.quantize_experts over the processes of the
    default group, for quantize_group = lords.model.lords_linear_group. Every process must call it with the same
    stacks in the same order (it does when every process walks the same model with the same calibration data).
    progress(layer-steps) counts the steps of the stacks that other processes refined, as they arrive."""

    def __init__(self, progress=None):
        self.rank, self.world, self.progress = dist.get_rank(), dist.get_world_size(), progress
        # refinement steps x weights given to each process so far: a stack goes to the least loaded one, which
        # balances the work over the whole model when a block's stacks (4 of an 8B model's) do not split evenly
        self.loads = [0] * self.world

    def __call__(self, quantize_group, stacks: list[tuple]) -> list[list]:
        owners = []
        for _, linears, config, _ in stacks:
            owner = min(range(self.world), key=self.loads.__getitem__)
            self.loads[owner] += max(config.steps, 1) * sum(layer.weight.numel() for layer in linears)
            owners.append(owner)
        mine = [quantize_group(*stack) if owner == self.rank else None for stack, owner in zip(stacks, owners)]
        return [self._share(stack, owner, results) for stack, owner, results in zip(stacks, owners, mine)]

    def _share(self, stack: tuple, owner: int, results: list | None) -> list:
        """The owner's [(LoRDSLinear, LayerReport)] of a stack, on every process."""
        names, linears, config, _ = stack
        received = results is None
        if received:
            results = [(empty_lords_linear(layer, config), None) for layer in linears]
        reports = [[report for _, report in results]]
        dist.broadcast_object_list(reports, src=owner)
        for module, _ in results:
            for tensor in (module.codes, module.scale_b, module.scale_a):  # the codebook is the config's table
                dist.broadcast(tensor.data, src=owner)
        if received and self.progress is not None:
            self.progress(config.steps * len(linears))
        return [(module, report) for (module, _), report in zip(results, reports[0])]


def empty_lords_linear(layer: nn.Module, config) -> LoRDSLinear:
    """What lords_linear_group makes of the layer under the config (its bias included), with zero codes and scales
    that the owner's broadcast fills."""
    out_features, in_features = layer.weight.shape
    device = layer.weight.device
    module = LoRDSLinear(in_features, out_features, config.bits, layer_rank(config, out_features, in_features),
                         config.codebook, layer.bias is not None, getattr(torch, config.scale_dtype), device)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach().clone())
    return module
