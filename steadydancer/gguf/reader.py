"""Read a GGUF file: metadata, and per tensor its logical shape, type and raw bytes (memmapped).

The parsing itself is the `gguf` package's `GGUFReader`, which memory-maps the file: nothing
is copied into RAM here, a 14B model opens in well under a second. What this module adds:

- bounds checks: `GGUFReader` reads past the end of a truncated or corrupt file without
  complaint (numpy slicing returns short arrays), which later surfaces as an obscure
  IndexError, a reshape error, or an endless loop over a garbage array length. Every read is
  checked here, so a bad file is one `GGUFError` that says where it went wrong;
- logical shapes in torch order, honouring `comfy.gguf.orig_shape.<name>` (ComfyUI-GGUF's
  converter flattens tensors whose last axis is not a multiple of the block size and records
  the real shape there) and tensors of more than 4 axes;
- names without a container prefix (`model.diffusion_model.` etc., see keys.strip_prefix).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from ..errors import GGUFError, UnsupportedQuantError
from ..keys import strip_prefix

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
_INT_TYPES = {
    gguf.GGUFValueType.INT32,
    gguf.GGUFValueType.UINT32,
    gguf.GGUFValueType.INT64,
    gguf.GGUFValueType.UINT64,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    `shape` is the logical shape in torch order; `data` the raw bytes as a flat uint8 view
    of the memory-mapped file (no copy); `stored_shape` the shape as stored (torch order),
    which differs from `shape` when the converter flattened the tensor.
    """

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray
    stored_shape: tuple[int, ...]
    file_name: str  # the name as written in the file, before prefix stripping

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class GGUFFile:
    """A parsed GGUF file; tensors keep the file mapped until `close()` (or the `with` block ends)."""

    path: str
    architecture: str | None
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    _reader: Any = field(default=None, repr=False)

    def close(self) -> None:
        """Drop this object's references to the mapping.

        Tensors handed out earlier (numpy views, torch tensors made from them) keep the
        mapping alive on their own and stay valid.
        """
        self._reader = None
        self.tensors = {}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())


