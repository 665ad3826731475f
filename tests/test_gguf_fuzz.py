"""Fuzz: mutated GGUF files load, or fail with one of our named errors; nothing else escapes.

Two fuzzers. The structure-aware one (tests/gguf_fuzz.py, docs/reliability.md) writes valid
files with the `gguf` writer, mutates their records (counts, lengths, offsets, types, names,
dims, orig_shape reshapes, truncation at every boundary) and checks outcome, time and memory
of every load: 20,000 cases here (GGUF_FUZZ_CASES / GGUF_FUZZ_SEED / GGUF_FUZZ_JOBS change
that). The hypothesis one below flips bytes (mostly in the header, where structure lives),
truncates, and overwrites header integers with random values, and shrinks what it finds.
A file that still loads must also dequantise completely.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import gguf_fuzz
import numpy as np
import pytest
from gguf_testutils import tiny_model_tensors, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steadydancer.errors import SteadyDancerError
from steadydancer.gguf.loader import load_gguf_state_dict
from steadydancer.gguf.ops import dequantize_tensor
from steadydancer.keys import TinyConfig

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A small but complete SteadyDancer GGUF with several types, orig_shape and a 5-D tensor."""
    tensors = tiny_model_tensors(
        Q.Q8_0, prefix="model.diffusion_model.", config=TinyConfig(dim=32, ffn_dim=64, num_layers=1)
    )
    ffn = "model.diffusion_model.blocks.0.ffn.0.weight"
    tensors[ffn] = (tensors[ffn][0].reshape(-1, 256), Q.Q4_K)  # stored flat, shape in orig_shape
    bf = "model.diffusion_model.blocks.0.ffn.2.weight"
    tensors[bf] = (gguf.quants.quantize(tensors[bf][0], Q.BF16), Q.BF16)
    path = write_gguf(
        tmp_path_factory.mktemp("fuzz") / "valid.gguf", tensors, orig_shapes={ffn: (64, 32)}
    )
    load_gguf_state_dict(path)  # the starting point is valid
    reader = gguf.GGUFReader(str(path))
    fields = []  # (offset, width) of header integers worth corrupting
    for f in list(reader.fields.values())[1:]:  # skip GGUF.version: a separate error path
        fields += [
            (
                int(p.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]),
                p.nbytes,
            )
            for p in f.parts
            if p.dtype.kind in "iu" and p.size == 1
        ]
    for t in reader.tensors:
        fields += [
            (
                int(p.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]),
                p.itemsize,
            )
            for p in t.field.parts
            if p.dtype.kind in "iu"
        ]
    return path.read_bytes(), reader.data_offset, sorted(set(fields))


def mutations(
    data: bytes, header_end: int, fields: list[tuple[int, int]]
) -> st.SearchStrategy[bytes]:
    def flip(args):
        out = bytearray(data)
        for pos, bit in args:
            out[pos] ^= 1 << bit
        return bytes(out)

    def set_field(args):
        (offset, width), value = args
        out = bytearray(data)
        out[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(out)

    positions = st.one_of(st.integers(0, header_end - 1), st.integers(0, len(data) - 1))
    flips = st.lists(st.tuples(positions, st.integers(0, 7)), min_size=1, max_size=4).map(flip)
    truncations = st.integers(0, len(data) - 1).map(lambda n: data[:n])
    values = st.one_of(
        st.integers(0, 64),
        st.sampled_from([2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
    )
    field_sets = st.tuples(st.sampled_from(fields), values).map(set_field)
    return st.one_of(flips, truncations, field_sets)


def test_mutated_files_raise_only_named_errors(valid, tmp_path_factory):
    data, header_end, fields = valid
    target = tmp_path_factory.mktemp("fuzz_out") / "mutated.gguf"

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations(data, header_end, fields))
    def check(mutated: bytes) -> None:
        target.write_bytes(mutated)
        try:
            state_dict = load_gguf_state_dict(target)
        except SteadyDancerError:
            return
        for tensor in state_dict.values():
            with np.errstate(all="ignore"):
                dequantize_tensor(tensor)

    check()


# --- the structure-aware fuzzer --------------------------------------------------------------


def test_the_layout_model_writes_the_gguf_writers_files_back_byte_for_byte(tmp_path):
    corpus = gguf_fuzz.build_corpus(tmp_path)  # checks the round trip and that each loads
    assert set(corpus) == {"comfy_q8", "k_quants_meta", "undeclared_f16"}
    for raw in corpus.values():
        layout = gguf_fuzz.parse_layout(raw)
        data, marks = gguf_fuzz.serialise(layout)
        assert data == raw
        assert {m.label for m in marks} >= {"tensor_count", "kv_count", "t0.offset", "data", "eof"}


def test_cases_are_a_function_of_seed_and_number(tmp_path):
    layouts = {k: gguf_fuzz.parse_layout(v) for k, v in gguf_fuzz.build_corpus(tmp_path).items()}
    first = [gguf_fuzz.make_case(layouts, 7, n) for n in range(40)]
    again = [gguf_fuzz.make_case(layouts, 7, n) for n in range(40)]
    assert [c.data for c in first] == [c.data for c in again]
    assert [c.description for c in first] == [c.description for c in again]
    other = [gguf_fuzz.make_case(layouts, 8, n).data for n in range(40)]
    assert sum(a.data != b for a, b in zip(first, other, strict=True)) > 30


def test_replaying_one_case_prints_it(tmp_path, capsys):
    save = tmp_path / "case.gguf"
    assert gguf_fuzz.main(["--seed", "0", "--case", "3", "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "case 3 (seed 0)" in out and save.is_file()


@pytest.mark.slow
def test_structure_aware_fuzz():
    """The CI run: 20,000 cases, ~2.5 minutes on 2 cores (docs/reliability.md)."""
    cases = int(os.environ.get("GGUF_FUZZ_CASES", gguf_fuzz.DEFAULT_CASES))
    seed = int(os.environ.get("GGUF_FUZZ_SEED", "0"))
    jobs = int(os.environ.get("GGUF_FUZZ_JOBS", str(min(2, os.cpu_count() or 1))))
    stats = gguf_fuzz.run(cases, seed=seed, jobs=jobs)
    summary = stats.summary() + "\n" + stats.table()
    print(summary)
    out = Path(__file__).resolve().parent.parent / "test-output"
    out.mkdir(exist_ok=True)
    (out / "gguf_fuzz.txt").write_text(summary + "\n" + "\n\n".join(f.report() for f in stats.failures))
    assert not stats.failures, "\n\n".join(f.report() for f in stats.failures[:10])
    assert stats.cases == cases
    assert stats.max_size < gguf_fuzz.FILE_LIMIT
    if cases >= 5000:  # the fuzzer reaches every stage, with every kind of mutation
        for outcome in (
            "loaded",
            "GGUFError (load)",
            "UnsupportedQuantError (load)",
            "ModelFileError (load)",
            "ModelFileError (config)",
        ):
            assert stats.outcomes[outcome] > 0, outcome
        assert {op for op, _ in stats.by_op} == set(gguf_fuzz.STRUCTURAL) | set(gguf_fuzz.BYTE_LEVEL)
