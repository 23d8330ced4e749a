"""Engines keep large temporaries on the heap, where freed memory is reused, instead of in
fresh mappings that page-fault on every first write."""

import subprocess
import sys

import pytest

CHECK = """
import ctypes, torch
from services.engine.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if {apply}:
    assert keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
logits = torch.ones(16, 49152)  # a 16-row step's logits: 3 MiB
print(libc.mallinfo2().hblkhd - mapped)
"""


def newly_mapped_bytes(apply: bool) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(apply=apply)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_steps_logits_come_from_the_heap_not_a_fresh_mapping():
    assert newly_mapped_bytes(apply=False) >= 3 << 20  # glibc's own thresholds map it
    assert newly_mapped_bytes(apply=True) == 0
