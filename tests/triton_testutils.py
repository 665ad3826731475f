"""Running Triton kernels on the CPU, for the tests of the fused kernels.

Triton chooses between its compiler and its CPU interpreter when a kernel module is first
imported (TRITON_INTERPRET=1 at that moment selects the interpreter), so interpreter checks
run as a script in a fresh Python process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (pip install triton)")


def run_in_interpreter(script: str, repo_root: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `script` with TRITON_INTERPRET=1 and the repository importable; its output as text."""
    path = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=repo_root
    )


def check_stochastic_rounding(round_fp8, device: str = "cpu") -> None:
    """Assert what `fused.stochastic_round_fp8` promises, on `device` (raises AssertionError).

    Each output is one of the two e4m3 values around x / scale; over many values the mean is
    x / scale (each value set 4096 times, so the noise of the mean is about 1 % of a step);
    the same seed repeats the result, another does not; values beyond +-448 saturate;
    values e4m3 holds are kept. Shared by the CPU, Triton-interpreter and GPU tests.
    """
    import torch

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()  # the 253 finite e4m3 values, sorted
    #        1/4 step  3/4 step  negative    subnormal  below 2^-9  exact   beyond range
    values = [1.03125, 0.2421875, -5.25, 0.0029296875, -0.0009765625, 1.125, -3.5, 900.0, -460.0]
    scale = torch.tensor(0.5, device=device)
    x = torch.tensor(values, device=device).repeat_interleave(4096) * scale
    out = round_fp8(x, scale, 1234)
    assert out.dtype == torch.float8_e4m3fn and out.shape == x.shape
    got = out.float().cpu().view(len(values), -1)
    target = torch.tensor(values).clamp(-448, 448)
    upper = grid[torch.searchsorted(grid, target).clamp_max(len(grid) - 1)]
    lower = grid[(torch.searchsorted(grid, target, right=True) - 1).clamp_min(0)]
    step = (upper - lower).clamp_min(2.0**-9)
    for i, value in enumerate(target.tolist()):
        seen = set(got[i].unique().tolist())
        assert seen <= {lower[i].item(), upper[i].item()}, (value, seen)
        assert abs(got[i].mean().item() - value) < 0.05 * step[i].item(), (
            value,
            got[i].mean().item(),
        )
    assert torch.equal(round_fp8(x, scale, 1234).view(torch.uint8), out.view(torch.uint8))
    assert not torch.equal(round_fp8(x, scale, 99).view(torch.uint8), out.view(torch.uint8))
