"""Time one forward pass of the SteadyDancer DiT with random weights.

    python -m steadydancer.bench                                # 14B shapes, bf16, 832x480x81
    python -m steadydancer.bench --weights Q4_K --attention sdpa
    python -m steadydancer.bench --tiny --device cpu            # a few seconds on a laptop

Random weights are made directly in their final form: float weights as random `dtype`
tensors, quantised weights as random packed GGML blocks whose fp16 scale fields are
overwritten with small finite values (random bytes would give NaN/inf scales), so a 14B
model never exists in float first. The FLOP count is the matrix products of the forward
pass (2*m*n*k each), stated per part in the output; element-wise work, norms, the pose path
and dequantisation are not counted, so TFLOP/s is "useful matmul work per second".
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .keys import TinyConfig
from .model import CLIP_TOKENS, SteadyDancerConfig, SteadyDancerDiT

# Byte offsets of the fp16 scale fields (d, and dmin/m where present) in one block.
SCALE_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
FLOAT_WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shapes:
    """Latent shapes of one run."""

    batch: int
    frames: int  # latent frames F (video frames 4(F-1)+1)
    height: int  # latent h
    width: int  # latent w
    text_len: int

    def grid(self, cfg: SteadyDancerConfig) -> tuple[int, int, int]:
        """Token grid including the two reference frames."""
        pt, ph, pw = cfg.patch
        return self.frames // pt + 2, self.height // ph, self.width // pw

    def tokens(self, cfg: SteadyDancerConfig) -> int:
        return math.prod(self.grid(cfg))


def shapes_for_video(
    width: int, height: int, frames: int, batch: int = 1, text_len: int = 512
) -> Shapes:
    """Latent shapes of a video of `frames` frames (4k+1) at width x height pixels."""
    if (frames - 1) % 4 or width % 16 or height % 16:
        raise SystemExit(
            f"video {width}x{height}x{frames}: frames must be 4k+1, width and height multiples of 16"
        )
    return Shapes(batch, (frames - 1) // 4 + 1, height // 8, width // 8, text_len)


def forward_flops(cfg: SteadyDancerConfig, shapes: Shapes) -> dict[str, float]:
    """Matrix-product FLOPs of one forward pass, by part."""
    b, d, f = shapes.batch, cfg.dim, cfg.ffn_dim
    n = shapes.tokens(cfg)
    n_video = n - 2 * math.prod(shapes.grid(cfg)[1:])
    ctx_text, ctx_img = cfg.text_len, CLIP_TOKENS
    per_block = {
        "self_attn_proj": 4 * 2 * n * d * d,
        "self_attn_sdpa": 2 * 2 * n * n * d,
        "cross_attn_proj": 2 * 2 * n * d * d + 2 * 2 * (ctx_text + ctx_img) * d * d,
        "cross_attn_sdpa": 2 * 2 * n * (ctx_text + ctx_img) * d,
        "ffn": 2 * 2 * n * d * f,
    }
    out = {k: float(b * cfg.num_layers * v) for k, v in per_block.items()}
    pt, ph, pw = cfg.patch
    patch = pt * ph * pw
    out["embeddings_head"] = float(
        b
        * (
            2 * n * d * (cfg.in_dim + 2 * cfg.in_dim_c) * patch  # patch embeddings
            + 2 * ctx_text * d * (cfg.text_dim + d)  # text embedding
            + 2 * 2 * ctx_img * (cfg.clip_dim * cfg.clip_dim + cfg.clip_dim * d)  # img_emb x2
            + 2 * n_video * d * cfg.out_dim * patch  # head
        )
    )
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------ random model
def _random_float(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    return t.mul_(1.0 / math.sqrt(max(fan_in, 1)))


def random_packed(
    qtype_name: str, shape: tuple[int, ...], device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """A GGMLTensor of random blocks with valid, small scales (weights ~ 1/sqrt(fan_in))."""
    import gguf

    from .gguf.ops import GGMLTensor

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    data = torch.randint(0, 256, (n_blocks, size), dtype=torch.uint8, device=device, generator=gen)
    scale = 1.0 / (64.0 * math.sqrt(shape[-1]))  # quants of up to ~64 steps times this
    bits = torch.tensor([scale], dtype=torch.float16).view(torch.uint8).to(device)
    for offset in SCALE_FIELDS[qtype_name]:
        data[:, offset : offset + 2] = bits
    return GGMLTensor(data.reshape(-1), tensor_type=qtype, tensor_shape=shape)


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
    from .gguf.ops import GGMLLayer, GGMLOps

    quant = weights.upper() if weights.lower() not in FLOAT_WEIGHTS else None
    if quant is not None and quant not in SCALE_FIELDS:
        raise SystemExit(
            f"--weights {weights}: use bf16, fp16, fp32 or one of {', '.join(SCALE_FIELDS)}"
        )
    float_dtype = compute_dtype if quant else FLOAT_WEIGHTS[weights.lower()]
    ops = GGMLOps if quant else nn
    with torch.device("meta"):
        model = SteadyDancerDiT(
            cfg, operations=ops, device="meta", dtype=float_dtype, attention=attention
        )
    model.compute_dtype = compute_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    if quant:
        import gguf

        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]][0]
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            shape = tuple(param.shape)
            full = f"{module_name}.{name}"
            if (
                quant
                and isinstance(module, GGMLLayer)
                and isinstance(module, nn.Linear)
                and name == "weight"
                and shape[-1] % block == 0
            ):
                value = random_packed(quant, shape, device, gen)
            elif full.endswith("modulation"):
                value = _random_float(shape, param.dtype, device, gen)
            elif name == "weight" and (len(shape) == 1 or "norm" in full):
                value = torch.ones(shape, dtype=param.dtype, device=device)
            elif name == "bias" or name == "in_proj_bias":
                value = torch.zeros(shape, dtype=param.dtype, device=device)
            else:
                value = _random_float(shape, param.dtype, device, gen)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
    return model.eval()


def random_inputs(
    cfg: SteadyDancerConfig, shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    b, f, h, w = shapes.batch, shapes.frames, shapes.height, shapes.width

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=g)

    return {
        "x": rnd(b, cfg.out_dim, f, h, w),
        "t": torch.full((b,), 500.0, device=device),
        "text": rnd(b, shapes.text_len, cfg.text_dim),
        "clip_x": rnd(b, CLIP_TOKENS, cfg.clip_dim),
        "clip_c": rnd(b, CLIP_TOKENS, cfg.clip_dim),
        "y": rnd(b, cfg.in_dim - cfg.out_dim, f, h, w),
        "pose": rnd(b, cfg.in_dim_c, f, h, w),
        "ref_x": rnd(b, cfg.in_dim, 1, h, w),
        "ref_c": rnd(b, cfg.in_dim, 1, h, w),
    }


# ------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    model: SteadyDancerDiT,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    warmup: int,
    repeat: int,
) -> list[float]:
    """Seconds of each of `repeat` forward passes after `warmup` untimed ones."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeat):
            _sync(device)
            start = time.perf_counter()
            out = model(**inputs)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if not torch.isfinite(out).all():
                raise SystemExit("the forward pass produced NaN/inf: the benchmark is invalid")
            del out
    return times


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
    shapes = shapes_for_video(args.width, args.height, args.frames, args.batch)
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
        from .streaming import enable_streaming

        streamer = enable_streaming(model, device, args.memory)
    build_s = time.perf_counter() - start
    inputs = random_inputs(cfg, shapes, device, compute, seed=args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_forward(model, inputs, device, args.warmup, args.repeat)
    flops = forward_flops(cfg, shapes)
    best, median = min(times), sorted(times)[len(times) // 2]
    from .gguf.ops import is_quantized

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
        "weight_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
        "quantised_tensors": [len(packed), len(params)],
        "memory": args.memory or "full",
    }
    if streamer is not None:
        result["streaming"] = streamer.summary()
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    result["peak_rss_gib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m steadydancer.bench", description=__doc__.splitlines()[0]
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
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="video width in pixels (default 832; 128 with --tiny)",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="video height in pixels (default 480; 128 with --tiny)",
    )
    p.add_argument(
        "--frames", type=int, default=None, help="video frames, 4k+1 (default 81; 17 with --tiny)"
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
    small = args.tiny
    args.width = args.width or (128 if small else 832)
    args.height = args.height or (128 if small else 480)
    args.frames = args.frames or (17 if small else 81)
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
