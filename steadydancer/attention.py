"""Attention backends, chosen at run time.

Every backend computes softmax(q k^T / sqrt(D)) v, non-causal, without a mask, on tensors
in the [B, L, H, D] layout (batch, tokens, heads, head dim), and returns the same layout.
What differs is speed, memory and where it runs:

| name           | package                          | runs on                              |
| -------------- | -------------------------------- | ------------------------------------ |
| flash_attn_4   | `flash_attn.cute` (PyPI flash-attn-4) | CUDA sm90/sm100 (Hopper, Blackwell), fp16/bf16, D 64/96/128 |
| flash_attn_3   | `flash_attn_interface` (FA3)      | CUDA sm90 (Hopper), fp16/bf16        |
| flash_attn_2   | `flash_attn`                      | CUDA sm80+, fp16/bf16                |
| xformers       | `xformers` (memory-efficient)     | CUDA, fp16/bf16/fp32                 |
| sage           | `sageattention` (INT8 QK, lossy)  | CUDA sm80+, fp16/bf16, D in 64/96/128 |
| sdpa           | PyTorch                           | everywhere                           |
| math           | PyTorch, written out, chunked     | everywhere (the reference)           |

`auto` takes the first installed backend of `auto_order(device)` (AUTO_ORDER; on Hopper
SDPA moves up, measured faster there) that supports the tensors' device, dtype and head size. SageAttention quantises q and k to 8 bits, which changes the
result beyond bf16 noise, so `auto` never picks it: ask for it by name. A backend that
raises when called (a wheel built for another GPU, a kernel without this shape) is dropped
for the rest of the run with one warning and the next one is used; an explicitly chosen
backend is never replaced silently: it raises AttentionBackendError instead.
`STEADYDANCER_ATTENTION` sets the backend used where "auto" is asked for.
Optional packages are imported only when a backend is first considered.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import AttentionBackendError

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ENV_VAR = "STEADYDANCER_ATTENTION"
BACKENDS: tuple[str, ...] = ("flash_attn_4", "flash_attn_3", "flash_attn_2", "xformers", "sage", "sdpa", "math")
# Fastest first before Hopper (FA2 ~ SDPA's own flash kernel > xformers); sage is opt-in (lossy).
AUTO_ORDER: tuple[str, ...] = ("flash_attn_3", "flash_attn_2", "xformers", "sdpa", "math")
# On Hopper PyTorch's SDPA dispatches to cuDNN's attention, which beat FA2-class kernels there
# (H100, torch 2.11, 14B self-attention: SDPA 581 TFLOP/s, its FA2 kernel alone 354; see
# docs/benchmarks.md), so there it goes right after FA3.
# FlashAttention-4 (CuTe kernels for sm90/sm100) beat cuDNN there: one 35,880-token 14B
# self-attention in 39.5 ms against 46.7 ms on an H200 (667 against 565-573 TFLOP/s).
HOPPER_AUTO_ORDER: tuple[str, ...] = ("flash_attn_4", "flash_attn_3", "sdpa", "flash_attn_2", "xformers", "math")


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The order `auto` tries backends in on this device (fastest first)."""
    if device.type == "cuda" and cuda_capability(device)[0] >= 9:
        return HOPPER_AUTO_ORDER
    return AUTO_ORDER

_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32})

# Scores computed at once by the math backend (elements): bounds its memory at any length.
MATH_CHUNK_ELEMENTS = 1 << 26


# ---------------------------------------------------------------------------- the backends
# FlashAttention-4 compiles its kernels at the first call of each shape in a process (seconds
# per shape); its own disk cache, off unless asked for, makes that once per machine. Read when
# flash_attn.cute is imported; a value the user set is kept.
FA4_DISK_CACHE_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


def _flash_attn_4() -> AttentionFn:
    os.environ.setdefault(FA4_DISK_CACHE_ENV, "1")
    from flash_attn.cute import flash_attn_func

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_func(q, k, v, causal=False)
        return out[0] if isinstance(out, tuple) else out  # (out, lse) in some releases

    return run


