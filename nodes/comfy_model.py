"""SteadyDancer as a ComfyUI MODEL: a `model_base` model in a ModelPatcher.

`SteadyDancerModel` is ComfyUI's WAN21 (flow matching with shift, the Wan 2.1 latent
format, the same memory estimate) whose diffusion model is our `SteadyDancerDiT`, built with
ComfyUI's operations (or `GGUFOps` for GGUF and scaled-fp8 weights) so that model management, low-VRAM
partial loading, offloading and LoRA patching work on it. `extra_conds` turns the
conditioning that the SteadyDancer conditioning node stores (docs/REFERENCE.md, "Conditioning": concat_latent_image,
concat_mask, steadydancer_*) into the DiT's inputs, wrapped in ComfyUI's cond types so that
positive, negative and pose-negative predictions are batched together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import ClassVar

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
import torch

from ..steadydancer.conditioning import MASK_CHANNELS, image_to_video_mask
from ..steadydancer.errors import ConditioningError
from ..steadydancer.model import load_model
from ..steadydancer.quantized import Fp8Tensor, fp8_matmul_supported, is_quantized
from .comfy_attention import OVERRIDE_KEY, ComfyAttention, attention_override
from .comfy_ops import GGUFModelPatcher, GGUFOps

logger = logging.getLogger(__name__)

DEFAULT_SHIFT = 5.0
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
# The DiT's inputs besides x and t, as extra_conds names them (= forward's argument names).
DIT_INPUTS = ("text", "clip_x", "clip_c", "y", "pose", "ref_x", "ref_c")


class SteadyDancerModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI's description of the model: latent format, sampling defaults, dtypes."""

    unet_config: ClassVar[dict] = {"image_model": "steadydancer"}
    unet_extra_config: ClassVar[dict] = {}
    sampling_settings: ClassVar[dict] = {"shift": DEFAULT_SHIFT}
    latent_format = comfy.latent_formats.Wan21
    supported_inference_dtypes: ClassVar[list[torch.dtype]] = [
        torch.bfloat16,
        torch.float16,
        torch.float32,
    ]

    def __init__(
        self,
        dit_config: object,
        weight_dtype: torch.dtype,
        manual_cast_dtype: torch.dtype | None,
        operations: type,
    ) -> None:
        # The DiT is built by `build_model_patcher`, not by BaseModel from unet_config.
        super().__init__({"image_model": "steadydancer", "disable_unet_model_creation": True})
        self.dit_config = dit_config
        self.memory_usage_factor = dit_config.dim / 2222  # ComfyUI's factor for Wan 2.1
        self.set_inference_dtype(weight_dtype, manual_cast_dtype)
        self.custom_operations = operations

    def get_model(
        self, state_dict: dict, prefix: str = "", device: torch.device | None = None
    ) -> SteadyDancerModel:
        return SteadyDancerModel(self, device=device)


def _latent_in(
    model: comfy.model_base.BaseModel, latent: torch.Tensor, channels: slice | None = None
) -> torch.Tensor:
    """Apply the Wan 2.1 latent normalisation to `latent` (or to its 16-channel groups)."""
    out = latent.clone()
    step = model.latent_format.latent_channels
    groups = (
        [channels]
        if channels is not None
        else [slice(i, i + step) for i in range(0, latent.shape[1], step)]
    )
    for group in groups:
        out[:, group] = model.process_latent_in(latent[:, group])
    return out


def _fit_to_noise(latent: torch.Tensor, noise: torch.Tensor, what: str) -> torch.Tensor:
    """Check that a per-frame latent matches the sampled latent's frames and size."""
    if latent.ndim != 5 or latent.shape[2:] != noise.shape[2:]:
        raise ConditioningError(
            f"{what} has shape {tuple(latent.shape)} but the latent being sampled is {tuple(noise.shape)}: "
            "use the LATENT of the same SteadyDancer Image to Video node as its conditioning"
        )
    return comfy.utils.resize_to_batch_size(latent, noise.shape[0])


def _required(kwargs: dict, key: str) -> object:
    value = kwargs.get(key)
    if value is None:
        raise ConditioningError(
            f"the conditioning has no {key!r}: SteadyDancer needs positive, negative and pose_negative "
            "from the 'SteadyDancer Image to Video' node"
        )
    return value


