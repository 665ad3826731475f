"""The ComfyUI MODEL glue and the guider, inside a real ComfyUI (COMFYUI_DIR, COMFYUI_PYTHON).

All checks run in one ComfyUI process (`comfyui_model_checks.py`, ComfyUI's own Python, CPU)
that writes a JSON report; each test here asserts one behaviour from it. Every test runs
twice: with ComfyUI as it starts on a CPU, and with dynamic VRAM on as ComfyUI 0.3x turns it
on for NVIDIA GPUs (skipped on a ComfyUI without it). The GPU side of dynamic VRAM (weights
streamed into VRAM per layer) needs a GPU and is not exercised here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfyui_report import result, run_checks

pytestmark = pytest.mark.comfyui

CHECKS = Path(__file__).with_name("comfyui_model_checks.py")


@pytest.fixture(scope="module", params=["classic", "dynamic_vram"])
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    args = ("--dynamic-vram",) if request.param == "dynamic_vram" else ()
    return run_checks(CHECKS, tmp_path_factory.mktemp("comfy_model"), timeout=900, args=args)


FORMAT_LIMITS = {  # largest relative difference from the library's float32 forward
    "tiny.safetensors@default": 1e-5,
    "tiny_bf16.safetensors@default": 1e-5,  # bf16 file, computed in float32 on the CPU
    "tiny_bf16.safetensors@bf16": 3e-2,
    "tiny_fp16.safetensors@fp16": 5e-3,
    "tiny_fp8_scaled.safetensors@default": 1e-2,  # the reference reads the same fp8 values
    "tiny_q8.gguf@default": 1e-5,
}


def test_every_weight_format_loads_and_predicts_like_the_library(report: dict) -> None:
    r = result(report, "formats")
    assert set(r["runs"]) == set(FORMAT_LIMITS)
    for name, run in r["runs"].items():
        assert run["finite"], name
        assert run["rel_diff"] <= FORMAT_LIMITS[name], (name, run)
    gguf = r["runs"]["tiny_q8.gguf@default"]
    assert gguf["patcher"] == "GGUFModelPatcher" and gguf["weight_dtype"] == "8"  # GGML type Q8_0
    assert r["runs"]["tiny_bf16.safetensors@bf16"]["weight_dtype"] == "torch.bfloat16"
    assert r["lazy_layers"] == r["aimdo_enabled"]  # the mode really is what the test asked for


def test_gguf_patcher_follows_the_running_comfyui_api(report: dict) -> None:
    r = result(report, "gguf_patcher")
    assert r["return_weight_vs_merged"] < 1e-5  # what checkpoint saving and LoRA extraction ask for
    assert r["model_untouched"]
    assert r["shrunk_vs_merged"] < 1e-4 and r["still_quantised"]
    if "saved_vs_merged" in r:  # ComfyUI 0.3x saves through the patcher
        assert r["saved_shape"] == r["expected_shape"] and r["saved_vs_merged"] < 1e-5


def test_gguf_files_are_listed_without_touching_shared_extensions(report: dict) -> None:
    r = result(report, "folders")
    assert r["files"] == [  # no .ckpt
        "plain_wan.safetensors", "tiny.safetensors", "tiny_bf16.safetensors", "tiny_fp16.safetensors",
        "tiny_fp8_scaled.safetensors", "tiny_q8.gguf",
    ]
    assert r["same_list"], "the .gguf key must share diffusion_models' path list object"
    assert not r["gguf_in_pt_extensions"]
    assert r["path"].endswith("tiny_q8.gguf")


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny_q8.gguf", "tiny_fp8_scaled.safetensors"])
def test_comfy_prediction_equals_direct_forward(report: dict, name: str) -> None:
    r = result(report, "parity")[name]
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r
    assert r["batch_max_diff"] <= 1e-5 * max(1.0, r["scale"]), r  # batch-1 conditioning, batch-2 latent


def test_gguf_weights_stay_quantised_after_loading_and_running(report: dict) -> None:
    r = result(report, "gguf_quantised")
    assert r["quantised_in_file"] > 0
    assert r["quantised_in_model"]
    # ComfyUI's memory accounting sees packed bytes: Q8_0 is 34 bytes per 32 weights (vs 128).
    assert r["model_size"] < r["float_model_size"] - 0.7 * r["quantised_float_bytes"]


def test_scaled_fp8_weights_stay_fp8_in_the_model(report: dict) -> None:
    """No bf16 copy of an fp8 checkpoint: its fp8 tensors are the model's, expanded per forward."""
    r = result(report, "fp8_compact")
    assert r["fp8_in_file"] and r["fp8_in_model"] == r["fp8_in_file"]
    assert r["patcher"] == "GGUFModelPatcher"  # the compact-weight patcher: LoRA per forward, no rewrite
    # ComfyUI's memory accounting sees 1 byte per fp8 weight (vs 4 in the float32 file)
    assert r["model_size"] < r["float_model_size"] - 0.7 * r["fp8_float_bytes"]


