"""The same CPU code paths on every x86-64 CPU, so that a run gives the same numbers on AVX2-only and AVX-512 machines.

PyTorch, MKL and oneDNN each pick their kernels by the CPU's instruction set, and kernels for different instruction
sets sum in different orders: the quick start's first losses agree to 1e-6 between an AVX-512 CPU and the same CPU
restricted to AVX2, but 150 training steps later its validation loss read 0.0342 on one and 0.0030 on the other.
Pinning all three to their AVX2 paths (the widest every x86-64 CPU of this decade has) makes them compute alike;
measured cost on the quick start on an AVX-512 BF16 CPU: bench/RESULTS.md "CPU compute dtype". A variable already
set in the environment wins. GPU kernels are not affected; CPU work in a GPU run is bookkeeping.

Only within one maker: MKL honours MKL_CBWR=AVX2 on Intel CPUs and runs its own choice elsewhere (Intel's CNR
documentation), so an AMD and an Intel CPU end the quick start at different validation losses (0.0030 vs 0.0013).
MKL_CBWR=COMPATIBLE (SSE2, Intel's setting for every maker; not tried on an AMD CPU here) costs twice the quick
start's time (measured, 2026-12-02), so it is not the default.

Must run before torch is imported: the three libraries read these variables once, when they load.
"""
from __future__ import annotations

import os
import sys

AVX2_CODE_PATHS = {
    "ATEN_CPU_CAPABILITY": "avx2",       # PyTorch's own vectorised kernels (reductions, softmax, elementwise)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",   # MKL's dispatch: the fp32 matmuls
    "MKL_CBWR": "AVX2",                  # MKL's conditional numerical reproducibility: the same results on any AVX2 CPU
    "ONEDNN_MAX_CPU_ISA": "AVX2",        # oneDNN's JIT kernels
}


def pin_cpu_code_paths() -> None:
    """Called by finetune.py and predict.py before they import torch. Where torch is already loaded (a script's
    main() called from the tests' process) the variables would change nothing, so they are left alone."""
    if "torch" in sys.modules:
        return
    for name, value in AVX2_CODE_PATHS.items():
        os.environ.setdefault(name, value)
