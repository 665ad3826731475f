"""ComfyUI operations for compact weights (GGUF blocks, scaled fp8), ComfyUI casting, LoRA on the fly.

ComfyUI builds its models from an `operations` namespace whose layers cast their weights
per forward pass (`comfy.ops.manual_cast`) and apply `weight_function`s on the way: that is
how low-VRAM partial loading streams weights and how LoRA patches reach weights that stay
on the CPU. `GGUFOps` keeps that contract for compact weights: packed GGML blocks
(`GGMLTensor`) and fp8 values with their scale (`Fp8Tensor`, steadydancer.quantized). The
compact data is what moves between devices; each forward pass expands it on the compute
device, then applies the layer's `weight_function`s (the patcher installs LoRA patches
there, see `GGUFModelPatcher`). Float tensors (norms, biases) stay in their file dtype and
are cast like ComfyUI's own layers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

from ..steadydancer.errors import GGUFError
from ..steadydancer.fused import E4M3_MAX, stochastic_round_fp8
from ..steadydancer.gguf.ops import GGMLLayer
from ..steadydancer.quantized import (
    Fp8Tensor,
    dequantize_tensor,
    fp8_linear,
    fp8_matmul_applies,
    fp8_matmul_enabled,
    is_quantized,
)

WeightFunction = Callable[[torch.Tensor], torch.Tensor]


def _materialise(
    tensor: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    functions: Iterable[WeightFunction],
) -> torch.Tensor:
    """`tensor` as a plain tensor of `dtype` on `device`, with patch functions applied."""
    functions = list(functions)
    non_blocking = comfy.model_management.device_supports_non_blocking(device)
    if is_quantized(tensor):  # the packed bytes move, dequantisation happens on `device`
        out = dequantize_tensor(tensor, dtype, device)
    else:
        out = comfy.model_management.cast_to(
            tensor, dtype, device, non_blocking=non_blocking, copy=bool(functions)
        )
    for function in functions:
        out = function(out)
    return out


def cast_bias_weight(
    layer: torch.nn.Module,
    input: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    bias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`comfy.ops.cast_bias_weight` for layers whose weight or bias may be a GGMLTensor."""
    if input is not None:
        dtype = dtype or input.dtype
        device = device or input.device
    bias = cast_bias(layer, bias_dtype or dtype, device)
    weight = _materialise(layer.weight, dtype, device, layer.weight_function)
    return weight, bias


def cast_bias(layer: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The layer's bias (if any) as `dtype` on `device`, with its patch functions applied."""
    if layer.bias is None:
        return None
    return _materialise(layer.bias, dtype, device, layer.bias_function)


class GGUFOps(comfy.ops.manual_cast):
    """`operations` namespace for a SteadyDancer DiT holding GGUF or scaled-fp8 weights.

    `GGMLLayer` (steadydancer.gguf.ops) creates the parameters on the meta device and takes
    state-dict tensors as they are; ComfyUI's `manual_cast` layers give the casting
    contract (`comfy_cast_weights`, `weight_function`, `bias_function`) that the patcher
    and ComfyUI's low-VRAM loading rely on.
    """

    class Linear(GGMLLayer, comfy.ops.manual_cast.Linear):
        fp8_matmul = False  # set per layer by the loader's fp8_matmul option

        def fp8_wanted(self) -> bool:
            """fp8 matmul asked for: by the loader for this model, or for all by the environment."""
            return self.fp8_matmul or fp8_matmul_enabled()

        def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:
            # a patch applied per forward (a layer streamed by low-VRAM loading) needs the
            # expanded weight; a fully loaded layer has its LoRA written into the fp8 weight
            if self.fp8_wanted() and not self.weight_function:
                out = fp8_linear(input, self.weight, cast_bias(self, input.dtype, input.device))
                if out is not None:
                    return out
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight, bias)

    class Conv2d(GGMLLayer, comfy.ops.manual_cast.Conv2d):
        def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:
            weight, bias = cast_bias_weight(self, input)
            return self._conv_forward(input, weight, bias)

    class Conv3d(GGMLLayer, comfy.ops.manual_cast.Conv3d):
        def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:
            weight, bias = cast_bias_weight(self, input)
            return self._conv_forward(input, weight, bias)

    class LayerNorm(GGMLLayer, comfy.ops.manual_cast.LayerNorm):
        def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:
            weight = bias = None
            if self.weight is not None:
                weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.layer_norm(
                input, self.normalized_shape, weight, bias, self.eps
            )

    class GroupNorm(GGMLLayer, comfy.ops.manual_cast.GroupNorm):
        def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.group_norm(input, self.num_groups, weight, bias, self.eps)


# ComfyUI 0.3x moved this to comfy.utils; the old name still works there but warns on each call.
_string_to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ComfyUI's backup record


def _multiplies_in_fp8(module: torch.nn.Module, weight: torch.Tensor, device: torch.device) -> bool:
    """True for a linear layer whose forward multiplies `weight` in fp8 on `device`."""
    return (
        isinstance(module, GGUFOps.Linear) and module.fp8_wanted() and fp8_matmul_applies(weight, device)
    )


def _without_patches(functions: list, key: str | None = None) -> list:
    """`functions` minus the LoRA patch functions (of `key`, or all of them)."""
    return [
        f
        for f in functions
        if not (isinstance(f, comfy.model_patcher.LowVramPatch) and (key is None or f.key == key))
    ]


def _dedupe_patches(functions: list) -> list:
    """One patch function per key: ComfyUI's partial unload may add a second one."""
    seen: set[str] = set()
    out = []
    for f in functions:
        if isinstance(f, comfy.model_patcher.LowVramPatch):
            if f.key in seen:
                continue
            seen.add(f.key)
        out.append(f)
    return out


class GGUFModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose quantised weights are never rewritten.

    ComfyUI patches a weight by computing `weight + lora` once and storing it (keeping a
    backup); that would turn a 4-bit weight into a full float one. For a quantised weight
    this patcher instead installs the patch as the layer's `weight_function`, which
    `GGUFOps` applies after each dequantisation: the same mechanism ComfyUI uses for weights
    of partially loaded models. Float tensors are patched the usual way.
    """

    def patch_weight_to_device(
        self,
        key: str,
        device_to: torch.device | None = None,
        inplace_update: bool = False,
        **kwargs: object,
    ) -> torch.Tensor | None:
        # kwargs: what the running ComfyUI adds (0.3x: return_weight, force_cast), passed on as given.
        weight = comfy.utils.get_attr(self.model, key)
        if not is_quantized(weight):
            return super().patch_weight_to_device(
                key, device_to=device_to, inplace_update=inplace_update, **kwargs
            )
        if kwargs.get("return_weight"):
            # A patched copy for whoever asked (checkpoint saving, LoRA extraction); the model is
            # untouched. A weight with the LoRA already written in is patched from its original.
            source = self.backup[key].weight if key in self.backup else weight
            return _materialise(
                source,
                self.model.manual_cast_dtype or torch.float32,
                device_to or source.device,
                [comfy.model_patcher.LowVramPatch(key, self.patches)]
                if key in self.patches
                else [],
            )
        if key not in self.patches:
            return weight
        module_name, param = key.rsplit(".", 1)
        module = comfy.utils.get_attr(self.model, module_name)
        device = device_to or weight.device
        if param == "weight" and _multiplies_in_fp8(module, weight, device):
            self._merge_into_fp8(key, weight, device)
            return weight
        attr = f"{param}_function"
        patch = comfy.model_patcher.LowVramPatch(key, self.patches)
        setattr(module, attr, [*_without_patches(getattr(module, attr), key), patch])
        return weight

    def _merge_into_fp8(self, key: str, weight: Fp8Tensor, device: torch.device) -> None:
        """Write the patches into the fp8 weight itself, as ComfyUI does for its own fp8 models.

        The fp8 product needs one fp8 weight, so a patched layer would otherwise fall back to
        the expanded one (1.1x slower per call, and every call re-applies the LoRA). Stochastic
        rounding (seeded by the key, like ComfyUI's; one Triton kernel on CUDA) keeps a LoRA's
        small changes in expectation; the error it adds is of the fp8 path's own size. The
        original stays in `backup`, which ComfyUI's unpatch puts back.
        """
        if key not in self.backup:
            self.backup[key] = _Backup(weight.to(device=self.offload_device), False)
        original = self.backup[key].weight  # never the merged weight: patching twice adds nothing
        merged = comfy.lora.calculate_weight(
            self.patches[key], original.dequantize(torch.float32, device), key
        )
        # the file's scale, widened if the patch made a value larger than e4m3 can hold
        scale = torch.maximum(original.scale.to(device), merged.abs().amax() / E4M3_MAX)
        values = stochastic_round_fp8(merged, scale, seed=_string_to_seed(key))
        comfy.utils.set_attr_param(self.model, key, Fp8Tensor(values, scale=scale))

    def model_state_dict_for_saving(
        self, model: torch.nn.Module | None = None, prefix: str = ""
    ) -> dict:
        """ComfyUI 0.3x's checkpoint saving: what ComfyUI does, with quantised weights saved as
        patched float weights (ComfyUI's version cannot wrap packed GGML blocks).

        Weights that are not final in memory (patches pending, or not loaded) are placeholders
        of their logical shape that ComfyUI's lazy caster fills, one at a time, while writing.
        """
        model = self.model if model is None else model
        lazy = comfy.model_patcher.LazyCastingParam
        dtype = self.model.manual_cast_dtype or torch.float32
        out = {}
        for name, value in model.state_dict().items():
            module = comfy.utils.get_attr(model, name.rsplit(".", 1)[0]) if "." in name else model
            if is_quantized(value):
                out[name] = lazy(
                    self, prefix + name, torch.empty(value.shape, dtype=dtype, device="meta")
                )
            elif hasattr(module, "comfy_cast_weights") and not getattr(
                module, "comfy_patched_weights", False
            ):
                out[name] = lazy(self, prefix + name, value)
            else:
                out[name] = value
        return out

    def patch_hook_weight_to_device(
        self,
        hooks: object,
        combined_patches: dict,
        key: str,
        original_weights: dict,
        memory_counter: object,
    ) -> None:
        if key in combined_patches and is_quantized(comfy.utils.get_attr(self.model, key)):
            raise GGUFError(
                f"LoRA hooks (scheduled or per-conditioning LoRA) cannot patch the quantised GGUF weight {key}: "
                "load the LoRA with LoraLoaderModelOnly instead, or use a .safetensors model"
            )
        super().patch_hook_weight_to_device(
            hooks, combined_patches, key, original_weights, memory_counter
        )

    def unpatch_model(
        self, device_to: torch.device | None = None, unpatch_weights: bool = True
    ) -> None:
        if unpatch_weights:
            for module in self.model.modules():
                if isinstance(module, GGMLLayer):
                    module.weight_function = _without_patches(module.weight_function)
                    module.bias_function = _without_patches(module.bias_function)
        super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

    def partially_unload(
        self, device_to: torch.device, memory_to_free: int = 0, **kwargs: object
    ) -> int:
        freed = super().partially_unload(device_to, memory_to_free=memory_to_free, **kwargs)
        for module in self.model.modules():
            if isinstance(module, GGMLLayer):
                module.weight_function = _dedupe_patches(module.weight_function)
                module.bias_function = _dedupe_patches(module.bias_function)
        return freed
