"""The pipeline benchmark's pieces that need no ComfyUI: random model files and stage timing.

The 14B files are only written on the GPU machine; here the same writers run at the tiny
size, and the files are read back by the loading code users run.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from test_model import make_inputs

from benchmarks import random_models
from benchmarks.comfyui_pipeline import stage_times
from steadydancer.gguf.loader import load_gguf_state_dict
from steadydancer.gguf.ops import is_quantized
from steadydancer.model import load_model

CONFIG = random_models.SteadyDancerConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, clip_dim=32)


def _inputs() -> dict:
    inputs = make_inputs(f=2, h=4, w=4)
    inputs["text"] = torch.randn(1, 7, CONFIG.text_dim)
    inputs["clip_x"] = torch.randn(1, 257, CONFIG.clip_dim)
    inputs["clip_c"] = torch.randn(1, 257, CONFIG.clip_dim)
    return inputs


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_random_gguf_dit_loads_and_runs_finite_with_initialised_spread(tmp_path: Path, qtype: str) -> None:
    path = tmp_path / "dit.gguf"
    random_models.write_dit_gguf(path, CONFIG, qtype)
    sd = load_gguf_state_dict(path)
    weight = sd["blocks.0.ffn.0.weight"]  # [512, 256]: quantised, fan-in 256
    assert is_quantized(weight) and weight.tensor_type == gguf.GGMLQuantizationType[qtype]
    values = weight.dequantize()
    assert torch.isfinite(values).all()
    assert 0.5 < float(values.std()) * 256**0.5 < 2.0  # ~ N(0, 1/fan_in) in spread
    assert abs(float(values.mean())) < 0.2 * float(values.std())
    model = load_model(path, dtype=torch.float32, attention="math")
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs())).all()


def test_random_fp8_dit_is_kijais_layout_and_runs_finite(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "dit_fp8.safetensors"
    random_models.write_dit_fp8(path, CONFIG)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.blocks.0.ffn.0.weight").dtype == torch.float8_e4m3fn
    assert "scaled_fp8" in keys and "model.diffusion_model.blocks.0.ffn.0.scale_weight" in keys
    model = load_model(path, dtype=torch.float32, attention="math")
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs())).all()


def test_spiece_model_is_a_working_tokenizer() -> None:
    sentencepiece = pytest.importorskip("sentencepiece", reason="needs sentencepiece (ComfyUI's Python has it)")
    processor = sentencepiece.SentencePieceProcessor(model_proto=random_models.spiece_model_bytes())
    ids = processor.encode("A person dances to the music.")
    assert ids and max(ids) < processor.get_piece_size() and processor.pad_id() == 0 and processor.eos_id() == 1


def test_stage_times_from_comfyui_messages() -> None:
    classes = {"1": "LoadImage", "5": "SteadyDancerPoseExtract", "22": "SamplerCustomAdvanced", "23": "VAEDecode"}
    messages = [
        (0.0, {"type": "execution_start", "data": {}}),
        (1.0, {"type": "executing", "data": {"node": "1"}}),
        (2.0, {"type": "executing", "data": {"node": "5"}}),
        (5.0, {"type": "executing", "data": {"node": "22"}}),
        (9.0, {"type": "progress", "data": {"node": "22", "value": 1, "max": 2}}),
        (9.5, {"type": "progress", "data": {"node": "22", "value": 1, "max": 2}}),  # repeated: not a step
        (12.0, {"type": "progress", "data": {"node": "22", "value": 2, "max": 2}}),
        (12.5, {"type": "executing", "data": {"node": "23"}}),
        (20.0, {"type": "executing", "data": {"node": None}}),
    ]
    spans, steps = stage_times(messages, classes, end=20.5)
    assert spans == [("load inputs", 1.0, 2.0), ("pose extraction", 2.0, 5.0), ("sampling", 5.0, 12.5),
                     ("VAE decode", 12.5, 20.0)]  # fmt: skip
    assert steps == [4.0, 3.0]


def test_presets_set_steps_guidance_and_put_the_lora_before_every_model_user() -> None:
    import json

    from scripts.workflow_variants import API, calls_per_step, node_id, with_preset

    api = json.loads(API.read_text())
    loader = [node_id(api, "SteadyDancerModelLoader"), 0]
    users = [k for k, n in api.items() if loader in n["inputs"].values()]
    fast = with_preset(api, "fast", "distilled.safetensors")
    lora = next(k for k, n in fast.items() if n["class_type"] == "LoraLoaderModelOnly")
    assert fast[lora]["inputs"] == {"model": loader, "lora_name": "distilled.safetensors", "strength_model": 1.0}
    assert users and all(fast[k]["inputs"]["model"] == [lora, 0] for k in users)
    guider = fast[node_id(fast, "SteadyDancerGuider")]["inputs"]
    assert (guider["text_scale"], guider["pose_scale"], guider["start"], guider["end"]) == (1.0, 1.5, 0.1, 0.4)
    assert fast[node_id(fast, "SteadyDancerScheduler")]["inputs"]["steps"] == 4
    reference = with_preset(api, "reference")
    assert reference[node_id(reference, "SteadyDancerScheduler")]["inputs"]["steps"] == 40
    assert not any(n["class_type"] == "LoraLoaderModelOnly" for n in reference.values())
    # the reference's window test is strict (idx/steps > 0.1 and < 0.4): steps 5..15 of 40
    assert calls_per_step("fast") == [1, 2, 1, 1]
    assert sum(calls_per_step("reference")) == 40 * 2 + 11
    with pytest.raises(ValueError, match="needs a distilled-step LoRA"):
        with_preset(api, "fast")
    with pytest.raises(ValueError, match="unknown preset"):
        with_preset(api, "turbo")


def test_fp8_matmul_variant_turns_the_loaders_option_on_and_nothing_else() -> None:
    import json

    from scripts.workflow_variants import API, node_id, with_fp8_matmul

    api = json.loads(API.read_text())
    loader = node_id(api, "SteadyDancerModelLoader")
    assert api[loader]["inputs"]["fp8_matmul"] is False  # the example ships with it off
    fast = with_fp8_matmul(api)
    assert fast[loader]["inputs"]["fp8_matmul"] is True
    fast[loader]["inputs"]["fp8_matmul"] = False
    assert fast == api and api[loader]["inputs"]["fp8_matmul"] is False  # a copy; the rest unchanged


def test_profile_node_goes_on_the_guiders_model_and_its_report_reads_per_level(tmp_path: Path, capsys) -> None:
    import json

    from benchmarks.comfyui_pipeline import PROFILE_NODE, print_profile, with_profile
    from scripts.workflow_variants import API, node_id

    api = json.loads(API.read_text())
    guider = node_id(api, "SteadyDancerGuider")
    source = api[guider]["inputs"]["model"]
    graph = with_profile(api, tmp_path)
    profile = next(k for k, n in graph.items() if n["class_type"] == "SteadyDancerBenchProfile")
    assert graph[guider]["inputs"]["model"] == [profile, 0] and graph[profile]["inputs"]["model"] == source
    assert (tmp_path / "custom_nodes" / "steadydancer_bench_profile").resolve() == PROFILE_NODE.resolve()
    assert api[guider]["inputs"]["model"] == source  # the input graph is left as it was
    levels = {"predict_noise": (4, 10.0), "calc_cond_batch": (4, 9.5), "apply_model": (5, 9.0), "diffusion_model": (5, 8.0)}
    call = {"call": 2, "call_s": 1.6, "repeat_s": 1.5, "random_inputs_s": 1.55, "profiled_wall_s": 1.7,
            "device_busy_s": 1.4, "host_busy_s": 0.9, "inputs": {"x": [[1, 16, 21, 60, 104], "bfloat16"]},
            "attention_probe": {"tokens": 35880, "sdpa_backend": "FLASH_ATTENTION", "sdpa_s": 0.0746},
            "operators": [{"op": "aten::addmm", "device_s": 2.5, "cpu_s": 0.1, "calls": 40}]}  # fmt: skip
    print_profile({"sampling_s": 11.0, "extras_s": 4.9, "profiled_call": call,
                   "levels": {k: {"calls": c, "total_s": t} for k, (c, t) in levels.items()}})  # fmt: skip
    text = capsys.readouterr().out
    assert "input conversion and denoising around the DiT: 1.00 s" in text
    assert "ComfyUI's cond batching around apply_model: 0.50 s" in text
    assert "sampler outside predict_noise: 1.00 s" in text and "extra runs, 4.90 s" in text
    assert "DiT call 2: 1.600 s; again on the same inputs 1.500 s; on random inputs of the same shapes 1.550 s" in text
    assert "one bare SDPA of 35880 tokens here: 74.6 ms, PyTorch's choice FLASH_ATTENTION" in text
    assert "aten::addmm" in text and "x (1, 16, 21, 60, 104) bfloat16" in text


def test_a_cached_run_gives_no_per_call_figure_and_the_library_ratio_only_without_a_cache(capsys) -> None:
    """EasyCache skips whole steps, and ComfyUI reports only the steps it ran: dividing the
    sampling by the planned predictions would print a per-call time nobody can reach
    (measured: "91 model calls, 2.17 s per call" for 3.7 s calls)."""
    from benchmarks.comfyui_pipeline import RunResult, print_library, print_run

    plain = RunResult("gguf/default/81f", "gguf", "default", [], ok=True, total_s=50.0,
                      stages={"sampling": 20.0}, steps_s=[6.0, 8.0, 4.0, 4.0], calls=[1, 2, 1, 1], library_s=3.8)  # fmt: skip
    print_run(plain)
    print_library(plain)
    text = capsys.readouterr().out
    assert "5 model calls, 4.00 s per call (steps 2-4)" in text
    assert "library path 3.80 s per call: ComfyUI / library = 1.05" in text
    cached = RunResult("gguf/default/81f", "gguf", "default", [], ok=True, total_s=200.0, stages={"sampling": 197.0},
                       steps_s=[9.0] * 24, calls=[2] * 40, library_s=3.8,
                       cache="EasyCache - skipped 16/40 steps (1.67x speedup).")  # fmt: skip
    print_run(cached)
    print_library(cached)
    text = capsys.readouterr().out
    assert "80 predictions planned (some skipped by the cache" in text and "s per call (" not in text
    assert "EasyCache - skipped 16/40 steps" in text and "ComfyUI / library" not in text


def test_profile_extra_runs_are_left_out_of_the_graph_and_the_per_call_figures(capsys) -> None:
    """--profile runs one DiT call three more times (34.7 s on the H100): the whole graph, the
    sampling and the per-call figure must not count them; the per-call figure then comes from
    the steps as timed in the server (the profile's levels), which leave them out."""
    from benchmarks.comfyui_pipeline import RunResult, print_run, print_summary

    levels = {"predict_noise": {"calls": 4, "total_s": 21.4, "each_s": [6.3, 7.6, 3.75, 3.75]}}
    r = RunResult("gguf/default/81f", "gguf", "default", [], ok=True, total_s=80.0, stages={"sampling": 58.0},
                  steps_s=[6.4, 42.3, 3.8, 3.8], calls=[1, 2, 1, 1],
                  profile={"sampling_s": 23.3, "extras_s": 34.7, "levels": levels})  # fmt: skip
    print_run(r)
    print_summary([r])
    text = capsys.readouterr().out
    assert "whole graph 45.30 s" in text and "sampling                          23.30 s" in text
    assert "5 model calls, 3.77 s per call (steps 2-4, timed in the server)" in text
    assert "34.70 s of --profile's extra runs" in text
    assert "gguf/default/81f                    45.30      6.40           5.03" in text  # later steps: 15.1 / 3
