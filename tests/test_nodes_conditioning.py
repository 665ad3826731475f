"""The conditioning rules behind the SteadyDancer Image to Video node (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch

from steadydancer import conditioning as cond
from steadydancer.errors import ConditioningError, SteadyDancerError


@pytest.mark.parametrize("length", [1, 5, 9, 81])
def test_valid_lengths_are_4k_plus_1(length: int) -> None:
    assert cond.length_error(length) is None
    assert cond.latent_frames(length) == (length - 1) // 4 + 1


@pytest.mark.parametrize(("length", "hint"), [(80, "77 or 81"), (2, "1 or 5"), (0, "1 or 5")])
def test_invalid_length_message_suggests_neighbours(length: int, hint: str) -> None:
    message = cond.length_error(length)
    assert message is not None
    assert "4k+1" in message and hint.replace(" or ", " or ") in message.replace("use ", "")


def test_size_must_be_multiple_of_16() -> None:
    assert cond.size_error(480, 832) is None
    assert "multiples of 16" in cond.size_error(480, 830)


def _frames(count: int) -> torch.Tensor:
    # frame i is filled with value i/100 so tests can see which frame ended where
    return torch.arange(count, dtype=torch.float32).div(100).view(count, 1, 1, 1).expand(count, 4, 6, 3).clone()


def test_short_pose_sequence_is_padded_with_its_last_frame() -> None:
    out = cond.fit_frames(_frames(3), 9, short="pad")
    assert out.shape == (9, 4, 6, 3)
    assert torch.equal(out[:3], _frames(3))
    assert torch.all(out[3:] == out[2])


def test_long_pose_sequence_is_cut_to_length() -> None:
    out = cond.fit_frames(_frames(12), 9)
    assert torch.equal(out, _frames(12)[:9])


def test_short_pose_sequence_is_refused_when_asked() -> None:
    with pytest.raises(ConditioningError, match=r"pose_frames has 6 frames but length is 9.*lower length to 5") as info:
        cond.fit_frames(_frames(6), 9, short="error", what="pose_frames")
    assert isinstance(info.value, SteadyDancerError)


def test_short_pose_sequence_loops_for_a_long_video() -> None:
    out = cond.fit_frames(_frames(3), 9, short="loop")
    assert [round(float(v) * 100) for v in out[:, 0, 0, 0]] == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_unknown_short_policy_is_refused() -> None:
    with pytest.raises(ConditioningError, match="short_video"):
        cond.fit_frames(_frames(2), 5, short="mirror")
    with pytest.raises(ConditioningError, match="short_video"):  # also when nothing needs padding
        cond.fit_frames(_frames(9), 5, short="mirror")


def test_short_policy_names_the_choices() -> None:
    assert cond.short_policy_error("pad") is None and cond.short_policy_error("loop") is None
    assert "['pad', 'loop', 'error']" in cond.short_policy_error("mirror")


def test_empty_pose_batch_is_refused() -> None:
    with pytest.raises(ConditioningError, match="non-empty"):
        cond.fit_frames(torch.zeros(0, 4, 4, 3), 5)


def test_reference_video_is_reference_then_mid_grey() -> None:
    reference = torch.rand(1, 8, 8, 3)
    video = cond.reference_video(reference, 5)
    assert video.shape == (5, 8, 8, 3)
    assert torch.equal(video[0], reference[0])
    assert torch.all(video[1:] == 0.5)  # zero in the VAE's [-1, 1] range


def test_image_to_video_mask_marks_the_first_latent_frame_known() -> None:
    mask = cond.image_to_video_mask(3, 2, 4)
    assert mask.shape == (1, 1, 3, 2, 4)
    assert torch.all(mask[:, :, 0] == 0) and torch.all(mask[:, :, 1:] == 1)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_reference_latent_is_latent_mask_latent(value: float) -> None:
    latent = torch.randn(2, 16, 3, 4, 5)
    out = cond.reference_latent(latent, value)
    assert out.shape == (2, 36, 1, 4, 5)
    assert torch.equal(out[:, :16], latent[:, :, :1])
    assert torch.all(out[:, 16:20] == value)
    assert torch.equal(out[:, 20:], latent[:, :, :1])


def test_reference_latent_rejects_non_latent() -> None:
    with pytest.raises(ConditioningError, match=r"\[B,16,F,h,w\]"):
        cond.reference_latent(torch.zeros(1, 4, 1, 2, 2), 1.0)


def test_empty_latent_shape() -> None:
    latent = cond.empty_latent(2, 81, 832, 480)
    assert latent.shape == (2, 16, 21, 104, 60)
    assert not latent.any()