def _flash_attn_3() -> AttentionFn:
    import flash_attn_interface

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_interface.flash_attn_func(q, k, v, causal=False)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE

    return run


def _flash_attn_2() -> AttentionFn:
    from flash_attn import flash_attn_func

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attn_func(q, k, v, dropout_p=0.0, causal=False)

    return run


def _xformers() -> AttentionFn:
    import xformers
    from xformers.ops import memory_efficient_attention

    if getattr(xformers, "_has_cpp_library", True) is False:
        # Seen on an H100 with torch 2.11 and xformers 0.0.35 (built for torch 2.10): the
        # import works, every call raises "No operator found". Treat it as not installed.
        raise RuntimeError(
            f"xformers {getattr(xformers, '__version__', '?')} imports but its compiled ops do not "
            f"load with torch {torch.__version__}; install the xformers build made for this torch"
        )

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return memory_efficient_attention(q, k, v)

    return run


def _sage() -> AttentionFn:
    from sageattention import sageattn

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return run


# PyTorch's SDPA kernels in the order tried on Hopper (sm90) and datacenter Blackwell (sm100),
# where cuDNN's is the fastest; elsewhere (Ada, Ampere, consumer Blackwell) PyTorch's order stays.
CUDNN_FIRST_MAJORS = (9, 10)
SDPA_HOPPER_PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
_SDPA_ENABLED = {  # each kernel's global switch (torch.backends.cuda.enable_*_sdp)
    "CUDNN_ATTENTION": "cudnn_sdp_enabled",
    "FLASH_ATTENTION": "flash_sdp_enabled",
    "EFFICIENT_ATTENTION": "mem_efficient_sdp_enabled",
    "MATH": "math_sdp_enabled",
}


def sdpa_priority(device: torch.device) -> list | None:
    """The SDPA kernel order to ask for on `device`, or None to leave PyTorch's own.

    On sm90 PyTorch prefers cuDNN's kernel only while nobody has set a priority order; once
    any code has (ComfyUI does, around its own attention calls), its flash kernel comes
    first: 1.6x slower for this model's self-attention (measured in a ComfyUI server on an
    H100). So there, and on sm100, the order is asked for on every call. Kernels switched off
    globally stay off.
    """
    if device.type != "cuda" or cuda_capability(device)[0] not in CUDNN_FIRST_MAJORS:
        return None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if "set_priority" not in _signature_parameters(sdpa_kernel):
        return None
    return [
        getattr(SDPBackend, name)
        for name in SDPA_HOPPER_PRIORITY
        if getattr(torch.backends.cuda, _SDPA_ENABLED[name])()
    ] or None


@functools.cache
def _signature_parameters(fn: Callable) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(inspect.unwrap(fn)).parameters)


