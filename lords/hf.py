"""transformers integration: a quantization config with quant_method "lords" and an HfQuantizer, registered with
transformers when lords is imported. AutoModelForCausalLM.from_pretrained then loads a lords checkpoint, and
save_pretrained writes one, the way bitsandbytes, HQQ and torchao checkpoints load and save.

A checkpoint is an ordinary transformers folder: config.json carries "quantization_config" (this module's
LoRDSQuantizationConfig: every quantized linear's bits, rank, codebook and scale dtype), the safetensors files
carry each LoRDSLinear's codes, codebook, scale_b, scale_a (and bias) under the linear's name. The experts of an MoE
block (lords.experts) have an entry per projection, "<experts>.gate_up_proj" and "<experts>.down_proj", with the number
of experts stacked in its tensors added as "experts".

Loading: transformers builds the model on the meta device; before any tensor is read, the quantizer swaps the named
nn.Linear modules for meta LoRDSLinear modules, so no dense weight is ever allocated, and transformers then reads
each tensor from the safetensors files straight to its device (device_map, "auto" included).

Only APIs that transformers 5.17 and 5.24 both have are used: QuantizationConfigMixin, register_quantization_config,
register_quantizer, and HfQuantizer's __init__(config, pre_quantized=...), requires_calibration,
validate_environment, param_needs_quantization, _process_model_before_weight_loading,
_process_model_after_weight_loading, is_serializable, is_trainable, is_qat_trainable and is_compileable.
"""

import warnings

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import __version__, integrity
from .codebooks import CODEBOOK_KINDS, check_bits
from .config import SCALE_DTYPES, LoRDSConfig
from .experts import PROJECTIONS, LoRDSExperts, LoRDSExpertWeights, is_stacked_experts
from .linear import LoRDSLinear

QUANT_METHOD = "lords"
# 3: transformers folders with config.json's quantization_config. 2: lords_config.json beside model.safetensors
# (lords.checkpoint still reads it). 1: codes in a flat stream, no longer read.
FORMAT_VERSION = 3
LAYER_FIELDS = ("bits", "rank", "codebook", "scale_dtype")


def check_layer_entry(name: str, entry: dict) -> None:
    if not isinstance(entry, dict) or set(entry) - {"experts"} != set(LAYER_FIELDS):
        raise ValueError(f"quantization_config layer {name}: expected the fields {list(LAYER_FIELDS)} (and "
                         f"'experts' for a stack of experts), got {entry!r}")
    if "experts" in entry and (not isinstance(entry["experts"], int) or isinstance(entry["experts"], bool)
                               or entry["experts"] < 1):
        raise ValueError(f"quantization_config layer {name}: experts must be a positive integer, "
                         f"got {entry['experts']!r}")
    if not isinstance(entry["bits"], int) or isinstance(entry["bits"], bool):
        raise ValueError(f"quantization_config layer {name}: bits must be an integer, got {entry['bits']!r}")
    try:
        check_bits(entry["bits"])
    except ValueError as error:
        raise ValueError(f"quantization_config layer {name}: {error}") from None
    if not isinstance(entry["rank"], int) or isinstance(entry["rank"], bool) or entry["rank"] < 1:
        raise ValueError(f"quantization_config layer {name}: rank must be a positive integer, got {entry['rank']!r}")
    if entry["codebook"] not in CODEBOOK_KINDS:
        raise ValueError(f"quantization_config layer {name}: codebook must be one of {CODEBOOK_KINDS}, "
                         f"got {entry['codebook']!r}")
    if entry["scale_dtype"] not in SCALE_DTYPES:
        raise ValueError(f"quantization_config layer {name}: scale_dtype must be one of {SCALE_DTYPES}, "
                         f"got {entry['scale_dtype']!r}")


class LoRDSQuantizationConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a lords checkpoint.

    Args:
        layers: {module name: {"bits", "rank", "codebook", "scale_dtype"}} for every LoRDSLinear of the model.
        quantization: the LoRDSConfig the model was quantized with, as a dict (a record; loading does not need it).
        format_version: the checkpoint layout; a checkpoint of another version is refused with what to do.
        lords_version: the lords that wrote it.
    """

    def __init__(self, layers: dict, quantization: dict | None = None, format_version: int = FORMAT_VERSION,
                 lords_version: str = __version__, quant_method: str = QUANT_METHOD):
        if format_version != FORMAT_VERSION:
            raise ValueError(f"this lords checkpoint has format_version {format_version!r} (written by lords "
                             f"{lords_version}); this lords ({__version__}) reads version {FORMAT_VERSION}: "
                             "install the lords that wrote it, or quantize the model again")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"quantization_config: layers must map layer names to their fields, got {layers!r:.80}")
        if quantization is not None and not isinstance(quantization, dict):
            raise ValueError(f"quantization_config: quantization must be a dict or null, got {quantization!r:.80}")
        for name, entry in layers.items():
            check_layer_entry(name, entry)
        if quantization is not None:
            LoRDSConfig.from_dict(quantization)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.lords_version = lords_version
        self.quantization = quantization
        self.layers = layers

    @classmethod
    def from_model(cls, model: nn.Module, config: LoRDSConfig | None = None) -> "LoRDSQuantizationConfig":
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, (LoRDSLinear, LoRDSExpertWeights)):
                layers[name] = {"bits": module.bits, "rank": module.rank, "codebook": module.codebook_kind,
                                "scale_dtype": str(module.scale_b.dtype).removeprefix("torch.")}
            if isinstance(module, LoRDSExpertWeights):
                layers[name]["experts"] = module.num_experts
        return cls(layers, config.to_dict() if config is not None else None)


def replace_linears(model: nn.Module, layers: dict[str, dict]) -> None:
    """Swap each named nn.Linear of a meta-device model for an empty (meta) LoRDSLinear of the entry's layout, and
    each experts module named by experts entries for an empty LoRDSExperts (replace_experts)."""
    experts = {name: entry for name, entry in layers.items() if "experts" in entry}
    replace_experts(model, experts)
    for name, entry in layers.items():
        if name in experts:
            continue
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config names layer {name}, which the model does not have") from None
        if not isinstance(original, nn.Linear):
            raise ValueError(f"quantization_config names layer {name}, a {type(original).__name__} in the model, "
                             "not an nn.Linear")
        with torch.device("cpu"):  # the codebook table is computed, on the CPU; every tensor is then meta
            module = LoRDSLinear(original.in_features, original.out_features, entry["bits"], entry["rank"],
                                 entry["codebook"], False, getattr(torch, entry["scale_dtype"]), device="meta")
        module.bias = original.bias  # a meta parameter in the model's dtype
        model.set_submodule(name, module)


def check_files_hold_layers(files, layers: dict[str, dict]) -> None:
    """The files must store exactly the quantization_config's layers as LoRDS layers: a LoRDS layer the config does
    not name would become an nn.Linear that transformers random-initialises."""
    stored = set()
    for path in files:
        if str(path).endswith(".safetensors"):
            _, header, _ = integrity.read_header(path)
            stored |= {name.removesuffix(".scale_b") for name in header if name.endswith(".scale_b")}
    unlisted = sorted(stored - set(layers))
    if unlisted:
        raise ValueError(f"the checkpoint stores LoRDS layers its quantization_config does not name "
                         f"({len(unlisted)}, e.g. {unlisted[:3]}); config.json does not match the weights")


def replace_experts(model: nn.Module, layers: dict[str, dict]) -> None:
    """Swap the experts module of each pair of experts entries (f"{experts}.gate_up_proj", ".down_proj") of a
    meta-device model for an empty (meta) LoRDSExperts of the entries' layout."""
    parents = {name.rpartition(".")[0] for name in layers}
    for parent in sorted(parents):
        missing = [f"{parent}.{part}" for part in PROJECTIONS if f"{parent}.{part}" not in layers]
        if missing:
            raise ValueError(f"quantization_config names one projection of the experts {parent} but not {missing[0]}")
        try:
            original = model.get_submodule(parent)
        except AttributeError:
            raise ValueError(f"quantization_config names the experts {parent}, which the model does not have") from None
        if not is_stacked_experts(original):
            raise ValueError(f"quantization_config names the experts {parent}, a {type(original).__name__} in the "
                             "model, not an experts module with 3-D gate_up_proj and down_proj")
        projections = {}
        for part in PROJECTIONS:
            entry, shape = layers[f"{parent}.{part}"], getattr(original, part).shape
            if entry["experts"] != shape[0]:
                raise ValueError(f"quantization_config layer {parent}.{part} has {entry['experts']} experts, the model "
                                 f"{shape[0]}")
            with torch.device("cpu"):  # as in replace_linears
                projections[part] = LoRDSExpertWeights(
                    shape[0], shape[2], shape[1], entry["bits"], entry["rank"], entry["codebook"],
                    getattr(torch, entry["scale_dtype"]), device="meta")
        model.set_submodule(parent, LoRDSExperts(original, **projections))


