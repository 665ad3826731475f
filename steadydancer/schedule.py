"""Which sampling step a sigma belongs to.

The pose-guidance window is defined on the 0-based step index of the reference loop
(spec/MODEL.md, "Guidance"), but a sampler hands the guider only the current sigma and the
whole schedule. Single-step solvers (Euler, UniPC) evaluate exactly at the schedule's
sigmas; multi-stage ones (Heun, DPM++ 2S) also evaluate between two of them. Both map to
the step whose interval (sigmas[i+1], sigmas[i]] contains the sigma.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .guidance import calls_needed, in_pose_window

# Samplers copy sigmas between devices and dtypes; a sigma this close to a schedule entry
# is that entry, not a point just below it.
_REL_TOL = 1e-4


def num_steps(sigmas: torch.Tensor | Sequence[float]) -> int:
    """Steps of a schedule: one fewer than its sigmas (the last one is the end point)."""
    return max(len(sigmas) - 1, 0)


def step_index(sigmas: torch.Tensor | Sequence[float], sigma: float | torch.Tensor) -> int:
    """0-based step of `sigma` in the descending schedule `sigmas` (clamped to [0, steps-1]).

    A sigma equal to sigmas[i] (within a relative 1e-4) is step i; one strictly between
    sigmas[i] and sigmas[i+1] is step i as well (an intermediate stage of step i).
    """
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if values.numel() < 2:
        return 0
    s = float(torch.as_tensor(sigma, dtype=torch.float64).flatten()[0])
    # Entries 1..n-1 at or above sigma (within tolerance) are the steps already passed.
    passed = values[1:-1] >= s - _REL_TOL * max(abs(s), 1e-8)
    return int(passed.sum())


def predictions_for(
    sigmas: torch.Tensor | Sequence[float] | None,
    sigma: float | torch.Tensor,
    *,
    text_scale: float,
    pose_scale: float,
    start: float,
    end: float,
) -> tuple[str, ...]:
    """The predictions (steadydancer.guidance names) the guider makes at `sigma`.

    The pose term needs `uncond_pose` only while start < step/steps < end and the pose
    scale is not 0; without a schedule (`sigmas` None or empty) the step is unknown and the
    pose term is left out.
    """
    steps = 0 if sigmas is None else num_steps(sigmas)
    pose_active = (
        pose_scale != 0.0 and steps > 0 and in_pose_window(step_index(sigmas, sigma), steps, start, end)
    )
    return calls_needed(text_scale, pose_active)
