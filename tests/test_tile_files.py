"""Packed weights mapped from files that a host's processes share (kernels/tile_files.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from services.engine.kernels import packing, tile_files


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSERVE_KERNEL_DIR", str(tmp_path))
    return tmp_path


def file_rows(fmt: packing.BlockFormat, out_features: int, in_features: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (out_features, in_features // 32 * fmt.block_bytes), np.uint8)
    scales = rows.reshape(out_features, -1, fmt.block_bytes)[..., : 2 * fmt.num_scales]
    scales[...] = np.full(scales.shape[:-1] + (fmt.num_scales,), 0.01, np.float16).view(np.uint8)
    return rows


@pytest.mark.parametrize("fmt", [packing.Q4_1, packing.Q8_0])
@pytest.mark.parametrize("pairs", [False, True])
def test_mapped_tiles_are_the_packed_tiles_from_one_file(kernel_dir, fmt, pairs):
    rows = file_rows(fmt, 64, 128)
    first = tile_files.mapped_tiles(fmt, rows, pairs)
    assert torch.equal(first, packing.pack(fmt, rows, pairs))
    (path,) = (kernel_dir / "tiles").iterdir()
    assert path.stat().st_size == first.numel()
    second = tile_files.mapped_tiles(fmt, rows, pairs)
    assert torch.equal(second, first)
    assert list((kernel_dir / "tiles").iterdir()) == [path]  # mapped, not written again
    # Other weights, or the same ones in the other layout, get files of their own.
    tile_files.mapped_tiles(fmt, rows, not pairs)
    tile_files.mapped_tiles(fmt, file_rows(fmt, 32, 128), pairs)
    assert len(list((kernel_dir / "tiles").iterdir())) == 3


def test_another_process_maps_the_same_pages(kernel_dir):
    rows = file_rows(packing.Q4_1, 64, 256)
    tiles = tile_files.mapped_tiles(packing.Q4_1, rows, True)
    np.save(kernel_dir / "rows.npy", rows)
    code = (
        "import numpy as np, sys; from services.engine.kernels import packing, tile_files\n"
        f"rows = np.load({str(kernel_dir / 'rows.npy')!r})\n"
        "tiles = tile_files.mapped_tiles(packing.Q4_1, rows, True)\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(sum(tiles.tolist()[0][0]), any('/tiles/q4_1-' in line for line in maps))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    ).stdout.split()
    assert out == [str(int(tiles[0, 0].sum())), "True"]


def test_where_no_file_can_be_written_tiles_stay_in_memory(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LLMSERVE_KERNEL_DIR", str(tmp_path / "a-file"))  # not a directory
    rows = file_rows(packing.Q8_0, 32, 64)
    tiles = tile_files.mapped_tiles(packing.Q8_0, rows, True)
    assert torch.equal(tiles, packing.pack(packing.Q8_0, rows, True))


def test_mapped_rows_are_the_rows(kernel_dir):
    rows = file_rows(packing.Q8_0, 48, 64)
    mapped = tile_files.mapped_rows(rows)
    assert torch.equal(mapped, torch.from_numpy(rows))
    assert torch.equal(tile_files.mapped_rows(rows), mapped)
    assert len(list((kernel_dir / "tiles").iterdir())) == 1


def test_files_beyond_the_budget_go_those_used_last_stay(kernel_dir, monkeypatch):
    weights = [file_rows(packing.Q8_0, 16 * (i + 1), 64) for i in range(3)]
    for i in range(2):
        tile_files.mapped_rows(weights[i])
    for i, path in enumerate(
        sorted((kernel_dir / "tiles").iterdir(), key=lambda p: p.stat().st_size)
    ):
        os.utime(path, (i + 1, i + 1))  # long unused, the first longest
    tile_files.mapped_rows(weights[0])  # used again: now the newest
    monkeypatch.setattr(tile_files, "MAX_BYTES", weights[0].nbytes + weights[2].nbytes)
    tile_files.mapped_rows(weights[2])  # the budget keeps it and the first, not the second
    sizes = sorted(path.stat().st_size for path in (kernel_dir / "tiles").iterdir())
    assert sizes == [weights[0].nbytes, weights[2].nbytes]
    monkeypatch.setattr(tile_files, "MAX_BYTES", 1)  # the newest file stays whatever its size
    tile_files.mapped_rows(weights[1])
    assert [path.stat().st_size for path in (kernel_dir / "tiles").iterdir()] == [weights[1].nbytes]


def test_partial_files_of_dead_writers_go_after_an_hour(kernel_dir):
    tiles = kernel_dir / "tiles"
    tiles.mkdir()
    (tiles / ".rows-old.bin.x1").write_bytes(b"partial")
    (tiles / ".rows-new.bin.x2").write_bytes(b"being written")
    os.utime(tiles / ".rows-old.bin.x1", (1, 1))
    tile_files.mapped_rows(file_rows(packing.Q8_0, 16, 64))
    assert sorted(p.name.startswith(".") for p in tiles.iterdir()) == [False, True]
    assert (tiles / ".rows-new.bin.x2").exists()
