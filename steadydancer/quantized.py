"""Weights kept in a compact storage format and expanded per forward pass.

`QuantizedTensor` is the common ground of the compact formats: a torch tensor over the
stored data (packed GGML blocks, fp8 values) that remembers what it needs to expand itself
(`dequantize(dtype, device)`), keeps its type through device moves, `detach`, `clone` and
deep copies (so `Module.to()` and ComfyUI's patchers move the compact data, not a float
copy), and refuses dtype casts, which would read stored data as numbers. Layers that accept
such weights (`steadydancer.gguf.ops.GGMLOps`, the ComfyUI adapter's `GGUFOps`) call
`dequantize` on the compute device for each forward pass.

`Fp8Tensor` keeps a scaled-fp8 checkpoint's weights fp8 in memory: a 14B model is 16 GB
instead of 31 GB as bf16, on the host and on the GPU. Its values are the stored fp8 numbers
times the per-tensor (or per-row) scale, computed exactly as a load-time conversion computes
them (float32 product, rounded once to the compute dtype), so results do not change.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .errors import ModelFileError
from .fused import quantize_fp8

logger = logging.getLogger(__name__)

FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})

# Tensor methods whose result holds the same stored data (maybe elsewhere): keep the type.
_KEEP_SUBCLASS = frozenset(
    {
        "to",
        "cpu",
        "cuda",
        "detach",
        "detach_",
        "clone",
        "contiguous",
        "pin_memory",
        "share_memory_",
        "requires_grad_",
    }
)
# Casts: on stored data they would produce wrong numbers, so they are refused.
_CASTS = frozenset({"float", "half", "bfloat16", "double", "type", "type_as"})


class QuantizedTensor(torch.Tensor):
    """Base of compact weight tensors; subclasses name their attributes in `ATTRIBUTES`."""

    ATTRIBUTES: ClassVar[tuple[str, ...]] = ()
    ERROR: ClassVar[type[Exception]] = ModelFileError  # raised for refused casts

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # attributes are set in __new__
        super().__init__()

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _KEEP_SUBCLASS or name in _CASTS:
            src = next((a for a in args if isinstance(a, QuantizedTensor)), None)
            if src is not None and isinstance(out, torch.Tensor):
                if out.dtype != src.storage_dtype():
                    raise src.ERROR(
                        f"a {src.describe()} weight cannot be cast to {out.dtype}: "
                        "call .dequantize(dtype) to get float values"
                    )
                return _rewrap(out, src)
        return _strip(out)

    def storage_dtype(self) -> torch.dtype:
        """The dtype of the stored data (what device moves must keep)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Short name of the format, for messages (e.g. 'Q4_K', 'fp8 scaled')."""
        raise NotImplementedError

    def dequantize(  # type: ignore[override]
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The float tensor (float32 unless `dtype`), on `device` (default: where the data is)."""
        raise NotImplementedError

    def stored(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The stored data as a plain tensor, moved to `device` if given."""
        raw = self.as_subclass(torch.Tensor)
        if device is None:
            return raw
        device = torch.device(device)
        # Asynchronous only towards an accelerator: the kernels that follow are queued
        # behind the copy there, while a CPU consumer would read before it completes.
        return raw.to(device, non_blocking=device.type != "cpu")

    def attributes(self) -> dict[str, Any]:
        return {name: self.__dict__[name] for name in self.ATTRIBUTES}

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedTensor:
        if id(self) in memo:
            return memo[id(self)]
        new = _rebuild(
            type(self), self.as_subclass(torch.Tensor).detach().clone(), self.attributes()
        )
        if isinstance(self, torch.nn.Parameter):  # a parameter is the tensor itself, flagged
            new = torch.nn.Parameter(new, requires_grad=False)
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto: int) -> Any:
        # Pickled as the plain stored data plus the attributes.
        data = self.as_subclass(torch.Tensor).detach().clone()
        return (_rebuild, (type(self), data, self.attributes()))


def _rebuild(
    cls: type[QuantizedTensor], data: torch.Tensor, attributes: dict[str, Any]
) -> QuantizedTensor:
    return cls(data, **attributes)


def _rewrap(out: torch.Tensor, src: QuantizedTensor) -> QuantizedTensor:
    if isinstance(out, type(src)) and all(a in out.__dict__ for a in src.ATTRIBUTES):
        return out
    new = out.as_subclass(type(src))
    new.__dict__.update(src.attributes())
    return new


def _strip(out: Any) -> Any:
    """Results of other ops are plain tensors: stored data has no meaning after arithmetic."""
    if isinstance(out, QuantizedTensor):
        return out.as_subclass(torch.Tensor)
    if isinstance(out, (tuple, list)):
        return type(out)(_strip(o) for o in out)
    return out


class Fp8Tensor(QuantizedTensor):
    """fp8 values with a float32 `scale` (one value, or one per output row): value * scale."""

    ATTRIBUTES = ("scale",)
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, *, scale: torch.Tensor | float | None = None) -> Fp8Tensor:
        if data.dtype not in FP8_DTYPES:
            raise ModelFileError(f"Fp8Tensor holds float8 values, got a {data.dtype} tensor")
        scale = torch.ones(()) if scale is None else torch.as_tensor(scale)
        scale = scale.detach().to("cpu", torch.float32)
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif data.ndim >= 1 and scale.numel() == data.shape[0]:
            scale = scale.reshape(-1, *([1] * (data.ndim - 1)))  # one per output row
        else:
            raise ModelFileError(
                f"an fp8 scale of shape {tuple(scale.shape)} fits neither one value nor one per row "
                f"of the {tuple(data.shape)} weight"
            )
        out = torch.Tensor._make_subclass(cls, data, False)
        out.scale = scale
        return out

    def storage_dtype(self) -> torch.dtype:
        return self.as_subclass(torch.Tensor).dtype

    def describe(self) -> str:
        return "fp8 scaled"

    def dequantize(  # type: ignore[override]
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        dtype = dtype or torch.float32
        raw = self.stored(device)
        if self.scale.ndim == 0:
            # fp8 values are exact in bf16/fp16/fp32, and a 0-dim float32 scale is applied in
            # float32 with one rounding to `dtype`: the load-time conversion's numbers.
            return raw.to(dtype) * self.scale
        return (raw.to(torch.float32) * self.scale.to(raw.device, non_blocking=True)).to(dtype)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (
            f"Fp8Tensor({self.storage_dtype()}, shape={tuple(self.shape)}, "
            f"scale={tuple(self.scale.shape) or 'per tensor'}, device={self.device})"
        )


def is_quantized(tensor: Any) -> bool:
    """True for weights in a compact format (GGML blocks, scaled fp8), False otherwise."""
    return isinstance(tensor, QuantizedTensor)


def dequantize_tensor(
    tensor: torch.Tensor, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Float values of a compact or a plain tensor, in `dtype` on `device` (None: unchanged)."""
    if isinstance(tensor, QuantizedTensor):
        return tensor.dequantize(dtype, device)
    return tensor.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- fp8 matmul (opt-in)
FP8_MATMUL_ENV = "STEADYDANCER_FP8_MATMUL"


def fp8_matmul_enabled() -> bool:
    """True when `STEADYDANCER_FP8_MATMUL=1`: fp8 weights multiply in fp8 (lossy, opt-in)."""
    return os.environ.get(FP8_MATMUL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor cores (NVIDIA sm89 and newer), or the CPU kernel (for tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


@functools.cache
def _warn_cpu_once() -> None:
    logger.warning(
        "%s=1 on the CPU: PyTorch's fp8 matrix product there is a slow reference kernel "
        "(hundreds of times slower); it is meant for GPUs with fp8 tensor cores (sm89+)",
        FP8_MATMUL_ENV,
    )


def fp8_matmul_applies(weight: Any, device: torch.device) -> bool:
    """True where `fp8_linear` multiplies `weight` in fp8 on `device`: a 2-D e4m3 weight with
    one scale, sizes the fp8 kernels take (multiples of 16), a device with fp8 matrix units."""
    return (
        isinstance(weight, Fp8Tensor)
        and weight.ndim == 2
        and weight.scale.ndim == 0
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 16 == 0
        and weight.storage_dtype() == torch.float8_e4m3fn
        and fp8_matmul_supported(device)
    )


def fp8_linear(
    x: torch.Tensor, weight: Fp8Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """`x @ weight.T + bias` as one fp8 matrix product (`torch._scaled_mm`), or None where it
    does not apply (then the caller expands the weight as usual).

    The input is quantised to e4m3 with one scale for the whole tensor (its max |x| / 448), so
    the result differs from the expanded weight's product by the input's rounding (about 2^-4
    relative per element); that is why it is opt-in. Applies to 2-D weights with one scale
    and sizes the fp8 kernels take (multiples of 16), on devices with fp8 matrix units.
    """
    if not fp8_matmul_applies(weight, x.device) or x.shape[-1] != weight.shape[1]:
        return None
    out_features, in_features = weight.shape
    if x.device.type == "cpu":
        _warn_cpu_once()
    # Few passes over the activations: on the GPU these passes, not the product, decided the
    # speed (H100, 14B: quantising a 35,880 x 5120 input in four passes took 0.97 ms against
    # 1.32 ms for its fp8 product), see `quantize_fp8`. It is given x itself, not a reshaped
    # view: what is known about x (its largest value, its fp8 form for q, k and v) is kept
    # with the tensor object.
    x_fp8, x_scale = quantize_fp8(x)
    w_fp8 = weight.stored(x.device)
    w_scale = weight.scale.to(x.device, non_blocking=True)
    # one scale for the whole input, not one per row: on an H100 PyTorch's row-wise scaled
    # products ran 25-30 % slower than the tensor-wise one at these sizes
    out = torch._scaled_mm(
        x_fp8.reshape(-1, in_features),
        w_fp8.t(),  # column-major, as the kernel wants its second operand
        scale_a=x_scale.reshape(()),
        scale_b=w_scale,
        bias=None if bias is None else bias.to(x.dtype),
        out_dtype=x.dtype,
    )
    return out.reshape(*x.shape[:-1], out_features)