def test_opt_in_fp8_matmul_runs_in_comfyui_and_keeps_loras(report: dict) -> None:
    """STEADYDANCER_FP8_MATMUL=1 or the loader's fp8_matmul option (torch._scaled_mm; its CPU
    kernel here): a bf16 prediction of an fp8 model within the input's fp8 rounding of the
    exact one, and a LoRA still applied; the option on a GGUF model warns and changes nothing."""
    r = result(report, "fp8_matmul")
    assert r["finite"] and 1e-4 < r["relative"] < 0.05, r  # the fp8 path ran: lossy, slightly
    assert r["lora_relative"] < 0.05, r
    assert r["lora_change_vs_exact"] < 0.5, r  # the LoRA is not lost on the fp8 path
    # the loader's fp8_matmul option does what the variable does, for that model only
    assert r["option_vs_env"] == 0, r
    # on a file without fp8 weights it changes nothing and says so
    assert r["gguf_option_vs_plain"] == 0, r
    assert any("no fp8 weights" in w for w in r["gguf_option_warnings"]), r


def test_lora_on_fp8_matmul_model_is_written_into_its_fp8_weights(report: dict) -> None:
    """With the loader's fp8_matmul option a LoRA is merged into the fp8 weights at load (as
    ComfyUI merges into its own fp8 models), so the patched layers keep the fp8 product and
    no call re-applies the LoRA; unpatching puts the file's weights back bit for bit."""
    r = result(report, "fp8_matmul")
    for key, layer in r["merged_layers"].items():
        assert layer["fp8"] and layer["weight_functions"] == 0, (key, layer)
        assert layer["worst_step"] <= 1.0, (key, layer)
        assert layer["bias"] < 0.2, (key, layer)
        assert layer["saved_vs_exact"] < 1e-2, (key, layer)  # bf16 copy of the exact sum
        assert layer["repatched_same"], (key, layer)
    assert r["merged_vs_exact_lora"] < 0.05, r  # within the fp8 path's own error
    assert r["merged_change_vs_exact"] < 0.2, r  # the LoRA's effect is kept
    assert r["restored_after_unpatch"], r
    # partly unloaded by ComfyUI: the LoRA is applied per forward again, still the same result
    assert r["partial_unload_patch_functions"] == len(r["merged_layers"]), r
    assert r["partial_unload_vs_exact_lora"] < 0.05, r


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny_q8.gguf", "tiny_fp8_scaled.safetensors"])
@pytest.mark.parametrize(
    "lora",
    [
        "tiny_lora.safetensors",  # kohya lora_unet_* and diffusion_model.* keys, lora_up/lora_down, .alpha, diff_b
        "tiny_lora_peft.safetensors",  # PEFT lora_A/lora_B without alpha (lightx2v's spelling), diff_b, diff
    ],
)
def test_lora_loader_patches_float_and_gguf_models(report: dict, name: str, lora: str) -> None:
    r = result(report, "lora")[f"{name}+{lora}"]
    assert r["patched_keys"] == r["expected_keys"] == 3  # two weights and a bias, whatever the spelling
    assert r["lora_effect"] > 1e-3, "the LoRA must change the prediction"
    assert r["lora_vs_merged"] < 1e-4, r
    assert r["lowvram_vs_merged"] < 1e-4, r
    assert r["partial_unload_vs_merged"] < 1e-4, r
    assert r["base_after_vs_before"] < 1e-6, "unpatching must restore the base model"
    if name != "tiny.safetensors":
        assert r["still_quantised"]


def test_attention_backend_is_per_model(report: dict) -> None:
    r = result(report, "attention")
    assert r["used"] == {"math": "math", "sdpa": "sdpa", "comfy": None}  # "comfy": no override of ours
    assert r["sdpa_vs_math"] < 1e-5
    assert r["comfy_vs_math"] < 1e-5  # ComfyUI's own attention gives the same prediction
    assert r["clone_shares"]


def test_comfyui_attention_override_on_the_model_is_used(report: dict) -> None:
    r = result(report, "attention")
    assert r["override_calls"] == 3 * r["layers"]  # self, text and image cross-attention per block
    assert r["override_vs_math"] < 1e-5
    assert r["comfy_choice_calls_without_override"] == 0


WINDOW_STEPS = {2, 3}  # 10 steps, window (0.1, 0.4) strict: i/10 in {0.2, 0.3}


def test_guider_makes_three_predictions_only_inside_the_window(report: dict) -> None:
    r = result(report, "guider")["5.0"]
    assert r["finite"]
    for i, made in enumerate(r["per_step"]):
        assert made == ([0, 1, 2] if i in WINDOW_STEPS else [0, 1]), (i, made)
    # The conditionings have equal shapes, so ComfyUI batches a step's predictions in one pass.
    assert r["forwards_per_step"] == [1] * 10


