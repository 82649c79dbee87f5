"""The streaming quantizer: a model is read one decoder block at a time from a source (a folder of safetensors
files, a synthetic generator of random weights, or a model already in memory), and its layers are written to a lords
checkpoint as soon as they are quantized, so neither host nor GPU memory ever holds the dense model.

Two parts, kept apart so that later quantizers can reuse the first:
- walk_blocks walks a meta-device model: it materialises one block from the source on the device, hands it over
  with the calibration activations that reach it, then runs it to get the next block's inputs and frees it.
- quantize_to_folder takes each block's statistics and layers, quantizes the layers once they fill a refinement
  stack (lords.model.quantize_targets: one block of an 8B model, every block of a small one) and writes them.
The next block's inputs come from the dense block, so the statistics are those of lords.quantize (as in AWQ) and
the result is the in-memory path's. walk_blocks(feedback=True) takes them from the block as the consumer left it
instead: what an error-feedback quantizer (GPTQ-style, each block calibrated on the quantized blocks before it)
needs. Under torchrun every process walks the blocks and the refinement stacks are split over the processes
(lords.distributed), and the first process writes the checkpoint.
"""

import copy
import json
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (
    DEFAULT_SHARD_SIZE, INDEX_NAME, LOAD_ERRORS, SAFETENSORS_DTYPES, ShardedSafetensors, checkpoint_specs,
    choose_storage_dtype, is_checkpoint, quantized_tensor_names, read_header, read_tensor, unique_tensors, write_folder,
    write_model_config, written_by_lords,
)
from .config import LoRDSConfig
from .distributed import SplitStacks, rank, world_size
from .hf import mark_quantized, replace_linears
from .experts import (
    PROJECTIONS, block_experts, expert_list_groups, is_stacked_experts, quantize_experts, recording_expert_moments,
)
from .model import (
    LayerReport, block_targets, capture_block_inputs, channel_second_moments, check_calibration,
    check_feedback_calibration, find_blocks, lords_linear_group, next_inputs, plan_layers, quantize_targets,
    recording_channel_moments, recording_input_hessians, run_in_order,
)


class SafetensorsSource:
    """A transformers folder of safetensors files (one file, or shards and their index), read one tensor at a time
    with plain file reads."""

    def __init__(self, folder: str | Path):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            files = sorted({self.folder / file for file in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder} holds no .safetensors files")
        self.entries = {}
        for path in files:
            start, header = read_header(path)
            self.entries.update({name: (path, start, entry) for name, entry in header.items()})
        dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
        self.dtype = next((dtypes[entry["dtype"]] for _, _, entry in self.entries.values()
                           if dtypes[entry["dtype"]].is_floating_point), None)
        plural = "s" * (len(files) > 1)
        self.description = f"{self.folder} ({len(files)} safetensors file{plural}, read block by block)"

    def names(self) -> set[str]:
        return set(self.entries)

    def tensor(self, name: str, device) -> torch.Tensor:
        path, start, entry = self.entries[name]
        return read_tensor(path, start, entry).to(device)

    def save_extras(self, folder: Path) -> None:
        """The source's generation settings travel with the quantized model."""
        if (self.folder / "generation_config.json").is_file():
            shutil.copy(self.folder / "generation_config.json", folder)


class SyntheticSource:
    """Random weights of a model's shapes, generated tensor by tensor from a seed on `device`, so that a model larger
    than the disk and the host memory (Llama-3-70B or 405B shapes) streams like a folder. Matrices ~ N(0, 0.02^2)
    (transformers' initializer_range), norm weights 1, biases 0; a tensor depends only on the seed, its name and the
    kind of device that generates it (CPU and CUDA generators differ)."""

    def __init__(self, config, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        self.config, self.seed, self.dtype, self.device = config, seed, dtype, torch.device(device)
        skeleton = empty_model(config, dtype)
        self.shapes = {name: tuple(tensor.shape) for name, tensor in unique_tensors(skeleton).items()}
        billions = sum(torch.Size(shape).numel() for shape in self.shapes.values()) / 1e9
        self.description = f"synthetic {config.model_type} of {billions:.1f}B parameters (seed {seed})"

    def names(self) -> set[str]:
        return set(self.shapes)

    def tensor(self, name: str, device) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            fill = 0.0 if name.endswith(".bias") else 1.0
            return torch.full(shape, fill, dtype=self.dtype, device=device)
        generator = torch.Generator(self.device).manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        values = torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device).mul_(0.02)
        return values.to(device)

    def save_extras(self, folder: Path) -> None:
        pass


class ModelSource:
    """A dense model already in memory: how a source transformers reads only whole (a GGUF file) is streamed."""

    def __init__(self, model: nn.Module, description: str):
        self.config, self.description = model.config, description
        self.tensors = model.state_dict()
        self.dtype = getattr(model, "source_dtype", None)
        self.generation_config = getattr(model, "generation_config", None)

    def names(self) -> set[str]:
        return set(self.tensors)

    def tensor(self, name: str, device) -> torch.Tensor:
        return self.tensors[name].detach().to(device)

    def save_extras(self, folder: Path) -> None:
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)


