"""Pieces shared by the benchmarks: the timer, latent shapes, the FLOP count, random weights
and inputs.

`python -m benchmarks.model_forward` (issue 3), `python -m benchmarks.gpu` (issue 7, with
`benchmarks.model_gpu`), `python -m benchmarks.gguf_dequant` and `python -m
benchmarks.pose_extract` time with the same timer; the two model benchmarks time the same
model on the same kind of random data. Keeping one definition of each piece here means their
figures are computed the same way and can be compared. This module imports no other
benchmark module (`gpu` may import `model_gpu`, never the reverse).

Random data is made directly on the target device, in its final dtype, with a generator on
that device: float weights as random tensors of the weight dtype scaled in place, packed
GGUF weights as random bytes whose fp16 scale fields are overwritten in place with random
finite values. No float32 temporary of a weight's size is ever made: on the GPU such
temporaries fragment the caching allocator (each weight should own its segment, as when a
file is loaded), and on the host a 14B model would otherwise exist in float first.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from steadydancer.model import CLIP_TOKENS, SteadyDancerConfig

GIB = 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE")

# Per GGUF type: byte offsets of the fp16 scale fields in one block (d, and dmin/m where the
# type has one), and the RMS of a dequantised block of uniformly random bytes whose scale
# fields are all 1.0 (measured with steadydancer.gguf.dequant on 4096 blocks, rounded): the
# factor between the scale and the weights' spread.
PACKED_TYPES: dict[str, tuple[tuple[int, ...], float]] = {
    "Q8_0": ((0,), 74.0),
    "Q4_0": ((0,), 4.6),
    "Q4_1": ((0, 2), 9.7),
    "Q5_0": ((0,), 9.2),
    "Q5_1": ((0, 2), 19.0),
    "Q2_K": ((80, 82), 13.0),
    "Q3_K": ((108,), 43.0),
    "Q4_K": ((0, 2), 300.0),
    "Q5_K": ((0, 2), 630.0),
    "Q6_K": ((208,), 1360.0),
}
FLOAT_WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------ host memory
def rss() -> int:
    """This process's resident set size in bytes (file-backed pages it touched included)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakRSS:
    """The largest resident set size seen while the block runs (sampled every 10 ms)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


# ------------------------------------------------------------------------------ timing
def sync(device: torch.device | str | None) -> None:
    """Wait until the work queued on `device` is done (CUDA only; None: nothing to wait for)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    warmup: int = 0,
    repeat: int = 1,
    cuda_events: bool = False,
    each: Callable[[Any], None] | None = None,
) -> list[float]:
    """Seconds of each of `repeat` calls of `fn`, after `warmup` untimed calls: the one timer
    of the benchmarks.

    By default a call is timed on the host clock (`time.perf_counter`) from an idle device to
    the end of its work: `device` is synchronised before and after the call (None: nothing
    to synchronise, e.g. work that returns host results). With `cuda_events`, the call is
    timed by CUDA events recorded before and after it on the current stream (the GPU's time
    for the work, without the host's synchronisation latency); the warm-up calls are then
    synchronised once, before the first timed call. `each`, if given, receives every call's
    result (warm-up calls too) outside the timed span, e.g. to check it; a result is
    dropped before the next call, so two never occupy memory at once.
    """
    for _ in range(warmup):
        result = fn()
        if each is not None:
            each(result)
        del result
    if cuda_events:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            sync(device)
            begin = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - begin)
        if each is not None:
            each(result)
        del result
    return times


