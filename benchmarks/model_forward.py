"""Time one forward pass of the SteadyDancer DiT with random weights.

    python -m benchmarks.model_forward                          # 14B shapes, bf16, 832x480x81
    python -m benchmarks.model_forward --weights Q4_K --attention sdpa
    python -m benchmarks.model_forward --tiny --device cpu      # a few seconds on a laptop

Random weights are made directly in their final form on the device (see benchmarks.common):
float weights as random `dtype` tensors, quantised weights as random packed GGML blocks
whose fp16 scale fields are overwritten with small finite values (random bytes would give
NaN/inf scales), so a 14B model never exists in float first. The FLOP count is
benchmarks.common.forward_flops: the matrix products of the forward pass (2*m*n*k each), stated
per part in the output; element-wise work, norms, the pose path and dequantisation are not
counted, so TFLOP/s is "useful matmul work per second".
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    FLOAT_WEIGHTS,
    GIB,
    PACKED_TYPES,
    forward_flops,
    random_inputs,
    random_weight,
    shapes_for_video,
    time_calls,
)
from steadydancer.keys import TinyConfig
from steadydancer.model import SteadyDancerConfig, SteadyDancerDiT


def build_random_model(
    cfg: SteadyDancerConfig,
    weights: str,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    attention: str = "auto",
    seed: int = 0,
) -> SteadyDancerDiT:
    """A SteadyDancer DiT of these sizes whose parameters are random, made on `device`.

    `weights`: "bf16"/"fp16"/"fp32" (float weights of that dtype) or a GGML type name
    ("Q8_0", "Q4_K", ...): Linear weights whose rows fit the blocks are packed, the
    rest are float (as converters do).
    """
    from steadydancer.gguf.ops import GGMLLayer, GGMLOps

    quant = weights.upper() if weights.lower() not in FLOAT_WEIGHTS else None
    if quant is not None and quant not in PACKED_TYPES:
        raise SystemExit(
            f"--weights {weights}: use bf16, fp16, fp32 or one of {', '.join(PACKED_TYPES)}"
        )
    float_dtype = compute_dtype if quant else FLOAT_WEIGHTS[weights.lower()]
    ops = GGMLOps if quant else nn
    with torch.device("meta"):
        model = SteadyDancerDiT(
            cfg, operations=ops, device="meta", dtype=float_dtype, attention=attention
        )
    model.compute_dtype = compute_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            shape = tuple(param.shape)
            full = f"{module_name}.{name}"
            value = random_weight(
                full,
                shape,
                quant=quant if isinstance(module, GGMLLayer) else None,
                dtype=param.dtype,
                device=device,
                generator=gen,
            )
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
    return model.eval()


# ------------------------------------------------------------------------------ timing
def _check_finite(out: torch.Tensor) -> None:
    if not torch.isfinite(out).all():
        raise SystemExit("the forward pass produced NaN/inf: the benchmark is invalid")


def time_forward(
    model: SteadyDancerDiT,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    warmup: int,
    repeat: int,
) -> list[float]:
    """Seconds of each of `repeat` forward passes after `warmup` untimed ones (host clock
    between device synchronisations); every output is checked to be finite."""
    with torch.inference_mode():
        return time_calls(
            lambda: model(**inputs),
            device=device,
            warmup=warmup,
            repeat=repeat,
            each=_check_finite,
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    float_weights = FLOAT_WEIGHTS.get(args.weights.lower())
    if float_weights is not None and args.dtype not in (None, args.weights.lower()):
        raise SystemExit(
            "--dtype applies to quantised weights; float weights compute in their own dtype"
        )
    args.dtype = args.weights.lower() if float_weights is not None else (args.dtype or "bf16")
    compute = FLOAT_WEIGHTS[args.dtype]
    if args.tiny:
        t = TinyConfig()
        cfg = SteadyDancerConfig(
            dim=t.dim, ffn_dim=t.ffn_dim, num_heads=t.num_heads, num_layers=t.num_layers,
            text_dim=t.text_dim, clip_dim=t.clip_dim,
        )  # fmt: skip
    else:
        cfg = SteadyDancerConfig()
    if args.layers is not None:
        cfg = replace(cfg, num_layers=args.layers)
    try:
        shapes = shapes_for_video(args.width, args.height, args.frames, args.batch)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    torch.manual_seed(args.seed)
    build_device = device if args.memory in (None, "full") else torch.device("cpu")
    start = time.perf_counter()
    model = build_random_model(
        cfg,
        args.weights,
        device=build_device,
        compute_dtype=compute,
        attention=args.attention,
        seed=args.seed,
    )
    streamer = None
    if args.memory not in (None, "full"):
        from steadydancer.streaming import enable_streaming

        streamer = enable_streaming(model, device, args.memory)
    build_s = time.perf_counter() - start
    inputs = random_inputs(cfg, shapes, device, compute, seed=args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_forward(model, inputs, device, args.warmup, args.repeat)
    flops = forward_flops(cfg, shapes)
    best, median = min(times), sorted(times)[len(times) // 2]
    from steadydancer.gguf.ops import is_quantized

    params = list(model.parameters())
    packed = [p for p in params if is_quantized(p)]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": asdict(cfg),
        "weights": args.weights,
        "compute_dtype": args.dtype,
        "video": f"{args.width}x{args.height}x{args.frames}",
        "batch": shapes.batch,
        "latent": [shapes.frames, shapes.height, shapes.width],
        "tokens": shapes.tokens(cfg),
        "build_s": build_s,
        "forward_s": times,
        "median_s": median,
        "best_s": best,
        "flops": flops,
        "tflops_per_s": flops["total"] / median / 1e12,
        "attention": model.attention.backend_used,
        "weight_gib": sum(p.numel() * p.element_size() for p in params) / GIB,
        "quantised_tensors": [len(packed), len(params)],
        "memory": args.memory or "full",
    }
    if streamer is not None:
        result["streaming"] = streamer.summary()
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    result["peak_rss_gib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    )  # KiB on Linux
    return result


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e6:.3g} MFLOP"


def format_result(r: dict[str, Any]) -> str:
    cfg, fl = r["config"], r["flops"]
    lines = [
        f"SteadyDancer DiT forward on {r['device']} (torch {r['torch']})",
        f"  model      dim {cfg['dim']}, ffn {cfg['ffn_dim']}, {cfg['num_layers']} blocks, "
        f"{cfg['num_heads']} heads; weights {r['weights']} ({r['quantised_tensors'][0]} of "
        f"{r['quantised_tensors'][1]} tensors packed, {r['weight_gib']:.2f} GiB), compute {r['compute_dtype']}, "
        f"memory {r['memory']}",
        f"  input      video {r['video']} -> latent {r['latent'][0]}x{r['latent'][1]}x{r['latent'][2]} "
        f"(+2 reference frames) = {r['tokens']:,} tokens, batch {r['batch']}",
        f"  forward    median {r['median_s']:.4f} s, best {r['best_s']:.4f} s over {len(r['forward_s'])} runs "
        f"(build {r['build_s']:.1f} s)",
        f"  FLOPs      {_flop(fl['total'])} per forward, matmuls only: self-attn proj "
        f"{_flop(fl['self_attn_proj'])}, self-attn QK/PV {_flop(fl['self_attn_sdpa'])}, "
        f"cross-attn {_flop(fl['cross_attn_proj'] + fl['cross_attn_sdpa'])}, FFN {_flop(fl['ffn'])}, "
        f"embeddings+head {_flop(fl['embeddings_head'])}",
        f"  throughput {_flop(r['tflops_per_s'] * 1e12)}/s (at the median)",
        f"  attention  {r['attention']}",
    ]
    if "peak_gpu_gib" in r:
        lines.append(
            f"  memory     peak GPU {r['peak_gpu_gib']:.2f} GiB allocated, "
            f"{r['peak_gpu_reserved_gib']:.2f} GiB reserved; peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
    else:
        lines.append(f"  memory     peak RSS {r['peak_rss_gib']:.2f} GiB (no GPU)")
    if "streaming" in r:
        lines.append(f"  streaming  {r['streaming']}")
    return "\n".join(lines)


# video size options: flag, meaning, default, default with --tiny
VIDEO_ARGS = (
    ("--width", "video width in pixels", 832, 128),
    ("--height", "video height in pixels", 480, 128),
    ("--frames", "video frames, 4k+1", 81, 17),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.model_forward", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny model (keys.TinyConfig) and a small video, for CPUs",
    )
    p.add_argument(
        "--weights", default="bf16", help="bf16, fp16, fp32 or a GGUF type: Q8_0, Q4_K, Q6_K, ..."
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(FLOAT_WEIGHTS),
        help="compute dtype of quantised weights (default bf16)",
    )
    p.add_argument(
        "--attention", default="auto", help="auto or a backend of steadydancer.attention"
    )
    for flag, what, default, tiny in VIDEO_ARGS:
        p.add_argument(
            flag, type=int, default=None, help=f"{what} (default {default}; {tiny} with --tiny)"
        )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--layers", type=int, default=None, help="number of blocks (default: all of the model size)"
    )
    p.add_argument(
        "--memory", default=None, help="full (default), auto or N resident blocks (block streaming)"
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line as well")
    args = p.parse_args(argv)
    for flag, _, default, tiny in VIDEO_ARGS:
        name = flag.lstrip("-")
        setattr(args, name, getattr(args, name) or (tiny if args.tiny else default))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_result(result))
    if args.json:
        print("RESULT " + json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