class LoRDSHfQuantizer(HfQuantizer):
    """Loads pre-quantized lords checkpoints (quantizing happens in lords.quantize, with calibration data)."""

    requires_calibration = True  # transformers refuses quantization_config=LoRDSQuantizationConfig on a dense model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # every tensor is stored as the module holds it

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_linears(model, self.quantization_config.layers)
        files = kwargs.get("checkpoint_files") or []
        check_files_hold_layers(files, self.quantization_config.layers)
        self.verification = None
        if integrity.verification_enabled():
            if not files:
                warnings.warn("transformers did not name the checkpoint files: their digests are not verified")
            self.verification = integrity.BackgroundVerification(files)  # overlaps transformers' reads
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if getattr(self, "verification", None) is not None:
            self.verification.result()
        # transformers only warns about a missing tensor and leaves it uninitialised; a quantized layer without its
        # codes or scales would run on garbage, so it is an error here.
        for name, module in model.named_modules():
            if isinstance(module, (LoRDSLinear, LoRDSExpertWeights)):
                for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    if not getattr(tensor, "_is_hf_initialized", False) and tensor.device.type != "meta":
                        raise ValueError(f"{name}.{key} is missing from the checkpoint (or has another shape); "
                                         "the folder is incomplete or does not match its quantization_config")
        if getattr(self, "verification", None) is not None:
            integrity.check_first_outputs({name: module for name, module in model.named_modules()
                                           if isinstance(module, (LoRDSLinear, LoRDSExperts))})
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True  # the scales are trained in place (lords.peft), no adapter on top is needed

    @property
    def is_compileable(self) -> bool:
        return True  # the kernels are torch operators (lords.kernels.ops)


def mark_quantized(model: nn.Module, config: LoRDSConfig | None = None) -> None:
    """Describe a model's LoRDSLinear layers in model.config.quantization_config and attach the quantizer, so that
    model.save_pretrained writes a folder from_pretrained loads (as a loaded lords model already has)."""
    quantization_config = LoRDSQuantizationConfig.from_model(model, config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = LoRDSHfQuantizer(quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    if any(isinstance(module, LoRDSExperts) for module in model.modules()):
        # save_pretrained reverts the conversions transformers applies on load (transformers 5.24: MoE experts stored
        # one by one are stacked): on stacked LoRDS tensors it would split codes and codebook as if they were weights.
        # A lords checkpoint stores them under the model's own names, as lords.save does.
        model._weight_conversions = []


def register() -> None:
    """Make transformers know quant_method "lords" (idempotent: lords may be imported again, e.g. reloaded)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LoRDSQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LoRDSHfQuantizer)


register()
