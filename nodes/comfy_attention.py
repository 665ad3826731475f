"""Attention inside ComfyUI: one route, ComfyUI's own.

Every attention call of the DiT goes through `ComfyAttention`, which runs ComfyUI's
`optimized_attention` with the call's `transformer_options`. ComfyUI's attention wrapper
hands such a call to `transformer_options["optimized_attention_override"]` when one is set,
on 0.3.64 and 0.33 alike. The loader's attention choice is installed as that override
(`BackendOverride`, one of steadydancer.attention's backends), so ComfyUI's own attention
patches replace it exactly as they replace it on ComfyUI's models, and the choice "comfy"
installs nothing: ComfyUI's flags (`--use-sage-attention`, ...) decide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import comfy.ldm.modules.attention
import torch

from ..steadydancer.attention import AttentionDispatcher

OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's key in transformer_options
COMFY_CHOICE = "comfy"


class ComfyAttention:
    """The DiT's attention for one model call: ComfyUI's `optimized_attention`, [B, L, H, D]."""

    def __init__(self, transformer_options: Mapping[str, Any]) -> None:
        self.transformer_options = transformer_options

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, length, heads, dim = q.shape
        attention = (
            comfy.ldm.modules.attention.optimized_attention
        )  # read per call: flags may swap it
        out = attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            heads,
            skip_reshape=True,
            transformer_options=self.transformer_options,
        )
        return out.reshape(b, length, heads, dim)


class BackendOverride:
    """An `optimized_attention_override` running one of steadydancer.attention's backends.

    Takes ComfyUI's attention arguments in either of its layouts ([B, H, L, D] with
    `skip_reshape`, else [B, L, H*D]) and returns the layout the caller asked for. Calls with
    a mask go to ComfyUI's function: our backends compute unmasked attention only.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.dispatcher = AttentionDispatcher(backend)  # an unusable explicit choice raises here

    def __call__(
        self,
        func: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        mask: torch.Tensor | None = None,
        attn_precision: Any = None,
        skip_reshape: bool = False,
        skip_output_reshape: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        if mask is not None:
            return func(
                q,
                k,
                v,
                heads,
                mask=mask,
                attn_precision=attn_precision,
                skip_reshape=skip_reshape,
                skip_output_reshape=skip_output_reshape,
                **kwargs,
            )
        if skip_reshape:  # [B, H, L, D]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        else:  # [B, L, H*D]
            q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        out = self.dispatcher(q, k, v)  # [B, L, H, D]
        return out.transpose(1, 2) if skip_output_reshape else out.flatten(2)

    @property
    def backend_used(self) -> str | None:
        """The backend that computed the last call (None before the first)."""
        return self.dispatcher.backend_used

    def __deepcopy__(self, memo: dict) -> BackendOverride:
        return self  # ModelPatcher.clone deep-copies model_options; clones share one dispatcher

    def __repr__(self) -> str:
        return f"BackendOverride({self.backend!r})"


def attention_override(choice: str) -> BackendOverride | None:
    """The override for a loader's attention choice; None for "comfy" (ComfyUI decides)."""
    return None if choice == COMFY_CHOICE else BackendOverride(choice)
