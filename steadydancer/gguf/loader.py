"""Load a SteadyDancer GGUF file as a torch state dict, without dequantising or copying.

Quantised tensors become `GGMLTensor`s over the memory-mapped bytes; F32/F16/BF16 tensors
become plain tensors, also over the mapping. Nothing is read from disk until a tensor is
used (or moved to a device), so loading a 14B file takes about as long as parsing its header.

Before anything is returned the file is checked: it must be a Wan model (declared
`general.architecture = wan`, or, for files written without that key, the Wan key set) and,
unless `require_pose_path=False`, carry SteadyDancer's pose path. A plain Wan2.1-I2V file is
the most common wrong download; the error says so and names what is missing.
"""

from __future__ import annotations

import os
import warnings

import gguf
import torch

from ..errors import ModelFileError, UnsupportedQuantError
from ..keys import checked_state_dict
from .dequant import FLOAT_QTYPES, SUPPORTED_QTYPES, _reinterpret, supported_names
from .ops import GGMLTensor
from .reader import GGUFFile, GGUFTensor, _show, read_gguf

WAN_ARCHITECTURE = "wan"
# The keys ComfyUI-GGUF uses to recognise a Wan model in a file without an architecture.
WAN_KEY_SET = ("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation")
# Written by some converters instead of a real architecture name.
_UNDECLARED = (None, "", "pig")

_TORCH_FLOAT = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}


def check_architecture(file: GGUFFile) -> str:
    """Return "wan" for a Wan file; raise ModelFileError naming what the file is otherwise."""
    arch = file.architecture
    if arch == WAN_ARCHITECTURE:
        return arch
    if arch in _UNDECLARED:
        missing = [k for k in WAN_KEY_SET if k not in file.tensors]
        if not missing:
            return WAN_ARCHITECTURE
        raise ModelFileError(
            f"{file.path}: no general.architecture in the file and the tensors are not a Wan "
            f"model's (missing {', '.join(missing)}); SteadyDancer needs a Wan2.1-based GGUF"
        )
    raise ModelFileError(
        f"{file.path}: a {_show(arch)} model; SteadyDancer needs a Wan2.1-based ('wan') GGUF file "
        "such as MCG-NJU/SteadyDancer-GGUF"
    )


def check_supported(file: GGUFFile) -> None:
    """Raise UnsupportedQuantError listing the tensors whose type cannot be dequantised."""
    bad = [f"{t.name} ({t.qtype.name})" for t in file if t.qtype not in SUPPORTED_QTYPES]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise UnsupportedQuantError(
            f"{file.path}: unsupported quantisation type in {shown}; supported: {supported_names()}"
        )


def to_torch(tensor: GGUFTensor) -> torch.Tensor:
    """A GGUFTensor as a torch tensor sharing the mapped bytes (GGMLTensor when quantised)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(tensor.data)
    if tensor.qtype in FLOAT_QTYPES:  # a view; copied only where torch refuses the view
        return _reinterpret(raw, _TORCH_FLOAT[tensor.qtype]).view(tensor.shape)
    return GGMLTensor(raw, tensor_type=tensor.qtype, tensor_shape=tensor.shape)


def load_gguf_state_dict(
    path: str | os.PathLike[str], *, require_pose_path: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors of a SteadyDancer GGUF by prefix-stripped name, quantised ones left packed.

    Raises GGUFError for an unreadable file, UnsupportedQuantError for a type this package
    cannot dequantise, ModelFileError for a file that is not Wan or lacks the pose path.
    """
    with read_gguf(path) as file:
        check_architecture(file)
        check_supported(file)
        tensors = {name: to_torch(t) for name, t in file.tensors.items()}  # names are prefix-free
        return checked_state_dict(tensors, file.path) if require_pose_path else tensors
