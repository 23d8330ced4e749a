"""Builds the CPU kernels ahead of time: this machine's variant, or those named
(`python -m services.engine.kernels avx512 avx2 portable`, as an image build does)."""

import os
import sys

from services.engine import kernels

for variant in sys.argv[1:] or [kernels.cpu_variant()]:
    os.environ["LLMSERVE_KERNEL_VARIANT"] = variant
    kernels.load.cache_clear()
    print(f"CPU kernels built: {kernels.load()}")
