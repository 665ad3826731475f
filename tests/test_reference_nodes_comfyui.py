"""The reference's sampling and CLIP preprocessing as ComfyUI nodes, inside a real ComfyUI.

All checks run in one ComfyUI process (`comfyui_reference_checks.py`, ComfyUI's own Python,
CPU, the tiny SteadyDancer) that writes a JSON report; each test asserts one behaviour.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfyui_report import result, run_checks

pytestmark = pytest.mark.comfyui

CHECKS = Path(__file__).with_name("comfyui_reference_checks.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_checks(CHECKS, tmp_path_factory.mktemp("reference_nodes"), timeout=900)


def test_model_sampling_calls_the_model_at_integer_timesteps_and_starts_from_noise(report: dict) -> None:
    r = result(report, "model_sampling")
    assert r["class"] == "ReferenceFlowSampling" and r["base_untouched"] and r["shift"] == 3.0
    assert r["timesteps"] == [999.0, 500.0, 0.0]
    assert r["float_class_is_flow"] and r["float_timestep"] == pytest.approx(999.79, abs=1e-3)
    assert r["starts_from_noise"] and r["one_starts_from_noise"]  # the reference's first sample is the noise
    assert r["partial_is_comfyui"] < 1e-6  # below the first sigma (partial denoise): ComfyUI's rule
    assert "timesteps must be one of" in r["validate"]


def test_scheduler_gives_the_references_sigmas_for_the_models_shift(report: dict) -> None:
    r = result(report, "scheduler")
    assert r["patched"] and r["loader_shift"]
    assert "flow-matching model" in r["not_flow"] and "Load SteadyDancer Model" in r["not_flow"]
    assert r["not_registered"]  # nothing added to ComfyUI's global sampler/scheduler lists


@pytest.mark.parametrize("label", ["single", "guided"])
def test_sampling_through_comfyui_matches_the_reference_loop(report: dict, label: str) -> None:
    """Tiny SteadyDancer, 8 steps at shift 3: ComfyUI with the three nodes and the guider
    against the re-implemented reference loop calling the DiT directly."""
    r = result(report, "sampling_matches_reference")[label]
    assert r["timesteps_seen"] == [float(t) for t in r["reference_timesteps"]]  # integers, the reference's
    # one prediction per step: the same arithmetic to float rounding; guided: ComfyUI combines
    # the three predictions as x0 (denoised), the reference as velocities (equal up to rounding)
    assert r["max_diff"] <= (1e-6 if label == "single" else 1e-5 * r["scale"]), r


def test_sampler_shortcut_defaults_are_the_references(report: dict) -> None:
    r = result(report, "shortcut")
    assert r["defaults"] == {"steps": 40, "shift": 5.0, "sampler_name": "steadydancer", "scheduler": "steadydancer"}
    assert r["max_diff"] == 0.0  # the same as Model Sampling + Scheduler + Sampler (flow UniPC)
    assert r["validate"] is True and "scheduler must be one of" in r["validate_bad"]
    assert r["comfyui_choices_still_run"]


def test_clip_encode_preprocesses_as_the_reference(report: dict) -> None:
    r = result(report, "clip")
    assert r["is_output"] and r["missing_fields"] == [] and r["shape"] == [1, 257, 32]
    assert r["square_equal"] < 1e-5  # 8-bit 224x224 input: both preprocessings agree (to float rounding), same encoder call
    assert r["direct_diff"] == 0.0  # the model on the reference's pixels
    assert r["differs_from_comfyui"] > 1e-3  # antialiasing and rounding change the features
