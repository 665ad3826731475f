"""Floats into GGML blocks: what the converter writes (and the tests build files with).

K types (Q2_K ... Q6_K) use our own quantiser (`kquants`: gguf's Python package cannot write
them), the others `gguf.quants`. Reading them back is `dequant`.
"""

from __future__ import annotations

import gguf
import numpy as np

from ..errors import GGUFError, UnsupportedQuantError
from . import kquants
from .dequant import SUPPORTED_QTYPES, Q, as_qtype, supported_names


def quantize(array: np.ndarray, qtype: Q | int | str) -> np.ndarray:
    """Pack a float array into `qtype` blocks along its last axis (the converter's quantiser).

    Returns uint8 bytes of shape [..., last // block_size * type_size] (float types: the
    array in that dtype, BF16 as its raw uint16 bits viewed as uint8 pairs, as gguf writes
    them). The last axis must be a multiple of the block size. K types use our own quantiser
    (`kquants`), the others `gguf.quants`.
    """
    qt = as_qtype(qtype)
    arr = np.asarray(array, dtype=np.float32)
    if qt not in SUPPORTED_QTYPES:
        raise UnsupportedQuantError(f"cannot quantise to {qt.name}; supported: {supported_names()}")
    block_size, _ = gguf.GGML_QUANT_SIZES[qt]
    if arr.ndim == 0 or arr.shape[-1] % block_size:
        raise GGUFError(
            f"cannot quantise a tensor of shape {arr.shape} to {qt.name}: its last axis must be "
            f"a multiple of {block_size}"
        )
    if qt in kquants.QUANTIZERS:
        return kquants.quantize(arr, qt)
    try:
        return gguf.quants.quantize(arr, qt)
    except (NotImplementedError, gguf.QuantError) as exc:  # pragma: no cover - gguf version drift
        raise UnsupportedQuantError(f"gguf {qt.name} quantisation failed: {exc}") from exc
