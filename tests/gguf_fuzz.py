"""Structure-aware fuzzer of the GGUF loading path (docs/reliability.md, "GGUF files").

Valid small SteadyDancer GGUF files are written with the real `gguf` writer, parsed here into
their records (header counts, key/value pairs, tensor records, data section), mutated with
knowledge of that structure and written back. Each case is then loaded as users load a file:
`load_gguf_state_dict(path)` or `load_weights(path)`, then `config_from_state_dict`. A case
passes when

- it loads, or fails with one of the errors the library defines for bad files (GGUFError,
  its subclass UnsupportedQuantError, ModelFileError) and not through the reader's
  last-resort net for unexpected exceptions (a named error caused by another exception);
- the load (and config) takes at most MAX_LOAD_S seconds (every case file is under 1 MB);
- the peak memory it allocates, traced with tracemalloc, is at most 2 x the file size +
  MEMORY_CONSTANT (see there for why that constant);
- a file that loads also dequantises completely (checked outside the time and memory).

Every case is a pure function of (seed, case number), so a failure replays on its own:

    .venv/bin/python tests/gguf_fuzz.py --cases 20000 --jobs 2        # the CI run (pytest)
    .venv/bin/python tests/gguf_fuzz.py --cases 200000 --seed 1       # a longer run
    .venv/bin/python tests/gguf_fuzz.py --seed 0 --case 1234 --save /tmp/case.gguf  # one case

`tests/test_gguf_fuzz.py` runs the CI amount; GGUF_FUZZ_CASES / GGUF_FUZZ_SEED /
GGUF_FUZZ_JOBS change it there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):  # the test helpers and the package, run as a script
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from gguf_testutils import tiny_model_tensors, write_gguf  # noqa: E402

from steadydancer.errors import GGUFError, ModelFileError, SteadyDancerError  # noqa: E402
from steadydancer.gguf.loader import load_gguf_state_dict  # noqa: E402
from steadydancer.gguf.ops import dequantize_tensor  # noqa: E402
from steadydancer.gguf.reader import ORIG_SHAPE_PREFIX  # noqa: E402
from steadydancer.keys import PREFIXES, TinyConfig  # noqa: E402
from steadydancer.model import config_from_state_dict  # noqa: E402
from steadydancer.weights import load_weights  # noqa: E402

Q = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType

DEFAULT_CASES = 20_000
MAX_LOAD_S = 2.0
# The constant of the memory bound (peak <= 2 x file size + MEMORY_CONSTANT). A successful
# load returns one Python object graph per tensor (name, shape tuple, numpy view, torch
# tensor): ~1.2 KiB traced, whatever the tensor's size. The base files have at most 129
# tensors (~160 KiB at peak) and a case adds at most 200 records (~240 KiB), so 1 MiB covers
# every legitimate load with room for interpreter noise, while the bug class it is there to
# catch, an allocation per *declared* element or record (the old reader kept ~670 bytes
# per element of a corrupt array length), exceeds it within the first few KiB of file. The 2 x
# allows one copy of the file's bytes plus their decoding.
MEMORY_CONSTANT = 1 << 20
FILE_LIMIT = 1 << 20  # every case file stays under 1 MB (MAX_LOAD_S is for those)
RATIO_MIN_SIZE = 64 << 10  # peak / size is reported for files this large (a few KiB of fixed
# cost over a 12-byte file says nothing)

NAMED_ERRORS = (GGUFError, ModelFileError)
CONFIG_NAMES = (
    "head.modulation",
    "blocks.0.ffn.0.weight",
    "patch_embedding.weight",
    "patch_embedding_ref_c.weight",
    "head.head.weight",
    "text_embedding.0.weight",
    "img_emb.proj.1.weight",
    "time_embedding.0.weight",
)
_SCALAR_FMT = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.FLOAT32: "<f",
    VT.BOOL: "<?",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT64: "<d",
}
_SIZE = {t: struct.calcsize(f) for t, f in _SCALAR_FMT.items()}
BIG = (2**64 - 1, 2**63, 2**63 - 1, 2**62, 2**40, 2**32, 2**32 - 1, 2**31, 2**31 - 1)


def u32(v: int) -> bytes:
    return (v % 2**32).to_bytes(4, "little")


def u64(v: int) -> bytes:
    return (v % 2**64).to_bytes(8, "little")


# --------------------------------------------------------------------------------- layout
@dataclass
class KV:
    key: bytes
    vtype: int
    body: bytes  # the encoded value after the type tag
    key_len: int | None = None  # written instead of len(key) when set


@dataclass
class Record:
    name: bytes
    dims: list[int]  # GGML order (fastest axis first)
    qtype: int
    offset: int
    name_len: int | None = None
    n_dims: int | None = None  # written instead of len(dims) when set


@dataclass
class Layout:
    """A GGUF file as records; `serialise` writes it back byte for byte."""

    version: int
    kvs: list[KV]
    tensors: list[Record]
    data: bytes  # the data section
    alignment: int  # what the data section is padded to when written
    tensor_count: int | None = None
    kv_count: int | None = None

    def clone(self) -> Layout:
        tensors = []
        for t in self.tensors:
            t = copy.copy(t)
            t.dims = list(t.dims)
            tensors.append(t)
        return dataclasses.replace(self, kvs=[copy.copy(k) for k in self.kvs], tensors=tensors)

    def kv(self, key: bytes) -> KV | None:
        return next((k for k in self.kvs if k.key == key), None)

    def set_kv(self, key: bytes, vtype: int, body: bytes) -> None:
        kv = self.kv(key)
        if kv is None:
            self.kvs.append(KV(key, vtype, body))
        else:
            kv.vtype, kv.body, kv.key_len = vtype, body, None


def string_body(s: bytes, length: int | None = None) -> bytes:
    return u64(len(s) if length is None else length) + s


def pack_value(item_type: int, value) -> bytes:
    """One fixed-size value; integers wrap to the type's width (two's complement)."""
    fmt = _SCALAR_FMT[VT(item_type)]
    if fmt[1] in "bBhHiIqQ":
        return (int(value) % 2 ** (8 * _SIZE[VT(item_type)])).to_bytes(_SIZE[VT(item_type)], "little")
    return struct.pack(fmt, value)


def array_body(item_type: int, values: list, count: int | None = None) -> bytes:
    if item_type == VT.STRING:
        items = b"".join(string_body(v) for v in values)
    else:
        items = b"".join(pack_value(item_type, v) for v in values)
    return u32(item_type) + u64(len(values) if count is None else count) + items


def _value_end(raw: bytes, pos: int, vtype: int) -> int:
    if vtype == VT.STRING:
        return pos + 8 + int.from_bytes(raw[pos : pos + 8], "little")
    if vtype == VT.ARRAY:
        item_type = int.from_bytes(raw[pos : pos + 4], "little")
        count = int.from_bytes(raw[pos + 4 : pos + 12], "little")
        pos += 12
        for _ in range(count):
            pos = _value_end(raw, pos, item_type)
        return pos
    return pos + _SIZE[VT(vtype)]


def parse_layout(raw: bytes) -> Layout:
    """The records of a valid file (written by gguf.GGUFWriter)."""
    assert raw[:4] == b"GGUF"
    version = int.from_bytes(raw[4:8], "little")
    n_tensors = int.from_bytes(raw[8:16], "little")
    n_kv = int.from_bytes(raw[16:24], "little")
    pos = 24
    kvs = []
    for _ in range(n_kv):
        n = int.from_bytes(raw[pos : pos + 8], "little")
        key = raw[pos + 8 : pos + 8 + n]
        pos += 8 + n
        vtype = int.from_bytes(raw[pos : pos + 4], "little")
        pos += 4
        end = _value_end(raw, pos, vtype)
        kvs.append(KV(key, vtype, raw[pos:end]))
        pos = end
    tensors = []
    for _ in range(n_tensors):
        n = int.from_bytes(raw[pos : pos + 8], "little")
        name = raw[pos + 8 : pos + 8 + n]
        pos += 8 + n
        n_dims = int.from_bytes(raw[pos : pos + 4], "little")
        dims = list(struct.unpack_from(f"<{n_dims}Q", raw, pos + 4))
        pos += 4 + 8 * n_dims
        qtype, offset = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        tensors.append(Record(name, dims, qtype, offset))
    alignment = 32
    for kv in kvs:
        if kv.key == b"general.alignment":
            alignment = int.from_bytes(kv.body, "little")
    start = -(-pos // alignment) * alignment
    return Layout(version, kvs, tensors, raw[start:], alignment)


class Mark(NamedTuple):
    offset: int
    width: int  # of an integer field; 0 for a boundary
    label: str


def serialise(layout: Layout) -> tuple[bytes, list[Mark]]:
    """The file's bytes, and the offset of every structural element (for byte-level mutations)."""
    out = bytearray()
    marks: list[Mark] = []

    def put(b: bytes, label: str, width: int = 0) -> None:
        marks.append(Mark(len(out), width, label))
        out.extend(b)

    put(b"GGUF", "magic")
    put(u32(layout.version), "version", 4)
    put(u64(len(layout.tensors) if layout.tensor_count is None else layout.tensor_count), "tensor_count", 8)
    put(u64(len(layout.kvs) if layout.kv_count is None else layout.kv_count), "kv_count", 8)
    for i, kv in enumerate(layout.kvs):
        put(u64(len(kv.key) if kv.key_len is None else kv.key_len), f"kv{i}.key_len", 8)
        put(kv.key, f"kv{i}.key")
        put(u32(kv.vtype), f"kv{i}.type", 4)
        start = len(out)
        if kv.vtype == VT.STRING and len(kv.body) >= 8:
            marks.append(Mark(start, 8, f"kv{i}.str_len"))
        elif kv.vtype == VT.ARRAY and len(kv.body) >= 12:
            marks.append(Mark(start, 4, f"kv{i}.item_type"))
            marks.append(Mark(start + 4, 8, f"kv{i}.count"))
            marks.append(Mark(start + 12, 0, f"kv{i}.items"))
            if int.from_bytes(kv.body[:4], "little") == VT.STRING:
                pos = 12
                for j in range(3):  # the first string lengths
                    if pos + 8 > len(kv.body):
                        break
                    marks.append(Mark(start + pos, 8, f"kv{i}.item{j}.len"))
                    pos += 8 + int.from_bytes(kv.body[pos : pos + 8], "little")
        put(kv.body, f"kv{i}.value")
    for i, t in enumerate(layout.tensors):
        put(u64(len(t.name) if t.name_len is None else t.name_len), f"t{i}.name_len", 8)
        put(t.name, f"t{i}.name")
        put(u32(len(t.dims) if t.n_dims is None else t.n_dims), f"t{i}.n_dims", 4)
        for j, d in enumerate(t.dims):
            put(u64(d), f"t{i}.dim{j}", 8)
        put(u32(t.qtype), f"t{i}.type", 4)
        put(u64(t.offset), f"t{i}.offset", 8)
    put(bytes(-len(out) % layout.alignment), "padding")
    data_start = len(out)
    put(layout.data, "data")
    for i, t in enumerate(layout.tensors):
        if t.offset < len(layout.data):
            marks.append(Mark(data_start + t.offset, 0, f"t{i}.data"))
    marks.append(Mark(len(out), 0, "eof"))
    return bytes(out), marks


