"""KV pool storage in an anonymous shared-memory file, mappable by other processes on the host.

The pool is a memfd: it has no name in /dev/shm, so nothing leaks when the process dies.
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


def create(shape: tuple[int, ...], dtype: torch.dtype) -> SharedStorage:
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
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
    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not 0 < rank <= 8 or min(shape) < 0 or _DATA_OFFSET + numel * itemsize > len(buffer):
        return None
    with warnings.catch_warnings():
        # Read-only mapping: torch warns that the tensor is not writable; it is only read.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(buffer, dtype=dtype, offset=_DATA_OFFSET, count=numel)
    return tensor.view(shape)
