"""Read a GGUF file: metadata, and per tensor its logical shape, type and raw bytes (memmapped).

The file is memory-mapped and its header parsed here, following the GGUF spec (versions 2
and 3, little-endian) as the `gguf` package's writer and llama.cpp write it. Nothing of the
tensor data is read or copied: a 14B model opens in well under a second. This module is
written for files that may be truncated, corrupt or hostile, and holds to three rules:

- every count and length is checked against what the rest of the file can hold *before*
  anything is read or allocated: an array of N elements of type T needs at least
  N * min_size(T) bytes, a string of length L needs L bytes, a table of N tensors needs
  N * 24 bytes. A violation is one `GGUFError` at once that names the section and the
  offending number, instead of a walk to the end of the file (the `gguf` package's reader
  reads a metadata array one element at a time, about 7 CPU-seconds and 170 MB of RAM per
  MB of file for one corrupt array length);
- metadata values are not decoded while parsing: arrays of fixed-size values are stepped
  over in one step, arrays of strings walked once without allocating per element, and a
  value is decoded only when `GGUFFile.metadata[key]` is read. So memory does not grow with
  the number of array elements a file declares, and parsing is linear in the header bytes;
- every inconsistency a reader could trip over later (unknown types, sizes that overflow,
  tensor data out of the file or overlapping another tensor's, duplicate names and keys,
  shapes whose element count disagrees with the data) is refused here, with the path.

It also gives the logical shapes in torch order, honouring `comfy.gguf.orig_shape.<name>`
(ComfyUI-GGUF's converter flattens tensors whose last axis is not a multiple of the block
size and records the real shape there) and tensors of more than 4 axes, and names without a
container prefix (`model.diffusion_model.` etc., see keys.strip_prefix).
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from ..errors import GGUFError, UnsupportedQuantError
from ..keys import strip_prefix

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
SUPPORTED_VERSIONS = (2, 3)  # version 1 (32-bit counts) is gone from every writer

# Plausibility limits: far above any real file (a 14B Wan GGUF has ~1,100 tensors and a
# dozen keys; the largest LLM vocabularies are ~260k strings), low enough that a corrupt or
# hostile header cannot make the parser allocate or loop without bound. Each tensor costs
# ~1.2 KiB once loaded (name, shape, numpy view, torch tensor), whatever its size in the
# file (a record can be 25 bytes), so MAX_TENSORS caps that at ~80 MiB.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 17  # an orig_shape key per tensor, and the rest
MAX_NAME_BYTES = 1 << 16  # a key or a tensor name
MAX_DIMS = 16  # axes of a tensor (GGML itself has 4; we read 5-D conv weights too)
MAX_STRING_ARRAY = 1 << 24  # strings in one metadata array

VT = gguf.GGUFValueType
# struct format of each fixed-size metadata value type (little-endian)
_SCALAR_FORMATS: dict[VT, str] = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.FLOAT32: "<f",
    VT.BOOL: "<B",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT64: "<d",
}
_SCALAR_SIZES = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}
_INT_TYPES = frozenset({VT.INT32, VT.UINT32, VT.INT64, VT.UINT64})
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT64_LIMIT = 1 << 63  # sizes at or above this are negative for every reader that uses int64
# name length (8) + n_dims (4) + type (4) + data offset (8): a tensor record with no axes
_MIN_TENSOR_RECORD = 24
# key length (8) + value type (4) + the smallest value (1 byte)
_MIN_KEY_RECORD = 13
_KNOWN_QTYPES = frozenset(int(t) for t in gguf.GGMLQuantizationType)


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


@dataclass(frozen=True)
class _Entry:
    """Where one metadata value lies: its type, and for arrays the element type and count."""

    vtype: VT
    offset: int  # of the value (after the key and the type tag)
    item_type: VT | None = None
    count: int = 0


class GGUFMetadata(Mapping[str, Any]):
    """The metadata of a GGUF file, key -> value, decoded when read (never while parsing).

    Values are Python values: str, int, float, bool, or a list of those for arrays (as the
    `gguf` package gives them). `types(key)` gives the GGUF value types without decoding.
    Reading a value decodes it from the mapped file each time: an array of a million
    strings costs what it costs only to the code that asks for it.
    """

    def __init__(self, data: np.ndarray, entries: dict[str, _Entry]) -> None:
        self._data = data  # keeps the mapping alive
        self._buf = memoryview(data)
        self._entries = entries

    def __getitem__(self, key: str) -> Any:
        entry = self._entries[key]
        if entry.item_type is None:
            return _decode_scalar(self._buf, entry.vtype, entry.offset)
        return _decode_array(self._buf, entry.item_type, entry.offset, entry.count)

    def __contains__(self, key: object) -> bool:  # Mapping's would decode the value
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def types(self, key: str) -> tuple[VT, ...]:
        """(type,) for a plain value, (ARRAY, element type) for an array."""
        entry = self._entries[key]
        return (entry.vtype,) if entry.item_type is None else (entry.vtype, entry.item_type)

    def count(self, key: str) -> int:
        """Number of elements of an array value (1 for a plain value)."""
        entry = self._entries[key]
        return 1 if entry.item_type is None else entry.count

    def __repr__(self) -> str:
        return f"GGUFMetadata({len(self)} keys: {', '.join(list(self)[:8])}{', ...' if len(self) > 8 else ''})"


@dataclass
class GGUFFile:
    """A parsed GGUF file; tensors keep the file mapped until `close()` (or the `with` block ends)."""

    path: str
    architecture: str | None
    metadata: Mapping[str, Any]
    tensors: dict[str, GGUFTensor]
    _mapping: Any = field(default=None, repr=False)

    def close(self) -> None:
        """Drop this object's references to the mapping.

        Tensors handed out earlier (numpy views, torch tensors made from them) keep the
        mapping alive on their own and stay valid.
        """
        self._mapping = None
        self.tensors = {}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())


# ------------------------------------------------------------------------------ decoding
def _decode_str(buf: memoryview, start: int, length: int) -> str:
    return str(buf[start : start + length], "utf-8", "replace")


def _decode_scalar(buf: memoryview, vtype: VT, offset: int) -> Any:
    if vtype == VT.STRING:
        (length,) = _U64.unpack_from(buf, offset)
        return _decode_str(buf, offset + 8, length)
    (value,) = struct.unpack_from(_SCALAR_FORMATS[vtype], buf, offset)
    return bool(value) if vtype == VT.BOOL else value


def _decode_array(buf: memoryview, item_type: VT, offset: int, count: int) -> list[Any]:
    if item_type == VT.STRING:
        out = []
        pos = offset
        for _ in range(count):
            (length,) = _U64.unpack_from(buf, pos)
            out.append(_decode_str(buf, pos + 8, length))
            pos += 8 + length
        return out
    values = np.frombuffer(buf, _SCALAR_FORMATS[item_type], count, offset)
    return (values != 0).tolist() if item_type == VT.BOOL else values.tolist()


# ------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class _TensorRecord:
    name: str
    dims: tuple[int, ...]  # GGML order (fastest axis first), as stored
    raw_type: int
    offset: int  # relative to the data section
    record_offset: int  # where its record starts in the file, for messages


class _Parser:
    """A cursor over the mapped bytes; every read checks that the bytes exist first."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.buf = memoryview(data)  # struct reads from it allocate nothing
        self.size = int(data.shape[0])
        self.pos = 0
        self.stage = "header"

    def corrupt(self, message: str) -> GGUFError:
        return GGUFError(f"truncated or corrupt GGUF file: its {self.stage} {message}")

    def need(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.corrupt(
                f"needs bytes {self.pos}..{self.pos + n} but the file has {self.size} bytes"
            )

    def bound_count(self, count: int, min_size: int, what: str) -> None:
        """Refuse a count whose elements cannot fit in the rest of the file."""
        left = self.size - self.pos
        if count * min_size > left:
            raise self.corrupt(
                f"declares {count:,} {what} at byte {self.pos}, which need at least "
                f"{count * min_size:,} bytes, but only {left:,} are left in the file"
            )

    def u32(self) -> int:
        self.need(4)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        self.need(8)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def name(self, what: str) -> str:
        """A key or tensor name: a string of at most MAX_NAME_BYTES bytes of valid UTF-8."""
        at = self.pos
        length = self.u64()
        if length > MAX_NAME_BYTES:
            raise self.corrupt(
                f"has a {what} of {length:,} bytes at byte {at} (at most {MAX_NAME_BYTES:,} "
                "are plausible)"
            )
        self.need(length)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"has a {what} at byte {at} that is not UTF-8: {raw[:64]!r}") from None

    def value_type(self, where: str) -> VT:
        at = self.pos
        raw = self.u32()
        try:
            return VT(raw)
        except ValueError:
            raise self.corrupt(f"has an unknown value type {raw} for {where} at byte {at}") from None

    def skip_string(self) -> None:
        length = self.u64()
        self.need(length)
        self.pos += length

    def skip_value(self, vtype: VT, key: str) -> _Entry:
        """Step over one metadata value, checking every length; returns where it lies."""
        offset = self.pos
        if vtype == VT.STRING:
            self.skip_string()
            return _Entry(vtype, offset)
        if vtype != VT.ARRAY:
            self.need(_SCALAR_SIZES[vtype])
            self.pos += _SCALAR_SIZES[vtype]
            return _Entry(vtype, offset)
        item_type = self.value_type(f"the elements of {_show(key)}")
        count = self.u64()
        start = self.pos
        if item_type == VT.ARRAY:  # llama.cpp refuses these too; no converter writes them
            raise self.corrupt(f"has an array of arrays for {_show(key)}, which is not supported")
        if item_type == VT.STRING:
            self.bound_count(count, 8, f"strings in the array {_show(key)}")
            if count > MAX_STRING_ARRAY:
                raise self.corrupt(
                    f"declares an array {_show(key)} of {count:,} strings (at most "
                    f"{MAX_STRING_ARRAY:,} are plausible)"
                )
            buf, size, pos = self.buf, self.size, self.pos
            unpack = _U64.unpack_from
            for i in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8)
                (length,) = unpack(buf, pos)
                pos += 8
                if length > size - pos:
                    raise self.corrupt(
                        f"has string {i} of the array {_show(key)} of length {length:,} at byte "
                        f"{pos - 8}, past the end of the file ({size:,} bytes)"
                    )
                pos += length
            self.pos = pos
        else:
            size = _SCALAR_SIZES[item_type]
            self.bound_count(count, size, f"{item_type.name} values in the array {_show(key)}")
            self.pos += count * size
        return _Entry(vtype, start, item_type, count)

    def metadata(self, count: int) -> dict[str, _Entry]:
        self.stage = "metadata"
        self.bound_count(count, _MIN_KEY_RECORD, "keys")
        if count > MAX_KEYS:
            raise self.corrupt(f"declares {count:,} keys (at most {MAX_KEYS:,} are plausible)")
        entries: dict[str, _Entry] = {}
        for _ in range(count):
            at = self.pos
            key = self.name("key")
            vtype = self.value_type(f"the key {_show(key)}")
            if key in entries:
                raise self.corrupt(f"has the key {_show(key)} twice (again at byte {at})")
            entries[key] = self.skip_value(vtype, key)
        return entries

    def tensor_table(self, count: int) -> list[_TensorRecord]:
        self.stage = "tensor table"
        self.bound_count(count, _MIN_TENSOR_RECORD, "tensors")
        if count > MAX_TENSORS:
            raise self.corrupt(
                f"declares {count:,} tensors (at most {MAX_TENSORS:,} are plausible)"
            )
        records = []
        for _ in range(count):
            at = self.pos
            name = self.name("tensor name")
            n_dims = self.u32()
            if n_dims > MAX_DIMS:
                raise self.corrupt(
                    f"gives tensor {_show(name)} {n_dims:,} axes (at most {MAX_DIMS} are supported)"
                )
            self.need(8 * n_dims)
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
            self.pos += 8 * n_dims
            raw_type = self.u32()
            offset = self.u64()
            records.append(_TensorRecord(name, dims, raw_type, offset, at))
        return records


