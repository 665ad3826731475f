"""The benchmark prints one throughput line per type."""

from __future__ import annotations

import re

from benchmarks import gguf_dequant


def test_one_line_per_type(capsys):
    assert gguf_dequant.main(["--device", "cpu", "--elements", "8192", "--repeats", "1", "--dtype", "fp16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "on cpu" in lines[0]
    rows = lines[1:]
    assert [r.split()[0] for r in rows] == list(gguf_dequant.ORDER)
    for row in rows:
        if row.startswith("F16"):
            assert "view" in row  # F16 -> fp16 costs nothing
        else:
            assert re.search(r"\d+\.\d+ GB/s", row), row