def test_guider_with_text_scale_one_skips_the_negative_prompt(report: dict) -> None:
    r = result(report, "guider")["1.0"]
    for i, made in enumerate(r["per_step"]):
        assert made == ([0, 2] if i in WINDOW_STEPS else [0]), (i, made)


def test_sampler_node_returns_a_latent_and_leaves_the_model_unshifted(report: dict) -> None:
    r = result(report, "sampler_node")
    assert r["shape"] == [1, 16, 2, 4, 6]
    assert r["finite"]
    assert r["base_shift_unchanged"] == 5.0


def test_clear_errors_for_wrong_files_and_conditioning(report: dict) -> None:
    r = result(report, "errors")
    assert r["plain_wan"] and "Wan2.1" in r["plain_wan"], r
    assert r["missing_pose"] and "steadydancer_pose" in r["missing_pose"], r
    assert r["attention_missing"] and "flash_attn_2" in r["attention_missing"], r
    assert r["missing_file"] and "gone.gguf" in r["missing_file"] and "diffusion_models" in r["missing_file"], r


def test_guider_prediction_is_the_formula_on_the_right_conditionings(report: dict) -> None:
    r = result(report, "guidance_values")
    assert r["2"] < 1e-4, "inside the window: text and pose terms"
    assert r["5"] < 1e-4, "outside the window: text term only"


def test_combo_values_are_validated_before_running(report: dict) -> None:
    r = result(report, "errors")
    assert r["validate_ok"] is True
    assert r["validate_linked"] is True
    assert "model_name" in r["validate_model"] and "nope.gguf" in r["validate_model"]
    assert "attention" in r["validate_attention"] and "'fast'" in r["validate_attention"]
    assert r["validate_fp8_matmul"] == "fp8_matmul must be true or false; got 'false'", r
    assert "sampler_name" in r["validate_sampler"]


def test_lora_hooks_work_on_float_weights_and_are_refused_clearly_on_gguf(report: dict) -> None:
    r = result(report, "lora_hooks")
    # Under dynamic VRAM ComfyUI itself refuses hooks (on a GPU); not checkable on a CPU.
    assert r["tiny.safetensors"] in ({"finite": True}, {"skipped": "dynamic VRAM"})
    assert "LoraLoaderModelOnly" in r["tiny_q8.gguf"]["error"]


@pytest.mark.parametrize("node", ["wan", "generic"])
def test_context_windows_give_each_window_its_frames_and_the_first_frame_only_to_window_0(report: dict, node: str) -> None:
    r = result(report, "context_windows")[node]
    assert r["shape"] == [1, 16, 6, 4, 6] and r["finite"]
    calls = r["calls"]
    assert calls, "the DiT was never called through a context window"
    covered = set()
    for call in calls:
        assert call["x_frames"] == len(call["indices"])
        assert call["pose_is_slice"], call  # the pose latent of exactly these frames
        # the image-to-video first frame (mask on) is given only where the video starts
        assert call["given_frames"] == ([0] if 0 in call["indices"] else []), call
        covered.update(call["indices"])
    assert covered == set(range(6))
    assert sum(0 in call["indices"] for call in calls) == 2  # one window per step (2 steps) holds frame 0
    assert len(calls) > 2  # more than one window per step


@pytest.mark.parametrize("cache", ["easycache", "lazycache"])
def test_comfyui_caches_skip_model_calls_and_change_nothing_at_threshold_zero(report: dict, cache: str) -> None:
    r = result(report, "caches")
    assert r[f"{cache}@0.0"]["calls"] == r["uncached_calls"]
    assert r[f"{cache}@0.0"]["max_diff"] == 0.0  # the wrapper reaches the DiT and leaves it alone
    assert r[f"{cache}@3.0"]["calls"] < r["uncached_calls"], "no model call was skipped"
    assert r[f"{cache}@3.0"]["finite"]


def test_sampling_past_81_frames_without_windows_warns_once_with_the_fix(report: dict) -> None:
    r = result(report, "long_without_windows")
    assert r["plain"]["finite"] and r["windows"]["finite"]
    assert len(r["plain"]["warnings"]) == 1 and "WAN Context Windows (Manual)" in r["plain"]["warnings"][0]
    assert r["windows"]["warnings"] == []


def test_comfyui_block_replacements_reach_the_dit_blocks(report: dict) -> None:
    r = result(report, "block_patches")
    assert r["passthrough"] == 0.0 and r["twice"] == 0.0  # running the block (again) changes nothing
    assert r["skip"] > 1e-4  # skipping a block changes the prediction
    assert r["calls"] == [[0, ["img", "img_context", "pe", "transformer_options", "txt", "vec"]]]  # Wan's arguments