def _show(name: str, limit: int = 80) -> str:
    """A name for a message: quoted, and cut short (a corrupt one may be 64 KiB long)."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name):,} characters)"


def _check_shape(shape: tuple[int, ...], what: str) -> None:
    """Sizes must fit int64 (readers and torch use it), alone and multiplied together."""
    if any(s >= _INT64_LIMIT for s in shape):
        raise GGUFError(f"{what} has a size that is negative as a signed 64-bit number: {shape}")
    if math.prod(s for s in shape if s) >= _INT64_LIMIT:
        raise GGUFError(f"{what} has more elements than a signed 64-bit number counts: {shape}")


def _orig_shape(metadata: GGUFMetadata, file_name: str) -> tuple[int, ...] | None:
    key = ORIG_SHAPE_PREFIX + file_name
    if key not in metadata:
        return None
    types = metadata.types(key)
    if len(types) != 2 or types[1] not in _INT_TYPES:
        raise GGUFError(
            f"metadata {key} must be an array of integers, got {[t.name for t in types]}"
        )
    if metadata.count(key) > MAX_DIMS:
        raise GGUFError(
            f"metadata {key} has {metadata.count(key):,} axes (at most {MAX_DIMS} are supported)"
        )
    shape = tuple(int(s) for s in metadata[key])
    if any(s < 0 for s in shape):
        raise GGUFError(f"metadata {key} has a negative size: {shape}")
    _check_shape(shape, f"metadata {key}")
    return shape


def _tensor(
    data: np.ndarray, metadata: GGUFMetadata, rec: _TensorRecord, data_offset: int
) -> GGUFTensor:
    if rec.raw_type not in _KNOWN_QTYPES:
        raise UnsupportedQuantError(
            f"tensor {_show(rec.name)} has an unknown GGML type id {rec.raw_type}: the file is corrupt "
            "or was written by a newer llama.cpp than the installed `gguf` package knows"
        )
    qtype = gguf.GGMLQuantizationType(rec.raw_type)
    stored = tuple(reversed(rec.dims))
    _check_shape(stored, f"tensor {_show(rec.name)}")
    n = math.prod(stored)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if block_size > 1 and (not rec.dims or rec.dims[0] % block_size):
        raise GGUFError(
            f"tensor {_show(rec.name)} of shape {stored} has rows of {rec.dims[0] if rec.dims else 1} "
            f"elements, not a multiple of the {qtype.name} block size {block_size}"
        )
    nbytes = n // block_size * type_size
    begin = data_offset + rec.offset
    end = begin + nbytes
    if end > data.shape[0]:
        raise GGUFError(
            f"truncated file: the data of tensor {_show(rec.name)} (bytes {begin}..{end}) lies past "
            f"its end ({data.shape[0]} bytes); an incomplete download?"
        )
    shape = _orig_shape(metadata, rec.name)
    if shape is None:
        shape = stored
    elif math.prod(shape) != n:
        raise GGUFError(
            f"tensor {_show(rec.name)}: original shape {shape} in the metadata does not match "
            f"the {n} elements stored"
        )
    raw = data[begin:end]
    return GGUFTensor(strip_prefix(rec.name), shape, qtype, raw, stored, rec.name)


def _check_no_overlap(tensors: list[GGUFTensor], starts: list[int]) -> None:
    """Two tensors whose data overlap mean a corrupt table (writers never share bytes)."""
    spans = sorted(
        (start, start + t.nbytes, t.file_name)
        for t, start in zip(tensors, starts, strict=True)
        if t.nbytes
    )
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise GGUFError(
                f"the data of tensors {_show(name_a)} and {_show(name_b)} overlap (byte {start_b}): "
                "the tensor table is corrupt"
            )


def _parse(data: np.ndarray) -> tuple[GGUFMetadata, list[GGUFTensor]]:
    p = _Parser(data)
    if p.size < 4 or data[:4].tobytes() != b"GGUF":
        raise GGUFError("not a GGUF file (bad magic)")
    p.pos = 4
    version = p.u32()
    if version & 0xFFFF == 0:
        raise GGUFError(
            "a GGUF file of the opposite byte order (big-endian); only little-endian "
            "files, what every converter writes by default, are supported"
        )
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(
            f"GGUF version {version} is not supported (versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} are)"
        )
    tensor_count = p.u64()
    key_count = p.u64()
    entries = p.metadata(key_count)
    metadata = GGUFMetadata(data, entries)
    records = p.tensor_table(tensor_count)

    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        if metadata.types("general.alignment") != (VT.UINT32,):
            raise GGUFError(
                "general.alignment must be a UINT32, got "
                f"{[t.name for t in metadata.types('general.alignment')]}"
            )
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFError(f"general.alignment {alignment} is not a power of two")
    data_offset = -(-p.pos // alignment) * alignment

    p.stage = "tensor data"
    tensors: list[GGUFTensor] = []
    seen: set[str] = set()
    for rec in records:
        if rec.name in seen:
            raise GGUFError(f"the tensor name {_show(rec.name)} appears twice in the tensor table")
        seen.add(rec.name)
        tensors.append(_tensor(data, metadata, rec, data_offset))
    _check_no_overlap(tensors, [data_offset + r.offset for r in records])
    return metadata, tensors


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
    try:
        # copy-on-write: a stray in-place write to a tensor cannot crash or reach the file
        data = np.memmap(path, dtype=np.uint8, mode="c")
        metadata, parsed = _parse(data)
        arch = None
        if "general.architecture" in metadata:
            if metadata.types("general.architecture") != (VT.STRING,):
                raise GGUFError(
                    "general.architecture must be a string, got a "
                    f"{'/'.join(t.name for t in metadata.types('general.architecture'))} value"
                )
            arch = metadata["general.architecture"]
    except GGUFError as exc:  # ours: add the path
        raise type(exc)(f"{path}: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # a bug here, not a property of the file: keep the cause
        raise GGUFError(
            f"{path}: could not be read ({type(exc).__name__}: {exc}); please report this"
        ) from exc

    tensors: dict[str, GGUFTensor] = {}
    for tensor in parsed:
        if tensor.name in tensors:
            raise GGUFError(
                f"{path}: tensors {_show(tensors[tensor.name].file_name)} and {_show(tensor.file_name)} "
                f"both map to {_show(tensor.name)} once the prefix is stripped"
            )
        tensors[tensor.name] = tensor
    return GGUFFile(
        path=path, architecture=arch, metadata=metadata, tensors=tensors, _mapping=data
    )
