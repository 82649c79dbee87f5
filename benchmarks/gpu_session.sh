#!/usr/bin/env bash
# The device call to make after a kernel change (docs/kernels.md, "Device calls"): the GPU suite (CUDA, Gluon and
# the Triton kernels compiled, against float64), then the MoE layer. Each report lands in $OUT under its results/
# name; copy it into results/ with its "Produced by" line reading the command as written here, --out results/....
#
#     bash benchmarks/gpu_session.sh        # through the device tool, carry [".device"] for bitsandbytes/gemlite
set -uo pipefail
out=${OUT:?set OUT to the folder that comes back}
start=$(date +%s)
# eight pytest-xdist workers compile and autotune the Triton cases side by side: 110 s, against more than 360 s
# in one process (H200, 2026-12-03)
python3 -m benchmarks.gpu_tests --workers 8 --out "$out/gpu_tests.md"
echo "gpu_tests exit $? at $(($(date +%s) - start)) s"
python3 -m benchmarks.moe --out "$out/moe.md"; echo "moe exit $? at $(($(date +%s) - start)) s"
