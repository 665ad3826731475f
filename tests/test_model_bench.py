"""The benchmark: shapes, FLOP count, random packed weights, and a --tiny run on the CPU."""

from __future__ import annotations

import json
import math

import gguf
import pytest
import torch

from benchmarks import common, model_forward
from steadydancer.gguf.dequant import dequantize
from steadydancer.model import SteadyDancerConfig


def test_default_video_is_35880_tokens_and_flops_are_stated():
    shapes = common.shapes_for_video(832, 480, 81)
    cfg = SteadyDancerConfig()
    assert (shapes.frames, shapes.height, shapes.width) == (21, 60, 104)
    assert shapes.tokens(cfg) == 35_880
    flops = common.forward_flops(cfg, shapes)
    n, d, ctx = 35_880, 5120, 512 + 257
    assert flops["self_attn_sdpa"] == 40 * 4 * n * n * d
    assert flops["ffn"] == 40 * 4 * n * d * 13824
    assert flops["cross_attn_proj"] == 40 * (4 * n * d * d + 4 * ctx * d * d)
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
    # the figure docs/benchmarks.md and the README state: 1.94 PFLOP per 14B forward
    assert round(flops["total"] / 1e15, 2) == 1.94
    with pytest.raises(ValueError, match="4k\\+1"):
        common.shapes_for_video(832, 480, 80)
    with pytest.raises(SystemExit, match="4k\\+1"):  # the CLI says it without a traceback
        model_forward.main(["--tiny", "--frames", "16"])


@pytest.mark.parametrize("qtype", sorted(common.PACKED_TYPES))
@pytest.mark.parametrize("fan_in", [256, 5120])
def test_random_packed_weights_are_finite_and_sized_by_fan_in(qtype, fan_in):
    gen = torch.Generator().manual_seed(0)
    shape = (64, fan_in)
    raw = common.random_packed(qtype, shape, device="cpu", generator=gen)
    assert raw.dtype == torch.uint8 and raw.dim() == 1
    values = dequantize(raw, gguf.GGMLQuantizationType[qtype], shape)
    assert torch.isfinite(values).all()
    rms = float(values.pow(2).mean().sqrt())
    assert 0.4 < rms * math.sqrt(fan_in) < 2.5  # ~1/sqrt(fan_in) whatever the type


def test_tiny_bench_runs_on_cpu(capsys):
    assert (
        model_forward.main(
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
        model_forward.main(["--tiny", "--weights", "bf16", "--dtype", "fp32"])


def test_one_timer_counts_calls_and_hands_each_result_over():
    calls, seen = [], []

    def fn():
        calls.append(len(calls))
        return len(calls)

    times = common.time_calls(fn, device="cpu", warmup=2, repeat=3, each=seen.append)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == [0, 1, 2, 3, 4] and seen == [1, 2, 3, 4, 5]  # warm-up results checked too
    assert common.time_calls(fn, repeat=0) == []
    with pytest.raises(SystemExit, match="NaN/inf"):  # the forward benchmark refuses a bad output
        common.time_calls(lambda: torch.tensor([float("nan")]), each=model_forward._check_finite)
