"""Quantised weights as torch tensors, and layers that dequantise them per forward pass.

`GGMLTensor` is a uint8 tensor of packed GGML blocks that remembers its quantisation type
and logical shape. It moves between devices like any tensor (the bytes move, which is 2-4x
less traffic than the float weight) and survives `Module.to()`, `state_dict()`, `detach()`
and deep copies. Like ComfyUI-GGUF's tensor of the same name, its `.shape` is the LOGICAL
shape, so code that infers a model's configuration from weight shapes works on a quantised
state dict unchanged; `.size()` and `.numel()` stay those of the packed bytes, which is what
memory accounting wants.

`GGMLOps` is a namespace of layer classes (torch.nn subclasses, passed to a model as its
`operations`) whose weight and bias may be GGMLTensors. Each forward dequantises the weight
into the input's dtype on the input's device, and gives the same result as the float layer
holding the dequantised weight. `cache_dequantized` trades memory for speed: it dequantises
once and keeps the float weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GGUFError, ModelFileError
from ..quantized import QuantizedTensor, is_quantized
from ..quantized import dequantize_tensor as dequantize_tensor  # re-exported
from .dequant import as_qtype, dequantize, packed_nbytes


class GGMLTensor(QuantizedTensor):
    """Packed GGML blocks (uint8) with `.tensor_type` and the logical `.tensor_shape`."""

    ATTRIBUTES = ("tensor_type", "tensor_shape")
    ERROR = GGUFError

    tensor_type: gguf.GGMLQuantizationType
    tensor_shape: torch.Size

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor,
        *,
        tensor_type: gguf.GGMLQuantizationType | int | str,
        tensor_shape: Sequence[int],
    ) -> GGMLTensor:
        if data.dtype != torch.uint8:
            raise GGUFError(f"GGMLTensor holds packed uint8 bytes, got a {data.dtype} tensor")
        qtype = as_qtype(tensor_type)
        shape = torch.Size(int(s) for s in tensor_shape)
        expected = packed_nbytes(qtype, shape)
        if data.numel() != expected:
            raise GGUFError(
                f"a {qtype.name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.numel()}"
            )
        out = torch.Tensor._make_subclass(cls, data, False)
        out.tensor_type = qtype
        out.tensor_shape = shape
        return out

    @property  # type: ignore[override]
    def shape(self) -> torch.Size:
        """The logical shape (of the dequantised tensor), not the packed byte shape."""
        shape = self.__dict__.get("tensor_shape")
        return self.size() if shape is None else shape

    def storage_dtype(self) -> torch.dtype:
        return torch.uint8

    def describe(self) -> str:
        return f"quantised {self.tensor_type.name}"

    def dequantize(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:  # type: ignore[override]
        """The float tensor (float32 unless `dtype`), on `device` (default: where the bytes are)."""
        raw = self.stored(device)
        return dequantize(raw, self.tensor_type, self.tensor_shape, dtype or torch.float32)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (
            f"GGMLTensor({self.tensor_type.name}, shape={tuple(self.tensor_shape)}, "
            f"{self.numel()} bytes, device={self.device})"
        )


# --- layers -------------------------------------------------------------------------------


class GGMLLayer(nn.Module):
    """Mixin for the layers of GGMLOps.

    Parameters are created on the meta device (a 14B model's float weights would not fit in
    RAM) and replaced, as they are, by `load_state_dict`: quantised ones stay GGMLTensors,
    float ones keep their dtype. Each forward asks `weight_for` for float weights.
    """

    _param_names: tuple[str, ...] = ("weight", "bias")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for hook in self._load_state_dict_pre_hooks.values():  # as nn.Module's version does
            hook(
                state_dict,
                prefix,
                local_metadata,
                strict,
                missing_keys,
                unexpected_keys,
                error_msgs,
            )
        for name in self._param_names:
            current = self._parameters.get(name)
            if current is None:
                continue  # e.g. bias=False, or LayerNorm without affine
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
                continue
            if tuple(value.shape) != tuple(current.shape):
                error_msgs.append(
                    f"size mismatch for {key}: the checkpoint has {tuple(value.shape)}, "
                    f"the model expects {tuple(current.shape)}"
                )
                continue
            self._parameters[name] = nn.Parameter(value, requires_grad=False)
            self._drop_cache(name)
        if strict:
            for key in state_dict:
                if key.startswith(prefix):
                    rest = key[len(prefix) :]
                    if (
                        "." not in rest
                        and rest not in self._parameters
                        and rest not in self._buffers
                    ):
                        unexpected_keys.append(key)

    # --- dequantisation -------------------------------------------------------------------

    def weight_for(
        self, name: str, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """Parameter `name` as a float tensor in `dtype` on `device` (None if the layer has none)."""
        tensor = getattr(self, name, None)
        if tensor is None:
            return None
        if tensor.device.type == "meta":
            raise ModelFileError(
                f"{type(self).__name__}.{name} was never loaded: the state dict lacks this tensor"
            )
        if is_quantized(tensor):
            cached = self._buffers.get(f"{name}_dequantized")
            if cached is not None:
                return cached.to(device=device, dtype=dtype)
            return tensor.dequantize(dtype, device)
        return tensor.to(device=device, dtype=dtype)

    def _drop_cache(self, name: str) -> None:
        self._buffers.pop(f"{name}_dequantized", None)

    def cache_dequantized(self, enabled: bool = True, dtype: torch.dtype | None = None) -> int:
        """Keep (or drop) float copies of the quantised parameters; returns the bytes they take.

        The copies are non-persistent buffers: they follow `Module.to()` and stay out of the
        state dict. `dtype` defaults to float32.
        """
        size = 0
        for name in self._param_names:
            self._drop_cache(name)
            tensor = self._parameters.get(name)
            if enabled and is_quantized(tensor):
                value = tensor.dequantize(dtype or torch.float32)
                self.register_buffer(f"{name}_dequantized", value, persistent=False)
                size += value.numel() * value.element_size()
        return size

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        weight = self.weight_for("weight", dtype, x.device)
        assert weight is not None
        return weight, self.weight_for("bias", dtype, x.device)


class Linear(GGMLLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weights(x)
        return F.linear(x, weight, bias)


class Conv2d(GGMLLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weights(x)
        return self._conv_forward(x, weight, bias)


class Conv3d(GGMLLayer, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weights(x)
        return self._conv_forward(x, weight, bias)


class LayerNorm(GGMLLayer, nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        weight, bias = self._weights(x)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class GroupNorm(GGMLLayer, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return F.group_norm(x, self.num_groups, None, None, self.eps)
        weight, bias = self._weights(x)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class Embedding(GGMLLayer, nn.Embedding):
    _param_names = ("weight",)

    def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        stored = self.weight
        dtype = out_dtype or (torch.float32 if is_quantized(stored) else stored.dtype)
        weight = self.weight_for("weight", dtype, ids.device)
        return F.embedding(
            ids,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


def cache_dequantized(
    module: nn.Module, enabled: bool = True, dtype: torch.dtype | None = None
) -> int:
    """Dequantise every GGML layer of `module` once and keep the result (or drop it).

    Returns the bytes the float copies take. Use when memory allows: forward passes then skip
    dequantisation entirely. Call again after loading new weights.
    """
    return sum(
        m.cache_dequantized(enabled, dtype) for m in module.modules() if isinstance(m, GGMLLayer)
    )


class GGMLOps:
    """The `operations` namespace for a model: torch.nn layers that accept GGMLTensor weights."""

    Linear = Linear
    Conv2d = Conv2d
    Conv3d = Conv3d
    LayerNorm = LayerNorm
    GroupNorm = GroupNorm
    Embedding = Embedding
    cache_dequantized = staticmethod(cache_dequantized)
