"""The pipeline benchmark's `--profile` against a real ComfyUI: the benchmark-only node loads
next to this package, wraps every level of each model call, and its report comes back.

Runs `benchmarks.comfyui_pipeline` as a user would (its own ComfyUI server, `--cpu`, the
tiny models at 64x64 and 5 frames, the fast preset with its random LoRA), so the figures it
prints on the GPU machine come from code that ran here on both ComfyUI versions.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from scripts.comfyui_server import REPO_ROOT, comfyui_python

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def _profiled_fast_preset(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The pipeline benchmark's fast preset with --profile on the tiny models, on the CPU."""
    comfyui = Path(os.environ["COMFYUI_DIR"])
    python = comfyui_python(comfyui)
    if subprocess.run([python, "-c", "import websocket, av"], capture_output=True).returncode:
        pytest.skip("the pipeline benchmark runs with ComfyUI's Python, which lacks websocket-client "
                    "(`pip install websocket-client` there)")  # fmt: skip
    run = subprocess.run(
        [python, "-m", "benchmarks.comfyui_pipeline", "--comfyui", str(comfyui), "--scale", "tiny",
         "--cpu", "--width", "64", "--height", "64", "--frames", "5", "--detect-resolution", "128",
         "--weights", "gguf", "--modes", "default", "--preset", "fast", "--profile", "--out", str(out), *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = json.loads((out / "report.json").read_text())
    return run, result


def test_profile_reports_every_level_of_every_model_call(tmp_path: Path) -> None:
    run, result = _profiled_fast_preset(tmp_path / "pipeline")
    profile = result["profile"]
    levels = profile["levels"]
    # the fast preset: 4 steps, 5 predictions; ComfyUI batches the pose step's two into one DiT call
    assert levels["predict_noise"]["calls"] == 4
    assert levels["calc_cond_batch"]["calls"] == 4
    assert levels["apply_model"]["calls"] == levels["diffusion_model"]["calls"] >= 4
    totals = [levels[name]["total_s"] for name in ("predict_noise", "calc_cond_batch", "apply_model", "diffusion_model")]
    assert totals == sorted(totals, reverse=True) and totals[-1] > 0  # each level wraps the next
    assert 0 < totals[0] <= profile["sampling_s"]
    # DiT call 2 ran three more times (profiled, repeated, random inputs), and none of that
    # counts in the levels: each call's DiT time is one run, not four
    call = profile["profiled_call"]
    assert call["call"] == 2 and call["call_s"] == levels["diffusion_model"]["each_s"][1]
    assert call["repeat_s"] > 0 and call["random_inputs_s"] > 0 and profile["extras_s"] > 0
    assert profile["extras_s"] >= call["profiled_wall_s"] + call["repeat_s"]
    assert levels["apply_model"]["each_s"][1] < call["call_s"] + profile["extras_s"] / 2
    assert call["inputs"]["x"][0][-3:] == [2, 8, 8]  # 5 frames at 64x64: 2 latent frames of 8x8
    assert any(row["op"] == "aten::addmm" for row in call["operators"])
    assert any("SteadyDancerModel" in line for line in result["model_loads"])
    assert "profile: sampling" in run.stdout and "the DiT (and its wrappers)" in run.stdout
    assert "on random inputs of the same shapes" in run.stdout


def test_later_videos_on_one_server_find_the_models_loaded(tmp_path: Path) -> None:
    """`--videos 2`: two videos in turn on one server. The second reads its inputs under other
    names, so pose extraction, the encoders of the image and the sampling run again (only the
    prompt's text encoding is ComfyUI's cached one), while the models stay loaded: its log
    part asks to load no model, and its first step has no loading in it."""
    comfyui = Path(os.environ["COMFYUI_DIR"])
    python = comfyui_python(comfyui)
    if subprocess.run([python, "-c", "import websocket, av"], capture_output=True).returncode:
        pytest.skip("the pipeline benchmark runs with ComfyUI's Python, which lacks websocket-client")
    out = tmp_path / "pipeline"
    run = subprocess.run(
        [python, "-m", "benchmarks.comfyui_pipeline", "--comfyui", str(comfyui), "--scale", "tiny",
         "--cpu", "--width", "64", "--height", "64", "--frames", "5", "--detect-resolution", "128",
         "--weights", "gguf", "--modes", "default", "--steps", "2", "--videos", "2", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    first, second = json.loads((out / "report.json").read_text())
    assert (first["video_number"], second["video_number"]) == (1, 2) and first["ok"] and second["ok"]
    assert second["name"] == first["name"] + " video 2"
    assert first["video"]["frames"] == second["video"]["frames"] == 5
    for stage in ("pose extraction", "CLIP vision encoder", "VAE encode (image to video)", "sampling"):
        assert stage in first["stages"] and stage in second["stages"], stage
    assert "text encoder" in first["stages"] and "text encoder" not in second["stages"]
    assert any("SteadyDancerModel" in line for line in first["model_loads"])
    assert not any(line.startswith("Requested to load") for line in second["model_loads"]), second["model_loads"]
    assert len(second["steps_s"]) == 2 and "video 2" in run.stdout


def test_forward_benchmark_compares_attention_choices() -> None:
    """`benchmarks.comfyui_forward --compare-attention --compare-fused` against a real ComfyUI
    in-process, on the tiny Q8_0 model on the CPU: each choice that runs here names the backend
    that ran and its error against the first prediction; one that cannot run says why instead
    of failing; the unfused run is timed and compared; the first calls of the process (of the
    LoRA'd MODEL, then unpatched again for the rest) are timed one by one."""
    comfyui = Path(os.environ["COMFYUI_DIR"])
    model = REPO_ROOT / "tiny_models" / "diffusion_models" / "steadydancer_tiny_Q8_0.gguf"
    if not model.is_file():
        pytest.skip(f"{model} is written by scripts/make_tiny_models.py (the comfyui tests' fixture)")
    run = subprocess.run(
        [comfyui_python(comfyui), "-m", "benchmarks.comfyui_forward", "--model", str(model), "--cpu",
         "--size", "64x64x5", "--batch", "1", "--repeat", "1", "--attention", "sdpa",
         "--compare-attention", "math,comfy,no_such_backend", "--compare-fused", "--first-calls", "2",
         "--lora-rank", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "COMFYUI_DIR": str(comfyui)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = {}
    for line in run.stdout.splitlines():
        words = line.split()
        if "attention" in words[:2]:
            lines[words[words.index("attention") + 1]] = line
    assert "ran math;" in lines["math"] and "ran ComfyUI's own;" in lines["comfy"]
    for choice in ("math", "comfy"):  # exact attention: the same prediction up to float32 rounding
        error = float(lines[choice].rsplit(" ", 1)[-1].rstrip(")"))
        assert error < 1e-4, lines[choice]
    assert "not usable here" in lines["no_such_backend"]
    # --compare-fused: on the CPU both runs take PyTorch's kernels, so the predictions are equal
    unfused = next(line for line in run.stdout.splitlines() if "apply_model, unfused" in line)
    assert unfused.rstrip(")").endswith("max |difference| 0"), unfused
    # --first-calls 2 with --lora-rank: the LoRA'd MODEL's first two calls, before the rest
    firsts = [line for line in run.stdout.splitlines() if "first calls of the process" in line]
    assert [line.split(",")[1].split()[1] for line in firsts] == ["1", "2"], firsts
    assert all("(with the LoRA)" in line for line in firsts)
    assert "comfyui apply_model + LoRA" in run.stdout and "rank 8 on" in run.stdout


def test_profile_as_run_profiles_the_first_call_itself(tmp_path: Path) -> None:
    """`--profile-call 1 --profile-as-run`: the first DiT call (the one that also does the
    first-time work) runs under the profiler itself; only the two reruns are extras."""
    run, result = _profiled_fast_preset(tmp_path / "pipeline", "--profile-call", "1", "--profile-as-run")
    profile = result["profile"]
    call = profile["profiled_call"]
    first = profile["levels"]["diffusion_model"]["each_s"][0]
    assert call["call"] == 1 and call["profiled_as_run"] and call["call_s"] == first
    assert call["profiled_wall_s"] == first  # the call's own time, not an extra run's
    assert profile["extras_s"] >= call["repeat_s"] + call["random_inputs_s"]
    assert profile["extras_s"] < call["repeat_s"] + call["random_inputs_s"] + first  # the call is no extra
    assert any(row["op"] == "aten::addmm" for row in call["operators"])
    assert "DiT call 1 (profiled as it ran)" in run.stdout


def test_forward_benchmark_times_a_lora_merged_into_fp8_weights(tmp_path: Path) -> None:
    """`benchmarks.comfyui_forward --fp8-matmul --lora-rank` on a tiny scaled-fp8 file (written
    by the benchmark's own writer) on the CPU, whose reference fp8 kernel stands in for the
    GPU's: the LoRA'd MODEL loaded with fp8 matmul on is timed against fp8 matmul alone, and its
    prediction stays within the fp8 path's error of the exact LoRA's."""
    comfyui = Path(os.environ["COMFYUI_DIR"])
    model = tmp_path / "steadydancer_tiny_fp8_e4m3fn_scaled.safetensors"
    write = ("from pathlib import Path; from benchmarks.random_models import dit_config, write_dit_fp8; "
             f"write_dit_fp8(Path({str(model)!r}), dit_config('tiny'))")  # fmt: skip
    python = comfyui_python(comfyui)
    subprocess.run([python, "-c", write], cwd=REPO_ROOT, check=True, timeout=300)
    run = subprocess.run(
        [python, "-m", "benchmarks.comfyui_forward", "--model", str(model), "--cpu", "--size", "64x64x5",
         "--batch", "1", "--repeat", "1", "--attention", "sdpa", "--fp8-matmul", "--lora-rank", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "COMFYUI_DIR": str(comfyui)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if "fp8 matmul + LoRA merged" in line)
    assert "x fp8 matmul without" in line, line
    error = float(line.rsplit(" ", 1)[-1].rstrip(")"))
    assert 0 < error < 0.1, line  # merged into fp8 (lossy), yet the LoRA's prediction