def open_source(path: str | Path):
    """(source, tokenizer) for a model folder: safetensors files stream block by block; another format (the default
    model's GGUF file, .bin) is read whole by transformers first, the only way it reads them."""
    from transformers import AutoTokenizer

    from .assets import load_pretrained

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (nothing is downloaded; give a local folder)")
    if is_checkpoint(path) or written_by_lords(path):
        raise ValueError(f"{path} is a lords checkpoint already; quantize the dense model it came from")
    reason = "not safetensors, so transformers reads it whole first; its blocks are then quantized one at a time"
    if any(path.glob("*.safetensors")):
        try:
            source = SafetensorsSource(path)
            # a config of wrong field types or values fails here, not later
            complete = set(unique_tensors(empty_model(source.config, torch.float32))) <= source.names()
        except LOAD_ERRORS as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        if complete:
            return source, AutoTokenizer.from_pretrained(path)
        # transformers 5 saves MoE experts one by one (experts.0.gate_proj.weight) and stacks them as it loads
        reason = ("its tensors are stored under other names than the model's (MoE experts one by one), so transformers "
                  "reads it whole first to convert them; its blocks are then quantized one at a time")
    model, tokenizer = load_pretrained(path)
    return ModelSource(model, f"{path} ({reason})"), tokenizer


