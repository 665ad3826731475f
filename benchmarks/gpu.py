"""GPU benchmarks of issue 7 (and the GPU half of issue 3), printed side by side in one run.

    python -m benchmarks.gpu all --out DIR      # everything below, one table
    python -m benchmarks.gpu matmul             # dense bf16 matmul ceiling
    python -m benchmarks.gpu dequant            # plain vs Triton dequant, GB/s
    python -m benchmarks.gpu attention          # backends: agreement + speed
    python -m benchmarks.gpu model --weights Q4_K --mode "16 GB auto:16:auto"
    python -m benchmarks.gpu guidance --weights bf16

Each model configuration runs in its own process (`all` spawns them), so peak-memory
figures and the per-process memory cap of the 16 GB mode never leak between runs. Every
timed path is also checked against its plain counterpart (bit-exact dequant, attention
error against a float64 reference, streamed vs resident forward), so a fast number that
computes something else cannot pass unnoticed. Results are JSON lines (`--out`), the table
is printed last. The whole-model runs (`model`, `guidance`) live in `benchmarks.model_gpu`;
timing, GIB and the random data come from `benchmarks.common`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import GIB, cuda_time


# ------------------------------------------------------------------------------ results
def _emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record, sort_keys=True)
    print("RESULT " + line, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------ environment
def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "part": "env",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=p.name,
            total_gib=round(p.total_memory / GIB, 1),
            sms=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
        )
    for mod in (
        "triton",
        "xformers",
        "sageattention",
        "flash_attn",
        "flash_attn_interface",
        "onnxruntime",
        "gguf",
    ):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as exc:
            info[mod] = f"missing ({type(exc).__name__})"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        pass
    return info


# ------------------------------------------------------------------------------ matmul
def bench_matmul() -> list[dict[str, Any]]:
    """Dense bf16 matmul rate: the ceiling the model's efficiency is measured against."""
    rows = []
    shapes = [
        ("8192^3", 8192, 8192, 8192),
        ("qkvo 35880x5120x5120", 35880, 5120, 5120),
        ("ffn.0 35880x5120x13824", 35880, 5120, 13824),
        ("ffn.2 35880x13824x5120", 35880, 13824, 5120),
    ]
    for name, m, k, n in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        t = cuda_time(lambda a=a, b=b: a @ b, warmup=3, repeat=10)
        rows.append(
            {"part": "matmul", "shape": name, "seconds": t, "tflops": 2 * m * k * n / t / 1e12}
        )
        del a, b
    # host -> device copy from pinned memory: the rate block streaming relies on
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    t = cuda_time(lambda d=dev, h=host: d.copy_(h, non_blocking=True), warmup=2, repeat=5)
    rows.append({"part": "h2d", "bytes": host.numel(), "seconds": t, "gbs": host.numel() / t / 1e9})
    del host, dev
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ dequant
def bench_dequant(shape: tuple[int, int] = (13824, 5120)) -> list[dict[str, Any]]:
    """Plain PyTorch dequant (dequant.py) vs the fused Triton kernels, bf16 output."""
    import gguf

    from benchmarks.common import random_packed
    from steadydancer.gguf import dequant, triton_dequant

    rows = []
    for name in ("Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[name]
        g = torch.Generator(device="cuda").manual_seed(len(rows))
        raw = random_packed(name, shape, device="cuda", generator=g)
        out_bytes = shape[0] * shape[1] * 2
        moved = raw.numel() + out_bytes

        os.environ[triton_dequant.ENV_SWITCH] = "0"
        ref = dequant.dequantize(raw, qtype, shape, torch.bfloat16)
        t_plain = cuda_time(
            lambda raw=raw, qtype=qtype: dequant.dequantize(raw, qtype, shape, torch.bfloat16)
        )
        os.environ[triton_dequant.ENV_SWITCH] = "1"
        fused = triton_dequant.dequantize_triton(raw, qtype, shape, torch.bfloat16)
        exact = bool(torch.equal(fused.view(torch.int16), ref.view(torch.int16)))
        fused32 = triton_dequant.dequantize_triton(raw, qtype, shape, torch.float32)
        os.environ[triton_dequant.ENV_SWITCH] = "0"
        ref32 = dequant.dequantize(raw, qtype, shape, torch.float32)
        os.environ[triton_dequant.ENV_SWITCH] = "1"
        exact32 = bool(torch.equal(fused32.view(torch.int32), ref32.view(torch.int32)))
        t_fused = cuda_time(
            lambda raw=raw, qtype=qtype: triton_dequant.dequantize_triton(
                raw, qtype, shape, torch.bfloat16
            ),
            warmup=3,
            repeat=20,
        )
        rows.append(
            {
                "part": "dequant",
                "qtype": name,
                "shape": list(shape),
                "plain_ms": t_plain * 1e3,
                "triton_ms": t_fused * 1e3,
                "plain_gbs": moved / t_plain / 1e9,
                "triton_gbs": moved / t_fused / 1e9,
                "speedup": t_plain / t_fused,
                "bit_exact_bf16": exact,
                "bit_exact_f32": exact32,
            }
        )
        del raw, ref, fused, fused32, ref32
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ attention
def _direct_backends() -> dict[str, Callable[..., torch.Tensor]]:
    """Attention implementations called directly, [B, L, H, D] in and out."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                ).transpose(1, 2)

        return run

    def sdpa_default(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    fns: dict[str, Callable[..., torch.Tensor]] = {
        "sdpa[default]": sdpa_default,
        "sdpa[flash]": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa[cudnn]": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "sdpa[efficient]": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    }
    try:
        import xformers.ops as xops

        fns["xformers (direct)"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    except Exception:
        pass
    try:
        from sageattention import sageattn

        fns["sage (direct)"] = lambda q, k, v: sageattn(
            q, k, v, tensor_layout="NHD", is_causal=False
        )
    except Exception:
        pass
    return fns


def _reference_attention(q, k, v) -> torch.Tensor:
    qf, kf, vf = (t.double().transpose(1, 2) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (s.softmax(-1) @ vf).transpose(1, 2)


def bench_attention(
    tokens: int = 35880, heads: int = 40, head_dim: int = 128
) -> list[dict[str, Any]]:
    """Each backend: error vs a float64 reference on random q/k/v, then speed at model size.

    Our dispatcher's backends (steadydancer.attention) are run by name when the module is
    there; direct library calls are listed too, so a dispatcher overhead or a wrong layout
    shows as a difference between the two.
    """
    rows = []
    candidates: dict[str, Callable[..., torch.Tensor]] = {}
    try:
        from steadydancer.attention import AttentionDispatcher, available_backends

        names = available_backends(torch.device("cuda"), torch.bfloat16, head_dim)
        for name in names:
            disp = AttentionDispatcher(backend=name)
            candidates[f"{name}"] = lambda q, k, v, disp=disp: disp(q, k, v)
        auto = AttentionDispatcher(backend="auto")
        candidates["auto"] = lambda q, k, v, auto=auto: auto(q, k, v)
    except ImportError as exc:
        rows.append(
            {"part": "attention", "backend": "dispatcher", "error": f"not importable: {exc}"}
        )
        auto = None
    candidates.update(_direct_backends())

    g = torch.Generator(device="cuda").manual_seed(0)
    small = [
        torch.randn(2, 2048, 8, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    ]
    ref = _reference_attention(*small)
    big = [
        torch.randn(1, tokens, heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16)
        for _ in range(3)
    ]
    flops = 4 * tokens * tokens * heads * head_dim
    for name, fn in candidates.items():
        row: dict[str, Any] = {"part": "attention", "backend": name}
        try:
            out = fn(*small)
            row["rel_err"] = float((out.double() - ref).norm() / ref.norm())
            row["shape_ok"] = tuple(out.shape) == tuple(small[0].shape)
            t = cuda_time(lambda fn=fn: fn(*big), warmup=2, repeat=5)
            row.update(ms=t * 1e3, tflops=flops / t / 1e12)
            if name == "auto" and auto is not None:
                row["backend_used"] = getattr(auto, "backend_used", None)
        except Exception as exc:
            row["error"] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ table
def format_table(records: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    env = next((r for r in records if r.get("part") == "env"), None)
    if env:
        lines.append(
            f"device {env.get('device')} ({env.get('total_gib')} GiB), torch {env.get('torch')}, "
            f"CUDA {env.get('cuda')}, triton {env.get('triton')}, {env.get('date')}"
        )
    mm = [r for r in records if r.get("part") == "matmul"]
    if mm:
        lines.append(
            "matmul bf16: " + "; ".join(f"{r['shape']} {r['tflops']:.0f} TFLOP/s" for r in mm)
        )
    for r in (r for r in records if r.get("part") == "h2d"):
        lines.append(f"host->device copy from pinned memory: {r['gbs']:.1f} GB/s (1 GiB)")
    dq = [r for r in records if r.get("part") == "dequant"]
    if dq:
        lines.append(
            "dequant (13824x5120 -> bf16)   plain ms  GB/s | triton ms  GB/s | speedup exact"
        )
        for r in dq:
            lines.append(
                f"  {r['qtype']:<6} {r['plain_ms']:>22.3f} {r['plain_gbs']:>6.0f} | {r['triton_ms']:>9.3f} "
                f"{r['triton_gbs']:>5.0f} | {r['speedup']:>6.1f}x {r['bit_exact_bf16'] and r['bit_exact_f32']}"
            )
    at = [r for r in records if r.get("part") == "attention"]
    if at:
        lines.append("attention [1,35880,40,128] bf16     rel_err     ms   TFLOP/s")
        for r in at:
            if "error" in r:
                lines.append(f"  {r['backend']:<30} ERROR {r['error']}")
            else:
                lines.append(
                    f"  {r['backend']:<30} {r['rel_err']:.2e} {r['ms']:>7.1f} {r['tflops']:>7.0f}"
                    + (f"  (ran {r['backend_used']})" if r.get("backend_used") else "")
                )
    models = [r for r in records if r.get("part") == "model"]
    if models:
        lines.extend(_model_lines(models, mm))
    for r in (r for r in records if r.get("part") == "guidance"):
        lines.append(
            f"guidance step ({r['weights']}, {r['calls']} calls): one forward {r['one_forward_s']:.2f} s, "
            f"separate {r['separate_s']:.2f} s ({r['separate_over_3_forwards']:.3f} x 3 forwards), "
            f"batched {r['batched_s']:.2f} s ({r['batched_over_separate']:.3f} x separate), "
            f"peak {r['peak_separate_gib']:.1f} / {r['peak_batched_gib']:.1f} GiB, "
            f"rel_err {_fmt(r['rel_err_batched_vs_separate'])}"
        )
    mem = [r for r in records if r.get("part") == "memory"]
    for weights in sorted({r["weights"] for r in mem}):
        rows = [r for r in mem if r["weights"] == weights][:14]
        lines.append(
            f"memory peaks, {weights}, FFN chunks of 8192 (GiB: at entry -> peak while running)"
        )
        lines.extend(
            f"  {r['module']:<34} {r['before_gib']:>6.2f} -> {r['peak_gib']:>6.2f}" for r in rows
        )
    for r in (r for r in records if r.get("part") == "alloc"):
        lines.append(
            f"alloc {r.get('weights')} {r.get('when')}: {r['size_mib']:9.1f} MiB  {r['site']}"
        )
    for part in ("pose", "error"):
        for r in (r for r in records if r.get("part") == part):
            lines.append(
                f"{part}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k != "part")
            )
    return "\n".join(lines)


def _model_lines(models: list[dict[str, Any]], mm: list[dict[str, Any]]) -> list[str]:
    ceiling = next((r["tflops"] for r in mm if r["shape"] == "8192^3"), None)
    fulls = {
        r["weights"]: r["seconds"] for r in models if r["mode"] == "full VRAM" and "seconds" in r
    }
    bf16 = fulls.get("bf16")
    lines = [
        "model 832x480x81 (35,880 tok)                s/fwd  x bf16  x full TFLOP/s %matmul peakGiB"
        " res/str attention rel_err"
    ]
    for r in models:
        head = f"  {r['weights']:<5} {r['mode']:<38}"
        if "error" in r:
            lines.append(head + f" ERROR {r['error']}")
            continue
        x_bf16 = r["seconds"] / bf16 if bf16 else float("nan")
        x_full = r["seconds"] / fulls[r["weights"]] if r["weights"] in fulls else float("nan")
        pct = 100 * r["tflops"] / ceiling if ceiling else float("nan")
        rs = f"{r['resident_blocks']}/{r['streamed_blocks']}" if "resident_blocks" in r else "all/0"
        err = r.get("rel_err_vs_full", r.get("rel_err_vs_default"))
        peak = r.get("peak_gib")
        lines.append(
            head
            + f" {r['seconds']:>6.2f} {x_bf16:>6.2f} {x_full:>6.2f} {r['tflops']:>7.0f} {pct:>6.0f}%"
            f" {peak if peak is None else round(peak, 2)!s:>7} {rs:>7} {r.get('attention')!s:<9}"
            f" {_fmt(err) if err is not None else '-'}"
        )
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------------------ CLI
# The model runs of `all`/`models`, each in its own process (peak memory and caps stay apart).
MODEL_RUNS: list[list[str]] = [
    ["model", "--weights", "bf16", "--profile", "--mode", "16 GB auto:16:auto",
     "--backends", "sdpa_cudnn,sage,xformers,flash_attn_2,flash_attn_3"],
    ["model", "--weights", "Q8_0", "--mode", "16 GB auto:16:auto"],
    ["model", "--weights", "Q4_K", "--profile", "--mode", "16 GB auto:16:auto",
     "--mode", "16 GB all streamed:16:0", "--mode", "12 GB auto:12:auto"],
    ["guidance", "--weights", "bf16"],
    ["guidance", "--weights", "Q4_K"],
    ["model", "--weights", "Q4_K", "--snapshot", "--repeat", "1"],
    ["model", "--weights", "bf16", "--mode", "16 GB auto:16:auto"],
    ["model", "--weights", "bf16", "--expandable", "--mode", "16 GB auto, expandable segments:16:auto"],
    ["model", "--weights", "Q4_K", "--mode", "16 GB auto:16:auto",
     "--mode", "16 GB all streamed:16:0", "--mode", "12 GB auto:12:auto"],
]  # fmt: skip


def _load_records(out: Path | None) -> list[dict[str, Any]]:
    if out is None or not (out / "results.jsonl").exists():
        return []
    return [
        json.loads(line)
        for line in (out / "results.jsonl").read_text().splitlines()
        if line.strip()
    ]


def _run_child(args: list[str], out: Path | None, timeout: int) -> None:
    cmd = [sys.executable, "-m", "benchmarks.gpu", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, timeout=timeout)
        if proc.returncode != 0:
            _emit({"part": "error", "cmd": " ".join(args), "rc": proc.returncode}, out)
    except subprocess.TimeoutExpired:
        _emit({"part": "error", "cmd": " ".join(args), "rc": "timeout"}, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "part",
        choices=[
            "env",
            "matmul",
            "dequant",
            "attention",
            "model",
            "guidance",
            "quick",
            "models",
            "all",
        ],
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for results.jsonl")
    parser.add_argument(
        "--weights", default="bf16", help="bf16, Q8_0, Q6_K, Q5_K or Q4_K (model, guidance)"
    )
    parser.add_argument("--attention", default="auto", help="attention backend of the model runs")
    parser.add_argument(
        "--backends", default="", help="comma list of extra attention backends to time (model)"
    )
    parser.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="LABEL:CAP_GIB:MEMORY",
        help="memory-saving run after the full-VRAM one, e.g. '16 GB auto:16:auto' or '16 GB streamed:16:0'",
    )
    parser.add_argument("--size", default="832x480x81", help="WIDTHxHEIGHTxFRAMES of the video")
    parser.add_argument("--repeat", type=int, default=2, help="timed forwards (median)")
    parser.add_argument(
        "--profile", action="store_true", help="model: FFN-chunk timing + memory profile"
    )
    parser.add_argument(
        "--snapshot", action="store_true", help="model: list non-weight allocations"
    )
    parser.add_argument(
        "--expandable", action="store_true", help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )
    parser.add_argument("--runs", default="", help="models/all: comma list of MODEL_RUNS indices")
    args = parser.parse_args(argv)
    if args.expandable:  # read by the CUDA allocator at its first use, which comes later
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA GPU; none is visible to torch", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.part in ("quick", "models", "all"):
        _emit(env_info(), args.out)
        if args.part in ("quick", "all"):
            for part in ("matmul", "dequant", "attention"):
                _run_child([part], args.out, timeout=300)
        if args.part in ("models", "all"):
            picked = [int(i) for i in args.runs.split(",")] if args.runs else range(len(MODEL_RUNS))
            for i in picked:
                _run_child(MODEL_RUNS[i], args.out, timeout=420)
        print(format_table(_load_records(args.out)))
        return 0
    if args.part in ("model", "guidance"):
        from benchmarks import model_gpu as bm

        width, height, frames = (int(v) for v in args.size.lower().split("x"))
        if args.part == "model":
            modes = []
            for spec in args.mode:
                label, cap, memory = spec.rsplit(":", 2)
                modes.append(
                    (
                        label,
                        float(cap) if cap else None,
                        int(memory) if memory.isdigit() else memory,
                    )
                )
            records = bm.run_model(
                args.weights,
                width=width,
                height=height,
                frames=frames,
                attention=args.attention,
                backends=tuple(b for b in args.backends.split(",") if b),
                modes=tuple(modes),
                repeat=args.repeat,
                profile=args.profile,
                snapshot=args.snapshot,
            )
        else:
            records = bm.run_guidance(
                args.weights, width=width, height=height, frames=frames, repeat=args.repeat
            )
        for r in records:
            _emit(r, args.out)
        print(format_table(records))
        return 0
    records: list[dict[str, Any]]
    if args.part == "env":
        records = [env_info()]
    elif args.part == "matmul":
        records = bench_matmul()
    elif args.part == "dequant":
        records = bench_dequant()
    else:
        records = bench_attention()
    for r in records:
        _emit(r, args.out)
    print(format_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
