"""The GPU benchmark's pieces that must be right before any device time is spent on them.

The model builder, FLOP count and table run here on the CPU at a small size; the timed
runs themselves happen on the GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import common, gpu
from benchmarks import model_gpu as bm

# a 2-layer model of width 256 with the 14B's channel counts
SMALL = dict(bm.DIMS_14B, dim=256, ffn_dim=512, num_layers=2, text_dim=256, clip_dim=256)


def test_the_14b_dims_are_the_config_defaults():
    from steadydancer.keys import model_shapes
    from steadydancer.model import SteadyDancerConfig, config_from_state_dict

    shapes = model_shapes(**bm.DIMS_14B)
    cfg = config_from_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()})
    assert cfg == SteadyDancerConfig()


@pytest.mark.parametrize("weights", ["bf16", "Q8_0", "Q4_K"])
def test_random_model_builds_and_runs(weights):
    from steadydancer.gguf.ops import is_quantized

    sd = bm.random_state_dict(weights, device="cpu", dims=SMALL, min_elements=1 << 16)
    quantised = [k for k, v in sd.items() if is_quantized(v)]
    if weights == "bf16":
        assert not quantised
    else:
        assert "blocks.0.ffn.0.weight" in quantised and "blocks.1.self_attn.q.weight" in quantised
        assert all(sd[k].tensor_type.name == weights for k in quantised)
        w = sd["blocks.0.ffn.0.weight"].dequantize()
        assert torch.isfinite(w).all() and 0.002 < w.std() < 0.2
    model = bm.build_model(
        weights, device="cpu", dims=SMALL, min_elements=1 << 16, attention="sdpa"
    )
    shapes = common.shapes_for_video(64, 32, 5)
    inputs = common.random_inputs(model.config, shapes, "cpu")
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all()


def test_table_formats_every_part():
    records = [
        {"part": "env", "device": "H100", "total_gib": 79.2, "torch": "2.11", "cuda": "13.0", "triton": "3.6", "date": "d"},
        {"part": "matmul", "shape": "8192^3", "tflops": 770.0, "seconds": 1.0},
        {"part": "dequant", "qtype": "Q4_K", "plain_ms": 1.5, "plain_gbs": 116.0, "triton_ms": 0.1,
         "triton_gbs": 1581.0, "speedup": 13.7, "bit_exact_bf16": True, "bit_exact_f32": True},
        {"part": "attention", "backend": "sdpa", "rel_err": 2e-3, "ms": 45.0, "tflops": 584.0},
        {"part": "attention", "backend": "xformers", "error": "NotImplementedError"},
        {"part": "model", "weights": "bf16", "mode": "full VRAM", "seconds": 3.2, "tflops": 600.0,
         "peak_gib": 40.0, "attention": "sdpa"},
        {"part": "model", "weights": "Q4_K", "mode": "16 GB auto", "seconds": 3.4, "tflops": 560.0,
         "peak_gib": 12.0, "resident_blocks": 40, "streamed_blocks": 0, "rel_err_vs_full": 1e-3},
        {"part": "model", "weights": "Q4_K", "mode": "12 GB auto", "error": "OutOfMemoryError"},
        {"part": "guidance", "weights": "bf16", "calls": 3, "one_forward_s": 3.2, "separate_s": 9.7,
         "batched_s": 9.5, "separate_over_3_forwards": 1.01, "batched_over_separate": 0.98,
         "peak_separate_gib": 40.0, "peak_batched_gib": 50.0, "rel_err_batched_vs_separate": 1e-3},
    ]  # fmt: skip
    table = gpu.format_table(records)
    assert "H100" in table and "13.7x True" in table and "584" in table
    assert "x bf16" in table and "1.06" in table and "ERROR OutOfMemoryError" in table
    assert "0.980 x separate" in table


def test_cli_refuses_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu.main(["matmul"]) == 2
    assert "CUDA" in capsys.readouterr().err


def _imported_modules(path) -> set[str]:
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_benchmarks_stay_out_of_the_library_and_import_in_one_direction():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for package in ("steadydancer", "pose"):
        for path in (root / package).rglob("*.py"):
            assert "bench" not in path.stem, path  # benchmark modules live in benchmarks/
            assert not any(m.split(".")[0] == "benchmarks" for m in _imported_modules(path)), path
    # common <- gpu, common <- model_gpu, gpu -> model_gpu: never model_gpu -> gpu
    assert "benchmarks.gpu" not in _imported_modules(root / "benchmarks" / "model_gpu.py")
    common_imports = _imported_modules(root / "benchmarks" / "common.py")
    assert not [m for m in common_imports if m.startswith("benchmarks")]