def cuda_time(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of `fn` measured with CUDA events (`time_calls`), after `warmup`
    untimed calls."""
    return statistics.median(time_calls(fn, warmup=warmup, repeat=repeat, cuda_events=True))


# ------------------------------------------------------------------------------ shapes
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
        """Tokens of one sample: video frames plus the two reference frames."""
        return math.prod(self.grid(cfg))


def shapes_for_video(
    width: int, height: int, frames: int, batch: int = 1, text_len: int = 512
) -> Shapes:
    """Latent shapes of a video of `frames` frames (4k+1) at width x height pixels.

    The VAE has stride 4 in time and 8 in space, the patch 2x2 in space, hence the limits.
    Raises ValueError for other sizes (the model would reject them later, less clearly).
    """
    if (frames - 1) % 4 or width % 16 or height % 16:
        raise ValueError(
            f"video {width}x{height}x{frames}: frames must be 4k+1, width and height multiples of 16"
        )
    return Shapes(batch, (frames - 1) // 4 + 1, height // 8, width // 8, text_len)


# ------------------------------------------------------------------------------ FLOPs
def forward_flops(cfg: SteadyDancerConfig, shapes: Shapes) -> dict[str, float]:
    """FLOPs of the matrix products of one forward pass, by part, and their "total".

    Every product counts 2*m*n*k (one multiply and one add per multiply-add). Counted, with
    n tokens (video + 2 reference frames), ctx = cfg.text_len text rows + 257 CLIP rows:
    - self_attn_proj: q, k, v, o on every token (4 * 2 n d^2 per block);
    - self_attn_sdpa: scores Q K^T and P V (2 * 2 n^2 d per block);
    - cross_attn_proj: q, o on every token and k, v (text) / k_img, v_img (CLIP) on the
      context rows (2 * 2 n d^2 + 2 * 2 ctx d^2 per block);
    - cross_attn_sdpa: scores and values against the ctx rows (2 * 2 n ctx d per block);
    - ffn: the two FFN linears (2 * 2 n d f per block);
    - embeddings_head: the patch embeddings (video frames with in_dim + 2 in_dim_c channels,
      the two reference frames with in_dim and in_dim_c), the text embedding (two linears),
      the CLIP image embedding (two linears, for clip_x and clip_c) and the head (video
      tokens only).
    Not counted: the time embedding/projection (< 1 GFLOP per sample), the pose path
    (1x1 convolutions and the frame attention at latent resolution, ~0.03 TFLOP at
    832x480x81, < 0.01 %), norms, softmax, element-wise work and GGUF dequantisation. So
    TFLOP/s from this count is "useful matmul work per second". 14B at 832x480x81: 1.94 PFLOP.
    """
    b, d, f = shapes.batch, cfg.dim, cfg.ffn_dim
    n = shapes.tokens(cfg)
    n_frame = math.prod(shapes.grid(cfg)[1:])  # tokens of one latent frame
    n_video = n - 2 * n_frame
    ctx = cfg.text_len + CLIP_TOKENS
    per_block = {
        "self_attn_proj": 4 * 2 * n * d * d,
        "self_attn_sdpa": 2 * 2 * n * n * d,
        "cross_attn_proj": 2 * 2 * n * d * d + 2 * 2 * ctx * d * d,
        "cross_attn_sdpa": 2 * 2 * n * ctx * d,
        "ffn": 2 * 2 * n * d * f,
    }
    out = {k: float(b * cfg.num_layers * v) for k, v in per_block.items()}
    patch, c = math.prod(cfg.patch), cfg.in_dim_c
    out["embeddings_head"] = float(
        b
        * (
            2 * d * patch * (n_video * (cfg.in_dim + 2 * c) + n_frame * (cfg.in_dim + c))
            + 2 * cfg.text_len * d * (cfg.text_dim + d)  # text embedding
            + 2 * 2 * CLIP_TOKENS * (cfg.clip_dim * cfg.clip_dim + cfg.clip_dim * d)  # img_emb x2
            + 2 * n_video * d * cfg.out_dim * patch  # head
        )
    )
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------ weights
def packs(name: str, shape: tuple[int, ...], qtype: str, min_elements: int = 0) -> bool:
    """Whether a GGUF converter would store this tensor as `qtype` blocks: a 2-D `.weight`
    (a Linear's) whose rows fill whole blocks, of at least `min_elements` elements."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return (
        name.endswith(".weight")
        and len(shape) == 2
        and shape[-1] % block == 0
        and math.prod(shape) >= min_elements
    )


def random_packed(
    qtype: str,
    shape: tuple[int, ...],
    *,
    device: torch.device | str,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random `qtype` blocks for a weight of `shape`, as flat uint8 on `device`.

    Every byte is random except the fp16 scale fields, which get random finite values with
    the same bit pattern in every field of a block, sized so that the dequantised weights
    have an RMS of about 1/sqrt(fan_in) (fan_in = shape[-1]) whatever the type: each block's
    scale lies between 0.5x and 1.5x of 1 / (unit RMS * sqrt(fan_in)). The scales are drawn
    as integers straight into the buffer (fp16 bit patterns of positive values increase
    with the value), so nothing but the packed buffer itself is allocated.
    """
    import gguf

    if qtype not in PACKED_TYPES:
        raise ValueError(
            f"random packed weights: {qtype!r} is not one of {', '.join(PACKED_TYPES)}"
        )
    offsets, unit_rms = PACKED_TYPES[qtype]
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n_blocks = math.prod(shape) // block
    raw = torch.randint(
        0, 256, (n_blocks, size), dtype=torch.uint8, device=device, generator=generator
    )
    scale = 1.0 / (unit_rms * math.sqrt(shape[-1]))
    lo, hi = (
        int(torch.tensor(v, dtype=torch.float16).view(torch.int16))
        for v in (scale / 2, scale * 1.5)
    )
    fields = raw.view(torch.int16)  # block sizes and scale offsets are even: fields are columns
    first = fields[:, offsets[0] // 2]
    first.random_(lo, hi + 1, generator=generator)
    for offset in offsets[1:]:
        fields[:, offset // 2].copy_(first)
    return raw.reshape(-1)


def random_float(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
) -> torch.Tensor:
    """A random float parameter named `name`, made in `dtype` on `device` and scaled in place.

    Norm weights ~ 1 + 0.05 N(0,1), modulation tables 0.05 N(0,1), biases and other 1-D
    parameters 0.01 N(0,1), everything else N(0,1)/sqrt(fan_in): activations stay finite
    and of realistic size through all blocks.
    """
    t = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight" and len(shape) in (1, 4):
        return t.mul_(0.05).add_(1.0)
    if "modulation" in name:
        return t.mul_(0.05)
    if leaf.endswith("bias") or len(shape) == 1:
        return t.mul_(0.01)
    return t.mul_(1.0 / math.sqrt(max(math.prod(shape[1:]), 1)))


def random_weight(
    name: str,
    shape: tuple[int, ...],
    *,
    quant: str | None,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    min_elements: int = 0,
) -> torch.Tensor:
    """The random parameter `name`: a GGMLTensor of `quant` blocks where a converter would
    pack it (see `packs`), else a float tensor of `dtype` (see `random_float`)."""
    if quant is not None and packs(name, shape, quant, min_elements):
        from steadydancer.gguf.ops import GGMLTensor

        raw = random_packed(quant, shape, device=device, generator=generator)
        return GGMLTensor(raw, tensor_type=quant, tensor_shape=shape)
    return random_float(name, shape, dtype, device, generator)


# ------------------------------------------------------------------------------ inputs
def random_inputs(
    cfg: SteadyDancerConfig,
    shapes: Shapes,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    timestep: float = 500.0,
) -> dict[str, torch.Tensor]:
    """Keyword arguments of SteadyDancerDiT.forward: random latents and contexts of `dtype`."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, f, h, w = shapes.batch, shapes.frames, shapes.height, shapes.width

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=g)

    return {
        "x": rnd(b, cfg.out_dim, f, h, w),
        "t": torch.full((b,), timestep, device=device),
        "text": rnd(b, shapes.text_len, cfg.text_dim),
        "clip_x": rnd(b, CLIP_TOKENS, cfg.clip_dim),
        "clip_c": rnd(b, CLIP_TOKENS, cfg.clip_dim),
        "y": rnd(b, cfg.in_dim - cfg.out_dim, f, h, w),
        "pose": rnd(b, cfg.in_dim_c, f, h, w),
        "ref_x": rnd(b, cfg.in_dim, 1, h, w),
        "ref_c": rnd(b, cfg.in_dim, 1, h, w),
    }
