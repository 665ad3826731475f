"""SteadyDancer's guidance: text guidance plus pose guidance inside a window of steps.

Three predictions per step inside the pose window, fewer outside it (docs/REFERENCE.md,
"Guidance"):
- cond: positive text, positive pose;
- uncond_text: negative text, positive pose;
- uncond_pose: positive text, negative (augmented) pose.

    pred = uncond_text + g_text (cond - uncond_text) + g_pose (cond - uncond_pose)

while start < i / steps < end (i the 0-based step index, both bounds strict); outside the
window the pose term is absent. With g_text = 1 (distilled LoRAs) the text term reduces to
`cond`, so uncond_text is not computed at all.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("cond", "uncond_text", "uncond_pose")
DEFAULT_TEXT_SCALE = 5.0
DEFAULT_POSE_SCALE = 1.5
DEFAULT_START = 0.1
DEFAULT_END = 0.4


def in_pose_window(step_index: int, num_steps: int, start: float, end: float) -> bool:
    """True when step `step_index` (0-based) of `num_steps` lies strictly inside (start, end)."""
    if num_steps <= 0:
        return False
    progress = step_index / num_steps
    return start < progress < end


def calls_needed(text_scale: float, pose_active: bool) -> tuple[str, ...]:
    """The predictions a step needs, in PREDICTIONS order.

    `pose_active`: the step is inside the pose window and the pose scale is not zero.
    A text scale of 1 makes uncond_text irrelevant (it cancels out of the formula).
    """
    needed = ["cond"]
    if text_scale != 1.0:
        needed.append("uncond_text")
    if pose_active:
        needed.append("uncond_pose")
    return tuple(needed)


def combine(
    cond: torch.Tensor,
    uncond_text: torch.Tensor | None,
    uncond_pose: torch.Tensor | None,
    text_scale: float,
    pose_scale: float,
) -> torch.Tensor:
    """uncond_text + g_text (cond - uncond_text) [+ g_pose (cond - uncond_pose)].

    `uncond_text` may be None only when text_scale is 1; `uncond_pose` None (or a pose
    scale of 0) leaves the pose term out, as outside the window.
    """
    if uncond_text is None:
        if text_scale != 1.0:
            raise ValueError(
                f"uncond_text is needed for a text scale of {text_scale} (only 1 skips it)"
            )
        out = cond.clone()
    else:
        out = uncond_text + text_scale * (cond - uncond_text)
    if uncond_pose is not None and pose_scale != 0.0:
        out = out + pose_scale * (cond - uncond_pose)
    return out