def pad_text(context: torch.Tensor, length: int) -> torch.Tensor:
    """Text states as the reference feeds them: exactly `length` rows, zero-padded/truncated.

    ComfyUI's umT5 already pads to 512 rows but does not truncate a longer prompt; equal
    lengths also let the positive and negative predictions share one batch.
    """
    if context.shape[1] >= length:
        return context[:, :length]
    return torch.nn.functional.pad(context, (0, 0, 0, length - context.shape[1]))


class SteadyDancerModel(comfy.model_base.WAN21):
    """WAN21 with SteadyDancer's inputs (y, pose, ref_x, ref_c, clip_x, clip_c, text)."""

    def __init__(
        self, model_config: SteadyDancerModelConfig, device: torch.device | None = None
    ) -> None:
        comfy.model_base.BaseModel.__init__(
            self, model_config, comfy.model_base.ModelType.FLOW, device=device
        )
        self.image_to_video = True
        # The two reference frames are extra tokens: count them in the memory estimate.
        self.memory_usage_factor_conds = ("ref_x", "ref_c")

    def get_dtype(self) -> torch.dtype:
        return self.model_config.unet_config["dtype"]

    def concat_cond(self, **kwargs: object) -> torch.Tensor:
        """y = the 4 image-to-video mask channels, then the normalised reference-video latent."""
        noise: torch.Tensor = kwargs["noise"]
        device = kwargs["device"]
        image = _required(kwargs, "concat_latent_image").to(device)
        image = _fit_to_noise(_latent_in(self, image), noise, "concat_latent_image")
        mask = kwargs.get("concat_mask")
        if mask is None:  # first latent frame known, the rest generated
            mask = image_to_video_mask(*noise.shape[2:])
        mask = mask.to(device=device, dtype=noise.dtype)
        if mask.shape[1] != 1:
            mask = mask.mean(dim=1, keepdim=True)
        mask = comfy.utils.common_upscale(
            1.0 - mask, noise.shape[-1], noise.shape[-2], "bilinear", "center"
        )
        mask = _fit_to_noise(mask, noise, "concat_mask").repeat(1, MASK_CHANNELS, 1, 1, 1)
        return torch.cat((mask, image), dim=1)

    def extra_conds(self, **kwargs: object) -> dict[str, comfy.conds.CONDRegular]:
        noise: torch.Tensor = kwargs["noise"]
        device = kwargs["device"]
        latent = self.latent_format.latent_channels
        reference = slice(0, latent), slice(latent + MASK_CHANNELS, 2 * latent + MASK_CHANNELS)
        pose = _fit_to_noise(
            _latent_in(self, _required(kwargs, "steadydancer_pose").to(device)),
            noise,
            "steadydancer_pose",
        )
        refs = {}
        for key in ("ref_x", "ref_c"):
            value = _required(kwargs, f"steadydancer_{key}").to(device)
            for group in reference:  # the 4 mask channels in between stay as they are
                value = _latent_in(self, value, group)
            refs[key] = comfy.conds.CONDRegular(value)
        return {
            "y": comfy.conds.CONDNoiseShape(self.concat_cond(**kwargs)),
            "pose": comfy.conds.CONDNoiseShape(pose),
            **refs,
            "text": comfy.conds.CONDRegular(
                pad_text(_required(kwargs, "cross_attn"), self.model_config.dit_config.text_len)
            ),
            "clip_x": comfy.conds.CONDRegular(
                _required(kwargs, "clip_vision_output").penultimate_hidden_states
            ),
            "clip_c": comfy.conds.CONDRegular(
                _required(kwargs, "steadydancer_clip_c").penultimate_hidden_states
            ),
        }

    def _apply_model(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: torch.Tensor | None = None,
        c_crossattn: torch.Tensor | None = None,
        control: object = None,
        transformer_options: dict | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Denoised latent for sigma `t` (BaseModel's arithmetic; the DiT takes x and y apart)."""
        sigma = t
        dtype = self.manual_cast_dtype or self.get_dtype()
        xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
        timestep = self.model_sampling.timestep(sigma).float()
        missing = [name for name in DIT_INPUTS if kwargs.get(name) is None]
        if missing:
            raise ConditioningError(
                f"SteadyDancer conditioning lacks {missing}: use the SteadyDancer Image to Video node"
            )
        options = transformer_options or {}
        window = options.get("context_window")
        if window is not None:
            kwargs.update(window_frames(window, x, kwargs))
        inputs = {
            name: comfy.model_base.convert_tensor(kwargs[name], dtype, xc.device)
            for name in DIT_INPUTS
        }
        # ComfyUI's DIFFUSION_MODEL wrappers (EasyCache, ...) wrap the DiT call as on ComfyUI's own models
        wrappers = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, options
        )
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._diffusion_forward, self, wrappers
        )
        out = executor.execute(xc, timestep, transformer_options=options, **inputs)
        return self.model_sampling.calculate_denoised(sigma, out.float(), x)

    def _diffusion_forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        transformer_options: dict,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """The DiT's prediction, with ComfyUI's attention and block patches for this call's options."""
        return self.diffusion_model(
            x,
            timestep,
            **inputs,
            attention=ComfyAttention(transformer_options),
            block_patches=comfy_block_patches(transformer_options),
        )