class _OutOfBounds(Exception):
    def __init__(self, offset: int, needed: int, size: int) -> None:
        super().__init__(offset, needed, size)
        self.offset, self.needed, self.size = offset, needed, size


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader whose every read is bounds-checked, and which names the section it was in."""

    stage = "header"

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: Any = None
    ) -> np.ndarray:
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        end = int(offset) + itemsize * count
        if offset < 0 or end > self.data.shape[0]:
            raise _OutOfBounds(int(offset), itemsize * count, int(self.data.shape[0]))
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        self.stage = "metadata"
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> Any:
        self.stage = "tensor table"
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        self.stage = "tensor data"
        known = {int(t) for t in gguf.GGMLQuantizationType}
        for f in fields:
            raw_type = int(f.parts[4][0])
            if raw_type not in known:
                name = bytes(f.parts[1]).decode("utf-8", "replace")
                raise UnsupportedQuantError(
                    f"tensor {name!r} has an unknown GGML type id {raw_type}: the file is corrupt "
                    "or was written by a newer llama.cpp than the installed `gguf` package knows"
                )
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
            n = math.prod(int(d) for d in f.parts[3])
            begin = int(start_offs) + int(f.parts[5][0])
            end = begin + n * type_size // block_size
            if end > self.data.shape[0]:
                name = bytes(f.parts[1]).decode("utf-8", "replace")
                raise GGUFError(
                    f"truncated file: the data of tensor {name!r} (bytes {begin}..{end}) lies past "
                    f"its end ({self.data.shape[0]} bytes); an incomplete download?"
                )
        super()._build_tensors(start_offs, fields)


def _field_value(f: Any) -> Any:
    """A metadata field as a Python value (str, int, float, bool, or a list of those)."""
    types = f.types
    if not types:
        return None

    def scalar(part: np.ndarray, vtype: gguf.GGUFValueType) -> Any:
        if vtype == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", "replace")
        value = part.tolist()
        value = value[0] if isinstance(value, list) else value
        return bool(value) if vtype == gguf.GGUFValueType.BOOL else value

    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) < 2:
            return []
        return [scalar(f.parts[i], types[1]) for i in f.data]
    return scalar(f.parts[f.data[-1]], types[0])


def _orig_shape(reader: Any, file_name: str) -> tuple[int, ...] | None:
    f = reader.get_field(ORIG_SHAPE_PREFIX + file_name)
    if f is None:
        return None
    if len(f.types) != 2 or f.types[0] != gguf.GGUFValueType.ARRAY or f.types[1] not in _INT_TYPES:
        raise GGUFError(
            f"metadata {ORIG_SHAPE_PREFIX + file_name} must be an array of integers, "
            f"got {[t.name for t in f.types]}"
        )
    shape = tuple(int(f.parts[i][0]) for i in f.data)
    if any(s < 0 for s in shape):
        raise GGUFError(f"metadata {ORIG_SHAPE_PREFIX + file_name} has a negative size: {shape}")
    return shape


def _tensor(reader: Any, t: Any, path: str) -> GGUFTensor:
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    stored = tuple(int(d) for d in reversed(t.shape.tolist()))
    n = math.prod(stored)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n % block_size:
        raise GGUFError(
            f"{path}: tensor {t.name!r} of shape {stored} has {n} elements, "
            f"not a multiple of the {qtype.name} block size {block_size}"
        )
    expected = n // block_size * type_size
    data = t.data
    if data.nbytes != expected:
        raise GGUFError(
            f"{path}: tensor {t.name!r} ({qtype.name}, shape {stored}) needs {expected} bytes, "
            f"the file holds {data.nbytes}"
        )
    shape = _orig_shape(reader, t.name)
    if shape is None:
        shape = stored
    elif math.prod(shape) != n:
        raise GGUFError(
            f"{path}: tensor {t.name!r}: original shape {shape} in the metadata does not match "
            f"the {n} elements stored"
        )
    raw = data.reshape(-1).view(np.uint8)
    return GGUFTensor(strip_prefix(t.name), shape, qtype, raw, stored, t.name)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse `path`; raises GGUFError (or UnsupportedQuantError) for anything malformed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise GGUFError(f"{path}: the file is empty, not a GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFError(
            f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "safetensors files are loaded by steadydancer.weights, not the GGUF reader"
        )
    # Made in two steps so that the section being parsed is known when __init__ fails.
    reader = _CheckedReader.__new__(_CheckedReader)
    try:
        with np.errstate(all="ignore"):  # corrupt offsets overflow; the bounds checks catch them
            reader.__init__(path, "c")  # copy-on-write: a stray in-place write cannot crash
    except _OutOfBounds as exc:
        raise GGUFError(
            f"{path}: truncated or corrupt GGUF file: its {reader.stage} needs bytes "
            f"{exc.offset}..{exc.offset + exc.needed} but the file has {exc.size} bytes"
        ) from None
    except GGUFError as exc:  # ours, raised inside the reader: add the path
        raise type(exc)(f"{path}: {exc}") from None
    except Exception as exc:  # the gguf reader raises ValueError/KeyError/IndexError/...
        raise GGUFError(f"{path}: not a valid GGUF file: {type(exc).__name__}: {exc}") from None

    if reader.byte_order != "I":
        raise GGUFError(
            f"{path}: a GGUF file of the opposite byte order (big-endian); only little-endian "
            "files, what every converter writes by default, are supported"
        )
    tensors: dict[str, GGUFTensor] = {}
    try:
        for t in reader.tensors:
            tensor = _tensor(reader, t, path)
            if tensor.name in tensors:
                raise GGUFError(
                    f"{path}: tensors {tensors[tensor.name].file_name!r} and {t.name!r} "
                    f"both map to {tensor.name!r} once the prefix is stripped"
                )
            tensors[tensor.name] = tensor
        metadata = {
            name: _field_value(f)
            for name, f in reader.fields.items()
            if not name.startswith("GGUF.")
        }
    except GGUFError:
        raise
    except Exception as exc:
        raise GGUFError(f"{path}: not a valid GGUF file: {type(exc).__name__}: {exc}") from None
    arch = metadata.get("general.architecture")
    if arch is not None and not isinstance(arch, str):
        raise GGUFError(f"{path}: general.architecture must be a string, got {arch!r}")
    return GGUFFile(
        path=path, architecture=arch, metadata=metadata, tensors=tensors, _reader=reader
    )
