"""vLLM integration: quant_method "lords" as a vLLM quantization method, so that `vllm.LLM(model=folder)` and vLLM's
OpenAI server serve a lords checkpoint with no extra flag.

vLLM loads this module through the entry point "vllm.general_plugins" (pyproject.toml), in each of its processes;
nothing else in lords imports it, so vLLM is imported only where vLLM runs. The config read is the quantization_config
that lords.hf writes into config.json, validated by the same class.

vLLM fuses q/k/v (and gate/up) into one layer, while a lords checkpoint keeps each part's codes, codebook and scales
(each its own rank). A fused layer stacks the parts' tensors in one parameter each (scales zero-padded to the largest
rank, so that B A is unchanged) and runs one lords matmul per part.

Tensor parallelism follows W = (B A) * C[codes]: a column-parallel layer owns some of W's rows, so it keeps those rows
of the codes and of B, and A whole; a row-parallel layer owns some columns: those columns of the codes and of A, and B
whole (vLLM sums the ranks' partial outputs). Codes are packed along the columns in segments (lords.packing), so a
row-parallel shard unpacks, slices and packs again.

Mixture-of-experts experts (LoRDSExpertsMethod) keep vLLM's router and run lords.experts.LoRDSExperts on its top-k;
tensor parallelism splits each expert's width the same way (gate and up by rows, down by columns), and expert
parallelism places whole experts.

On the CPU each layer dequantizes its weight once, after loading, in the model's dtype, and runs a dense matmul:
dequantizing on every forward made decoding 15x slower than the dense model's, and vLLM on the CPU is for trying a
checkpoint out, not for saving memory (the dense copies cost the dense model's memory; the checkpoint on disk stays
4-bit). On CUDA lords.kernels.lords_matmul runs through the torch operator of lords.kernels.ops, which CUDA graphs and
torch.compile accept. vLLM's CUDA build cannot be installed
where the GPU is, so the CUDA path here is untested under vLLM; it is the call that LoRDSLinear makes on CUDA.
"""

from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts, UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from .experts import PROJECTIONS, LoRDSExperts, LoRDSExpertWeights
from .hf import QUANT_METHOD, LoRDSQuantizationConfig
from .linear import lords_linear, reference_weight
from .packing import packed_columns, row_bytes

TENSORS = ("codes", "codebook", "scale_b", "scale_a")


class LoRDSVllmConfig(QuantizationConfig):
    """config.json's quantization_config of a lords checkpoint, for vLLM."""

    def __init__(self, layers: dict[str, dict]):
        super().__init__()
        self.layers = layers

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernels' bfloat16 dot products need Ampere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict) -> "LoRDSVllmConfig":
        return cls(LoRDSQuantizationConfig(**config).layers)  # refuses what transformers would refuse

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            return self.experts_method(layer, prefix)
        if not isinstance(layer, LinearBase):
            return None
        head, _, name = prefix.rpartition(".")
        part_names = [f"{head}.{part}" if head else part for part in self.packed_modules_mapping.get(name, [name])]
        entries = [self.layers.get(part) for part in part_names]
        if all(entry is None for entry in entries):
            return UnquantizedLinearMethod()
        dense = [part for part, entry in zip(part_names, entries) if entry is None]
        if dense:
            raise ValueError(f"vLLM fuses {part_names} into {prefix}, but {dense} are not quantized: quantize all of "
                             "them or none")
        for field in ("bits", "scale_dtype"):
            values = {entry[field] for entry in entries}
            if len(values) > 1:
                raise ValueError(f"vLLM fuses {part_names} into {prefix}; they must share one {field}, got "
                                 f"{sorted(values)}")
        return LoRDSLinearMethod(part_names, entries)

    def experts_method(self, layer, prefix: str):
        """The experts of one MoE block: both projections quantized (LoRDSExpertsMethod) or neither (dense)."""
        names = [f"{prefix}.{projection}" for projection in PROJECTIONS]
        entries = [self.layers.get(name) for name in names]
        if all(entry is None for entry in entries):
            return UnquantizedFusedMoEMethod(layer.moe_config)
        if any(entry is None for entry in entries):
            raise ValueError(f"quantization_config names one projection of the experts {prefix} but not the other "
                             f"({names})")
        return LoRDSExpertsMethod(layer.moe_config, prefix, dict(zip(PROJECTIONS, entries)))


