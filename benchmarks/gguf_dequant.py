"""Dequantisation throughput per type, in GB/s of output, on the current device.

    python -m benchmarks.gguf_dequant [--device cuda] [--dtype bf16] [--elements 16777216]

One line per type. Input blocks come from quantising Gaussian weights (random bytes would
contain NaN/subnormal scales, which run slower on some CPUs than real weights do). Each
type is timed as the best of `--repeats` runs after a warm-up, synchronising the device.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import gguf
import numpy as np
import torch

from benchmarks.common import time_calls
from steadydancer.gguf.dequant import SUPPORTED_QTYPES, as_qtype, dequantize
from steadydancer.gguf.quantize import quantize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ORDER = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "Q3_K",
    "Q2_K",
)


def packed_weights(
    qtype: gguf.GGMLQuantizationType, n_elements: int, seed: int = 0
) -> torch.Tensor:
    """`n_elements` Gaussian weights (std 0.02, like a DiT layer) packed as `qtype` bytes."""
    rows = max(1, n_elements // 4096)
    values = (np.random.default_rng(seed).standard_normal((rows, 4096)) * 0.02).astype(np.float32)
    raw = quantize(values, qtype)
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())


def bench_type(
    qtype: gguf.GGMLQuantizationType,
    n_elements: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> tuple[float, float, bool]:
    """(seconds of the best run, GB/s of output, whether the result is a view of the input)."""
    raw = packed_weights(qtype, n_elements).to(device)
    shape = (max(1, n_elements // 4096), 4096)
    out = dequantize(raw, qtype, shape, dtype)  # warm-up (kernel selection, caches)
    is_view = out.data_ptr() == raw.data_ptr()  # F32->fp32, BF16->bf16...: nothing to convert
    out_bytes = out.numel() * out.element_size()  # every run's output has this size
    times = time_calls(lambda: dequantize(raw, qtype, shape, dtype), device=device, repeat=repeats)
    best = min(times, default=float("inf"))
    return best, out_bytes / best / 1e9, is_view


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gguf_dequant", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="output dtype (default bf16)"
    )
    parser.add_argument(
        "--elements", type=int, default=1 << 24, help="weights per type (default 16M)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--types", nargs="*", default=list(ORDER), help="subset of types")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(
        f"dequant throughput, {args.elements:,} weights per type -> {args.dtype} on {device}"
        + (
            f" ({threads} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
            if threads
            else ""
        )
        + f", torch {torch.__version__}"
    )
    for name in args.types:
        qtype = as_qtype(name)
        if qtype not in SUPPORTED_QTYPES:
            print(f"{qtype.name:<5} unsupported")
            continue
        seconds, gbps, is_view = bench_type(qtype, args.elements, device, dtype, args.repeats)
        if is_view:
            print(
                f"{qtype.name:<5}      n/a        (already {args.dtype}: returned as a view, no work)"
            )
        else:
            print(f"{qtype.name:<5} {gbps:8.2f} GB/s  ({seconds * 1e3:8.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