# ---------------------------------------------------------------------------- base corpus
def _comfy_layout(
    tensors: dict[str, tuple[np.ndarray, Q]], row_types: list[Q], flat_types: list[Q]
) -> tuple[dict[str, tuple[np.ndarray, Q]], dict[str, tuple[int, ...]]]:
    """As ComfyUI-GGUF's converter stores tensors: rows of 32 quantised as they are, others
    flattened to rows of 256 (K quants need those) with the real shape in orig_shape."""
    out, orig = {}, {}
    for i, (name, (value, qtype)) in enumerate(tensors.items()):
        if qtype != Q.F32 and 2 <= value.ndim <= 4:
            out[name] = (value, row_types[i % len(row_types)])
        elif value.ndim >= 2 and value.size % 256 == 0:
            out[name] = (value.reshape(-1, 256), flat_types[i % len(flat_types)])
            orig[name] = value.shape
        else:
            out[name] = (value, Q.F32)
    return out, orig


def _all_value_types() -> dict[str, tuple[object, VT]]:
    return {
        "fuzz.u8": (7, VT.UINT8),
        "fuzz.i8": (-7, VT.INT8),
        "fuzz.u16": (700, VT.UINT16),
        "fuzz.i16": (-700, VT.INT16),
        "fuzz.u32": (70000, VT.UINT32),
        "fuzz.i32": (-70000, VT.INT32),
        "fuzz.f32": (0.5, VT.FLOAT32),
        "fuzz.bool": (True, VT.BOOL),
        "fuzz.str": ("SteadyDancer fuzz ✓", VT.STRING),
        "fuzz.u64": (2**40, VT.UINT64),
        "fuzz.i64": (-(2**40), VT.INT64),
        "fuzz.f64": (0.25, VT.FLOAT64),
        "fuzz.ints": ([1, 2, 3, 4], VT.ARRAY),
        "fuzz.floats": ([0.5, 1.5], VT.ARRAY),
        "fuzz.bools": ([True, False, True], VT.ARRAY),
        "fuzz.strings": (["a", "", "wan", "ü"], VT.ARRAY),
    }