def _sdpa() -> AttentionFn:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        order = sdpa_priority(q.device)
        if order is None:
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    return run


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: softmax(q k^T / sqrt(D)) v with float32 scores, in query chunks."""
    b, lq, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    kt = k.permute(0, 2, 3, 1).float()  # [B, H, D, Lk]
    vt = v.transpose(1, 2).float()  # [B, H, Lk, D]
    out = torch.empty_like(q)
    chunk = max(1, MATH_CHUNK_ELEMENTS // max(1, b * h * k.shape[1]))
    for start in range(0, lq, chunk):
        qc = q[:, start : start + chunk].transpose(1, 2).float()  # [B, H, c, D]
        probs = torch.softmax((qc @ kt).mul_(scale), dim=-1)
        out[:, start : start + chunk] = (probs @ vt).transpose(1, 2).to(q.dtype)
    return out


def _math() -> AttentionFn:
    return math_attention


@dataclass(frozen=True)
class BackendSpec:
    """What a backend needs: its loader, devices, dtypes, head sizes and GPU generation."""

    name: str
    load: Callable[[], AttentionFn]  # imports the package; raises ImportError when absent
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    head_dim_ok: Callable[[int], bool]
    min_capability: tuple[int, int] | None = None  # CUDA compute capability, inclusive
    max_capability: tuple[int, int] | None = None
    package: str = ""  # what to pip install, for messages

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """None if this backend can run these tensors, else the reason why not."""
        if device.type not in self.devices:
            return f"runs on {'/'.join(sorted(self.devices))}, not {device.type}"
        if dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"supports {names}, not {str(dtype).removeprefix('torch.')}"
        if not self.head_dim_ok(head_dim):
            return f"does not support head size {head_dim}"
        if device.type == "cuda" and (self.min_capability or self.max_capability):
            cap = cuda_capability(device)
            if self.min_capability and cap < self.min_capability:
                return (
                    f"needs a GPU of compute capability >= {self.min_capability}, this one is {cap}"
                )
            if self.max_capability and cap > self.max_capability:
                return (
                    f"needs a GPU of compute capability <= {self.max_capability}, this one is {cap}"
                )
        return None


def _flash_head(d: int) -> bool:
    return d % 8 == 0 and d <= 256


SPECS: dict[str, BackendSpec] = {
    "flash_attn_4": BackendSpec(
        "flash_attn_4",
        _flash_attn_4,
        frozenset({"cuda"}),
        _HALF,
        lambda d: d in (64, 96, 128),
        (9, 0),
        (10, 3),  # sm90 and sm100/sm103; not the consumer Blackwell sm120
        "flash-attn-4",
    ),
    "flash_attn_3": BackendSpec(
        "flash_attn_3",
        _flash_attn_3,
        frozenset({"cuda"}),
        _HALF,
        _flash_head,
        (9, 0),
        (9, 9),
        "flash-attn 3 (hopper/ of the flash-attention repository)",
    ),
    "flash_attn_2": BackendSpec(
        "flash_attn_2",
        _flash_attn_2,
        frozenset({"cuda"}),
        _HALF,
        _flash_head,
        (8, 0),
        None,
        "flash-attn",
    ),
    "xformers": BackendSpec(
        "xformers",
        _xformers,
        frozenset({"cuda"}),
        _FLOAT,
        lambda d: d % 8 == 0 and d <= 256,
        None,
        None,
        "xformers",
    ),
    "sage": BackendSpec(
        "sage",
        _sage,
        frozenset({"cuda"}),
        _HALF,
        lambda d: d in (64, 96, 128),
        (8, 0),
        None,
        "sageattention",
    ),
    "sdpa": BackendSpec(
        "sdpa", _sdpa, frozenset({"cuda", "cpu", "mps", "xpu"}), _FLOAT, lambda d: True
    ),
    "math": BackendSpec(
        "math", _math, frozenset({"cuda", "cpu", "mps", "xpu"}), _FLOAT, lambda d: True
    ),
}


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (tests replace this to pretend a GPU)."""
    return torch.cuda.get_device_capability(device)


def _import_isolated(load: Callable[[], AttentionFn]) -> AttentionFn:
    """Run a backend's import in a worker thread and return (or raise) its result.

    Why a thread: some packages keep the exception of a failed step of their import (xformers
    does when its compiled ops do not match the installed torch), and that traceback pins
    every frame under the import, with their locals. Backends are imported lazily, i.e.
    inside the first forward pass, so the pinned locals were the forward's activations: 2.9
    GiB for the 14B model at 832x480x81, for the rest of the process (measured on an H100,
    docs/benchmarks.md). A thread's frames end at the thread, so nothing of the caller is
    reachable from such a traceback.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["fn"] = load()
        except BaseException as exc:  # re-raised below, in the caller's thread
            result["exc"] = exc

    worker = threading.Thread(target=work, name="steadydancer-attention-import", daemon=True)
    worker.start()
    worker.join()
    if "exc" in result:
        raise result.pop("exc")
    return result["fn"]


@functools.cache
def _loaded(name: str) -> AttentionFn | None:
    try:
        return _import_isolated(SPECS[name].load)
    except ImportError:
        return None
    except Exception as exc:  # a broken install (ABI mismatch) counts as not installed
        logger.warning("attention backend %s is installed but cannot be imported: %s", name, exc)
        return None


def is_installed(name: str) -> bool:
    """True when the backend's package imports (cached for the process)."""
    return _loaded(name) is not None


