"""Step index of a sigma in a schedule: what the guider's pose window is measured on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from steadydancer.schedule import num_steps, predictions_for, step_index


def flow_sigmas(steps: int, shift: float = 5.0) -> torch.Tensor:
    """A shifted flow-matching schedule ending at 0, as ComfyUI builds for Wan."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def test_each_schedule_sigma_is_its_own_step() -> None:
    sigmas = flow_sigmas(50)
    assert num_steps(sigmas) == 50
    assert [step_index(sigmas, s) for s in sigmas[:-1]] == list(range(50))


def test_sigma_between_two_entries_belongs_to_the_earlier_step() -> None:
    sigmas = flow_sigmas(10)
    for i in range(10):
        midpoint = (sigmas[i] + sigmas[i + 1]) / 2
        assert step_index(sigmas, midpoint) == i


def test_float32_copies_and_tensor_sigmas_map_to_the_same_step() -> None:
    sigmas = flow_sigmas(30).double()
    for i in range(30):
        sigma = sigmas[i].float().reshape(1).repeat(2)  # a batch of the current sigma, as samplers pass it
        assert step_index(sigmas.float(), sigma) == i


def test_out_of_range_sigmas_clamp() -> None:
    sigmas = flow_sigmas(8)
    assert step_index(sigmas, 10.0) == 0
    assert step_index(sigmas, 0.0) == 7
    assert step_index([1.0], 0.5) == 0
    assert num_steps([]) == 0


@given(steps=st.integers(1, 200), shift=st.floats(1.0, 10.0))
def test_index_is_monotonic_and_covers_every_step(steps: int, shift: float) -> None:
    sigmas = flow_sigmas(steps, shift)
    indices = [step_index(sigmas, s) for s in sigmas[:-1].tolist()]
    assert indices == list(range(steps))


@pytest.mark.parametrize("sigmas", [[1.0, 0.5, 0.0], (1.0, 0.5, 0.0)])
def test_plain_sequences_are_accepted(sigmas: list[float] | tuple[float, ...]) -> None:
    assert step_index(sigmas, 0.5) == 1


def plan(sigmas: torch.Tensor, **scales: float) -> list[tuple[str, ...]]:
    kwargs = {"text_scale": 5.0, "pose_scale": 1.5, "start": 0.1, "end": 0.4, **scales}
    return [predictions_for(sigmas, s, **kwargs) for s in sigmas[:-1]]


THREE = ("cond", "uncond_text", "uncond_pose")
TWO = ("cond", "uncond_text")


def test_reference_schedule_has_three_predictions_exactly_on_steps_6_to_19() -> None:
    steps = plan(flow_sigmas(50))  # 50 steps, window (0.1, 0.4): i/50 strictly inside
    assert [i for i, p in enumerate(steps) if p == THREE] == list(range(6, 20))
    assert all(p == TWO for i, p in enumerate(steps) if not 6 <= i < 20)
    assert sum(len(p) for p in steps) == 50 * 2 + 14


def test_window_bounds_are_strict() -> None:
    steps = plan(flow_sigmas(10))  # i/10 = 0.1 and 0.4 are outside
    assert [i for i, p in enumerate(steps) if "uncond_pose" in p] == [2, 3]


def test_text_scale_one_makes_one_prediction_outside_the_window_and_two_inside() -> None:
    steps = plan(flow_sigmas(10), text_scale=1.0)
    assert steps == [("cond",)] * 2 + [("cond", "uncond_pose")] * 2 + [("cond",)] * 6


def test_pose_scale_zero_or_unknown_schedule_skips_the_pose_prediction() -> None:
    assert all("uncond_pose" not in p for p in plan(flow_sigmas(10), pose_scale=0.0))
    assert predictions_for(None, 0.5, text_scale=5.0, pose_scale=1.5, start=0.1, end=0.4) == TWO
    assert predictions_for([], 0.5, text_scale=5.0, pose_scale=1.5, start=0.1, end=0.4) == TWO


def test_heun_stage_sigmas_share_their_step_window() -> None:
    sigmas = flow_sigmas(10)
    midpoints = (sigmas[:-1] + sigmas[1:]) / 2
    kwargs = {"text_scale": 5.0, "pose_scale": 1.5, "start": 0.1, "end": 0.4}
    assert [predictions_for(sigmas, m, **kwargs) for m in midpoints] == plan(sigmas)
