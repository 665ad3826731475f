"""The benchmark: FLOP count, random packed weights, and a --tiny run on the CPU."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from steadydancer import bench
from steadydancer.gguf.dequant import dequantize
from steadydancer.model import SteadyDancerConfig


def test_default_video_is_35880_tokens_and_flops_are_stated():
    shapes = bench.shapes_for_video(832, 480, 81)
    cfg = SteadyDancerConfig()
    assert (shapes.frames, shapes.height, shapes.width) == (21, 60, 104)
    assert shapes.tokens(cfg) == 35_880
    flops = bench.forward_flops(cfg, shapes)
    n, d = 35_880, 5120
    assert flops["self_attn_sdpa"] == 40 * 4 * n * n * d
    assert flops["ffn"] == 40 * 4 * n * d * 13824
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
    assert 1.8e15 < flops["total"] < 2.1e15  # ~1.9 PFLOP per forward of the 14B model
    with pytest.raises(SystemExit, match="4k\\+1"):
        bench.shapes_for_video(832, 480, 80)


@pytest.mark.parametrize("qtype", sorted(bench.SCALE_FIELDS))
def test_random_packed_weights_have_finite_small_values(qtype):
    gen = torch.Generator().manual_seed(0)
    t = bench.random_packed(qtype, (8, 512), torch.device("cpu"), gen)
    assert tuple(t.shape) == (8, 512) and t.tensor_type == gguf.GGMLQuantizationType[qtype]
    values = dequantize(t.as_subclass(torch.Tensor), t.tensor_type, t.tensor_shape)
    assert torch.isfinite(values).all()
    assert 0 < values.abs().max() < 5.0


def test_tiny_bench_runs_on_cpu(capsys):
    assert (
        bench.main(
            [
                "--tiny",
                "--weights",
                "Q8_0",
                "--dtype",
                "fp32",
                "--warmup",
                "0",
                "--repeat",
                "1",
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "448 tokens" in out and "attention  sdpa" in out
    result = json.loads(out.split("RESULT ", 1)[1])
    packed, total = result["quantised_tensors"]
    assert 0 < packed < total  # the Linear weights are random Q8_0 blocks
    assert result["tokens"] == 448 and result["median_s"] > 0 and result["flops"]["total"] > 0
    with pytest.raises(SystemExit, match="--dtype applies"):
        bench.main(["--tiny", "--weights", "bf16", "--dtype", "fp32"])
