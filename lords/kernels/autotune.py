"""Autotuning shared by the LoRDS kernels: on the GPU each config is timed briefly; under TRITON_INTERPRET=1 (the CPU
tests) only the small interpreter config runs."""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _quick_bench(kernel_call, quantiles):
    # Triton's default (25 ms warm-up, 100 ms per config) makes tuning a model's shapes take minutes; the medians
    # that decide between configs are stable at a fifth of that.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune(configs, interpret_configs, key, **kwargs):
    return triton.autotune(configs=interpret_configs if INTERPRET else configs, key=key, do_bench=_quick_bench,
                           **kwargs)
