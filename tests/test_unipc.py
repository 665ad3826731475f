"""The reference's sampling (schedule, integer timesteps, flow UniPC) against a re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import reference_sampling as ref
import torch

from steadydancer.schedule import (
    REFERENCE_SIGMA_MAX,
    reference_first_sigma,
    reference_schedule,
    reference_timestep,
)
from steadydancer.unipc import check_sigmas, sample_flow_unipc


def toy_velocity(seed: int = 0) -> ref.Velocity:
    """A small nonlinear 'model' of the sample and the integer timestep."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 4, generator=gen) * 0.5
    bias = torch.randn(4, 1, 1, 1, generator=gen)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = t.to(torch.float64).float() / 1000.0
        mixed = torch.einsum("oc,bcfhw->bofhw", mix, x)
        return torch.tanh(mixed + level * bias) + 0.3 * x * level

    return velocity


def ours(velocity: ref.Velocity, noise: torch.Tensor, steps: int, shift: float) -> tuple[torch.Tensor, list[int]]:
    """The package's sampler with the package's schedule; the model sees floor(sigma*1000)."""
    sigmas, _ = reference_schedule(steps, shift)
    seen: list[int] = []

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = reference_timestep(sigma)
        seen.append(int(t))
        return x - sigma * velocity(x, t)

    return sample_flow_unipc(denoise, noise.clone(), sigmas), seen


@pytest.mark.parametrize(("steps", "shift"), [(40, 5.0), (40, 3.0), (10, 5.0), (3, 5.0), (2, 1.0), (1, 5.0)])
def test_sampler_matches_the_reference_loop_to_1e_6(steps: int, shift: float) -> None:
    noise = torch.randn(1, 4, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    velocity = toy_velocity()
    expected, expected_t = ref.sample(velocity, noise.clone(), steps, shift)
    got, got_t = ours(velocity, noise, steps, shift)
    assert got_t == expected_t
    assert float((got - expected).abs().max()) <= 1e-6
    assert float(expected.abs().max()) > 0.5  # a real result, not zeros


def test_schedule_is_the_references() -> None:
    for steps, shift in [(40, 5.0), (40, 3.0), (50, 5.0), (4, 8.0), (1, 1.0)]:
        sigmas, timesteps = reference_schedule(steps, shift)
        expected_sigmas, expected_t = ref.schedule(steps, shift)
        assert sigmas.dtype == torch.float32 and timesteps.dtype == torch.int64
        assert torch.equal(sigmas, expected_sigmas) and torch.equal(timesteps, expected_t)
    sigmas, timesteps = reference_schedule(40, 5.0)
    assert float(sigmas[0]) == pytest.approx(0.99980, abs=1e-5) and float(sigmas[-1]) == 0.0
    assert timesteps[0] == 999 and abs(REFERENCE_SIGMA_MAX - 0.999) < 1e-7
    assert reference_first_sigma(5.0) == pytest.approx(float(sigmas[0]), rel=1e-7)


def test_float32_sigmas_give_the_references_integer_timesteps_everywhere() -> None:
    """Where the float64 sigma*1000 is within float32 rounding of an integer (shift 1, 37
    steps: 0.999 * 35/37 = 0.945000...), the float32 sigma is moved by one float32 step."""
    sigmas, timesteps = reference_schedule(37, 1.0)
    expected_sigmas, _ = ref.schedule(37, 1.0)
    assert torch.equal(reference_timestep(sigmas[:-1]).long(), timesteps)
    moved = sigmas != expected_sigmas
    assert moved.any()
    gap = (sigmas[moved].double() - expected_sigmas[moved].double()).abs()
    assert float(gap.max()) <= float(np.spacing(np.float32(1.0)))
    for steps in range(1, 120):
        for shift in (1.0, 3.0, 5.0, 8.3):
            s, t = reference_schedule(steps, shift)
            assert torch.equal(reference_timestep(s[:-1]).long(), t), (steps, shift)


def test_timestep_is_floor_in_float64_on_the_input_device_and_dtype() -> None:
    sigma = torch.tensor([0.9998, 0.5, 0.0015, 0.0], dtype=torch.float32)
    t = reference_timestep(sigma)
    assert t.dtype == torch.float32 and t.tolist() == [999.0, 500.0, 1.0, 0.0]


def test_last_step_returns_the_last_x0_prediction_and_callbacks_see_every_step() -> None:
    noise = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    sigmas, _ = reference_schedule(5, 5.0)
    x0s, steps = [], []

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0s.append(0.5 * x + sigma)
        return x0s[-1]

    out = sample_flow_unipc(denoise, noise, sigmas, callback=lambda i, x, x0: steps.append(i))
    assert steps == [0, 1, 2, 3, 4]
    assert torch.equal(out, x0s[-1])  # the final sigma is 0: the sample is the last x0


def test_schedules_from_sigma_one_stay_finite() -> None:
    """ComfyUI's own schedulers start at sigma 1.0 (alpha 0, lambda -inf)."""
    sigmas = torch.linspace(1.0, 0.0, 9)
    noise = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    out = sample_flow_unipc(lambda x, s: torch.tanh(x) * (1 - s), noise, sigmas)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        ([1.0], "at least 2 sigmas"),
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([0.5, 0.7, 0.0], "strictly decreasing"),
        ([14.6, 1.0, 0.0], "in [0, 1]"),
        ([1.0, float("nan"), 0.0], "in [0, 1]"),
    ],
)
def test_schedules_unipc_cannot_step_through_are_refused(sigmas: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_sigmas(torch.tensor(sigmas))


def test_bad_schedule_and_order_arguments() -> None:
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        reference_schedule(0, 5.0)
    with pytest.raises(ValueError, match="shift must be a positive number"):
        reference_schedule(40, 0.0)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        sample_flow_unipc(lambda x, s: x, torch.zeros(1), torch.tensor([1.0, 0.0]), order=3)
