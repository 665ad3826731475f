"""The inspection command: what a user needs to tell a good file from a wrong download."""

from __future__ import annotations

import gguf
import numpy as np
from gguf_testutils import tiny_model_tensors, write_gguf

from steadydancer.gguf import inspect as gguf_inspect
from steadydancer.keys import POSE_PATH_KEYS

Q = gguf.GGMLQuantizationType


def run(capsys, *args):
    code = gguf_inspect.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_file_counts_types_and_sizes(tmp_path, capsys):
    tensors = tiny_model_tensors(Q.Q8_0)
    path = write_gguf(tmp_path / "ok.gguf", tensors)
    report = gguf_inspect.inspect_file(path)
    assert report.usable and report.tensors == len(tensors)
    n_q8 = sum(1 for _, q in tensors.values() if q == Q.Q8_0)
    assert report.types["Q8_0"].tensors == n_q8
    assert report.types["Q8_0"].nbytes * 32 == report.types["Q8_0"].elements * 34
    code, out, _ = run(capsys, path, "--tensors")
    assert code == 0
    assert f"Q8_0   {n_q8:>5} tensors" in out and "8.50 bits/weight" in out
    assert "blocks.0.ffn.0.weight" in out  # --tensors lists every tensor


def test_plain_wan_file_is_reported_absent(tmp_path, capsys):
    path = write_gguf(tmp_path / "wan.gguf", tiny_model_tensors(drop=POSE_PATH_KEYS))
    code, out, _ = run(capsys, path)
    assert code == 1
    assert "ABSENT: a plain Wan2.1 file" in out and "usable:        no" in out


def test_other_architecture_and_unsupported_types(tmp_path, capsys):
    tensors = tiny_model_tensors()
    tensors["blocks.0.ffn.0.weight"] = (np.zeros((128, 36), np.uint8), Q.IQ4_NL)
    path = write_gguf(tmp_path / "x.gguf", tensors, arch="flux")
    code, out, _ = run(capsys, path)
    assert code == 1
    assert "architecture:  flux  -> not a Wan model" in out
    assert "unsupported:   blocks.0.ffn.0.weight (IQ4_NL)" in out


def test_unreadable_file_is_an_error_message(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    code, out, err = run(capsys, bad)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and "truncated" in err
