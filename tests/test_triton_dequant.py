"""The fused Triton dequant must equal the plain dequant bit for bit.

On CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, since
Triton picks interpreter or compiler when the kernel module is imported); on a GPU they run
compiled and are compared with the plain PyTorch path and with gguf's numpy reference.
Random bytes are used on purpose: every field (scales, mins, fp16 d values including
subnormals, infinities and NaNs) takes arbitrary values, so any indexing slip shows.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from triton_testutils import needs_triton, run_in_interpreter

from steadydancer.errors import GGUFError, UnsupportedQuantError
from steadydancer.gguf import triton_dequant as td


def _random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    _, block_bytes = td.BLOCK_LAYOUT[name]
    return np.random.default_rng(seed).integers(0, 256, size=n_blocks * block_bytes, dtype=np.uint8)


def _reference(raw: np.ndarray, name: str) -> np.ndarray:
    import gguf

    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(-1)


def test_supported_types_and_switch(monkeypatch):
    import gguf

    for name in ("Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        assert td.supported(gguf.GGMLQuantizationType[name])
        assert td.supported(int(gguf.GGMLQuantizationType[name]))
    assert not td.supported(gguf.GGMLQuantizationType.Q4_0)
    monkeypatch.setenv(td.ENV_SWITCH, "0")
    assert not td.enabled()
    monkeypatch.setenv(td.ENV_SWITCH, "1")
    assert td.enabled()


def test_try_dequantize_declines_cpu_tensors():
    raw = torch.from_numpy(_random_blocks("Q8_0", 4, 0))
    assert td.try_dequantize(raw, "Q8_0", (128,), torch.float32) is None


def test_bad_inputs_raise_named_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # get past the device check on CPU
    raw = torch.zeros(34 * 4, dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantError, match="Q4_0"):
        td.dequantize_triton(raw, "Q4_0", (128,))
    with pytest.raises(GGUFError, match="needs 170 bytes"):
        td.dequantize_triton(raw, "Q8_0", (160,))
    with pytest.raises(GGUFError, match="multiple of 32"):
        td.dequantize_triton(raw, "Q8_0", (100,))
    with pytest.raises(GGUFError, match="uint8"):
        td.dequantize_triton(raw.float(), "Q8_0", (128,))
    with pytest.raises(GGUFError, match="float32, float16 or bfloat16"):
        td.dequantize_triton(raw, "Q8_0", (128,), torch.int32)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch, gguf
    from steadydancer.gguf.triton_dequant import dequantize_triton, BLOCK_LAYOUT
    try:
        from steadydancer.gguf.dequant import dequantize as plain
    except ImportError:
        plain = None
    rng = np.random.default_rng(1234)
    for name, (block_elems, block_bytes) in BLOCK_LAYOUT.items():
        qtype = gguf.GGMLQuantizationType[name]
        n_blocks = 24
        raw = rng.integers(0, 256, size=n_blocks * block_bytes, dtype=np.uint8)
        with np.errstate(all="ignore"):
            ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(-1).copy())
        shape = (n_blocks * block_elems // 64, 64)
        # bf16 is checked on the GPU only: the interpreter truncates float32 -> bfloat16
        for dtype in (torch.float32, torch.float16):
            out = dequantize_triton(torch.from_numpy(raw), qtype, shape, dtype)
            assert out.shape == shape and out.dtype == dtype, (name, out.shape, out.dtype)
            torch.testing.assert_close(out.reshape(-1), ref.to(dtype), rtol=0, atol=0, equal_nan=True)
            if plain is not None:
                p = plain(torch.from_numpy(raw), qtype, shape, dtype)
                torch.testing.assert_close(out, p, rtol=0, atol=0, equal_nan=True)
        print(name, "exact")
    """
)


@needs_triton
def test_kernels_bit_exact_in_triton_interpreter(repo_root):
    proc = run_in_interpreter(_INTERPRETER_SCRIPT, repo_root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in td.BLOCK_LAYOUT:
        assert f"{name} exact" in proc.stdout


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("name", sorted(td.BLOCK_LAYOUT))
def test_gpu_kernels_match_plain_path(name, monkeypatch):
    import gguf

    from steadydancer.gguf import dequant

    qtype = gguf.GGMLQuantizationType[name]
    block_elems, _ = td.BLOCK_LAYOUT[name]
    for seed, n_blocks in ((0, 1), (1, 3 * 1024 + 7), (2, 40_000)):
        raw_np = _random_blocks(name, n_blocks, seed)
        raw = torch.from_numpy(raw_np).cuda()
        shape = (n_blocks * block_elems,)
        ref = torch.from_numpy(_reference(raw_np, name).copy()).cuda()
        for dtype in td.OUTPUT_DTYPES:
            out = td.dequantize_triton(raw, qtype, shape, dtype)
            torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0, equal_nan=True)
            monkeypatch.setenv(td.ENV_SWITCH, "0")
            plain = dequant.dequantize(raw, qtype, shape, dtype)
            monkeypatch.setenv(td.ENV_SWITCH, "1")
            torch.testing.assert_close(out, plain, rtol=0, atol=0, equal_nan=True)
            # the dispatch uses the fused path on CUDA and still gives the same bits
            hooked = dequant.dequantize(raw, qtype, shape, dtype)
            torch.testing.assert_close(hooked, plain, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@needs_triton
def test_gpu_out_buffer_is_filled_in_place():
    raw = torch.from_numpy(_random_blocks("Q4_K", 16, 7)).cuda()
    out = torch.full((16 * 256,), float("nan"), dtype=torch.bfloat16, device="cuda")
    res = td.dequantize_triton(raw, "Q4_K", (16 * 256,), torch.bfloat16, out=out)
    assert res.data_ptr() == out.data_ptr()
    ref = torch.from_numpy(_reference(raw.cpu().numpy(), "Q4_K").copy()).to(torch.bfloat16)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True)
