"""LoRDSConfig: what to quantize and how, with validation that names the offending field."""

import fnmatch
from dataclasses import asdict, dataclass, field, fields, replace

from .codebooks import CODEBOOK_KINDS, check_bits

SCALE_DTYPES = ("bfloat16", "float16", "float32")
CODE_ASSIGNMENTS = ("nearest", "gptq")


@dataclass
class LoRDSConfig:
    bits: int = 4
    block_size: int = 64  # sets the parity rank and the block statistics of the SVD init
    rank: int | None = None  # None: parameter parity with block_size
    codebook: str = "nf"  # "nf" (NormalFloat) or "int" (symmetric integer)
    steps: int = 500  # refinement steps (0: SVD init only)
    lr: float = 0.1  # Adam step relative to each scale tensor's initial RMS
    exact_init: bool = False  # absmax over in_features/rank blocks so that B A equals S_blk exactly
    scale_dtype: str = "bfloat16"  # storage dtype of B and A; bits per weight are counted with it
    # "nearest": each code the nearest level of W / S; "gptq": error-feedback codes that minimise the output error on
    # the calibration inputs, block by block on the outputs of the blocks already quantized (lords.gptq)
    codes: str = "nearest"
    refit_rounds: int = 0  # codes="gptq": rounds of refitting B, A to the full E[x x^T] and assigning codes again
    # fnmatch patterns on module names relative to the model; linears inside the decoder blocks by default
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=list)
    # pattern -> dict of fields overriding the above for matching modules, e.g. {"*.down_proj": {"bits": 4}}
    overrides: dict[str, dict] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_bits(self.bits)
        if self.codebook not in CODEBOOK_KINDS:
            raise ValueError(f"codebook must be one of {CODEBOOK_KINDS}, got {self.codebook!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer or None, got {self.rank!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.codes not in CODE_ASSIGNMENTS:
            raise ValueError(f"codes must be one of {CODE_ASSIGNMENTS}, got {self.codes!r}")
        if not isinstance(self.refit_rounds, int) or self.refit_rounds < 0:
            raise ValueError(f"refit_rounds must be a non-negative integer, got {self.refit_rounds!r}")
        allowed = {f.name for f in fields(self)} - {"targets", "skip", "overrides"}
        for pattern, values in self.overrides.items():
            # codes decides how the whole model is walked: on the dense model's statistics or the quantized one's
            if "codes" in values:
                raise ValueError(f"override {pattern!r} sets codes, which applies to the whole model only")
            unknown = set(values) - allowed
            if unknown:
                raise ValueError(f"override {pattern!r} sets unknown field(s) {sorted(unknown)}")
            replace(self, overrides={}, **values)  # validates the overridden values

    def matches(self, name: str) -> bool:
        hit = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.targets)
        return hit and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.skip)

    def for_module(self, name: str) -> "LoRDSConfig":
        """The config that applies to one module: later matching overrides win."""
        values = {}
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                values.update(override)
        return replace(self, overrides={}, **values) if values else self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LoRDSConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown LoRDSConfig field(s) {sorted(unknown)}")
        return cls(**values)