def build_corpus(directory: Path) -> dict[str, bytes]:
    """The valid starting files, written with gguf.GGUFWriter; each loads and has a config."""
    small = {"dim": 32, "ffn_dim": 64, "text_dim": 32, "clip_dim": 32, "freq_dim": 32}
    one = TinyConfig(num_layers=1, **small)
    two = TinyConfig(num_layers=2, **small)
    files: dict[str, bytes] = {}

    t, orig = _comfy_layout(
        tiny_model_tensors(Q.Q8_0, prefix="model.diffusion_model.", config=one),
        [Q.Q8_0, Q.Q8_0, Q.BF16, Q.F16],
        [Q.Q8_0, Q.Q4_K],
    )
    files["comfy_q8"] = _write(directory / "comfy_q8.gguf", t, orig_shapes=orig)

    t, orig = _comfy_layout(
        tiny_model_tensors(Q.Q8_0, config=two),
        [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0],
        [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K],
    )
    files["k_quants_meta"] = _write(
        directory / "k_quants_meta.gguf",
        t,
        orig_shapes=orig,
        typed_metadata=_all_value_types(),
        alignment=64,
    )

    t = {
        name: (value, Q.F16 if value.ndim >= 2 else Q.F32)
        for name, (value, _) in tiny_model_tensors(Q.F32, prefix="diffusion_model.", config=one).items()
    }
    files["undeclared_f16"] = _write(directory / "undeclared_f16.gguf", t, arch=None)
    return files


def _write(path: Path, tensors, **kwargs) -> bytes:
    write_gguf(path, tensors, **kwargs)
    config_from_state_dict(load_gguf_state_dict(path))  # the starting point is valid
    raw = path.read_bytes()
    assert serialise(parse_layout(raw))[0] == raw, f"{path.name}: the layout model does not round-trip"
    assert len(raw) < FILE_LIMIT // 2
    return raw


# ------------------------------------------------------------------------------ mutations
@dataclass
class Ctx:
    rng: random.Random
    size: int  # of the unmutated file

    def count(self, actual: int, min_size: int) -> int:
        """An interesting count or length: off by one, what the file could hold, huge."""
        r = self.rng
        choice = r.random()
        if choice < 0.3:
            return r.choice(BIG)
        if choice < 0.6:
            return max(0, actual + r.choice((-1, 1, 2, 8, -8)))
        if choice < 0.85:
            return self.size // max(min_size, 1) + r.choice((-1, 0, 1, 2))
        return r.choice((0, 1, actual * 2, r.randrange(2**64)))


def _pick(layout: Layout, rng: random.Random, prefer_config: float = 0.5) -> tuple[int, Record]:
    if not layout.tensors:
        layout.tensors.append(Record(b"head.modulation", [32, 2, 1], int(Q.F32), 0))
    if rng.random() < prefer_config:
        wanted = [i for i, t in enumerate(layout.tensors) if _strip(t.name) in CONFIG_NAMES]
        if wanted:
            i = rng.choice(wanted)
            return i, layout.tensors[i]
    i = rng.randrange(len(layout.tensors))
    return i, layout.tensors[i]


def _strip(name: bytes) -> str:
    s = name.decode("utf-8", "replace")
    for p in PREFIXES:
        if s.startswith(p):
            return s[len(p) :]
    return s


def _nbytes(t: Record) -> int:
    try:
        block, size = gguf.GGML_QUANT_SIZES[Q(t.qtype)]
    except (ValueError, KeyError):
        return 0
    n = 1
    for d in t.dims:
        n *= d
    return n // block * size


def _logical_shape(layout: Layout, t: Record) -> tuple[int, ...]:
    kv = layout.kv(ORIG_SHAPE_PREFIX.encode() + t.name)
    if kv is not None and kv.vtype == VT.ARRAY and len(kv.body) >= 12:
        count = int.from_bytes(kv.body[4:12], "little")
        item = int.from_bytes(kv.body[:4], "little")
        if item in (VT.INT32, VT.UINT32, VT.INT64, VT.UINT64) and count < 64:
            fmt = _SCALAR_FMT[VT(item)]
            if len(kv.body) >= 12 + count * _SIZE[VT(item)]:  # not when a count was mutated
                return struct.unpack_from(f"<{count}{fmt[1]}", kv.body, 12)
    return tuple(reversed(t.dims))


