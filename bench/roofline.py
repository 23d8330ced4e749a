"""Roofline benchmark: one engine's forward passes against the device's memory bandwidth and
compute peak.

    python -m bench.roofline --model dummy:bench/configs/llama-8b --device cuda   # a GPU
    python -m bench.roofline                                                      # CPU default

Decode: B sequences of --context tokens each (prefilled first), then --steps steps of one
token per sequence, at each --batch size. A step reads every weight once (an untied
embedding table only by the rows looked up) and each sequence's KV, so its achieved
bandwidth is (weight bytes + KV bytes) / step time, compared with --peak-bandwidth (GB/s;
known GPUs by name). Prefill: one --prefill-tokens chunk of a new sequence, its FLOPs
2 x (matmul weights) x tokens + the head once + attention's 4 x layers x heads x head_dim x
tokens (tokens + 1) / 2, compared with --peak-tflops. Prints a table and writes
bench/results/roofline.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from services.engine.config import ModelConfig
from services.engine.kv_pool import kv_bytes_per_token
from services.engine.runner import SeqChunk
from services.engine.worker import Worker, WorkerOptions, tensor_bytes

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Dense bfloat16 peaks and HBM bandwidth by device name (the vendors' data sheets, SXM parts).
KNOWN_PEAKS = {"H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0)}


@dataclass
class DecodeResult:
    batch: int
    context: int
    step_ms: float  # median
    tokens_per_s: float
    weight_bytes: int
    kv_bytes: int
    bandwidth_gb_s: float
    bandwidth_share: float | None  # of --peak-bandwidth


@dataclass
class PrefillResult:
    tokens: int
    seconds: float
    tflops: float
    tflops_share: float | None  # of --peak-tflops


def matmul_weights(config: ModelConfig) -> int:
    """Weights every token multiplies in the decoder layers (q/k/v, o, gate/up, down)."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = hidden * (q + 2 * kv) + q * hidden + hidden * 2 * inter + inter * hidden
    return config.num_layers * per_layer


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    attention = 4 * config.num_layers * config.num_heads * config.head_dim
    causal_pairs = tokens * (tokens + 1) / 2
    head = 2 * config.hidden_size * config.vocab_size  # the last token's logits only
    return 2 * matmul_weights(config) * tokens + head + attention * causal_pairs


def weights_read_per_step(worker: Worker) -> int:
    """Bytes a decode step reads of the weights: all of them, less the tables it only looks
    rows up in: the rotary angles, and an embedding table where the head has its own copy."""
    model = worker.model
    looked_up = tensor_bytes(model.rotary)
    if model.lm_head is not None:
        looked_up += tensor_bytes(model.embed_tokens)
    return worker.weight_bytes - looked_up


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(config: ModelConfig, count: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, config.vocab_size, (count,), generator=generator).tolist()


def measure_decode(
    worker: Worker, batch: int, context: int, steps: int, peak: float | None
) -> DecodeResult:
    config, blocks = worker.config, worker.pool.blocks
    block_size = worker.pool.block_size
    generator = torch.Generator().manual_seed(batch)
    tables = [blocks.allocate(-(-(context + steps) // block_size)) for _ in range(batch)]
    try:
        for table in tables:  # each sequence's context, one prefill pass each
            worker.runner.forward([SeqChunk(random_ids(config, context, generator), 0, table)])
        times = []
        for step in range(steps):
            ids = random_ids(config, batch, generator)
            chunks = [SeqChunk([ids[i]], context + step, tables[i]) for i in range(batch)]
            synchronize(worker.device)
            start = time.perf_counter()
            worker.runner.forward(chunks)
            synchronize(worker.device)
            times.append(time.perf_counter() - start)
    finally:
        for table in tables:
            blocks.free(table)
    step_s = statistics.median(times[1:] if len(times) > 1 else times)  # the first warms up
    weights = weights_read_per_step(worker)
    kv = batch * (context + steps // 2) * kv_bytes_per_token(config, worker.kv_dtype)
    bandwidth = (weights + kv) / step_s / 1e9
    return DecodeResult(
        batch=batch,
        context=context,
        step_ms=step_s * 1e3,
        tokens_per_s=batch / step_s,
        weight_bytes=weights,
        kv_bytes=kv,
        bandwidth_gb_s=bandwidth,
        bandwidth_share=bandwidth / peak if peak else None,
    )


def measure_prefill(worker: Worker, tokens: int, repeats: int, peak: float | None) -> PrefillResult:
    config, blocks = worker.config, worker.pool.blocks
    generator = torch.Generator().manual_seed(tokens)
    table = blocks.allocate(-(-tokens // worker.pool.block_size))
    try:
        ids = random_ids(config, tokens, generator)
        worker.runner.forward([SeqChunk(ids, 0, table)])  # warm-up
        times = []
        for _ in range(repeats):
            synchronize(worker.device)
            start = time.perf_counter()
            worker.runner.forward([SeqChunk(ids, 0, table)])
            synchronize(worker.device)
            times.append(time.perf_counter() - start)
    finally:
        blocks.free(table)
    seconds = statistics.median(times)
    tflops = prefill_flops(config, tokens) / seconds / 1e12
    return PrefillResult(tokens, seconds, tflops, tflops / peak if peak else None)


def device_peaks(device: torch.device) -> tuple[float | None, float | None]:
    """(GB/s, bf16 TFLOP/s) of a known GPU, else (None, None)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, peaks in KNOWN_PEAKS.items():
        if key in name:
            return peaks
    return None, None


def share(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=512, help="KV tokens per sequence")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill passes")
    parser.add_argument("--peak-bandwidth", type=float, help="GB/s (default: known GPUs)")
    parser.add_argument("--peak-tflops", type=float, help="TFLOP/s (default: known GPUs)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/roofline.json")
    args = parser.parse_args()

    # The largest batch's sequences and the prefill's, each with a partly empty last block.
    sequences = max(args.batch) + 1
    needed = max(args.batch) * (args.context + args.steps) + args.prefill_tokens
    options = WorkerOptions(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_cache_tokens=needed + 64 * sequences,
    )
    worker = Worker(options)
    known_bandwidth, known_tflops = device_peaks(worker.device)
    peak_bandwidth = args.peak_bandwidth or known_bandwidth
    peak_tflops = args.peak_tflops or known_tflops
    print(
        f"{worker.config.model_id} on {worker.device} ({worker.dtype}, weights "
        f"{worker.info.weight_format}), peaks: {peak_bandwidth or '?'} GB/s, "
        f"{peak_tflops or '?'} TFLOP/s"
    )
    decode = []
    for batch in args.batch:
        result = measure_decode(worker, batch, args.context, args.steps, peak_bandwidth)
        decode.append(result)
        print(
            f"decode batch {batch:3d} x {args.context} tokens: step {result.step_ms:8.2f} ms, "
            f"{result.tokens_per_s:9.1f} tok/s, {result.bandwidth_gb_s:8.1f} GB/s "
            f"({share(result.bandwidth_share)} of peak)"
        )
    prefill = measure_prefill(worker, args.prefill_tokens, args.repeats, peak_tflops)
    print(
        f"prefill {prefill.tokens} tokens: {prefill.seconds * 1e3:.1f} ms, "
        f"{prefill.tflops:.2f} TFLOP/s ({share(prefill.tflops_share)} of peak)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": worker.config.model_id,
        "device": str(worker.device),
        "dtype": str(worker.dtype).removeprefix("torch."),
        "peak_bandwidth_gb_s": peak_bandwidth,
        "peak_tflops": peak_tflops,
        "decode": [asdict(r) for r in decode],
        "prefill": asdict(prefill),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
