"""Tensor names of a SteadyDancer checkpoint (docs/MODEL.md), and a tiny random model.

`pose_path_shapes` lists the tensors that SteadyDancer adds to Wan2.1-I2V-14B: a file
without them is a plain Wan2.1 file, which is the most common wrong download.
`tiny_state_dict` builds a complete state dict with every tensor name of the real model at
small sizes; tests, the demo and the benchmarks use it so that the loading code they run is
the code users run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFileError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")

POSE_CHANNELS = 16  # in_dim_c: latent channels of the pose video
ALIGN_HIDDEN = 128  # hidden width of the frame-wise alignment unit
DCD_DIM = 4  # rank of the dynamic 1x1 convolution module


def strip_prefix(name: str) -> str:
    """Drop the container prefix that some exports put before every tensor name."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def pose_path_shapes(c: int = POSE_CHANNELS, dim: int = 5120, in_dim: int = 36) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the pose-path tensors (absent from plain Wan2.1-I2V files)."""
    h, r = ALIGN_HIDDEN, DCD_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding_fuse.weight": (dim, in_dim + 2 * c, 1, 2, 2),
        "patch_embedding_fuse.bias": (dim,),
        "patch_embedding_ref_c.weight": (dim, c, 1, 2, 2),
        "patch_embedding_ref_c.bias": (dim,),
    }
    for i in (0, 2, 4):
        p = f"condition_embedding_temporal.{i}"
        shapes[f"{p}.spatial.weight"] = (c, 1, 1, 3, 3)
        shapes[f"{p}.temporal.weight"] = (c, c, 3, 1, 1)
        shapes[f"{p}.temporal.bias"] = (c,)
    s = "condition_embedding_spatial"
    shapes.update(
        {
            f"{s}.conv.weight": (c, c, 1, 1),
            f"{s}.conv_q.weight": (r, c, 1, 1),
            f"{s}.conv_p.weight": (c, r, 1, 1),
            f"{s}.fc.0.weight": (r, c),
            f"{s}.fc.1.fc.0.weight": (r, r),
            f"{s}.fc_phi.weight": (c, r),
            f"{s}.fc_scale.weight": (c, r),
            f"{s}.bn1.weight": (r,),
            f"{s}.bn1.bias": (r,),
            f"{s}.bn2.weight": (r,),
            f"{s}.bn2.bias": (r,),
        }
    )
    a = "condition_embedding_align"
    shapes.update(
        {
            f"{a}.proj_p.weight": (h, c, 1, 1),
            f"{a}.proj_p.bias": (h,),
            f"{a}.proj_r.weight": (h, c, 1, 1),
            f"{a}.proj_r.bias": (h,),
            f"{a}.proj_p_back.weight": (c, h, 1, 1),
            f"{a}.proj_p_back.bias": (c,),
            f"{a}.cross_attn.in_proj_weight": (3 * h, h),
            f"{a}.cross_attn.in_proj_bias": (3 * h,),
            f"{a}.cross_attn.out_proj.weight": (h, h),
            f"{a}.cross_attn.out_proj.bias": (h,),
            f"{a}.ffn_pose.0.weight": (h, h, 1, 1),
            f"{a}.ffn_pose.0.bias": (h,),
            f"{a}.ffn_pose.2.weight": (h, h, 1, 1),
            f"{a}.ffn_pose.2.bias": (h,),
            f"{a}.norm1.weight": (1, h, 1, 1),
            f"{a}.norm1.bias": (1, h, 1, 1),
            f"{a}.norm2.weight": (1, h, 1, 1),
            f"{a}.norm2.bias": (1, h, 1, 1),
        }
    )
    return shapes


POSE_PATH_KEYS: tuple[str, ...] = tuple(pose_path_shapes())

# Tensors every Wan2.1 DiT has: their absence means the file is some other model.
WAN_KEYS: tuple[str, ...] = ("head.modulation", "text_embedding.0.weight", "blocks.0.self_attn.q.weight")


def missing_pose_path(names: Iterable[str]) -> list[str]:
    """The pose-path tensors (SteadyDancer's additions to Wan2.1) absent from `names`."""
    present = set(names)
    return [k for k in POSE_PATH_KEYS if k not in present]


class SteadyDancerStateDict(dict):
    """Tensors by prefix-free name, from a file whose pose path has been checked.

    What this library's readers return (`steadydancer.weights`, `steadydancer.gguf.loader`):
    `load_model` and `config_from_state_dict` take it as it is, so that a file is checked
    once, where it is read, and not again on the way to the model.
    """


def checked_state_dict(tensors: Mapping[str, Any], source: str = "the weights") -> SteadyDancerStateDict:
    """`tensors` by prefix-free name, after `check_pose_path` (a SteadyDancerStateDict as it is)."""
    if isinstance(tensors, SteadyDancerStateDict):
        return tensors
    out = SteadyDancerStateDict({strip_prefix(k): v for k, v in tensors.items()})
    check_pose_path(out, source)
    return out


