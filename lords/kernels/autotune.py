"""Autotuning shared by the LoRDS kernels: on the GPU each config is timed briefly; under TRITON_INTERPRET=1 (the CPU
tests) only the small interpreter config runs."""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gpu_time(fn, quantiles=None):
    """Milliseconds of GPU time per call of fn, from replays of a captured CUDA graph. A plain do_bench of a kernel
    shorter than its Python launch (tens of microseconds for a Triton launcher; a decode kernel takes 8-50) times the
    launch, and configs or kernels would be chosen by noise. 20 ms of replays: Triton's default of 100 ms per config
    makes tuning a model's shapes take minutes."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=quantiles, return_mode="median")


def autotune(configs, interpret_configs, key, **kwargs):
    return triton.autotune(configs=interpret_configs if INTERPRET else configs, key=key, do_bench=gpu_time, **kwargs)