def _reshapes(shape: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    """A shape of the same element count and another layout (a coherent reshape)."""
    n = 1
    for s in shape:
        n *= s
    options = [(n,), (1, n), (*shape, 1), (1, *shape), (1,) * rng.randint(2, 20) + (n,)]
    if len(shape) >= 2:
        options += [shape[::-1], (*shape[1:-1], shape[0] * shape[-1]), (shape[0], n // (shape[0] or 1))]
    divisors = [d for d in (2, 3, 4, 8, 16, 32) if n and n % d == 0]
    if divisors:
        d = rng.choice(divisors)
        options += [(d, n // d), (n // d, d, 1, 1, 1), (1, d, n // d)]
    if n == 1:
        options.append(())
    return rng.choice(options)


def op_counts(layout: Layout, c: Ctx) -> str:
    if c.rng.random() < 0.5:
        layout.tensor_count = c.count(len(layout.tensors), 24)
        return f"tensor_count={layout.tensor_count}"
    layout.kv_count = c.count(len(layout.kvs), 13)
    return f"kv_count={layout.kv_count}"


def op_version(layout: Layout, c: Ctx) -> str:
    layout.version = c.rng.choice((0, 1, 2, 4, 99, 0x00030000, 0x03000000, 2**32 - 1))
    return f"version={layout.version:#x}"


def op_key(layout: Layout, c: Ctx) -> str:
    if not layout.kvs:
        return op_counts(layout, c)
    kv = c.rng.choice(layout.kvs)
    what = c.rng.choice(("len", "dup", "utf8", "empty", "long"))
    if what == "len":
        kv.key_len = c.count(len(kv.key), 1)
        return f"key {kv.key[:40]!r} length={kv.key_len}"
    if what == "dup":
        kv.key = c.rng.choice(layout.kvs).key
    elif what == "utf8":
        kv.key = kv.key[:3] + b"\xff\xfe" + kv.key[3:]
    elif what == "empty":
        kv.key = b""
    else:
        kv.key = b"k" * c.rng.choice((1 << 16, (1 << 16) + 1, 70_000))
    return f"key -> {what}"


def op_value_type(layout: Layout, c: Ctx) -> str:
    if not layout.kvs:
        return op_counts(layout, c)
    kv = c.rng.choice(layout.kvs)
    old = kv.vtype
    kv.vtype = c.rng.choice([*range(13), 13, 255, 2**31, 2**32 - 1])
    return f"value type of {kv.key[:40]!r}: {old} -> {kv.vtype}"


def op_string_len(layout: Layout, c: Ctx) -> str:
    strings = [k for k in layout.kvs if k.vtype == VT.STRING]
    if not strings:
        return op_array_count(layout, c)
    kv = c.rng.choice(strings)
    n = c.count(len(kv.body) - 8, 1)
    kv.body = u64(n) + kv.body[8:]
    return f"string length of {kv.key[:40]!r}={n}"


def op_array_count(layout: Layout, c: Ctx) -> str:
    arrays = [k for k in layout.kvs if k.vtype == VT.ARRAY and len(k.body) >= 12]
    if not arrays:
        return op_counts(layout, c)
    kv = c.rng.choice(arrays)
    item = int.from_bytes(kv.body[:4], "little")
    actual = int.from_bytes(kv.body[4:12], "little")
    n = c.count(actual, _SIZE.get(VT(item), 8) if item < 13 else 1)
    kv.body = kv.body[:4] + u64(n) + kv.body[12:]
    return f"array count of {kv.key[:40]!r}={n}"


def op_array_item_type(layout: Layout, c: Ctx) -> str:
    arrays = [k for k in layout.kvs if k.vtype == VT.ARRAY and len(k.body) >= 12]
    if not arrays:
        return op_value_type(layout, c)
    kv = c.rng.choice(arrays)
    item = c.rng.choice([*range(13), 13, 2**32 - 1])
    kv.body = u32(item) + kv.body[4:]
    return f"array item type of {kv.key[:40]!r}={item}"


def op_big_array(layout: Layout, c: Ctx) -> str:
    """A genuinely large array (the file grows towards 1 MB), its count honest or not."""
    r = c.rng
    budget = FILE_LIMIT - c.size - 4096
    item = r.choice([VT.UINT8, VT.INT8, VT.BOOL, VT.INT32, VT.FLOAT32, VT.UINT64, VT.FLOAT64, VT.STRING])
    if item == VT.STRING:
        pattern = b"".join(string_body(b"x" * r.choice((0, 0, 1, 3))) for _ in range(8))
        count = budget // len(pattern) * 8
        items = pattern * (count // 8)
    else:
        count = budget // _SIZE[item]
        items = bytes(count * _SIZE[item]) if r.random() < 0.5 else r.randbytes(count * _SIZE[item])
        if item == VT.BOOL:
            items = bytes(b & 1 for b in items[:1]) + items[1:]
    declared = r.choice((count, count, count + 1, count - 1, count * 2, 2**63))
    key = r.choice((b"fuzz.big", b"general.architecture", b"tokenizer.ggml.tokens"))
    layout.set_kv(key, VT.ARRAY, u32(item) + u64(declared) + items)
    return f"big array {key!r} of {count} {item.name} (declared {declared})"


def op_nested_array(layout: Layout, c: Ctx) -> str:
    inner = array_body(VT.INT32, [1, 2])
    body = u32(VT.ARRAY) + u64(c.rng.choice((1, 2, 10**6))) + inner * 2
    layout.set_kv(b"fuzz.nested", VT.ARRAY, body)
    return "nested array"


def op_alignment(layout: Layout, c: Ctx) -> str:
    r = c.rng
    if r.random() < 0.7:
        value = r.choice((0, 1, 3, 8, 48, 64, 4096, 2**31, 2**32 - 1))
        layout.set_kv(b"general.alignment", VT.UINT32, u32(value))
        return f"alignment={value}"
    vtype = r.choice((VT.UINT64, VT.INT32, VT.STRING, VT.FLOAT32))
    body = string_body(b"32") if vtype == VT.STRING else pack_value(vtype, 32)
    layout.set_kv(b"general.alignment", vtype, body)
    return f"alignment as {vtype.name}"


def op_architecture(layout: Layout, c: Ctx) -> str:
    r = c.rng
    choice = r.randrange(5)
    key = b"general.architecture"
    if choice == 0:
        layout.kvs = [k for k in layout.kvs if k.key != key]
        return "no architecture"
    if choice == 1:
        layout.set_kv(key, VT.UINT32, u32(7))
        return "architecture as UINT32"
    if choice == 2:
        layout.set_kv(key, VT.ARRAY, array_body(VT.STRING, [b"wan"]))
        return "architecture as array"
    value = r.choice((b"flux", b"", b"pig", b"wan\x00", b"WAN", b"\xff\xfewan", b"w" * 200_000))
    layout.set_kv(key, VT.STRING, string_body(value))
    return f"architecture={value[:20]!r}"


def op_orig_shape(layout: Layout, c: Ctx) -> str:
    r = c.rng
    _, t = _pick(layout, r, 0.6)
    n = 1
    for d in t.dims:
        n *= d
    key = ORIG_SHAPE_PREFIX.encode() + (t.name if r.random() < 0.9 else _strip(t.name).encode())
    kind = r.choice(("coherent", "coherent", "count", "zero", "negative", "huge", "axes", "empty", "type"))
    item = VT.INT32 if kind == "negative" else r.choice((VT.INT32, VT.UINT32, VT.INT64, VT.UINT64))
    shape = list(_logical_shape(layout, t))
    if kind == "coherent":
        shape = list(_reshapes(tuple(shape), r))
    elif kind == "count":
        shape = [*shape[:-1], max(0, (shape[-1] if shape else 1) + r.choice((-1, 1, 32)))]
    elif kind == "zero":
        shape = [*shape, 0] if r.random() < 0.5 else [0] * max(1, len(shape))
    elif kind == "negative":
        shape = [-1, -n] if r.random() < 0.5 else [-2, n // 2 * -1]
    elif kind == "huge":
        item = r.choice((VT.UINT64, VT.INT64))
        big = r.choice((2**63 - 1, 2**62, 2**32)) if item == VT.INT64 else r.choice(BIG)
        shape = [big, 0] if r.random() < 0.5 else [big, big]
    elif kind == "axes":
        shape = [1] * r.choice((17, 33, 100, 5000)) + [n]
    elif kind == "empty":
        shape = []
    if kind == "type":
        vtype = r.choice((VT.STRING, VT.FLOAT32, VT.UINT8, VT.INT16, VT.BOOL, VT.UINT32))
        if vtype == VT.STRING:
            layout.set_kv(key, VT.STRING, string_body(str(tuple(shape)).encode()))
        elif vtype == VT.UINT32:
            layout.set_kv(key, VT.UINT32, u32(n))
        else:
            values = [float(s) for s in shape] if vtype == VT.FLOAT32 else [s % 2 for s in shape]
            layout.set_kv(key, VT.ARRAY, array_body(vtype, values or [1]))
        return f"orig_shape of {t.name[:60]!r} as {vtype.name}"
    if item in (VT.UINT32, VT.UINT64):
        shape = [s % (2**32 if item == VT.UINT32 else 2**64) for s in shape]
    elif item == VT.INT32:
        shape = [max(-(2**31), min(s, 2**31 - 1)) for s in shape]
    else:
        shape = [max(-(2**63), min(s, 2**63 - 1)) for s in shape]
    layout.set_kv(key, VT.ARRAY, array_body(item, shape))
    return f"orig_shape {kind} of {t.name[:60]!r}: {tuple(shape[:8])}{'...' if len(shape) > 8 else ''}"


def op_reshape(layout: Layout, c: Ctx) -> str:
    """A tensor the config reads, reshaped so the file stays readable but the shape is not
    the model's: another rank or factorisation of the same elements, or a zero size."""
    r = c.rng
    _, t = _pick(layout, r, 1.0)
    if not t.dims:
        t.dims.append(1)
    key = ORIG_SHAPE_PREFIX.encode() + t.name
    if r.random() < 0.35:
        t.dims[r.randrange(len(t.dims))] = 0
        shape = [0 if d == 0 else d for d in _logical_shape(layout, t)]
        if layout.kv(key) is not None:
            shape = shape or [0]
            shape[r.randrange(len(shape))] = 0
            layout.set_kv(key, VT.ARRAY, array_body(VT.UINT32, shape))
        return f"zero-size {t.name[:60]!r}: dims {t.dims}, shape {tuple(shape)}"
    shape = _reshapes(_logical_shape(layout, t), r)[:16]
    n = 1
    for d in t.dims:
        n *= d
    if _product(shape) != n:
        shape = (n,)
    layout.set_kv(key, VT.ARRAY, array_body(VT.INT64, list(shape)))
    return f"reshape {t.name[:60]!r} -> {shape}"


def _product(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def op_tensor_name(layout: Layout, c: Ctx) -> str:
    r = c.rng
    i, t = _pick(layout, r, 0.3)
    kind = r.choice(("dup", "alias", "empty", "utf8", "long", "len", "block", "block", "block"))
    if kind == "dup":
        t.name = r.choice(layout.tensors).name
    elif kind == "alias":
        other = _strip(r.choice(layout.tensors).name)
        t.name = (r.choice(PREFIXES) + other if r.random() < 0.5 else other).encode()
    elif kind == "empty":
        t.name = b""
    elif kind == "utf8":
        t.name = t.name[:5] + b"\xc3\x28" + t.name[5:]
    elif kind == "long":
        t.name = b"n" * r.choice((64, 1 << 16, (1 << 16) + 1))
    elif kind == "len":
        t.name_len = c.count(len(t.name), 1)
        return f"tensor {i} name length={t.name_len}"
    else:
        blocks = [x for x in layout.tensors if b"blocks." in x.name]
        t = r.choice(blocks) if blocks else t
        number = r.choice(
            (
                "99999999999999999999",
                "9" * 5000,
                "1000",
                "1001",
                str(len(layout.tensors)),
                str(len(layout.tensors) - 1),
                "4294967296",
                "01",
                "-1",
                "1e3",
                "\u0663",  # ARABIC-INDIC DIGIT THREE: \d and int() both accept it
                "\uff11",  # FULLWIDTH DIGIT ONE
                "2",
                "3",
            )
        )
        head, _, rest = t.name.partition(b"blocks.")
        t.name = head + b"blocks." + number.encode() + b"." + rest.partition(b".")[2]
        return f"block rename -> blocks.{number[:24]}"
    return f"tensor {i} name -> {kind}"


def op_dims(layout: Layout, c: Ctx) -> str:
    r = c.rng
    i, t = _pick(layout, r, 0.5)
    if not t.dims:
        t.dims.append(1)
    kind = r.choice(("zero", "negative", "huge", "overflow", "many", "none", "permute", "double", "row", "n_dims"))
    if kind == "zero":
        t.dims[r.randrange(len(t.dims))] = 0
    elif kind == "negative":
        t.dims[r.randrange(len(t.dims))] = r.choice((2**64 - 1, 2**63, 2**64 - t.dims[0]))
    elif kind == "huge":
        t.dims[r.randrange(len(t.dims))] = r.choice((2**63 - 1, 2**62, 2**40, 10**12))
    elif kind == "overflow":
        t.dims = [2**32, 2**32, 2**32] if r.random() < 0.5 else [0, 2**62, 2**62]
    elif kind == "many":
        t.dims = t.dims + [1] * r.choice((1, 3, 12, 13, 40))
    elif kind == "none":
        t.dims = []
    elif kind == "permute":
        r.shuffle(t.dims)
    elif kind == "double":
        t.dims[-1] *= 2
    elif kind == "row":
        t.dims[0] = t.dims[0] + r.choice((1, 16, -1))
    else:
        t.n_dims = r.choice((0, 1, 5, 17, 64, 2**31, 2**32 - 1, len(t.dims) + 1, max(0, len(t.dims) - 1)))
        return f"tensor {i} n_dims field={t.n_dims} (dims {t.dims})"
    return f"tensor {i} dims {kind} -> {t.dims[:6]}"


UNKNOWN_TYPES = (4, 5, 31, 32, 33, 36, 37, 38, 42, 100, 2**31, 2**32 - 1)


def op_qtype(layout: Layout, c: Ctx) -> str:
    r = c.rng
    i, t = _pick(layout, r, 0.3)
    kind = r.choice(("unknown", "known", "known"))
    old = t.qtype
    t.qtype = r.choice(UNKNOWN_TYPES) if kind == "unknown" else int(r.choice(list(Q)))
    return f"tensor {i} type {old} -> {t.qtype}"


def op_offset(layout: Layout, c: Ctx) -> str:
    r = c.rng
    i, t = _pick(layout, r, 0.3)
    kind = r.choice(("past", "huge", "overlap", "overlap", "misaligned", "misaligned", "eof", "swap", "zero"))
    end = len(layout.data)
    if kind == "past":
        t.offset = end + r.choice((0, 1, 32, 4096))
    elif kind == "huge":
        t.offset = r.choice(BIG)
    elif kind == "overlap":
        other = r.choice(layout.tensors)
        t.offset = other.offset + r.choice((0, 0, 1, 2, 4, 32))
    elif kind == "misaligned":
        t.offset += r.choice((1, 2, 3, 4, 8, 16, -1))
        t.offset %= 2**64
    elif kind == "eof":
        t.offset = max(0, end - _nbytes(t) + r.choice((0, 0, 1, -1)))
    elif kind == "swap":
        other = r.choice(layout.tensors)
        t.offset, other.offset = other.offset, t.offset
    else:
        for x in layout.tensors:
            x.offset = 0
    return f"tensor {i} offset {kind} -> {t.offset}"


def op_records(layout: Layout, c: Ctx) -> str:
    """Records dropped, duplicated, reordered or added (tiny extra tensors, valid or not)."""
    r = c.rng
    kind = r.choice(("drop_tensor", "drop_kv", "dup_tensor", "dup_kv", "shuffle", "add"))
    if kind == "drop_tensor":
        layout.tensors.pop(_pick(layout, r, 0.5)[0])
    elif kind == "drop_kv" and layout.kvs:
        layout.kvs.pop(r.randrange(len(layout.kvs)))
    elif kind == "dup_tensor":
        layout.tensors.insert(r.randrange(len(layout.tensors) + 1), dataclasses.replace(r.choice(layout.tensors)))
    elif kind == "dup_kv" and layout.kvs:
        layout.kvs.insert(r.randrange(len(layout.kvs) + 1), dataclasses.replace(r.choice(layout.kvs)))
    elif kind == "shuffle":
        r.shuffle(layout.tensors)
        r.shuffle(layout.kvs)
    elif kind == "add":
        n = r.choice((1, 10, 200))
        data = bytearray(layout.data)
        for j in range(n):
            offset = len(data)
            qtype = r.choice((Q.F32, Q.F16, Q.Q8_0, Q.BF16))
            dims = [32] if qtype == Q.Q8_0 else [r.choice((0, 1, 3))]
            name = r.choice((f"extra.{j}.weight", f"blocks.0.extra{j}", f"blocks.{j + 7}.x"))
            layout.tensors.append(Record(name.encode(), dims, int(qtype), offset))
            data += r.randbytes(_nbytes(layout.tensors[-1]))
            data += bytes(-len(data) % layout.alignment)
        layout.data = bytes(data)
        return f"add {n} tensors"
    return kind


def op_data(layout: Layout, c: Ctx) -> str:
    """Garbage in a tensor's data: NaN/inf scales, all ones, random bytes (loads; dequantises)."""
    r = c.rng
    _, t = _pick(layout, r, 0.3)
    n = _nbytes(t)
    if not n or t.offset + n > len(layout.data):
        return "data (none)"
    fill = r.choice((b"\xff", b"\x00", b"\x7c", None))
    new = r.randbytes(n) if fill is None else fill * n
    layout.data = layout.data[: t.offset] + new + layout.data[t.offset + n :]
    return f"data of {t.name[:40]!r} -> {fill!r}"


STRUCTURAL: dict[str, Callable[[Layout, Ctx], str]] = {
    "counts": op_counts,
    "version": op_version,
    "key": op_key,
    "value_type": op_value_type,
    "string_len": op_string_len,
    "array_count": op_array_count,
    "array_item_type": op_array_item_type,
    "big_array": op_big_array,
    "nested_array": op_nested_array,
    "alignment": op_alignment,
    "architecture": op_architecture,
    "orig_shape": op_orig_shape,
    "reshape": op_reshape,
    "tensor_name": op_tensor_name,
    "dims": op_dims,
    "qtype": op_qtype,
    "offset": op_offset,
    "records": op_records,
    "data": op_data,
}
# how often each is drawn (relative)
WEIGHTS = {
    "counts": 4,
    "version": 1,
    "key": 3,
    "value_type": 3,
    "string_len": 3,
    "array_count": 4,
    "array_item_type": 2,
    "big_array": 2,
    "nested_array": 1,
    "alignment": 2,
    "architecture": 2,
    "orig_shape": 6,
    "reshape": 4,
    "tensor_name": 6,
    "dims": 7,
    "qtype": 5,
    "offset": 6,
    "records": 4,
    "data": 2,
}


def bop_truncate(raw: bytes, marks: list[Mark], r: random.Random) -> tuple[bytes, str]:
    """Cut at a structural boundary (just before, at, just after, inside a field)."""
    m = r.choice(marks)
    at = m.offset + r.choice((-1, 0, 0, 1, 2, max(m.width // 2, 1)))
    at = max(0, min(at, len(raw) - 1))
    return raw[:at], f"truncate at {m.label}{at - m.offset:+d} ({at} bytes)"


def bop_field(raw: bytes, marks: list[Mark], r: random.Random) -> tuple[bytes, str]:
    """Overwrite an integer field of the header (a count, length, type, dim or offset)."""
    fields = [m for m in marks if m.width]
    m = r.choice(fields)
    if r.random() < 0.6:
        value = r.choice((0, 1, 2, 3, 255, 256, len(raw), len(raw) + 1, *BIG))
    else:
        value = r.randrange(2 ** (8 * m.width))
    out = bytearray(raw)
    out[m.offset : m.offset + m.width] = (value % 2 ** (8 * m.width)).to_bytes(m.width, "little")
    return bytes(out), f"field {m.label}={value}"


def bop_flip(raw: bytes, marks: list[Mark], r: random.Random) -> tuple[bytes, str]:
    header_end = next((m.offset for m in marks if m.label == "data"), len(raw))
    out = bytearray(raw)
    spots = []
    for _ in range(r.randint(1, 4)):
        pos = r.randrange(header_end if r.random() < 0.8 else len(raw))
        out[pos] ^= 1 << r.randrange(8)
        spots.append(pos)
    return bytes(out), f"flip bits at {spots}"


BYTE_LEVEL: dict[str, Callable[[bytes, list[Mark], random.Random], tuple[bytes, str]]] = {
    "truncate": bop_truncate,
    "field": bop_field,
    "flip": bop_flip,
}


@dataclass
class Case:
    number: int
    base: str
    ops: list[str]  # families applied
    description: list[str]
    data: bytes


_SIZES: dict[int, int] = {}


def make_case(layouts: dict[str, Layout], seed: int, number: int) -> Case:
    r = random.Random(f"gguf-fuzz/{seed}/{number}")
    base = r.choice(sorted(layouts))
    layout = layouts[base].clone()
    if id(layouts[base]) not in _SIZES:
        _SIZES[id(layouts[base])] = len(serialise(layouts[base])[0])
    c = Ctx(r, _SIZES[id(layouts[base])])
    ops, description = [], []
    n_struct = r.choices((0, 1, 2, 3), weights=(15, 55, 20, 10))[0]
    names = list(STRUCTURAL)
    for name in r.choices(names, weights=[WEIGHTS[n] for n in names], k=n_struct):
        ops.append(name)
        description.append(STRUCTURAL[name](layout, c))
    raw, marks = serialise(layout)
    if n_struct == 0 or r.random() < 0.2:
        name = r.choice(list(BYTE_LEVEL))
        raw, text = BYTE_LEVEL[name](raw, marks, r)
        ops.append(name)
        description.append(text)
    return Case(number, base, ops, description, raw[: FILE_LIMIT - 1])


# ---------------------------------------------------------------------------------- running
@dataclass
class Failure:
    seed: int
    case: int
    base: str
    description: list[str]
    problem: str
    detail: str

    def report(self) -> str:
        return (
            f"case {self.case} (seed {self.seed}, base {self.base}): {self.problem}\n"
            f"  mutations: {'; '.join(self.description)}\n"
            f"  replay: .venv/bin/python tests/gguf_fuzz.py --seed {self.seed} --case {self.case} "
            f"--save /tmp/gguf_fuzz_case.gguf\n{self.detail}"
        )


@dataclass
class Stats:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "ModelFileError (config)" -> n
    by_op: Counter = field(default_factory=Counter)  # (mutation family, outcome) -> n
    max_load_s: float = 0.0
    max_load_case: int = -1
    max_ratio: float = 0.0  # peak traced bytes / file size, files of RATIO_MIN_SIZE or more
    max_ratio_case: int = -1
    max_excess: int = -(2**62)  # peak - 2 x size, the largest seen (must stay <= MEMORY_CONSTANT)
    max_excess_case: int = -1
    max_peak: int = 0
    max_rss_growth: int = 0
    max_rss_case: int = -1
    max_size: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the workers, summed
    failures: list[Failure] = field(default_factory=list)

    def merge(self, other: Stats) -> None:
        self.cases += other.cases
        self.outcomes += other.outcomes
        self.by_op += other.by_op
        for attr, case in (("max_load_s", "max_load_case"), ("max_ratio", "max_ratio_case"), ("max_excess", "max_excess_case")):
            if getattr(other, attr) > getattr(self, attr):
                setattr(self, attr, getattr(other, attr))
                setattr(self, case, getattr(other, case))
        self.max_peak = max(self.max_peak, other.max_peak)
        if other.max_rss_growth > self.max_rss_growth:
            self.max_rss_growth, self.max_rss_case = other.max_rss_growth, other.max_rss_case
        self.max_size = max(self.max_size, other.max_size)
        self.cpu_s += other.cpu_s
        self.failures += other.failures

    def table(self) -> str:
        """Outcomes by mutation family (a case with several families counts for each)."""
        families = sorted({op for op, _ in self.by_op})
        outcomes = sorted({o for _, o in self.by_op})
        lines = ["| mutation | " + " | ".join(outcomes) + " |", "|---" * (len(outcomes) + 1) + "|"]
        for op in families:
            lines.append(f"| {op} | " + " | ".join(f"{self.by_op[(op, o)]:,}" for o in outcomes) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        lines = [
            f"{self.cases:,} cases in {self.wall_s:.1f} s ({self.cpu_s:.1f} CPU-seconds in the "
            f"workers); {len(self.failures)} failures",
            "outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.outcomes.items())),
            f"max load time {self.max_load_s * 1000:.1f} ms (case {self.max_load_case}); "
            f"largest file {self.max_size:,} bytes",
            f"max peak memory / file size {self.max_ratio:.3f} for files of 64 KiB or more "
            f"(case {self.max_ratio_case}); "
            f"max peak - 2 x size {self.max_excess / 1024:,.1f} KiB (case {self.max_excess_case}, "
            f"limit {MEMORY_CONSTANT / 1024:,.0f} KiB); max peak {self.max_peak / 1024:,.1f} KiB",
            f"max RSS growth during a load {self.max_rss_growth / 1024:,.0f} KiB "
            f"(case {self.max_rss_case})",
        ]
        return "\n".join(lines)


class _Rss:
    """Peak RSS of one load: the high-water mark is reset before it (Linux clear_refs)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = True
        except OSError:
            self.ok = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self) -> int:
        if not self.ok:
            return 0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._status("VmRSS:")

    def peak(self) -> int:
        return self._status("VmHWM:") if self.ok else 0


_WORKER: dict = {}


def _init_worker(corpus: dict[str, bytes], directory: str) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER["layouts"] = {name: parse_layout(raw) for name, raw in corpus.items()}
    _WORKER["path"] = Path(directory) / f"case-{os.getpid()}.gguf"
    _WORKER["rss"] = _Rss()
    # warm up: first-call caches (imports, regexes, torch dispatch) are not the case's memory
    _WORKER["path"].write_bytes(corpus[sorted(corpus)[0]])
    for _ in range(3):
        config_from_state_dict(load_weights(_WORKER["path"]))


def load_case(path: Path, number: int):
    """What users run: one of the two loading entry points, then the config."""
    if number % 2:
        return load_weights(path)
    return load_gguf_state_dict(path)


def _attempt(path: Path, number: int) -> tuple[dict | None, str, str | None, str | None]:
    """(state dict or None, outcome, problem or None, detail) of one load and config."""
    stage = "load"
    try:
        sd = load_case(path, number)
        stage = "config"
        config_from_state_dict(sd)
        return sd, "loaded", None, None
    except NAMED_ERRORS as exc:
        cause = exc.__cause__
        if cause is not None and not isinstance(cause, SteadyDancerError):
            problem = f"named error raised for an unexpected {type(cause).__name__}: {exc}"
            return None, f"{type(exc).__name__} ({stage})", problem, "".join(traceback.format_exception(cause))
        return None, f"{type(exc).__name__} ({stage})", None, None
    except Exception as exc:
        problem = f"unnamed exception {type(exc).__name__}: {exc}"
        return None, f"{type(exc).__name__} ({stage}, NOT NAMED)", problem, traceback.format_exc()


def run_one(seed: int, number: int, stats: Stats) -> None:
    try:
        case = make_case(_WORKER["layouts"], seed, number)
    except Exception as exc:  # a bug of the fuzzer itself: report it, go on with the others
        stats.cases += 1
        stats.outcomes["fuzzer error"] += 1
        stats.failures.append(
            Failure(seed, number, "?", [], f"the fuzzer failed to build the case: {exc!r}", traceback.format_exc())
        )
        return
    path: Path = _WORKER["path"]
    path.write_bytes(case.data)
    size = len(case.data)
    rss: _Rss = _WORKER["rss"]
    # Run 1, timed (and its peak RSS); run 2, memory traced: tracemalloc slows what it
    # watches (up to ~50x for a loop that allocates), so timing it would time tracemalloc.
    rss_before = rss.reset()
    t0 = time.perf_counter()
    sd, outcome, problem, detail = _attempt(path, number)
    elapsed = time.perf_counter() - t0
    rss_growth = max(0, rss.peak() - rss_before)
    tracemalloc.start()
    again = _attempt(path, number)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del again

    if problem is None and elapsed > MAX_LOAD_S:
        problem = f"load took {elapsed:.2f} s (limit {MAX_LOAD_S} s) for {size:,} bytes"
        detail = ""
    if problem is None and peak > 2 * size + MEMORY_CONSTANT:
        problem = f"peak memory {peak:,} bytes > 2 x {size:,} + {MEMORY_CONSTANT:,}"
        detail = ""
    if problem is None and sd is not None and outcome == "loaded":
        try:
            with np.errstate(all="ignore"):
                for tensor in sd.values():
                    dequantize_tensor(tensor)
        except Exception as exc:
            problem = f"a loaded file does not dequantise: {type(exc).__name__}: {exc}"
            detail = traceback.format_exc()
    del sd

    stats.cases += 1
    stats.outcomes[outcome] += 1
    for op in set(case.ops):
        stats.by_op[(op, outcome)] += 1
    stats.max_size = max(stats.max_size, size)
    if elapsed > stats.max_load_s:
        stats.max_load_s, stats.max_load_case = elapsed, number
    if size >= RATIO_MIN_SIZE and peak / size > stats.max_ratio:
        stats.max_ratio, stats.max_ratio_case = peak / max(size, 1), number
    if peak - 2 * size > stats.max_excess:
        stats.max_excess, stats.max_excess_case = peak - 2 * size, number
    stats.max_peak = max(stats.max_peak, peak)
    if rss_growth > stats.max_rss_growth:
        stats.max_rss_growth, stats.max_rss_case = rss_growth, number
    if problem is not None:
        stats.failures.append(Failure(seed, number, case.base, case.description, problem, detail or ""))


def run_range(seed: int, start: int, stop: int) -> Stats:
    stats = Stats()
    cpu = time.process_time()
    for number in range(start, stop):
        run_one(seed, number, stats)
    stats.cpu_s = time.process_time() - cpu
    return stats


def run(cases: int = DEFAULT_CASES, *, seed: int = 0, jobs: int = 2, start: int = 0, chunk: int = 250) -> Stats:
    """Run cases start..start+cases-1 of `seed` on `jobs` processes; the merged statistics."""
    t0 = time.perf_counter()
    stats = Stats()
    bounds = [(a, min(a + chunk, start + cases)) for a in range(start, start + cases, chunk)]
    # the case files go to memory when there is a tmpfs: 20,000 cases write ~3 GB
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="gguf_fuzz_", dir=shm) as tmp:
        corpus = build_corpus(Path(tmp))
        with ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(corpus, tmp),
        ) as pool:
            for part in pool.map(run_range, [seed] * len(bounds), *zip(*bounds, strict=True)):
                stats.merge(part)
    stats.wall_s = time.perf_counter() - t0
    return stats


def replay(seed: int, number: int, save: str | None) -> int:
    """Run one case in this process, letting any exception through with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp))
        case = make_case({k: parse_layout(v) for k, v in corpus.items()}, seed, number)
        print(f"case {number} (seed {seed}), base {case.base}, {len(case.data):,} bytes")
        for line in case.description:
            print(f"  {line}")
        path = Path(save) if save else Path(tmp) / "case.gguf"
        path.write_bytes(case.data)
        if save:
            print(f"written to {path}")
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            config_from_state_dict(load_case(path, number))
            print("loaded")
        except NAMED_ERRORS as exc:
            print(f"{type(exc).__name__}: {exc}")
            if exc.__cause__ is not None:
                raise
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(
                f"{time.perf_counter() - t0:.3f} s (memory traced, slower than untraced), "
                f"peak traced {peak:,} bytes; limit 2 x {len(case.data):,} + {MEMORY_CONSTANT:,}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--case", type=int, help="replay this one case (with --seed)")
    parser.add_argument("--save", help="with --case: write the case's file here")
    args = parser.parse_args(argv)
    if args.case is not None:
        return replay(args.seed, args.case, args.save)
    stats = run(args.cases, seed=args.seed, jobs=args.jobs, start=args.start)
    print(stats.summary())
    print(stats.table())
    for failure in stats.failures[:20]:
        print(failure.report())
    return 1 if stats.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