def comfy_block_patches(transformer_options: dict) -> dict[int, Callable]:
    """ComfyUI's per-block replacements (`patches_replace["dit"][("double_block", i)]`, as on
    ComfyUI's Wan models) as the DiT's block patches.

    A replacement gets Wan's arguments ({"img": tokens, "txt": text context, "vec": time
    modulation, "pe": RoPE, "transformer_options"}, plus "img_context" for SteadyDancer's
    image context) and {"original_block": run the block}; it returns {"img": tokens}.
    """
    replace = transformer_options.get("patches_replace", {}).get("dit", {})
    patches = {}
    for key, replacement in replace.items():
        if isinstance(key, tuple) and len(key) == 2 and key[0] == "double_block":
            patches[int(key[1])] = _block_patch(replacement, transformer_options)
    return patches


def _block_patch(replacement: Callable, transformer_options: dict) -> Callable:
    def run(block: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        def original_block(args: dict) -> dict:
            # the block updates its input in place; a patch may still need what it passed in
            out = block(args["img"].clone(), **{**kwargs, "e0": args["vec"], "rope": args["pe"],
                                                "context_text": args["txt"]})  # fmt: skip
            return {"img": out}

        args = {"img": x, "txt": kwargs["context_text"], "vec": kwargs["e0"], "pe": kwargs["rope"],
                "img_context": kwargs["context_img"], "transformer_options": transformer_options}  # fmt: skip
        return replacement(args, {"original_block": original_block})["img"]

    return run


FRAME_INPUTS = (
    "y",
    "pose",
)  # the DiT inputs with one entry per latent frame (the rest are per video)
FRAME_DIM = 2


def window_frames(window: object, x: torch.Tensor, conds: dict) -> dict[str, torch.Tensor]:
    """The per-frame conditioning of one ComfyUI context window (comfy.context_windows).

    ComfyUI 0.33 slices 5-D conditioning along the window's frames itself; 0.3.64 hands it
    over whole, and it is sliced here with the window's own indexing (which includes 0.33's
    causal anchor frame). Either way `y` (the image-to-video mask and first-frame latent) and
    the pose latent cover exactly the window's frames: only the window that holds frame 0
    carries the first-frame conditioning; the reference reaches every window through ref_x,
    ref_c and the CLIP features, which are not per frame.
    """
    if getattr(window, "dim", FRAME_DIM) != FRAME_DIM:
        raise ConditioningError(
            f"context windows over dimension {window.dim}: SteadyDancer's frames are dimension {FRAME_DIM}; "
            "use 'WAN Context Windows (Manual)', or set dim to 2 in 'Context Windows (Manual)'"
        )
    frames = x.shape[FRAME_DIM]
    out = {}
    for name in FRAME_INPUTS:
        value = conds[name]
        if value.shape[FRAME_DIM] != frames:
            value = window.get_tensor(value)
            if value.shape[FRAME_DIM] != frames:
                raise ConditioningError(
                    f"{name} has {conds[name].shape[FRAME_DIM]} latent frames; the context window asks for "
                    f"{frames}: use the LATENT of the same SteadyDancer Image to Video node as its conditioning"
                )
        out[name] = value
    return out


def _param_count(state_dict: dict[str, torch.Tensor]) -> int:
    """Logical parameter count (a quantised tensor counts its unpacked elements)."""
    return sum(math.prod(getattr(t, "tensor_shape", t.shape)) for t in state_dict.values())


def _float_dtypes(
    state_dict: dict[str, torch.Tensor], compute: torch.dtype | None, load_device: torch.device
) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, manual cast dtype) for float weights: the choice, or ComfyUI's default."""
    if compute is not None:
        return compute, None
    supported = SteadyDancerModelConfig.supported_inference_dtypes
    weight = comfy.model_management.unet_dtype(
        model_params=_param_count(state_dict),
        supported_dtypes=supported,
        weight_dtype=comfy.utils.weight_dtype(state_dict),
    )
    return weight, comfy.model_management.unet_manual_cast(weight, load_device, supported)


