"""The fused-kernel benchmark: one row per block operation, both columns, a clear refusal.

On the CPU the kernels do not run, so both columns time the PyTorch path and the header says
so; on a GPU the same rows time the Triton kernels against PyTorch's."""

from __future__ import annotations

import re

import pytest

from benchmarks import fused_kernels


def test_one_row_per_block_operation(capsys):
    args = ["--device", "cpu", "--tokens", "64", "--dim", "256", "--ffn", "512", "--repeat", "1"]
    assert fused_kernels.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "64 tokens x 256 channels" in lines[0] and "both columns are PyTorch" in lines[0]
    rows = lines[2:-1]
    assert len(rows) == 6 and rows[-1].startswith("GELU (tanh), 512 channels")
    for row in rows:
        assert len(re.findall(r"\d+\.\d{3}", row)) == 2, row  # fused ms and PyTorch ms
    assert re.search(r"fp8 quantisation .* \d+\.\d+ ms with its largest value noted, \d+\.\d+ ms searching", lines[-1])


def test_a_width_without_128_channel_heads_is_refused(capsys):
    with pytest.raises(SystemExit):
        fused_kernels.main(["--device", "cpu", "--dim", "200"])
    assert "--dim must be a positive multiple of 128" in capsys.readouterr().err
