"""Fused element-wise work of the DiT: one GPU kernel where PyTorch runs a chain.

The blocks' residual updates and normalisations (with modulation and RoPE), the FFN's GELU,
and the input quantisation of the opt-in fp8 matrix products (`quantize_fp8`, at the end).

Why: at 14B and 832x480x81 a block's activations are 35,880 tokens x 5120 channels, and
every element-wise PyTorch operation on them is a full pass over GPU memory (0.7 GB in
float32 per sample). Unfused, each block runs about 50 such passes around its norms alone:
- each residual update (x += y * gate, float32 x, bf16 y), then LayerNorm of x, times
  (1 + scale), plus shift, cast to the compute dtype: five kernels, at half the memory
  bandwidth for PyTorch's mixed-dtype addcmul_;
- on q and k, RMSNorm (a reduction, a product, a product with the weight) and RoPE (a cast
  to float32, a complex product, a copy back), the RoPE in chunks: about 50 kernels;
- before each fp8 product, a pass to find max |input| and a pass to scale and cast, for
  each of q, k and v although they read one input.
Here the residual update and the norm after it are one kernel that reads its row once and
writes it once; the norms and GELU note the largest magnitude they wrote, so the fp8
quantisation that follows is a single pass, done once per input (see `quantize_fp8`).

The maths is the unfused path's, in the same precision: float32 statistics and products,
and for RMSNorm the same two roundings to the compute dtype (after normalising, after the
weight), so results agree to float32 rounding (a compute-dtype result differs by at most
one unit in its last place, where float32 sums in another order round the other way).

Each function takes its fused kernel for CUDA tensors when Triton imports and
STEADYDANCER_FUSED_KERNELS is not 0/false/off/no, and the PyTorch expressions otherwise
(CPU, Windows without Triton). A kernel that fails to compile (an unusual GPU or Triton) is
switched off for the rest of the process with one warning, and the call is answered by the
PyTorch path.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_SWITCH = "STEADYDANCER_FUSED_KERNELS"
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROPE_CHUNK_ELEMENTS = 1 << 24  # elements rotated at once by the PyTorch path

_broken: set[str] = set()
_lock = threading.Lock()


def enabled() -> bool:
    """The fused kernels are on unless STEADYDANCER_FUSED_KERNELS is 0/false/off/no."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _kernels() -> Any | None:
    """The Triton kernels module, or None where Triton does not import."""
    try:
        from . import _fused_kernels
    except ImportError:
        return None
    return _fused_kernels


def _use_kernel(name: str, *tensors: torch.Tensor) -> Any | None:
    """The kernel `name` if it should run on these tensors, else None (PyTorch path).

    Each tensor's rows must be contiguous (its last axis of stride 1; the kernels take the
    strides of the other axes where they allow them, else the caller passes contiguous ones).
    """
    if not enabled() or name in _broken:
        return None
    on_device = all(t.device.type == "cuda" for t in tensors) or _interpreting()
    if not on_device or not all(t.stride(-1) == 1 for t in tensors):
        return None
    kernels = _kernels()
    return None if kernels is None else getattr(kernels, name)


def _launch(name: str, kernel: Any, grid: tuple[int], device: torch.device, *args: Any, **meta: Any) -> bool:
    """Run a kernel; False (and the kernel switched off, one warning) if it cannot run here."""
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)
    except Exception as exc:  # Triton raises many types when it cannot compile
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        with _lock:
            _broken.add(name)
        logger.warning(
            "SteadyDancer: the fused %s kernel does not run here (%s: %s); using PyTorch's "
            "kernels for the rest of this run (set %s=0 to skip the attempt)",
            name, type(exc).__name__, exc, ENV_SWITCH,
        )
        return False
    return True


