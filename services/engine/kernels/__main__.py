"""Builds the CPU kernels ahead of time: this machine's variant, or those named
(`python -m services.engine.kernels amx avx512vnni avx512 avx2 portable`, as an image build
does).

Building loads the library, and a process can hold only one variant's operators, so each
named variant builds in a process of its own."""

import os
import subprocess
import sys

from services.engine import kernels

variants = sys.argv[1:]
if len(variants) > 1:
    for variant in variants:
        subprocess.run([sys.executable, "-m", "services.engine.kernels", variant], check=True)
else:
    if variants:
        os.environ["LLMSERVE_KERNEL_VARIANT"] = variants[0]
    print(f"CPU kernels built: {kernels.load()}")