def available_backends(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Installed backends that support this device, dtype and head size, in BACKENDS order."""
    device = torch.device(device)
    return [
        n
        for n in BACKENDS
        if SPECS[n].supports(device, dtype, head_dim) is None and is_installed(n)  # no GPU package imported on a CPU
    ]


def resolve_choice(backend: str | None) -> str:
    """The backend name to use: an explicit name, or the env default where "auto"/None is given."""
    choice = (backend or "auto").strip().lower()
    if choice == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env != "auto" and env not in BACKENDS:
                raise AttentionBackendError(
                    f"{ENV_VAR}={env!r} is not an attention backend; use one of auto, {', '.join(BACKENDS)}"
                )
            choice = env
    if choice != "auto" and choice not in BACKENDS:
        raise AttentionBackendError(
            f"unknown attention backend {backend!r}; use one of auto, {', '.join(BACKENDS)}"
        )
    return choice


class AttentionDispatcher:
    """Attention on [B, L, H, D] tensors through the chosen (or best available) backend.

    `backend_used` is the name of the backend that computed the last call (None before the
    first). One dispatcher belongs to one model; its list of dropped backends lives as
    long as it does.
    """

    def __init__(self, backend: str | None = None) -> None:
        self.choice = resolve_choice(backend)
        self.backend_used: str | None = None
        self.dropped: set[str] = set()
        if self.choice != "auto" and not is_installed(self.choice):
            spec = SPECS[self.choice]
            raise AttentionBackendError(
                f"attention backend {self.choice!r} is not installed here: `pip install {spec.package}` "
                "(or choose 'auto' / 'sdpa')"
            )

    @property
    def explicit(self) -> bool:
        return self.choice != "auto"

    def candidates(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
        """Backends to try, in order, for tensors of this kind."""
        if self.explicit:
            reason = SPECS[self.choice].supports(device, dtype, head_dim)
            if reason is not None:
                raise AttentionBackendError(
                    f"attention backend {self.choice!r} {reason}; choose 'auto' or another backend"
                )
            return [self.choice]
        return [
            n
            for n in auto_order(device)
            if n not in self.dropped
            and SPECS[n].supports(device, dtype, head_dim) is None
            and is_installed(n)  # checked last: a GPU-only package is not imported for a CPU
        ]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for name in self.candidates(q.device, q.dtype, q.shape[-1]):
            fn = _loaded(name)
            assert fn is not None
            try:
                out = fn(q, k, v)
            except torch.OutOfMemoryError:
                raise  # not the backend's fault; a slower fallback would need more memory
            except Exception as exc:
                if self.explicit:
                    raise AttentionBackendError(
                        f"attention backend {name!r} failed: {type(exc).__name__}: {exc}; "
                        "choose 'auto' or another backend"
                    ) from exc
                self.dropped.add(name)
                logger.warning(
                    "attention backend %s failed (%s: %s); using the next one for the rest of the run",
                    name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                )  # fmt: skip
                continue
            self.backend_used = name
            return out
        raise AttentionBackendError(
            f"no attention backend can run {q.dtype} tensors of head size {q.shape[-1]} on {q.device}"
            + (
                f" (dropped after errors: {', '.join(sorted(self.dropped))})"
                if self.dropped
                else ""
            )
        )

    def __repr__(self) -> str:
        return f"AttentionDispatcher({self.choice!r}, used={self.backend_used!r})"
