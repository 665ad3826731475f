"""The pose and conditioning nodes inside a real ComfyUI (COMFYUI_DIR, COMFYUI_PYTHON).

All checks run in one ComfyUI process (`comfyui_graph_checks.py`, ComfyUI's own Python, CPU)
that writes a JSON report; each test asserts one behaviour a user depends on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfyui_report import result, run_checks

pytestmark = pytest.mark.comfyui

CHECKS = Path(__file__).with_name("comfyui_graph_checks.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_checks(CHECKS, tmp_path_factory.mktemp("graph_nodes"), timeout=600)


def test_dwpose_folder_is_registered_next_to_extra_paths(report: dict) -> None:
    r = result(report, "folders")
    assert r["paths"][0] == r["default"] and r["extra"] in r["paths"]
    assert {".onnx", ".pth"} <= set(r["extensions"])
    assert r["shared_with"] == [] and not r["pt_extensions_has_onnx"]
    assert r["files"] == ["dw-ll_ucoco_384.onnx", "yolox_l.onnx"]


def test_extraction_reports_progress_per_frame(report: dict) -> None:
    r = result(report, "extract_progress")
    assert r["reported"] == [[i, 6] for i in range(1, 7)]
    assert r["sent"][0] == [1, 6] and r["sent"][-1] == [6, 6]  # the UI sees the start and the end
    assert all(call in r["reported"] for call in r["sent"])
    assert r["frames"] == 6 and r["people"] == [1] * 6
    assert r["preview"] == [6, 96, 96, 3]


def test_batched_extraction_reports_progress_per_batch_and_batches_by_default(report: dict) -> None:
    """batch_size 4 over 6 frames: the bar moves after each batch (4, then 6), the poses are
    those of one frame per call; the node's default is 8 frames per call (a GPU is mostly
    idle at one)."""
    r, single = result(report, "extract_progress_batched"), result(report, "extract_progress")
    assert r["reported"] == [[4, 6], [6, 6]]
    assert r["frames"] == 6 and r["people"] == single["people"] and r["preview"] == single["preview"]
    assert r["schema_default"] == 8


def test_cancel_stops_extraction_as_a_comfyui_interrupt(report: dict) -> None:
    r = result(report, "extract_cancel")
    assert r["raised"] == "InterruptProcessingException"
    assert r["flag_after"] is False  # consumed: the next prompt runs


def test_detector_colour_order_defaults_to_the_references(report: dict) -> None:
    r = result(report, "colour_order")
    assert (r["default"], r["trained"]) == ("reference", "trained")
    assert "colour_order must be one of ['reference', 'trained']" in r["validate"]


def test_alignment_renders_positive_and_augmented_negative(report: dict) -> None:
    r = result(report, "alignment")
    assert r["shape"] == r["negative_shape"] == [4, 64, 48, 3]  # 6 frames, align_frame 2
    assert r["range"][0] > -0.1 and r["range"][1] < 1.1 and r["drawn"] > 0.01  # bicubic overshoot kept
    assert r["negative_differs"] and r["deterministic"] and r["seed_matters"]
    assert r["reference_pose_input_equal"]
    assert r["no_reference"].startswith("PoseError") and "pose_detector" in r["no_reference"]
    assert r["clip_pose_shape"] == [1, 120, 80, 3]  # the first positive frame at the reference's size


def test_pose_frames_go_through_the_reference_chain(report: dict) -> None:
    """Reference pose detected on the reference resized to its 1024x576-area size (624x928
    for 80x120), frames drawn at 2x that, PIL to 80x120, bicubic to 48x64: equal to the library."""
    r = result(report, "pose_chain")
    assert r["reference_width_height"] == [624, 928]
    assert r["positive_equal"] and r["negative_equal"] and r["clip_pose_equal"]
    assert r["unclamped"][0] < 0.0
    assert r["frames"] > 2 and r["threads_equal"] == [True, True]  # drawn on several threads, kept in order


def test_generation_size_is_the_references_auto_size(report: dict) -> None:
    r = result(report, "generation_size")
    assert r["auto"] == [464, 832]  # a 1080x1920 photo at 832*480: 464x832, not 480x832
    assert r["auto_720p"] == [720, 1280] and r["forced"] == [512, 768]
    assert r["half_forced"].startswith("ConditioningError") and "both be 0 (auto" in r["half_forced"]
    bad, good, linked = r["validate"]
    assert "area must be one of" in bad and good is True and linked is True


def test_conditioning_stores_the_contract_keys(report: dict) -> None:
    r = result(report, "conditioning")
    assert {"concat_latent_image", "concat_mask", "steadydancer_pose", "steadydancer_ref_x", "steadydancer_ref_c",
            "clip_vision_output", "steadydancer_clip_c"} <= set(r["keys"])  # fmt: skip
    s = r["shapes"]
    assert s["concat_latent_image"] == s["steadydancer_pose"] == [1, 16, 3, 6, 4]  # 9 frames of 48x32
    assert s["steadydancer_ref_x"] == s["steadydancer_ref_c"] == [1, 36, 1, 6, 4]
    assert r["latent"] == [2, 16, 3, 6, 4]
    assert (r["ref_x_mask"], r["ref_c_mask"]) == (1.0, 0.0)
    assert (r["concat_mask_first"], r["concat_mask_rest"]) == (0.0, 1.0)


def test_conditioning_three_outputs_share_all_but_pose(report: dict) -> None:
    r = result(report, "conditioning")
    assert r["text_kept"] == [True, True, True]  # pose_negative carries the positive prompt
    assert r["pose_same_pos_neg"] and r["pose_negative_differs"] and r["same_except_pose"]


def test_conditioning_encodes_what_the_spec_says(report: dict) -> None:
    r = result(report, "conditioning")
    assert r["encoded_shapes"] == [[9, 48, 32, 3], [1, 48, 32, 3], [1, 48, 32, 3], [9, 48, 32, 3], [9, 48, 32, 3]]
    assert r["video_first_is_reference"] and r["video_rest_grey"]
    assert r["ref_c_is_first_pose"]
    assert r["padded_with_last"] and r["negative_padded_with_last"]  # 3 pose frames -> 9
    assert r["clip_reference_rows"] == 1 and r["clip_pose_rows"] == 1 and r["clip_pose_first_row"] == 0.0


def test_conditioning_resizes_as_the_reference_without_clamping(report: dict) -> None:
    r = result(report, "resize_unclamped")
    assert r["ref_range"][0] < 0.0 and r["ref_range"][1] > 1.0  # bicubic overshoot reaches the VAE
    assert r["ref_diff"] < 1e-6 and r["first_frame_is_ref"] and r["pose_at_size_untouched"]


def test_conditioning_refuses_short_video_and_bad_length(report: dict) -> None:
    r = result(report, "conditioning")
    assert r["short_error"].startswith("ConditioningError") and "short_video" in r["short_error"]
    bad, good, linked = r["validate"]
    assert "4k+1" in bad and good is True and linked is True