def _block(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


# ----------------------------------------------------------------------- LayerNorm (+ residual)
def _per_sample(t: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """A modulation row per sample as a contiguous [B, C] tensor (one row is shared by all)."""
    rows = t.reshape(-1, c)
    if rows.shape[0] not in (1, b):
        raise ValueError(f"modulation of shape {tuple(t.shape)} for a batch of {b}")
    return rows.expand(b, c).contiguous()


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
    *,
    add: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm of x over its last axis (no affine), times (1 + scale), plus shift, in `dtype`.

    x: float32 [B, L, C]; shift and scale: float32, one row per sample ([B, 1, C] or [B, C]).
    With `add` ([B, L, C]), x first becomes x + add (times `gate`, one row per sample), in
    place: the residual update before the norm, in the same pass. The result is a new tensor
    of x's shape in `dtype`.
    """
    b, _, c = x.shape
    return _layer_norm(x, _per_sample(scale, b, c), _per_sample(shift, b, c), 1.0, eps, dtype, add, gate)


def layer_norm_affine(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
    *,
    add: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm of x over its last axis with an elementwise weight and bias, in `dtype`;
    x, `add` and `gate` as for `layer_norm_modulate`."""
    c = x.shape[-1]
    weight = weight.to(device=x.device, dtype=torch.float32).reshape(1, c)
    bias = bias.to(device=x.device, dtype=torch.float32).reshape(1, c)
    return _layer_norm(x, weight, bias, 0.0, eps, dtype, add, gate)


def _layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    one_plus: float,
    eps: float,
    dtype: torch.dtype,
    add: torch.Tensor | None,
    gate: torch.Tensor | None,
) -> torch.Tensor:
    """LayerNorm(x) * (one_plus + weight) + bias; weight and bias [1 or B, C] float32."""
    b, n, c = x.shape
    if gate is not None:
        gate = _per_sample(gate, b, c)
    tensors = [x, weight, bias] + [t for t in (add, gate) if t is not None]
    kernel = _use_kernel("layer_norm_rows", *tensors)
    if (
        kernel is not None
        and x.dtype == torch.float32
        and weight.dtype == bias.dtype == torch.float32
        and dtype in FUSED_DTYPES
        and x.numel() > 0
        and (add is None or _adds_in_place(x, add))
    ):
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        row_amax = torch.empty(b * n, dtype=torch.float32, device=x.device)
        block = _block(c)
        args = (
            x, x if add is None else add, weight if gate is None else gate, weight, bias, out,
            row_amax, n, x.stride(0), x.stride(1), c if weight.shape[0] == b > 1 else 0, c, float(eps),
        )
        meta: dict[str, Any] = {
            "ONE_PLUS": one_plus, "ADD": add is not None, "GATE": gate is not None, "BLOCK": block,
        }
        if x.is_cuda:
            meta["num_warps"] = _num_warps(block)
        if _launch("layer_norm_rows", kernel, (b * n,), x.device, *args, **meta):
            remember_amax(out, row_amax)
            return out
    if add is not None:
        add_residual(x, add, gate)
    normed = F.layer_norm(x, (c,), eps=eps)
    return normed.mul_(one_plus + weight[:, None]).add_(bias[:, None]).to(dtype)


def _adds_in_place(x: torch.Tensor, add: torch.Tensor) -> bool:
    """Whether a kernel can add `add` into x's rows in place (it indexes both as [rows, C])."""
    return x.is_contiguous() and add.is_contiguous() and add.shape == x.shape


def add_residual(x: torch.Tensor, add: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x += add (times `gate`, one row per sample) in place, in float32; returns x.

    x: float32 [B, L, C]; add: [B, L, C] in any float dtype; gate: float32 [B, 1, C] or [B, C].
    """
    b, n, c = x.shape
    if gate is not None:
        gate = _per_sample(gate, b, c)
    tensors = [x, add] if gate is None else [x, add, gate]
    kernel = _use_kernel("add_rows", *tensors)
    if (
        kernel is not None
        and x.dtype == torch.float32
        and _adds_in_place(x, add)
        and x.numel() > 0
    ):
        block = min(_block(c), 4096)
        grid = (b * n, _cdiv(c, block))
        args = (x, add, x if gate is None else gate, n, c)
        meta: dict[str, Any] = {"GATE": gate is not None, "BLOCK": block}
        if x.is_cuda:
            meta["num_warps"] = 4
        if _launch("add_rows", kernel, grid, x.device, *args, **meta):
            return x
    return x.add_(add) if gate is None else x.addcmul_(add, gate[:, None])


# ----------------------------------------------------------------------- GELU
GELU_BLOCK = 4096  # elements per program


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (as nn.GELU(approximate="tanh")), a new tensor like x.

    The fused kernel also notes the result's largest magnitude for a following fp8 product
    (see `quantize_fp8`), which then skips its own pass to find it.
    """
    kernel = _use_kernel("gelu_tanh", x) if x.is_contiguous() else None
    if kernel is not None and x.dtype in FUSED_DTYPES and x.numel() > 0:
        out = torch.empty_like(x)
        grid = (_cdiv(x.numel(), GELU_BLOCK),)
        partial_amax = torch.empty(grid[0], dtype=torch.float32, device=x.device)
        meta = {"BLOCK": GELU_BLOCK, "num_warps": 8} if x.is_cuda else {"BLOCK": GELU_BLOCK}
        if _launch("gelu_tanh", kernel, grid, x.device, x, out, partial_amax, x.numel(), **meta):
            remember_amax(out, partial_amax)
            return out
    return F.gelu(x, approximate="tanh")


# ----------------------------------------------------------------------- RMSNorm and RoPE
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, rope: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x [B, L, C] over its last axis times `weight`, then RoPE if `rope` is given.

    As WanRMSNorm: float32 statistics, the normalised values rounded to x's dtype, then
    multiplied by the weight in x's dtype. `rope` is a complex64 table [L, D/2] (see
    `model.rope_table`) for heads of D channels: channel pairs (2m, 2m+1) of every head are
    rotated in float32 and rounded to x's dtype. The result is a new tensor like x.
    """
    b, n, c = x.shape
    pairs_per_head = 1 if rope is None else rope.shape[-1]
    if rope is not None and (rope.shape[0] != n or c % (2 * pairs_per_head)):
        raise ValueError(
            f"RoPE table {tuple(rope.shape)} does not fit {n} tokens of {c} channels"
        )
    weight = weight.to(device=x.device, dtype=torch.float32)
    table = None if rope is None else torch.view_as_real(rope.to(x.device, torch.complex64))
    tensors = (x, weight) if table is None else (x, weight, table)
    kernel = _use_kernel("rms_norm_rope", *tensors) if all(t.is_contiguous() for t in tensors) else None
    if kernel is not None and x.dtype in FUSED_DTYPES and x.numel() > 0 and c % 2 == 0:
        out = torch.empty_like(x)
        block = _block(c // 2)
        args = (x, weight, weight if table is None else table, out, n, c, float(eps))
        meta: dict[str, Any] = {"PAIRS_PER_HEAD": pairs_per_head, "ROPE": table is not None, "BLOCK": block}
        if x.is_cuda:
            meta["num_warps"] = _num_warps(block)
        if _launch("rms_norm_rope", kernel, (b * n,), x.device, *args, **meta):
            return out
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    inv = torch.rsqrt(norm.square_().div_(c).add_(eps))
    out = torch.mul(x, inv, out=torch.empty_like(x)).mul_(weight.to(x.dtype))
    if rope is None:
        return out
    return apply_rope(out.view(b, n, -1, 2 * pairs_per_head), rope).view(b, n, c)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2m, 2m+1) of x [B, L, H, D] by table [L, D/2] (float32 maths).

    Works through the tokens in chunks so that the complex float32 temporaries stay small
    whatever the sequence length; the result is written into a tensor of x's dtype.
    """
    b, n, h, d = x.shape
    out = torch.empty_like(x)
    step = max(1, ROPE_CHUNK_ELEMENTS // (b * h * d))
    for start in range(0, n, step):
        part = x[:, start : start + step].float().unflatten(-1, (-1, 2))
        rotated = torch.view_as_complex(part) * table[start : start + step, None, :]
        out[:, start : start + step] = torch.view_as_real(rotated).flatten(-2)
    return out


# ----------------------------------------------------------------------- fp8 input quantisation
FP8_BLOCK = 4096  # elements per program of the fp8 cast


class _Note:
    """What is known about one activation: its largest magnitude (partial maxima, as the
    kernel that wrote it found them) and, once quantised, its fp8 values and scale."""

    def __init__(self, tensor: torch.Tensor, partial_amax: torch.Tensor | None) -> None:
        known: dict[str, Any] = {"partial_amax": partial_amax}
        self.known = known
        # Dropped with the activation, so no fp8 copy outlives it. The callback holds the
        # dict, not the note: a note that is replaced is freed at once (no reference cycle
        # that only the garbage collector would break, holding GPU memory until it runs).
        self.ref = weakref.ref(tensor, lambda _: known.clear())
        self.version = _version(tensor)

    @property
    def partial_amax(self) -> torch.Tensor | None:
        return self.known.get("partial_amax")

    @property
    def fp8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.known.get("fp8")

    def describes(self, tensor: torch.Tensor) -> bool:
        return self.ref() is tensor and self.version == _version(tensor)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


_notes = threading.local()  # the last activation noted in this thread (one at a time)


def remember_amax(tensor: torch.Tensor, partial_amax: torch.Tensor) -> None:
    """Note that max |tensor| is partial_amax.max() (a kernel found it while writing tensor)."""
    _notes.last = _Note(tensor, partial_amax)


def _noted(tensor: torch.Tensor) -> _Note | None:
    note = getattr(_notes, "last", None)
    return note if note is not None and note.describes(tensor) else None


def forget(tensor: torch.Tensor) -> None:
    """Drop what is noted about `tensor` (its fp8 copy above all), once no product will read it
    again: the self-attention input's copy would otherwise live through the attention."""
    note = _noted(tensor)
    if note is not None:
        note.known.clear()


def quantize_fp8(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """x as `fp8_dtype` with one float32 scale for the whole tensor: (values, scale), x ~ values * scale.

    The scale is max|x| / the format's largest value (at least 1e-12). The largest magnitude
    comes from the kernel that wrote x where one noted it (the fused norms and GELU), else
    from one pass over x; on CUDA with Triton one more pass multiplies by the inverse scale
    in float32 and casts, saturating (unfused: a bf16 product and a cast, two more passes).
    The result is kept with x (one activation per thread): the q, k and v products of one
    input quantise it once. Nothing is read back to the host. x must not be changed in place
    while the next products read it (the model's blocks never do).
    """
    note = _noted(x)
    if note is not None and note.fp8 is not None and note.fp8[0].dtype == fp8_dtype:
        return note.fp8
    if note is None:
        note = _notes.last = _Note(x, None)
    fp8_max = torch.finfo(fp8_dtype).max
    if note.partial_amax is not None:
        amax = note.partial_amax.amax()
    else:
        low, high = torch.aminmax(x)
        amax = torch.maximum(high, low.neg())
    scale = (amax.float() / fp8_max).clamp_min(1e-12)
    result = (_scale_to_fp8(x, scale, fp8_dtype), scale)
    note.known["fp8"] = result
    return result


def _scale_to_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    kernel = _use_kernel("scale_to_fp8", x) if x.is_contiguous() else None
    if kernel is not None and x.dtype in FUSED_DTYPES and x.numel() > 0:
        out = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
        inverse = scale.reciprocal().reshape(1)
        grid = (_cdiv(x.numel(), FP8_BLOCK),)
        meta = {"FP8_MAX": torch.finfo(fp8_dtype).max, "BLOCK": FP8_BLOCK}
        if x.is_cuda:
            meta["num_warps"] = 8
        if _launch("scale_to_fp8", kernel, grid, x.device, x, inverse, out, x.numel(), **meta):
            return out
    # bf16 scaling rounds the inverse scale by at most 2^-8: the largest value lands below 450,
    # which e4m3 rounds to 448 (only from 464 on would it give NaN), so no clamp pass is needed
    return (x * scale.reciprocal().to(x.dtype)).to(fp8_dtype)


# ----------------------------------------------------------------------- stochastic rounding to fp8
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
E4M3_MIN_NORMAL = 2.0**-6  # below it e4m3 values are multiples of 2^-9
_DROPPED_BITS = 20  # float32 mantissa bits e4m3 does not keep (23 - 3)


def stochastic_round_fp8(x: torch.Tensor, scale: torch.Tensor, seed: int) -> torch.Tensor:
    """x / scale as float8 e4m3, each value rounded up or down at random so that its mean is
    exact: a value a quarter of the way from one e4m3 value to the next becomes the upper one
    with probability 1/4. Values beyond e4m3's range saturate at +-448.

    Why: a LoRA's change to a weight is often smaller than e4m3's step (2^-3 relative), so
    rounding to nearest would drop most of it; random rounding keeps it on average over the
    thousands of products in each output. `seed` makes the result repeatable. `scale`: a
    float32 tensor of one value on x's device. One pass on CUDA with Triton; the PyTorch path
    draws its random numbers from another generator, so the two agree in distribution only.
    """
    inverse = scale.to(device=x.device, dtype=torch.float32).reciprocal().reshape(1)
    kernel = _use_kernel("stochastic_round_e4m3", x) if x.is_contiguous() else None
    if kernel is not None and x.dtype in FUSED_DTYPES and x.numel() > 0:
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        grid = (_cdiv(x.numel(), FP8_BLOCK),)
        meta = {"BLOCK": FP8_BLOCK, "num_warps": 8} if x.is_cuda else {"BLOCK": FP8_BLOCK}
        args = (x, inverse, out, x.numel(), seed)
        if _launch("stochastic_round_e4m3", kernel, grid, x.device, *args, **meta):
            return out
    values = (x.float() * inverse).clamp_(-E4M3_MAX, E4M3_MAX)
    magnitude = values.abs()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(
        0, 1 << _DROPPED_BITS, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    normal = (magnitude.view(torch.int32) + noise).bitwise_and_(-(1 << _DROPPED_BITS)).view(torch.float32)
    subnormal = torch.floor(magnitude * 512.0 + noise.float() / (1 << _DROPPED_BITS)) / 512.0
    rounded = torch.where(magnitude < E4M3_MIN_NORMAL, subnormal, normal).clamp_max_(E4M3_MAX)
    return rounded.copysign_(values).to(torch.float8_e4m3fn)
