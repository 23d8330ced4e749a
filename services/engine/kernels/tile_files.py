"""Packed weight tiles (and embedding tables) kept in files that every process on the host
maps read-only: prefill and decode then hold one copy of the model's weights between them
(the same page-cache pages), and every process after the first maps the tiles instead of
packing them.

A file is named by a digest of what it holds (the file's rows, the format, the layout and
packing.py itself), so it is never stale. It is written once, to a temporary name and then
renamed, so no process maps a partial file. Where no file can be written (a read-only
directory), the tiles stay in the process's own memory. Files live under the kernels' build
directory (`LLMSERVE_KERNEL_DIR`), in `tiles/`, at most MAX_BYTES of them (those used last);
deleting them is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import mmap
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from services.engine.kernels import cache_root
from services.engine.kernels.packing import BLOCK_INPUTS, TILE_OUTPUTS, BlockFormat, pack

log = logging.getLogger(__name__)

_PACKING_SOURCE = (Path(__file__).resolve().parent / "packing.py").read_bytes()
_unwritable: set[Path] = set()  # directories already logged
MAX_BYTES = 2 << 30  # of files kept; the default model's take 123 MB


def mapped_tiles(fmt: BlockFormat, rows: np.ndarray, pairs: bool) -> torch.Tensor:
    """pack(fmt, rows, pairs), mapped from the host's file of those tiles (written first if
    there is none); packed in memory if no file can be written."""
    rows = np.ascontiguousarray(rows)
    in_features = rows.shape[1] // fmt.block_bytes * BLOCK_INPUTS
    shape = (rows.shape[0] // TILE_OUTPUTS, in_features // BLOCK_INPUTS, fmt.tile_bytes)
    kind = f"{fmt.name.lower()}-pairs" if pairs else fmt.name.lower()
    return _mapped(kind, rows, shape, lambda: pack(fmt, rows, pairs))


def mapped_rows(rows: np.ndarray) -> torch.Tensor:
    """The file's rows as they are (an embedding table looked up by row), mapped likewise."""
    rows = np.ascontiguousarray(rows)
    return _mapped("rows", rows, rows.shape, lambda: torch.from_numpy(rows))


def _mapped(
    kind: str, rows: np.ndarray, shape: tuple[int, ...], make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    digest = hashlib.blake2b(_PACKING_SOURCE, digest_size=16)
    digest.update(f"{kind} {rows.shape}".encode())
    digest.update(memoryview(rows).cast("B"))
    path = cache_root() / "tiles" / f"{kind}-{digest.hexdigest()}.bin"
    if path.exists():
        with contextlib.suppress(OSError):  # in use: the last to be pruned
            os.utime(path)
        with contextlib.suppress(FileNotFoundError):  # unless pruned just now
            return _map(path, shape)
    made = make()
    try:
        _write(path, made)
        _prune(path.parent)
    except OSError as exc:
        if path.parent not in _unwritable:
            _unwritable.add(path.parent)
            log.info("weights stay in each process's memory: cannot write %s: %s", path, exc)
        return made
    return _map(path, shape)


def _prune(directory: Path) -> None:
    """Keeps the directory within MAX_BYTES (bar the newest file), the files used last
    kept. A process that maps a deleted file keeps its pages; the next one to need it
    writes it again."""
    files = []
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):  # pruned meanwhile by another process
            stat = path.stat()
            if path.name.startswith("."):  # being written, or left by a writer that died
                if time.time() - stat.st_mtime > 3600:
                    path.unlink()
            elif path.suffix == ".bin":
                files.append((stat.st_mtime, stat.st_size, path))
    kept = 0
    for newest, (_, size, path) in enumerate(sorted(files, reverse=True)):
        kept += size
        if kept > MAX_BYTES and newest:
            path.unlink(missing_ok=True)


def _write(path: Path, tiles: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            tiles.numpy().tofile(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _map(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)  # shared, read-only
    if len(mapped) != math.prod(shape):
        raise ValueError(f"{path} holds {len(mapped)} bytes, want {shape}")
    with warnings.catch_warnings():  # read-only on purpose: the kernels only read tiles
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mapped, dtype=torch.uint8).view(shape)