def empty_model(config, dtype: torch.dtype, device="meta") -> nn.Module:
    """The model with every parameter on the meta device (nothing allocated), tied weights tied, and the buffers that
    no checkpoint holds (rotary frequencies) made on `device` by the model's own initialisation, as from_pretrained
    makes them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)  # from_config sets its dtype
    for module in model.modules():
        names = [name for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None]
        if names and torch.device(device).type != "meta":
            for name in names:
                module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
            model._init_weights(module)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def load_module(module: nn.Module, prefix: str, source, device, dtype: torch.dtype) -> None:
    """Materialise a meta submodule (named prefix in the model) from the source: floating tensors in dtype."""
    module.to_empty(device=device)
    module.load_state_dict({key: source.tensor(f"{prefix}.{key}", device) for key in module.state_dict()})
    module.to(dtype).requires_grad_(False)


@dataclass
class Block:
    index: int
    name: str  # e.g. "model.layers.3"
    module: nn.Module  # the dense block, materialised on the walk's device; the consumer may replace its linears
    inputs: list  # [(args, kwargs)] per calibration batch, as the block's forward takes them; [] when data-free
    moments: dict = field(default_factory=dict)  # E[x^2] of the inputs of walk_blocks' `watch` linears
    expert_moments: dict = field(default_factory=dict)  # of its experts' projections (lords.experts), by name


def walk_blocks(model: nn.Module, source, calibration: torch.Tensor | None, device, dtype: torch.dtype,
                batch_size: int = 8, feedback: bool = False, watch=None,
                recorder=None, expert_hessians: bool = False) -> Iterator[Block]:
    """Yield the decoder blocks of a meta-device model (empty_model) one at a time, each read from the source onto
    device in dtype, with the calibration activations that reach it; freed once the consumer hands control back.
    The next block's inputs are this block's outputs before the consumer runs (feedback=False: statistics of the
    unquantized model) or after (feedback=True: of the block as the consumer left it).
    watch(module, name) -> linears: Block.moments holds E[x^2] of their inputs (recorder(linears): another
    statistic, e.g. lords.model.recording_input_hessians), recorded during the forward that makes the next block's
    inputs when feedback=False (calibration then costs one forward a block). The moments of the block's stacked
    experts (lords.experts.recording_expert_moments; E[x x^T] with expert_hessians) come with them in
    Block.expert_moments."""
    prefix, blocks = find_blocks(model)
    inputs = []
    if calibration is not None:
        check_calibration(calibration)
        embeddings = model.get_input_embeddings()
        load_module(embeddings, _module_name(model, embeddings), source, device, dtype)
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks[0], calibration, batch_size)
        embeddings.to("meta")
    for index, module in enumerate(blocks):
        name = f"{prefix}.{index}"
        load_module(module, name, source, device, dtype)
        watched = watch(module, name) if watch is not None and inputs else []
        experts = [(f"{name}.{path}", experts) for path, experts in module.named_modules()
                   if watch is not None and inputs and is_stacked_experts(experts)]
        outputs = None
        if feedback:
            with recording_expert_moments(experts, expert_hessians) as expert_moments:
                moments = channel_second_moments(module, watched, inputs, recorder)
        else:
            groups = expert_list_groups(module)
            recording = recorder(watched) if recorder else recording_channel_moments(watched, groups)
            with recording as moments, recording_expert_moments(experts, expert_hessians) as expert_moments:
                outputs = _run(module, inputs)
        yield Block(index, name, module, inputs, moments, expert_moments)
        if feedback:
            outputs = _run(module, inputs)
        module.to("meta")
        inputs = outputs


@torch.no_grad()
def _run(module: nn.Module, inputs: list) -> list:
    return next_inputs(module, inputs)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def quantize_to_folder(
    source,
    folder: str | Path,
    config: LoRDSConfig | None = None,
    calibration: torch.Tensor | None = None,
    tokenizer=None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    batch_size: int = 8,
    max_batch_numel: int = 2**27,
    progress: bool = True,
) -> list[LayerReport]:
    """Quantize a source block by block into a lords checkpoint folder (what lords.quantize + lords.save make of
    the model in memory, without holding it).

    Args:
        source: SafetensorsSource, SyntheticSource or ModelSource (open_source picks one for a folder).
        config: what to quantize and how (default LoRDSConfig()).
        calibration: token ids (N, L) for activation-aware statistics, or None (data-free).
        device: where blocks run and are refined (default: CUDA when present); blocks compute in bf16 on a GPU and
            float32 on the CPU, as lords.assets.load_pretrained loads dense models.
        dtype, max_shard_size, overwrite: as lords.save.
    Under torch.distributed (every process calls it with the same arguments, each with its own device) the
    refinement stacks are split over the processes (lords.distributed.SplitStacks) and the first process writes the
    folder: the same checkpoint as one process makes, bit for bit on the same kind of device.
    Returns the layers' reports, as lords.quantize; the folder also gets them as quantize_report.json and .md, with
    totals and the time of each phase (quantize_summary).

    Example::

        source = SafetensorsSource("Llama-3-8B")  # or SyntheticSource(LlamaConfig(...), seed=0, device="cuda")
        lords.stream.quantize_to_folder(source, "llama-lords-4bit", lords.LoRDSConfig(bits=4), calibration=tokens)
    """
    config = config or LoRDSConfig()
    # error-feedback codes calibrate each block on the quantized blocks before it: a block is quantized as soon as
    # it is read, before the walk runs it to make the next block's inputs (lords.model.walk_blocks_with_feedback)
    feedback = config.codes == "gptq"
    if feedback:
        check_feedback_calibration(config, calibration)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    stored = choose_storage_dtype(dtype, (source.dtype,))
    model = empty_model(source.config, compute, device)
    layers = plan_layers(model, config)
    output = empty_model(source.config, compute)
    replace_linears(output, layers)
    mark_quantized(output, config)
    specs = checkpoint_specs(output, stored)
    quantized = quantized_tensor_names(output)
    missing = sorted(set(unique_tensors(model)) - source.names())
    if missing:
        raise ValueError(f"the source lacks {len(missing)} tensors of the model, e.g. {missing[:3]}")
    reports: list[LayerReport] = []
    seconds = dict.fromkeys(("reading and calibration", "refinement", "writing"), 0.0)

    def write(staging: Path | None) -> None:
        """Quantize into staging (None: quantize only, in a process that does not write)."""
        start = time.perf_counter()
        writer = ShardedSafetensors(staging, specs, max_shard_size) if staging is not None else DiscardedWrites()
        for name, (_, stored_dtype) in specs.items():  # embeddings, norms, lm_head, biases: straight from the source
            if name not in quantized and staging is not None:
                writer.write(name, source.tensor(name, "cpu").to(stored_dtype))
        # One bar for all refinement in layer-steps: it moves at every step of every stack, so its rate and ETA hold
        # (a bar in layers sat still for minutes while a stack of 60 layers refined). Made at the first stack, so
        # that it does not sit empty under the calibration bar.
        steps = sum(config.for_module(name).steps * entry.get("experts", 1) for name, entry in layers.items())
        refine_bar = None
        pending, stats = [], {}
        seconds["writing"] = time.perf_counter() - start
        run_stacks = SplitStacks(lambda steps: refine_bar.update(steps)) if world_size() > 1 else run_in_order

        def refinement_group():
            nonlocal refine_bar
            if refine_bar is None:
                refine_bar = tqdm(total=steps, desc="refinement", unit="layer-step", disable=not progress or not steps)
            return partial(lords_linear_group, device=device, progress=refine_bar.update)

        def flush() -> None:
            start = time.perf_counter()
            group = refinement_group()
            reports.extend(quantize_targets(model, pending, config, group, stats or None, max_batch_numel,
                                            run_stacks=run_stacks))
            seconds["refinement"] += time.perf_counter() - start
            start = time.perf_counter()
            for name, _ in pending:
                layer = model.get_submodule(name)
                for key in ("codes", "codebook", "scale_b", "scale_a"):
                    writer.write(f"{name}.{key}", getattr(layer, key))
                if not feedback:  # with feedback the layer is in its block, which the walk runs, then frees
                    layer.to("meta")
            pending.clear()
            stats.clear()
            seconds["writing"] += time.perf_counter() - start

        def watch(module, name):
            return [layer for _, layer in block_targets(module, name, config)]

        recorder = recording_input_hessians if feedback else None
        blocks = walk_blocks(model, source, calibration, device, compute, batch_size, feedback, watch, recorder,
                             expert_hessians=feedback)
        description = "calibrating blocks" if calibration is not None else "reading blocks"
        walk_start, refining, writing = time.perf_counter(), seconds["refinement"], seconds["writing"]
        for block in tqdm(blocks, desc=description, total=len(find_blocks(model)[1]), disable=not progress):
            targets = block_targets(block.module, block.name, config)
            names = {layer: name for name, layer in targets}
            stats.update({names[layer]: value for layer, value in block.moments.items()})
            # The targets leave the block, which the walk frees, and wait until they fill a stack: the blocks of a
            # small model are then refined together, as in memory (small stacks cost their per-step overhead each);
            # a block of an 8B model fills its stacks alone. With feedback they are quantized in their block at once.
            if not feedback:
                for name, layer in targets:
                    model.set_submodule(name, nn.Linear(layer.in_features, layer.out_features,
                                                        layer.bias is not None, device="meta"))
            pending.extend(targets)
            if feedback or sum(layer.weight.numel() for _, layer in pending) >= max_batch_numel:
                flush()
            # An experts module is a stack of its own (128 experts of Qwen3-30B-A3B hold 200M weights a projection).
            experts = block_experts(block.module, block.name, config)
            start = time.perf_counter()
            group = refinement_group() if experts else None
            expert_reports, replacements = quantize_experts(experts, config, group, stats=block.expert_moments or None,
                                                            max_batch_numel=max_batch_numel, run_stacks=run_stacks)
            reports.extend(expert_reports)
            for name, module in replacements.items():
                model.set_submodule(name, module)
            seconds["refinement"] += time.perf_counter() - start
            start = time.perf_counter()
            for name, _ in experts:
                for part in PROJECTIONS:
                    projection = model.get_submodule(f"{name}.{part}")
                    for key in ("codes", "codebook", "scale_b", "scale_a"):
                        writer.write(f"{name}.{part}.{key}", getattr(projection, key))
                if not feedback:  # with feedback the walk runs the quantized experts next, then frees the block
                    model.get_submodule(name).to("meta")
            seconds["writing"] += time.perf_counter() - start
        seconds["reading and calibration"] = (time.perf_counter() - walk_start - (seconds["refinement"] - refining)
                                              - (seconds["writing"] - writing))
        if pending:
            flush()
        if refine_bar is not None:
            refine_bar.close()
        if staging is None:
            return
        start = time.perf_counter()
        writer.close()
        write_model_config(output, staging, stored)
        source.save_extras(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        seconds["writing"] += time.perf_counter() - start
        tokens = 0 if calibration is None else calibration.numel()
        write_report(staging, quantize_summary(reports, seconds, source.description, config, tokens))

    if rank() == 0:
        write_folder(folder, overwrite, write)
    else:
        write(None)
    return reports


class DiscardedWrites:
    """The writer of a process that quantizes without writing (lords.distributed)."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        pass


