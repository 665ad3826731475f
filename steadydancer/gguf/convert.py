"""Convert a SteadyDancer safetensors checkpoint to GGUF.

    python -m steadydancer.gguf.convert SRC.safetensors DST.gguf --type Q4_K

Sources: bf16, fp16 or fp32 tensors, and fp8 (e4m3fn / e5m2) with a per-tensor scale as in
Kijai's "fp8_scaled" files (`<layer>.scale_weight`, or `<layer>.weight_scale` in ComfyUI's
newer layout; the `scaled_fp8` marker and input scales are dropped).

Output follows ComfyUI-GGUF's conventions, so its loader reads our files and ours reads its:
- architecture `wan`, names without a container prefix, `general.file_type` and the
  quantisation version set;
- kept in F32 (lossless from any source, and these are tiny or precision-critical): 1-D
  tensors, tensors of at most 1024 elements, `.modulation` tensors, and tensors of more than
  4 axes (the Conv3d patch embeddings: GGML's C code handles at most 4 axes, so ComfyUI-GGUF
  stores them whole in F32 and its loader, like ours, reads their full shape back);
- a tensor whose last axis is not a multiple of the block size is stored as rows of 256
  (or of the block size) with its real shape in `comfy.gguf.orig_shape.<name>`; one whose
  element count does not divide into blocks at all is stored in the source's float type.

The conversion streams: each tensor is read (memory-mapped), converted and written before
the next one is touched, so peak memory is about one tensor, not one model. The output is
written to DST.part and renamed when complete.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ..errors import GGUFError, ModelFileError, SteadyDancerError, UnsupportedQuantError
from ..keys import missing_pose_path, strip_prefix
from .dequant import SUPPORTED_QTYPES, as_qtype, packed_nbytes, supported_names
from .loader import WAN_ARCHITECTURE, WAN_KEY_SET
from .quantize import quantize
from .reader import ORIG_SHAPE_PREFIX

Q = gguf.GGMLQuantizationType
QUANTIZATION_THRESHOLD = 1024  # tensors this small stay F32 (ComfyUI-GGUF's threshold)
HIGH_PRECISION_KEYS = (".modulation",)  # nn.Parameters added to activations, kept in F32
MAX_QUANT_AXES = 4
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED_SUFFIXES = (".scale_input", ".input_scale")
DROPPED_KEYS = ("scaled_fp8",)

FILE_TYPES: dict[Q, gguf.LlamaFileType] = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
# Lossless float storage for each source dtype (safetensors dtype strings).
_LOSSLESS = {"BF16": Q.BF16, "F16": Q.F16, "F32": Q.F32}
_READABLE = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


class SafetensorsHandle(Protocol):
    """What the converter uses of `safetensors.safe_open(...)`."""

    def keys(self) -> list[str]: ...
    def get_slice(self, name: str) -> Any: ...
    def get_tensor(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorPlan:
    """How one source tensor is written."""

    name: str  # output name (prefix stripped)
    source: str  # name in the source file
    shape: tuple[int, ...]  # logical shape
    stored_shape: tuple[int, ...]  # shape as written (differs when reshaped)
    qtype: Q
    scale: str | None = None  # fp8 scale tensor in the source

    @property
    def reshaped(self) -> bool:
        return self.stored_shape != self.shape

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.qtype, self.stored_shape)


@dataclass
class ConversionReport:
    """What the converter wrote."""

    path: str
    target: Q
    tensors: int = 0
    bytes_written: int = 0
    types: Counter[str] = field(default_factory=Counter)
    reshaped: list[str] = field(default_factory=list)
    missing_pose_path: list[str] = field(default_factory=list)


def choose_storage(
    name: str, shape: Sequence[int], source_dtype: str, target: Q
) -> tuple[Q, tuple[int, ...]]:
    """(type, stored shape) for one tensor under ComfyUI-GGUF's rules (see module docstring)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if (
        len(shape) <= 1
        or n <= QUANTIZATION_THRESHOLD
        or len(shape) > MAX_QUANT_AXES
        or any(k in name for k in HIGH_PRECISION_KEYS)
    ):
        return Q.F32, shape
    block_size, _ = gguf.GGML_QUANT_SIZES[target]
    if shape[-1] % block_size == 0:
        return target, shape
    if n % block_size == 0:
        row = 256 if n % 256 == 0 else block_size
        return target, (n // row, row)
    return _LOSSLESS.get(source_dtype, Q.F32), shape


def _source_names(keys: Sequence[str]) -> dict[str, str]:
    """Output name -> source name for the model tensors (scales and markers excluded)."""
    keys = [
        k
        for k in keys
        if not k.endswith(SCALE_SUFFIXES + DROPPED_SUFFIXES) and k not in DROPPED_KEYS
    ]
    if any(k.startswith("model.diffusion_model.") for k in keys):
        keys = [k for k in keys if k.startswith("model.diffusion_model.")]
    out: dict[str, str] = {}
    for key in keys:
        name = strip_prefix(key)
        if name in out:
            raise ModelFileError(f"source tensors {out[name]!r} and {key!r} both map to {name!r}")
        out[name] = key
    return out


def _scale_key(source: str, keys: set[str]) -> str | None:
    base = source[: -len(".weight")] if source.endswith(".weight") else source
    for suffix in SCALE_SUFFIXES:
        if base + suffix in keys:
            return base + suffix
    return None


def plan_conversion(handle: SafetensorsHandle, target: Q) -> list[TensorPlan]:
    """Decide type and layout of every tensor from the source's header alone."""
    keys = list(handle.keys())
    key_set = set(keys)
    names = _source_names(keys)
    missing = [k for k in WAN_KEY_SET if k not in names]
    if missing:
        raise ModelFileError(
            f"not a Wan model: the source lacks {', '.join(missing)}; this converter writes "
            "Wan2.1-based (SteadyDancer) checkpoints"
        )
    plans = []
    for name, source in names.items():
        info = handle.get_slice(source)
        dtype, shape = info.get_dtype(), tuple(info.get_shape())
        if dtype not in _READABLE:
            raise ModelFileError(
                f"tensor {source!r} has dtype {dtype}; expected bf16, fp16, fp32 or fp8"
            )
        qtype, stored = choose_storage(name, shape, dtype, target)
        plans.append(TensorPlan(name, source, shape, stored, qtype, _scale_key(source, key_set)))
    return plans


def _load(handle: SafetensorsHandle, plan: TensorPlan) -> np.ndarray:
    """The source tensor as float32 numpy, fp8 scales applied."""
    tensor = handle.get_tensor(plan.source)
    values = tensor.to(torch.float32)
    if plan.scale is not None:
        scale = handle.get_tensor(plan.scale).to(torch.float32)
        try:
            values = values * scale
        except RuntimeError as exc:
            raise ModelFileError(
                f"scale {plan.scale!r} {tuple(scale.shape)} does not fit tensor {plan.source!r} {plan.shape}"
            ) from exc
    return values.numpy()


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Values (already in the stored shape) -> the bytes written for `qtype`."""
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(values).all():
            raise GGUFError("values exceed the F16 range (65504); convert to BF16 or F32 instead")
        return out
    return quantize(values, qtype)


def convert_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: Q | int | str = Q.Q8_0,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Convert `src` (safetensors) to the GGUF file `dst`; see the module docstring."""
    from safetensors import safe_open

    target = as_qtype(qtype)
    if target not in FILE_TYPES:
        raise UnsupportedQuantError(
            f"cannot write {target.name} files; choose one of: {supported_names()}"
        )
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isfile(src):
        raise ModelFileError(f"{src}: no such file")
    if os.path.exists(dst) and not overwrite:
        raise ModelFileError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    try:
        handle_ctx = safe_open(src, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        raise ModelFileError(f"{src}: not a readable safetensors file: {exc}") from None

    with handle_ctx as handle:
        plans = plan_conversion(handle, target)
        missing = missing_pose_path(p.name for p in plans)
        if missing:
            say(
                f"warning: {len(missing)} SteadyDancer pose-path tensors are missing "
                f"(e.g. {missing[0]}); the GGUF loader will refuse this file"
            )

        def encoded(plan: TensorPlan) -> np.ndarray:
            try:
                return encode(_load(handle, plan).reshape(plan.stored_shape), plan.qtype)
            except GGUFError as exc:
                raise GGUFError(f"tensor {plan.source!r}: {exc}") from None

        report = write_plans(dst, plans, encoded, target, progress=progress)
    report.missing_pose_path = missing
    return report


def write_plans(
    dst: str,
    plans: Sequence[TensorPlan],
    data: Callable[[TensorPlan], np.ndarray],
    target: Q,
    *,
    progress: bool = True,
) -> ConversionReport:
    """Write a Wan GGUF file of `plans`, asking `data(plan)` for each tensor's stored bytes in
    turn (one tensor in memory at a time); written to DST.part and renamed when complete."""
    report = ConversionReport(path=dst, target=target)
    tmp = dst + ".part"
    writer = gguf.GGUFWriter(path=None, arch=WAN_ARCHITECTURE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(FILE_TYPES[target]))
    for plan in plans:
        if plan.reshaped:
            writer.add_array(ORIG_SHAPE_PREFIX + plan.name, list(plan.shape))
        byte_shape = gguf.quant_shape_to_byte_shape(plan.stored_shape, plan.qtype)
        writer.add_tensor_info(
            plan.name, byte_shape, np.dtype(np.uint8), plan.nbytes, raw_dtype=plan.qtype
        )
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(plans, desc=f"to {target.name}", unit="tensor", disable=not progress, file=sys.stderr)
        for plan in bar:
            out = data(plan)
            if out.nbytes != plan.nbytes:  # pragma: no cover - guards the writer's layout
                raise GGUFError(f"tensor {plan.source!r}: encoded {out.nbytes} bytes, planned {plan.nbytes}")
            writer.write_tensor_data(out)
            report.tensors += 1
            report.bytes_written += plan.nbytes
            report.types[plan.qtype.name] += 1
            if plan.reshaped:
                report.reshaped.append(plan.name)
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return report


def main(argv: Sequence[str] | None = None) -> int:
    types = sorted(q.name for q in SUPPORTED_QTYPES)
    parser = argparse.ArgumentParser(
        prog="python -m steadydancer.gguf.convert",
        description="Convert a SteadyDancer safetensors checkpoint (bf16/fp16/fp32/fp8-scaled) to GGUF.",
    )
    parser.add_argument("src", help="source .safetensors file")
    parser.add_argument("dst", help="output .gguf file")
    parser.add_argument(
        "--type", default="Q8_0", help=f"target type, one of {', '.join(types)} (default Q8_0)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        target = as_qtype(args.type)
        if target not in SUPPORTED_QTYPES:
            raise UnsupportedQuantError(
                f"cannot write {target.name}; choose one of: {', '.join(types)}"
            )
        report = convert_file(
            args.src, args.dst, target, overwrite=args.overwrite, progress=not args.quiet
        )
    except SteadyDancerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.types.items()))
    print(
        f"wrote {report.path}: {report.tensors} tensors, {report.bytes_written / 2**20:.1f} MiB ({kinds}); "
        f"{len(report.reshaped)} reshaped with orig_shape metadata"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
