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