class LoRDSLinearMethod(LinearMethodBase):
    """One vLLM linear layer (fused or not) of LoRDS parts; created per layer, so it keeps that layer's state."""

    def __init__(self, part_names: list[str], entries: list[dict]):
        self.part_names, self.entries = part_names, entries
        self.bits = entries[0]["bits"]
        self.ranks = [entry["rank"] for entry in entries]
        self.loaded: set[tuple[str, int]] = set()

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        if len(output_partition_sizes) != len(self.part_names):
            raise ValueError(f"{layer.prefix} has {len(output_partition_sizes)} parts in vLLM, {self.part_names} "
                             "in the quantization_config")
        self.rows, self.columns, self.full_columns = list(output_partition_sizes), input_size_per_partition, input_size
        self.params_dtype = params_dtype
        scale_dtype = getattr(torch, self.entries[0]["scale_dtype"])
        max_rank = max(self.ranks)
        # zeros: the padding columns of B and rows of A of a part with a smaller rank are never loaded
        shapes = {
            "codes": ((sum(self.rows), row_bytes(input_size_per_partition, self.bits)), torch.uint8),
            "codebook": ((len(self.rows), 2**self.bits), torch.float32),  # lords.codebooks' tables
            "scale_b": ((sum(self.rows), max_rank), scale_dtype),
            "scale_a": ((len(self.rows) * max_rank, input_size_per_partition), scale_dtype),
        }
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": partial(self.load, layer, name)})
            layer.register_parameter(name, param)

    def load(self, layer, name: str, param, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """vLLM's weight_loader for one tensor of one part, as the checkpoint stores it (the whole matrix)."""
        shard_id = getattr(loaded_weight, "shard_id", None) if shard_id is None else shard_id
        part = 0 if shard_id is None else "qkv".index(shard_id) if isinstance(shard_id, str) else shard_id
        rank, local_rows = self.ranks[part], self.rows[part]
        first_local_row = sum(self.rows[:part])
        first_row, full_rows = 0, local_rows
        if isinstance(layer, ColumnParallelLinear):
            # QKVParallelLinear repeats k and v heads when there are fewer of them than ranks
            replicas = layer.num_kv_head_replicas if isinstance(layer, QKVParallelLinear) and part > 0 else 1
            first_row, full_rows = layer.tp_rank // replicas * local_rows, local_rows * layer.tp_size // replicas
        local_columns, full_columns = self.columns, self.full_columns
        first_column = layer.tp_rank * local_columns if isinstance(layer, RowParallelLinear) else 0
        expected = {"codes": (full_rows, row_bytes(full_columns, self.bits)), "codebook": (2**self.bits,),
                    "scale_b": (full_rows, rank), "scale_a": (rank, full_columns)}[name]
        if tuple(loaded_weight.shape) != expected or loaded_weight.dtype != param.dtype:
            raise ValueError(f"{self.part_names[part]}.{name} in the checkpoint is {loaded_weight.dtype} "
                             f"{tuple(loaded_weight.shape)}, expected {param.dtype} {expected} for its "
                             f"quantization_config entry {self.entries[part]}")
        rows = slice(first_local_row, first_local_row + local_rows)
        if name == "codes":
            codes = loaded_weight[first_row:first_row + local_rows]
            if local_columns != full_columns:
                codes = packed_columns(codes, self.bits, full_columns, first_column, local_columns)
            param.data[rows] = codes
        elif name == "codebook":
            param.data[part] = loaded_weight
        elif name == "scale_b":
            param.data[rows, :rank] = loaded_weight[first_row:first_row + local_rows]
        else:
            first_padded_row = part * max(self.ranks)
            param.data[first_padded_row:first_padded_row + rank] = (
                loaded_weight[:, first_column:first_column + local_columns])
        self.loaded.add((name, part))

    def process_weights_after_loading(self, layer) -> None:
        # vLLM checks that every parameter was loaded only for unquantized models; a LoRDS layer without its codes or
        # scales would run on zeros.
        for part, part_name in enumerate(self.part_names):
            for name in TENSORS:
                if (name, part) not in self.loaded:
                    raise ValueError(f"{part_name}.{name} is missing from the checkpoint; the folder is incomplete or "
                                     "does not match its quantization_config")
        max_rank, first = max(self.ranks), 0
        layer.lords_parts = []
        for part, (rows, rank) in enumerate(zip(self.rows, self.ranks)):
            layer.lords_parts.append((
                layer.codes[first:first + rows], layer.codebook[part],
                layer.scale_b[first:first + rows, :rank].contiguous(),
                layer.scale_a[part * max_rank:part * max_rank + rank]))
            first += rows
        layer.lords_dense = None
        if layer.codes.device.type == "cpu":
            layer.lords_dense = torch.cat([reference_weight(*part, self.bits, self.params_dtype)
                                           for part in layer.lords_parts])

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.lords_dense is not None and layer.lords_dense.dtype == x.dtype:
            return F.linear(x, layer.lords_dense, bias)
        path = "triton" if x.is_cuda else "torch"
        outputs = [lords_linear(x, codes, codebook, scale_b, scale_a, self.bits, None, path)
                   for codes, codebook, scale_b, scale_a in layer.lords_parts]
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return output if bias is None else output + bias


class LoRDSExpertsMethod(FusedMoEMethodBase):
    """The experts of one vLLM MoE layer as lords.experts.LoRDSExperts: the router is vLLM's, and apply runs the
    experts of its top-k, so the routing and the expert arithmetic are those lords.load runs under transformers.

    vLLM's expert loader maps checkpoint names to per-expert GPTQ-like parameters (w13_*, w2_*, one expert and one of
    gate or up at a time); a lords checkpoint stores each projection stacked over experts, with one scale_a for gate
    and up together, which that mapping would split. So the layer loads through this method's own load_weights,
    set on the layer in create_weights. Tensor parallelism splits each expert's width, as for the dense MLP: a rank
    keeps its rows of gate and of up (codes and scale_b; scale_a whole) and its columns of down (codes and scale_a;
    scale_b whole). Expert parallelism places whole experts: a rank keeps the experts vLLM's expert map gives it and
    runs the router's choices among them. vLLM sums the ranks' outputs either way. Gated SiLU experts without biases
    (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE)."""

    def __init__(self, moe, prefix: str, entries: dict[str, dict]):
        super().__init__(moe)
        self.prefix, self.entries = prefix, entries
        self.loaded: set[str] = set()

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        moe = self.moe
        if moe.has_bias or not moe.is_act_and_mul or moe.activation.value != "silu":
            raise ValueError(f"lords' vLLM plugin serves gated SiLU experts without biases; {self.prefix} has "
                             f"activation {moe.activation.value}, gated {moe.is_act_and_mul}, biases {moe.has_bias}")
        self.tp_rank, self.tp_size = moe.moe_parallel_config.tp_rank, moe.tp_size
        self.width = intermediate_size_per_partition
        shapes = {"gate_up_proj": (hidden_size, 2 * intermediate_size_per_partition),
                  "down_proj": (intermediate_size_per_partition, hidden_size)}
        projections = {}
        for projection, (in_features, out_features) in shapes.items():
            entry = self.entries[projection]
            if entry["experts"] != moe.num_logical_experts:
                raise ValueError(f"{self.prefix}.{projection} stacks {entry['experts']} experts in the "
                                 f"quantization_config; the model has {moe.num_logical_experts}")
            projections[projection] = LoRDSExpertWeights(
                num_experts, in_features, out_features, entry["bits"], entry["rank"], entry["codebook"],
                getattr(torch, entry["scale_dtype"]))
        layer.lords_experts = LoRDSExperts(SimpleNamespace(num_experts=num_experts, act_fn=F.silu), **projections)
        layer.lords_experts.requires_grad_(False)
        self.params_dtype = params_dtype
        layer.load_weights = partial(self.load_weights, layer)

    def checkpoint_shape(self, projection: str, tensor: str, local: torch.Size) -> tuple[int, ...]:
        """The shape the checkpoint holds of a tensor of which this rank keeps local."""
        if tensor == "codebook":
            return tuple(local)
        full_width, experts = self.width * self.tp_size, self.moe.num_logical_experts
        if projection == "gate_up_proj" and tensor in ("codes", "scale_b"):
            return (experts, 2 * full_width, local[2])
        if projection == "down_proj" and tensor == "codes":
            return (experts, local[1], row_bytes(full_width, self.entries[projection]["bits"]))
        if projection == "down_proj" and tensor == "scale_a":
            return (experts, local[1], full_width)
        return (experts, *local[1:])

    def shard(self, layer, projection: str, tensor: str, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor: its experts (expert parallelism), of each its rows of gate and of
        up and its columns of down (tensor parallelism)."""
        if tensor == "codebook":
            return loaded
        if layer.expert_map is not None:
            loaded = loaded[self.local_experts(layer)]
        if self.tp_size == 1:
            return loaded
        first, width = self.tp_rank * self.width, self.width
        if projection == "gate_up_proj" and tensor in ("codes", "scale_b"):
            full_width = loaded.shape[1] // 2
            return torch.cat([loaded[:, first:first + width], loaded[:, full_width + first:full_width + first + width]],
                             dim=1)
        if projection == "down_proj" and tensor == "scale_a":
            return loaded[:, :, first:first + width]
        if projection == "down_proj" and tensor == "codes":
            experts, rows, _ = loaded.shape
            codes = packed_columns(loaded.reshape(experts * rows, -1), self.entries[projection]["bits"],
                                   width * self.tp_size, first, width)
            return codes.view(experts, rows, -1)
        return loaded

    def load_weights(self, layer, weights):
        """The experts' tensors, named relative to the layer ("gate_up_proj.codes"); yields the names loaded, as
        vLLM's loaders do, relative to the layer."""
        for name, loaded_weight in weights:
            projection, _, tensor = name.partition(".")
            if projection not in PROJECTIONS or tensor not in TENSORS:
                raise ValueError(f"{self.prefix}.{name} in the checkpoint is not a tensor of lords experts "
                                 f"({PROJECTIONS} x {TENSORS})")
            target = getattr(layer.lords_experts.get_submodule(projection), tensor)
            expected = self.checkpoint_shape(projection, tensor, target.shape)
            if tuple(loaded_weight.shape) != expected or loaded_weight.dtype != target.dtype:
                raise ValueError(f"{self.prefix}.{name} in the checkpoint is {loaded_weight.dtype} "
                                 f"{tuple(loaded_weight.shape)}, expected {target.dtype} {expected} for its "
                                 f"quantization_config entry {self.entries[projection]}")
            target.data.copy_(self.shard(layer, projection, tensor, loaded_weight))
            self.loaded.add(name)
            yield f"lords_experts.{name}"

    def process_weights_after_loading(self, layer) -> None:
        for projection in PROJECTIONS:
            for tensor in TENSORS:
                if f"{projection}.{tensor}" not in self.loaded:
                    raise ValueError(f"{self.prefix}.{projection}.{tensor} is missing from the checkpoint; the folder "
                                     "is incomplete or does not match its quantization_config")
            weights = layer.lords_experts.get_submodule(projection)
            if weights.codes.device.type == "cpu":  # dense copies, as LoRDSLinearMethod keeps on the CPU
                weights.dense_weight = weights.dequantize(self.params_dtype)

    def get_fused_moe_quant_config(self, layer):
        return None

    @staticmethod
    def local_experts(layer) -> torch.Tensor:
        """The global index of each expert this rank holds, in its local order (vLLM's expert map: global -> local
        slot, or -1 for another rank's expert)."""
        expert_map = layer.expert_map.cpu()
        held = torch.nonzero(expert_map >= 0).flatten()
        return held[expert_map[held].argsort()]

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        if layer.expert_map is not None:
            # another rank's expert becomes an index past this rank's experts, which LoRDSExperts skips
            local = layer.expert_map[topk_ids]
            topk_ids = torch.where(local >= 0, local, layer.lords_experts.num_experts)
        return layer.lords_experts(x, topk_ids, topk_weights)


def register() -> None:
    """vLLM's entry point (vllm.general_plugins): make quant_method "lords" known to vLLM. vLLM calls it in every
    process it starts; registering again replaces the entry with the same class."""
    register_quantization_config(QUANT_METHOD)(LoRDSVllmConfig)