REPORT_NAME = "quantize_report"  # .json and .md in the output folder
REPORT_COLUMNS = {
    "bits_per_weight": "storage per weight: the code bits plus the scales B, A spread over the layer's weights",
    "error_init": "the objective's relative error after the SVD init: ||(W - W_hat) diag(h)^1/2|| / ||W diag(h)^1/2||, "
                  "h = E[x^2] of the layer's input over the calibration tokens (h = 1 when data-free); with codes "
                  "gptq: the output error sqrt(tr(E H E^T) / tr(W H W^T)), H = E[x x^T], E = W - W_hat, after "
                  "refinement with nearest codes",
    "error": "the same after refinement (codes gptq: with the error-feedback codes), with the scales rounded to their "
             "stored dtype",
    "weight_error": "the plain relative weight error ||W - W_hat|| / ||W||",
    "seconds": "refinement time of the layer's stack divided by its layers",
}


def quantize_summary(reports: list[LayerReport], seconds: dict[str, float], source: str, config: LoRDSConfig,
                     calibration_tokens: int) -> dict:
    """What quantize_report.json holds: the run, totals, the worst layer and the per-layer table."""
    if not reports:
        raise ValueError("no layer was quantized: the config's targets match no linear layer of the model")
    weights = sum(r.shape[0] * r.shape[1] for r in reports)
    worst = max(reports, key=lambda r: r.error)
    return {
        "source": source,
        "config": config.to_dict(),
        "calibration_tokens": calibration_tokens,
        "layers": len(reports),
        "weights": weights,
        "bits_per_weight": sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / weights,
        "mean_error": sum(r.error for r in reports) / len(reports),
        "worst_error": worst.error,
        "worst_layer": worst.name,
        "mean_weight_error": sum(r.weight_error for r in reports) / len(reports),
        "seconds": seconds,
        "columns": REPORT_COLUMNS,
        "per_layer": [asdict(r) for r in reports],
    }


