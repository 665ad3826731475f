"""The fused element-wise kernels of the DiT blocks against PyTorch's, one op at a time.

    python -m benchmarks.fused_kernels [--tokens 35880] [--dim 5120] [--ffn 13824] [--device cuda]

Each operation of `steadydancer.fused` that a block runs, on one sample of the given size
(default: the 14B model at 832x480x81), timed with its Triton kernel and with the kernels
switched off (STEADYDANCER_FUSED_KERNELS=0, the PyTorch expressions), in one process: the
milliseconds of each and the memory traffic per second that the op's bytes make of them
(what the fused kernel reads and writes once; the PyTorch path moves more). Then the fp8
input quantisation with the largest value noted by the norm that wrote the input (one pass)
and without (two). Where the kernels do not run (a CPU, no Triton) both columns are the
PyTorch path, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from unittest import mock

import torch

from benchmarks.common import time_calls
from steadydancer import fused
from steadydancer.model import rope_table


def operations(tokens: int, dim: int, ffn: int, device: torch.device) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call, bytes a single pass reads and writes) of each block operation."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, dim, device=device, generator=g)
    y = torch.randn(1, tokens, dim, device=device, generator=g).bfloat16()
    shift = torch.randn(1, 1, dim, device=device, generator=g)
    scale = torch.randn(1, 1, dim, device=device, generator=g) * 0.1
    weight, bias = torch.rand(dim, device=device) + 0.5, torch.randn(dim, device=device)
    hidden = torch.randn(tokens, ffn, device=device, generator=g).bfloat16()
    # one rotation per token for heads of 128 channels (a grid of tokens x 1 x 1: the same
    # work as the video's grid, other angles)
    table = rope_table((tokens, 1, 1), 128, device)
    n = tokens * dim
    return [
        ("LN1, modulated, to bf16", lambda: fused.layer_norm_modulate(x, shift, scale, 1e-6, torch.bfloat16), n * 6),
        ("x += y * gate, then norm3 (affine)",
         lambda: fused.layer_norm_affine(x, weight, bias, 1e-6, torch.bfloat16, add=y, gate=scale), n * 12),
        ("x += y, then LN2 (modulated)",
         lambda: fused.layer_norm_modulate(x, shift, scale, 1e-6, torch.bfloat16, add=y), n * 12),
        ("x += y * gate", lambda: fused.add_residual(x, y, scale), n * 10),
        ("RMSNorm + RoPE, bf16", lambda: fused.rms_norm(y, weight, 1e-6, table), n * 4),
        (f"GELU (tanh), {ffn} channels", lambda: fused.gelu_tanh(hidden), tokens * ffn * 4),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=35880)
    parser.add_argument("--dim", type=int, default=5120, help="channels (a multiple of 128 for the RoPE row)")
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    if args.dim % 128 or min(args.tokens, args.dim, args.ffn, args.repeat) < 1:
        parser.error("--dim must be a positive multiple of 128 (heads of 128 channels); sizes and --repeat positive")
    device = torch.device(args.device)
    timed = lambda fn: sorted(time_calls(fn, device=device, warmup=2, repeat=args.repeat))[args.repeat // 2]  # noqa: E731
    kernels = device.type == "cuda" and fused._kernels() is not None and fused.enabled()
    print(f"{args.tokens} tokens x {args.dim} channels (FFN {args.ffn}) on {device}"
          f"{'' if kernels else ': the fused kernels do not run here, both columns are PyTorch'}")  # fmt: skip
    print(f"{'operation':36s} {'fused ms':>9s} {'GB/s':>6s} {'PyTorch ms':>11s} {'GB/s':>6s}")
    for name, fn, nbytes in operations(args.tokens, args.dim, args.ffn, device):
        fused_s = timed(fn)
        with mock.patch.dict(os.environ, {fused.ENV_SWITCH: "0"}):
            plain_s = timed(fn)
        print(f"{name:36s} {fused_s * 1e3:9.3f} {nbytes / fused_s / 1e9:6.0f} "
              f"{plain_s * 1e3:11.3f} {nbytes / plain_s / 1e9:6.0f}")  # fmt: skip
    normed = fused.layer_norm_modulate(
        torch.randn(1, args.tokens, args.dim, device=device), torch.zeros(1, 1, args.dim, device=device),
        torch.zeros(1, 1, args.dim, device=device), 1e-6, torch.bfloat16,
    )  # fmt: skip
    amax = normed.float().abs().amax(dim=-1).flatten()

    def noted() -> object:
        fused.remember_amax(normed, amax)  # as the norm kernel leaves it
        return fused.quantize_fp8(normed)

    def searched() -> object:
        fused.forget(normed)  # nothing known about it: the search pass runs
        return fused.quantize_fp8(normed)

    print(f"fp8 quantisation of the norm's output: {timed(noted) * 1e3:.3f} ms with its largest value noted, "
          f"{timed(searched) * 1e3:.3f} ms searching for it")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
