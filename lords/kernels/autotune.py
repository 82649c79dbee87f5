"""Autotuning shared by the LoRDS kernels: on the GPU each config is timed briefly; under TRITON_INTERPRET=1 (the CPU
tests) only the small interpreter config runs."""

import contextlib
import functools
import hashlib
import json
import os
import re
import statistics
from pathlib import Path

import torch
import triton
from triton.compiler import CompiledKernel
from triton.runtime.autotuner import Autotuner, Config
from triton.runtime.cache import get_cache_manager

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tuning results are kept on disk, in Triton's cache (TRITON_CACHE_DIR, by default ~/.triton/cache), so that a new
# process skips the timing an earlier one did: each kernel's best config (Triton's cache_results) and lords_matmul's
# choice of kernel (load_choice, save_choice). Without it, a model's first forward times every config and kernel
# for each of its layer shapes again (16 s for one 28672 x 8192 layer at M = 1 on the H100, its kernels compiled).
# LORDS_TUNING_CACHE=0 turns both off, and the shipped tuning below with them: everything is timed again.
TUNING_CACHE = os.environ.get("LORDS_TUNING_CACHE", "1") != "0"
# Tuning shipped inside the package, one file per GPU model (tuned/<GPU name>.json, written by `lords tune --export`
# on that GPU): where the user's cache has no entry, its kernel choices and configs are used instead of timing, so a
# fresh machine does not spend minutes tuning a model's shapes. `lords tune` turns it off, to measure.
TUNED_DIR = Path(__file__).parent / "tuned"
SHIPPED_TUNING = True
TUNING_FORMAT = 1


def gpu_time(fn, quantiles=None, rep_ms: float = 20.0):
    """Milliseconds of GPU time per call of fn, from replays of a captured CUDA graph. A plain do_bench of a kernel
    shorter than its Python launch (tens of microseconds for a Triton launcher; a decode kernel takes 8-50) times the
    launch, and configs or kernels would be chosen by noise. 20 ms of replays: Triton's default of 100 ms per config
    makes tuning a model's shapes take minutes.

    The capture is thread-local: in the default global mode a CUDA call made meanwhile by another thread (a compile,
    a module load) invalidates it, and a failed capture leaves the process unable to launch anything."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles, autotunes and allocates outside the capture
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        calls = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    torch.cuda.current_stream().wait_stream(stream)
    del graph
    times.sort()
    if quantiles is not None:  # Triton's autotuner asks for (0.5, 0.2, 0.8)
        return [times[round(q * (len(times) - 1))] for q in quantiles]
    return statistics.median(times)


class _CacheMiss(Exception):
    pass


def _missed():
    raise _CacheMiss


class ShippedAutotuner(Autotuner):
    """Triton's autotuner, which on a miss in the user's disk cache takes the shipped config for this GPU (if there
    is one among the configs it would time) before timing them."""

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        try:  # the user's cache first: Triton's own lookup, stopped before it would time the configs
            return super().check_disk_cache(tuning_key, configs, _missed)
        except _CacheMiss:
            pass
        config = shipped_config(self.base_fn.__name__, tuning_key, configs, torch.cuda.get_device_name())
        if config is None:
            return super().check_disk_cache(tuning_key, configs, bench_fn)
        self.cache[tuning_key] = config
        return True


LAUNCHERS: list["Launcher"] = []  # every autotuned kernel, for lords.tune's export


def autotune(configs, interpret_configs, key, **kwargs):
    """Triton's autotune over `configs` (`interpret_configs` under the interpreter), timed by gpu_time, seeded by the
    shipped tuning (ShippedAutotuner), and launched through a Launcher."""
    kwargs = {"reset_to_zero": None, "restore_value": None, **kwargs}
    configs = interpret_configs if INTERPRET else configs

    def wrap(kernel):
        LAUNCHERS.append(Launcher(ShippedAutotuner(kernel, kernel.arg_names, configs, key, do_bench=gpu_time,
                                                   cache_results=TUNING_CACHE, **kwargs)))
        return LAUNCHERS[-1]
    return wrap


@functools.cache
def _kernel_sources() -> str:
    """A stored choice holds for the code that timed it: a hash of this package's sources."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _choice_entry(key: tuple, device_name: str):
    parts = [triton.__version__, torch.__version__, device_name, _kernel_sources(), repr(key)]
    return get_cache_manager(hashlib.sha256("\n".join(parts).encode()).hexdigest()), "lords_matmul.json"


def load_choice(key: tuple, device_name: str) -> str | None:
    """The kernel an earlier process chose for this key on a GPU of this name, if it stored one; else the shipped
    choice for this GPU, if any."""
    if not TUNING_CACHE:
        return None
    cache, name = _choice_entry(key, device_name)
    path = cache.get_file(name)
    if path is not None:
        try:
            with open(path) as file:
                return json.load(file)["choice"]
        except (OSError, ValueError, KeyError, TypeError):  # a damaged entry: as if absent; timing overwrites it
            pass
    return shipped_tuning(device_name)["choices"].get(repr(key))