def write_report(folder: Path, summary: dict) -> None:
    (folder / f"{REPORT_NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# Quantization report: {summary['source']}", "", format_summary(summary), "", "Columns:", ""]
    lines += [f"- {name}: {meaning}" for name, meaning in summary["columns"].items()]
    lines += ["", "| layer | shape | bits | rank | bits_per_weight | error_init | error | weight_error | seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["per_layer"]:
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['rank']} | "
                     f"{r['bits_per_weight']:.3f} | {r['error_init']:.4f} | {r['error']:.4f} | "
                     f"{r['weight_error']:.4f} | {r['seconds']:.1f} |")
    (folder / f"{REPORT_NAME}.md").write_text("\n".join(lines) + "\n")


def read_report(folder: str | Path) -> dict:
    return json.loads((Path(folder) / f"{REPORT_NAME}.json").read_text())


def format_summary(summary: dict) -> str:
    """The few labelled lines printed at the end of `lords quantize`."""
    aware = "activation-weighted" if summary["calibration_tokens"] else "data-free, unweighted"
    phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in summary["seconds"].items())
    return "\n".join([
        f"layers quantized:   {summary['layers']} ({summary['weights'] / 1e6:.1f}M weights), "
        f"{summary['config']['steps']} refinement steps",
        f"bits per weight:    {summary['bits_per_weight']:.3f} (codes + scales)",
        f"layer error:        mean {summary['mean_error']:.4f}, worst {summary['worst_error']:.4f} "
        f"({summary['worst_layer']}): relative error of W, {aware}",
        f"weight error:       mean {summary['mean_weight_error']:.4f}: plain ||W - W_hat|| / ||W||",
        f"time:               {phases}; total {sum(summary['seconds'].values()):.1f} s",
    ])
