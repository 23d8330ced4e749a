"""KV pool storage in memory mappings whose pages are zero until written: a private one, or an
anonymous shared-memory file that other processes on the host can map.

The shared pool is a memfd: it has no name in /dev/shm, so nothing leaks when the process dies.
Another process on the same host (and PID namespace) maps it through /proc/<pid>/fd/<fd>.
A header describes the tensor (pool id, dtype, shape) so that a reader checks it mapped
the right pool and needs nothing else.
"""

import mmap
import os
import stat
import struct
import uuid
import warnings
from dataclasses import dataclass

import torch

_MAGIC = b"KVPOOL01"
# magic, pool id (16 bytes), dtype name (16 bytes), rank, shape (up to 8 dims)
_HEADER = struct.Struct("<8s16s16sq8q")
_DATA_OFFSET = 256  # keeps the tensor data aligned for vector loads


@dataclass(slots=True)
class SharedStorage:
    path: str  # what another process opens
    pool_id: str
    tensor: torch.Tensor


def anonymous(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A private anonymous mapping: its pages read as zeros and take memory only once written,
    so a pool costs what it holds, not its capacity."""
    buffer = mmap.mmap(-1, max(1, _numel(shape)) * _itemsize(dtype))
    return torch.frombuffer(buffer, dtype=dtype, count=_numel(shape)).view(shape)


def create(shape: tuple[int, ...], dtype: torch.dtype) -> SharedStorage:
    """Like `anonymous` (zeros, memory taken as pages are written), but mappable by other
    processes of the host."""
    numel = _numel(shape)
    itemsize = _itemsize(dtype)
    fd = os.memfd_create("kv-pool")
    size = _DATA_OFFSET + numel * itemsize
    os.ftruncate(fd, size)
    buffer = mmap.mmap(fd, size)
    pool_id = uuid.uuid4()
    dtype_name = str(dtype).removeprefix("torch.").encode()
    dims = list(shape) + [0] * (8 - len(shape))
    buffer[: _HEADER.size] = _HEADER.pack(_MAGIC, pool_id.bytes, dtype_name, len(shape), *dims)
    tensor = torch.frombuffer(buffer, dtype=dtype, offset=_DATA_OFFSET, count=numel).view(shape)
    # The fd stays open for the life of the process: it is what /proc/<pid>/fd/<fd> names.
    return SharedStorage(f"/proc/{os.getpid()}/fd/{fd}", pool_id.hex, tensor)


def open_readonly(path: str, pool_id: str) -> torch.Tensor | None:
    """Maps another process's pool, or None when it cannot be reached or is not that pool.
    Only a regular file is mapped, and opening never blocks (a FIFO would block a reader)."""
    try:
        expected_id = uuid.UUID(hex=pool_id).bytes
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if len(buffer) < _DATA_OFFSET:
        return None
    magic, raw_id, dtype_name, rank, *dims = _HEADER.unpack(buffer[: _HEADER.size])
    dtype = getattr(torch, dtype_name.rstrip(b"\0").decode(errors="replace"), None)
    if magic != _MAGIC or raw_id != expected_id or not isinstance(dtype, torch.dtype):
        return None
    shape = tuple(dims[:rank])
    numel = _numel(shape)
    if not 0 < rank <= 8 or min(shape) < 0 or _DATA_OFFSET + numel * _itemsize(dtype) > len(buffer):
        return None
    with warnings.catch_warnings():
        # Read-only mapping: torch warns that the tensor is not writable; it is only read.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(buffer, dtype=dtype, offset=_DATA_OFFSET, count=numel)
    return tensor.view(shape)


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
