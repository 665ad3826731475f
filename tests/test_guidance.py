"""SteadyDancer's three-prediction guidance (docs/REFERENCE.md, "Guidance")."""

from __future__ import annotations

import pytest
import torch

from steadydancer.guidance import PREDICTIONS, calls_needed, combine, in_pose_window


def test_window_bounds_are_strict():
    # 50 steps, window (0.1, 0.4): steps 6..19 inside; 5 (=0.1) and 20 (=0.4) outside
    inside = [i for i in range(50) if in_pose_window(i, 50, 0.1, 0.4)]
    assert inside == list(range(6, 20))
    assert not in_pose_window(0, 0, 0.0, 1.0)
    assert in_pose_window(1, 4, 0.0, 1.0) and not in_pose_window(0, 4, 0.0, 1.0)


@pytest.mark.parametrize(
    ("text_scale", "pose_active", "expected"),
    [
        (5.0, True, ("cond", "uncond_text", "uncond_pose")),
        (5.0, False, ("cond", "uncond_text")),
        (1.0, True, ("cond", "uncond_pose")),
        (1.0, False, ("cond",)),
    ],
)
def test_calls_needed(text_scale, pose_active, expected):
    needed = calls_needed(text_scale, pose_active)
    assert needed == expected
    assert all(name in PREDICTIONS for name in needed)


def test_combine_formula_inside_and_outside_window():
    g = torch.Generator().manual_seed(0)
    cond, ut, up = (torch.randn(2, 16, 3, 4, 4, generator=g) for _ in range(3))
    inside = combine(cond, ut, up, 5.0, 1.5)
    torch.testing.assert_close(inside, ut + 5.0 * (cond - ut) + 1.5 * (cond - up))
    outside = combine(cond, ut, None, 5.0, 1.5)
    torch.testing.assert_close(outside, ut + 5.0 * (cond - ut))
    torch.testing.assert_close(combine(cond, ut, up, 5.0, 0.0), outside)


def test_text_scale_one_needs_no_uncond_text():
    g = torch.Generator().manual_seed(1)
    cond, up = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
    torch.testing.assert_close(combine(cond, None, up, 1.0, 2.0), cond + 2.0 * (cond - up))
    # and it equals the three-prediction formula with uncond_text anything
    torch.testing.assert_close(
        combine(cond, None, up, 1.0, 2.0), combine(cond, up * 7, up, 1.0, 2.0)
    )
    with pytest.raises(ValueError, match="uncond_text"):
        combine(cond, None, up, 5.0, 2.0)
