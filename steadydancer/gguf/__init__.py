"""SteadyDancer's GGUF weights: read, dequantise, load, convert and inspect.

Submodules, each with one job: `reader` (parse a file, memory-mapped), `dequant` (packed
blocks -> float tensors in PyTorch, bit-exact with `gguf.quants`), `kquants` (K-type
quantiser for the converter), `ops` (GGMLTensor and the layers that use it), `loader` (file
-> checked state dict), `convert`, `inspect` and `bench` (command-line tools). Names are
resolved lazily so that importing this package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_gguf": "reader",
    "GGUFFile": "reader",
    "GGUFTensor": "reader",
    "dequantize": "dequant",
    "quantize": "dequant",
    "SUPPORTED_QTYPES": "dequant",
    "GGMLTensor": "ops",
    "GGMLOps": "ops",
    "is_quantized": "ops",
    "dequantize_tensor": "ops",
    "cache_dequantized": "ops",
    "load_gguf_state_dict": "loader",
    "convert_file": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