def _gguf_compute_dtype(
    state_dict: dict[str, torch.Tensor], compute: torch.dtype | None, load_device: torch.device
) -> torch.dtype:
    """Dtype compact (GGUF, fp8) weights are expanded into: the choice, or what this device runs best."""
    if compute is not None:
        return compute
    supported = SteadyDancerModelConfig.supported_inference_dtypes
    dtype = comfy.model_management.unet_dtype(
        model_params=_param_count(state_dict), supported_dtypes=supported
    )
    return comfy.model_management.unet_manual_cast(dtype, load_device, supported) or dtype


def _use_fp8_matmul(dit: torch.nn.Module, device: torch.device) -> None:
    """Turn the fp8 product on for the linear layers that hold scaled fp8 weights."""
    layers = [m for m in dit.modules() if isinstance(m, GGUFOps.Linear) and isinstance(m.weight, Fp8Tensor)]
    if not layers:
        logger.warning("SteadyDancer: fp8_matmul applies to scaled fp8 .safetensors files; this model has no "
                       "fp8 weights, so it runs as usual")  # fmt: skip
        return
    if not fp8_matmul_supported(device):
        logger.warning("SteadyDancer: fp8_matmul needs fp8 tensor cores (NVIDIA RTX 40xx, L40S, H100 and newer); "
                       "%s has none, so the fp8 weights are expanded as usual", device)  # fmt: skip
        return
    for layer in layers:
        layer.fp8_matmul = True


def build_model_patcher(
    state_dict: dict[str, torch.Tensor],
    *,
    compute_dtype: str = "default",
    attention: str = "auto",
    fp8_matmul: bool = False,
) -> comfy.model_patcher.ModelPatcher:
    """A MODEL from a SteadyDancer state dict (GGUF blocks and fp8 weights kept compact).

    The DiT is `steadydancer.model.load_model`'s, built with ComfyUI's operations
    (`pick_operations`, as ComfyUI's own models) or `GGUFOps`; weights are checked there.
    `fp8_matmul`: the linear layers with scaled fp8 weights multiply in fp8 (as
    STEADYDANCER_FP8_MATMUL=1 does for every model); a warning says when it cannot apply.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {list(COMPUTE_DTYPES)}; got {compute_dtype!r}"
        )
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    chosen = COMPUTE_DTYPES[compute_dtype]
    if any(is_quantized(t) for t in state_dict.values()):
        # ComfyUI's dynamic VRAM casts dense or ComfyUI-quantised weights only (docs/ARCHITECTURE.md)
        weight_dtype = manual_cast = _gguf_compute_dtype(state_dict, chosen, load_device)
        operations, patcher_class = GGUFOps, GGUFModelPatcher
    else:
        weight_dtype, manual_cast = _float_dtypes(state_dict, chosen, load_device)
        operations = comfy.ops.pick_operations(weight_dtype, manual_cast, load_device=load_device)
        # ModelPatcherDynamic where ComfyUI turned dynamic VRAM on (0.3x on NVIDIA), else the classic one
        patcher_class = getattr(
            comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher
        )
    override = attention_override(
        attention
    )  # an unusable explicit backend fails here, before loading

    dit = load_model(state_dict, device=offload_device, dtype=weight_dtype, operations=operations)
    dit.compute_dtype = manual_cast or weight_dtype
    model_config = SteadyDancerModelConfig(dit.config, weight_dtype, manual_cast, operations)
    model = model_config.get_model({}, device=offload_device)
    model.diffusion_model = dit
    if fp8_matmul:
        _use_fp8_matmul(dit, load_device)
    patcher = patcher_class(model, load_device=load_device, offload_device=offload_device)
    if override is not None:
        patcher.model_options["transformer_options"][OVERRIDE_KEY] = override
    return patcher
