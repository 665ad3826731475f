"""Which sampling step a sigma belongs to, and the reference's sampling schedule.

The pose-guidance window is defined on the 0-based step index of the reference loop
(docs/REFERENCE.md, "Guidance"), but a sampler hands the guider only the current sigma and the
whole schedule. Single-step solvers (Euler, UniPC) evaluate exactly at the schedule's
sigmas; multi-stage ones (Heun, DPM++ 2S) also evaluate between two of them. Both map to
the step whose interval (sigmas[i+1], sigmas[i]] contains the sigma.

`reference_schedule` is the reference's flow UniPC schedule: its sigmas (from 0.999, not
1.0, shifted) and the integer timesteps it hands the model (docs/REFERENCE.md, "Sampling").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


# --- the reference's sampling schedule ----------------------------------------------------

TRAIN_TIMESTEPS = 1000
#: The first of the reference's 1000 training sigmas, as it stores it (float32 of 0.999);
#: the last is 0. Its step schedule is spaced linearly between the two.
REFERENCE_SIGMA_MAX = float(np.float32(1.0 - 1.0 / TRAIN_TIMESTEPS))


def _shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def reference_first_sigma(shift: float) -> float:
    """The sigma the reference's schedule starts at (0.9998 at shift 5), where it starts from
    pure noise."""
    return float(_shifted(np.float64(REFERENCE_SIGMA_MAX), shift))


def reference_schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of the reference's flow UniPC schedule.

    sigmas: float32 [steps + 1], `steps` values spaced linearly (in float64) from 0.999 down
    towards 0, shifted by `shift`, then 0. timesteps: int64 [steps], floor(sigma * 1000) of
    the float64 sigmas: the integer timestep the reference hands the model.

    A float32 sigma is the float32 of the reference's; where the float64 sigma * 1000 lies
    within float32 rounding of an integer (e.g. shift 1 with 37 steps), the float32 sigma is
    moved by one float32 step towards the reference's side, so that floor(sigma * 1000)
    computed from the float32 sigma (`reference_timestep`) is the reference's timestep.
    """
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive number; got {shift!r}")
    exact = _shifted(np.linspace(REFERENCE_SIGMA_MAX, 0.0, steps + 1)[:-1], float(shift))
    timesteps = (exact * TRAIN_TIMESTEPS).astype(np.int64)
    sigmas = np.append(exact, 0.0).astype(np.float32)
    for i, target in enumerate(timesteps):
        while int(np.floor(np.float64(sigmas[i]) * TRAIN_TIMESTEPS)) < target:
            sigmas[i] = np.nextafter(sigmas[i], np.float32(np.inf))
        while int(np.floor(np.float64(sigmas[i]) * TRAIN_TIMESTEPS)) > target:
            sigmas[i] = np.nextafter(sigmas[i], np.float32(-np.inf))
    return torch.from_numpy(sigmas), torch.from_numpy(timesteps)


def reference_timestep(sigma: torch.Tensor, multiplier: float = TRAIN_TIMESTEPS) -> torch.Tensor:
    """floor(sigma * multiplier), computed in float64 on the CPU (exact for the float32 sigmas
    of `reference_schedule`), returned on sigma's device and dtype."""
    exact = torch.floor(sigma.detach().to("cpu", torch.float64) * multiplier)
    return exact.to(device=sigma.device, dtype=sigma.dtype)