def save_choice(key: tuple, device_name: str, choice: str, times: dict) -> None:
    """Store lords_matmul's choice and the times (ms) it came from; written whole or not at all."""
    if TUNING_CACHE:
        cache, name = _choice_entry(key, device_name)
        cache.put(json.dumps({"key": repr(key), "choice": choice, "times_ms": times}), name, binary=False)


def tuned_file(device_name: str) -> Path:
    """Where the shipped tuning for a GPU of this name lives: its name with every run of other characters than
    letters and digits made one underscore ("NVIDIA H200" -> tuned/NVIDIA_H200.json)."""
    return TUNED_DIR / f"{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


def read_tuning(path: Path) -> dict:
    """A tuning file ({"format", "gpu", "choices", "configs", ...}); a clear error for anything else."""
    try:
        tuning = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not a lords tuning file: {error}") from None
    if (not isinstance(tuning, dict) or tuning.get("format") != TUNING_FORMAT or not isinstance(tuning.get("gpu"), str)
            or not isinstance(tuning.get("choices"), dict) or not isinstance(tuning.get("configs"), dict)):
        raise ValueError(f"{path} is not a lords tuning file of format {TUNING_FORMAT} (with gpu, choices, configs)")
    return tuning


def shipped_tuning(device_name: str) -> dict:
    """The shipped tuning for this GPU; empty when there is none, when turned off, or when the file names another
    GPU (two names that differ only in punctuation share a file name)."""
    path = tuned_file(device_name)
    if SHIPPED_TUNING and path.is_file():
        tuning = _read_shipped(path)
        if tuning["gpu"] == device_name:
            return tuning
    return {"choices": {}, "configs": {}}


@functools.cache
def _read_shipped(path: Path) -> dict:
    return read_tuning(path)


def config_entry(config: Config) -> dict:
    """A Triton config as JSON, as Triton's own disk cache stores it (a pre-hook cannot be stored)."""
    return {name: value for name, value in config.__dict__.items() if name != "pre_hook"}


def shipped_config(kernel: str, tuning_key: tuple, configs: list[Config], device_name: str) -> Config | None:
    """The shipped config of this kernel for Triton's tuning key on this GPU, if it is one of `configs` (those
    Triton would time now: a config the kernel no longer has is not used)."""
    entry = shipped_tuning(device_name)["configs"].get(kernel, {}).get(repr(tuning_key))
    return next((config for config in configs if config_entry(config) == entry), None)


class Launcher:
    """An autotuned kernel, kernel[grid](*args, **kwargs) as in Triton, whose launches after the first of each kind
    go straight to the compiled kernel. Triton's own path (the autotuner's key and config lookup, then the JIT's
    binding and specialising of some 25 arguments) took most of the ~150 us of host time a LoRDS call cost on the
    H100 machine, against ~30 us for a bf16 F.linear, and bound eager decoding.

    A kind is all that Triton specialises a launch on: each tensor's dtype, device and 16-byte alignment, and every
    other argument's value; and which arguments came by keyword. Its first launch goes through Triton, which autotunes
    and compiles; the compiled kernel, the config and the grid it ran with are kept for the next."""

    def __init__(self, autotuner: Autotuner):
        self.autotuner = autotuner
        self.names = autotuner.fn.arg_names
        self.launches = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        # list comprehensions, not generators, and no dict of the arguments: this runs on every call of every layer
        kind = (tuple(kwargs), *[(value.dtype, value.get_device(), value.data_ptr() % 16 == 0)
                                 if isinstance(value, torch.Tensor) else value
                                 for value in (*args, *kwargs.values())])
        launch = self.launches.get(kind)
        if launch is not None:
            runner, rest = launch
            return runner(*args, *[kwargs[name] if keyword else name for keyword, name in rest])
        compiled = self.autotuner[grid](*args, **kwargs)
        if isinstance(compiled, CompiledKernel):  # not under the interpreter, compile_only or a launch recorder
            config = self.autotuner.best_config.kwargs
            shape = tuple(grid({**dict(zip(self.names, args)), **kwargs, **config}) if callable(grid) else grid)
            # the parameters after the positional ones: from the keywords by name, or the config's constant value
            rest = [(name in kwargs, name if name in kwargs else config[name]) for name in self.names[len(args):]]
            self.launches[kind] = (compiled[shape + (1,) * (3 - len(shape))], rest)
        return compiled


def processors(device: torch.device) -> int:
    """Multiprocessors of a GPU; one under the CPU interpreter, whose grid is then PER_SM programs."""
    return _processors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1


@functools.cache
def _processors(index: int) -> int:  # asked on every launch: a property query costs microseconds of host time
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). triton.cdiv is a constexpr function, several microseconds a call outside a kernel."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side, as cdiv."""
    return 1 << (n - 1).bit_length()


@contextlib.contextmanager
def compile_only():
    """Within it, launching an autotuned kernel compiles every config that survives pruning (into Triton's on-disk
    cache) and runs nothing; outputs are left as allocated. Processes doing this for different shapes fill the cache
    in parallel: ptxas takes seconds per config, and autotuning one kernel otherwise compiles its configs one by
    one."""
    run = Autotuner.run

    def warm(self, *args, grid, warmup=False, **kwargs):
        return self.warmup(*args, grid=grid, **kwargs)

    Autotuner.run = warm
    try:
        yield
    finally:
        Autotuner.run = run