def check_pose_path(names: Iterable[str], source: str = "the weights") -> None:
    """Refuse what is not SteadyDancer with a ModelFileError that says what it is instead:
    not a Wan DiT at all, a plain Wan2.1 file (the common wrong download), or a file with
    part of the pose path (every missing tensor named)."""
    present = set(names)
    if not any(k in present for k in WAN_KEYS):
        raise ModelFileError(
            f"{source}: not a Wan2.1/SteadyDancer diffusion model (none of {', '.join(WAN_KEYS)} "
            "is present). Load a SteadyDancer file (MCG-NJU/SteadyDancer-14B, its GGUF or Kijai's files)."
        )
    missing = missing_pose_path(present)
    if not missing:
        return
    if len(missing) == len(POSE_PATH_KEYS):
        raise ModelFileError(
            f"{source}: a plain Wan2.1 model, not SteadyDancer: none of the {len(missing)} pose-path "
            f"tensors is present ({', '.join(missing[:4])}, ...). Use the SteadyDancer weights "
            "(MCG-NJU/SteadyDancer-14B, MCG-NJU/SteadyDancer-GGUF or Kijai's fp8/bf16 files)."
        )
    raise ModelFileError(
        f"{source}: incomplete SteadyDancer weights: {len(missing)} pose-path tensors are missing: "
        f"{', '.join(missing)}"
    )


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny SteadyDancer; head_dim 32 keeps RoPE's 3-axis split meaningful."""

    dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 2
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 32
    clip_dim: int = 48
    freq_dim: int = 256


def model_shapes(
    dim: int,
    ffn_dim: int,
    num_layers: int,
    in_dim: int = 36,
    out_dim: int = 16,
    text_dim: int = 4096,
    clip_dim: int = 1280,
    freq_dim: int = 256,
) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a SteadyDancer DiT with these sizes (14B by default)."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
        "img_emb.proj.0.weight": (clip_dim,),
        "img_emb.proj.0.bias": (clip_dim,),
        "img_emb.proj.1.weight": (clip_dim, clip_dim),
        "img_emb.proj.1.bias": (clip_dim,),
        "img_emb.proj.3.weight": (dim, clip_dim),
        "img_emb.proj.3.bias": (dim,),
        "img_emb.proj.4.weight": (dim,),
        "img_emb.proj.4.bias": (dim,),
        "head.head.weight": (out_dim * 4, dim),
        "head.head.bias": (out_dim * 4,),
        "head.modulation": (1, 2, dim),
    }
    for n in range(num_layers):
        b = f"blocks.{n}"
        shapes[f"{b}.norm3.weight"] = (dim,)
        shapes[f"{b}.norm3.bias"] = (dim,)
        for attn, projs in (("self_attn", "qkvo"), ("cross_attn", ("q", "k", "v", "o", "k_img", "v_img"))):
            for p in projs:
                shapes[f"{b}.{attn}.{p}.weight"] = (dim, dim)
                shapes[f"{b}.{attn}.{p}.bias"] = (dim,)
            norms = ("norm_q", "norm_k") + (("norm_k_img",) if attn == "cross_attn" else ())
            for nm in norms:
                shapes[f"{b}.{attn}.{nm}.weight"] = (dim,)
        shapes[f"{b}.ffn.0.weight"] = (ffn_dim, dim)
        shapes[f"{b}.ffn.0.bias"] = (ffn_dim,)
        shapes[f"{b}.ffn.2.weight"] = (dim, ffn_dim)
        shapes[f"{b}.ffn.2.bias"] = (dim,)
        shapes[f"{b}.modulation"] = (1, 6, dim)
    shapes.update(pose_path_shapes(POSE_CHANNELS, dim, in_dim))
    return shapes


def tiny_state_dict(config: TinyConfig | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A complete SteadyDancer state dict with random float32 weights at tiny sizes.

    Weights are scaled like an initialised network (about 1/sqrt(fan_in)) so that a forward
    pass stays in a sane numeric range; norm weights are near 1.
    """
    cfg = config or TinyConfig()
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    shapes = model_shapes(
        cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.in_dim, cfg.out_dim, cfg.text_dim, cfg.clip_dim, cfg.freq_dim
    )
    for name, shape in shapes.items():
        is_norm = any(k in name for k in ("norm", "bn1", "bn2", "img_emb.proj.0", "img_emb.proj.4"))
        if is_norm and name.endswith("weight"):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("modulation"):
            arr = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif len(shape) == 1 or name.endswith("bias"):
            arr = 0.02 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            arr = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        out[name] = arr.astype(np.float32)
    return out
