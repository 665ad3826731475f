"""Attention backends: selection, fallback, and agreement with the math reference."""

from __future__ import annotations

import itertools
import logging
import math
import sys

import pytest
import torch

from steadydancer import attention as A
from steadydancer.errors import AttentionBackendError

OPTIONAL = ("flash_attn_4", "flash_attn_3", "flash_attn_2", "xformers", "sage")


def _reference(q, k, v):
    qf, kf, vf = (t.double().transpose(1, 2) for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (s.softmax(-1) @ vf).transpose(1, 2)


def _qkv(dtype=torch.float32, b=2, lq=37, lk=29, h=3, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, lq, h, d, generator=g).to(dtype),
        torch.randn(b, lk, h, d, generator=g).to(dtype),
        torch.randn(b, lk, h, d, generator=g).to(dtype),
    )


@pytest.fixture
def fake_install(monkeypatch):
    """Pretend that exactly `names` of the optional backends are installed, on an sm90 GPU."""

    def install(names, capability=(9, 0)):
        real = {n: A.SPECS[n].load for n in ("sdpa", "math")}

        def loaded(name):
            if name in real:
                return real[name]()
            return (lambda q, k, v: A.math_attention(q, k, v)) if name in names else None

        monkeypatch.setattr(A, "_loaded", loaded)
        monkeypatch.setattr(A, "cuda_capability", lambda device: capability)

    monkeypatch.delenv(A.ENV_VAR, raising=False)
    return install


@pytest.mark.parametrize(
    "installed", [c for r in range(len(OPTIONAL) + 1) for c in itertools.combinations(OPTIONAL, r)]
)
def test_selection_for_every_combination_of_installed_backends(fake_install, installed):
    fake_install(set(installed))
    cuda = torch.device("cuda")
    avail = A.available_backends(cuda, torch.bfloat16, 128)
    assert avail == [n for n in A.BACKENDS if n in installed or n in ("sdpa", "math")]
    auto = A.AttentionDispatcher("auto").candidates(cuda, torch.bfloat16, 128)
    # sm90 (the fixture's GPU): FA4, FA3, then SDPA (cuDNN attention, measured faster there), ...
    assert auto == [n for n in A.HOPPER_AUTO_ORDER if n in installed or n in ("sdpa", "math")]
    assert "sage" not in auto  # lossy: only on request
    # float32: only xformers, sdpa, math can run it
    assert A.available_backends(cuda, torch.float32, 128) == [
        n for n in ("xformers", "sdpa", "math") if n in installed or n != "xformers"
    ]
    # on the CPU only the PyTorch backends remain
    assert A.AttentionDispatcher().candidates(torch.device("cpu"), torch.bfloat16, 128) == [
        "sdpa",
        "math",
    ]
    for name in OPTIONAL:
        if name in installed:
            assert A.AttentionDispatcher(name).candidates(cuda, torch.bfloat16, 128) == [name]
        else:
            with pytest.raises(AttentionBackendError, match="not installed"):
                A.AttentionDispatcher(name)


@pytest.mark.parametrize("installed", [(), ("flash_attn_2",), ("xformers",), ("flash_attn_2", "xformers")])
def test_auto_prefers_flash_and_xformers_over_sdpa_before_hopper(fake_install, installed):
    fake_install(set(installed), capability=(8, 9))
    auto = A.AttentionDispatcher("auto").candidates(torch.device("cuda"), torch.float16, 128)
    assert auto == [n for n in ("flash_attn_2", "xformers", "sdpa", "math") if n in installed or n in ("sdpa", "math")]


def test_capability_dtype_and_head_size_limits(fake_install):
    fake_install(set(OPTIONAL), capability=(8, 6))  # Ampere/Ada: no flash-attn 3 or 4
    cuda = torch.device("cuda")
    assert "flash_attn_3" not in A.available_backends(cuda, torch.float16, 128)
    assert "flash_attn_4" not in A.available_backends(cuda, torch.float16, 128)
    assert A.AttentionDispatcher().candidates(cuda, torch.float16, 128)[0] == "flash_attn_2"
    with pytest.raises(AttentionBackendError, match="compute capability"):
        A.AttentionDispatcher("flash_attn_3").candidates(cuda, torch.float16, 128)
    assert "sage" not in A.available_backends(cuda, torch.float16, 32)  # sage: 64/96/128 only
    assert "flash_attn_2" not in A.available_backends(cuda, torch.float16, 260)
    with pytest.raises(AttentionBackendError, match="float32"):
        A.AttentionDispatcher("flash_attn_2").candidates(cuda, torch.float32, 128)


@pytest.mark.parametrize(("capability", "first"), [((9, 0), "flash_attn_4"), ((10, 0), "flash_attn_4"), ((12, 0), "sdpa")])
def test_flash_attention_4_leads_on_hopper_and_datacentre_blackwell_only(fake_install, capability, first):
    fake_install({"flash_attn_4"}, capability=capability)
    cuda = torch.device("cuda")
    assert A.AttentionDispatcher().candidates(cuda, torch.bfloat16, 128)[0] == first
    assert "flash_attn_4" not in A.available_backends(cuda, torch.bfloat16, 256)  # head sizes 64/96/128
    if first != "flash_attn_4":
        with pytest.raises(AttentionBackendError, match="compute capability"):
            A.AttentionDispatcher("flash_attn_4").candidates(cuda, torch.bfloat16, 128)


def test_explicit_backend_refused_on_cpu(fake_install):
    fake_install({"flash_attn_2"})
    q, k, v = _qkv()
    disp = A.AttentionDispatcher("flash_attn_2")
    with pytest.raises(AttentionBackendError, match="runs on cuda, not cpu"):
        disp(q, k, v)


def test_failing_backend_is_dropped_with_one_warning(monkeypatch, caplog):
    calls = []

    def broken(q, k, v):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    spec = A.SPECS["flash_attn_2"]
    fake = A.BackendSpec(
        "flash_attn_2", lambda: broken, frozenset({"cpu"}), A._FLOAT, lambda d: True
    )
    monkeypatch.setitem(A.SPECS, "flash_attn_2", fake)
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    A._loaded.cache_clear()
    try:
        q, k, v = _qkv()
        disp = A.AttentionDispatcher()
        with caplog.at_level(logging.WARNING, logger="steadydancer.attention"):
            out1 = disp(q, k, v)
            out2 = disp(q, k, v)
        assert disp.backend_used == "sdpa"
        assert disp.dropped == {"flash_attn_2"}
        assert len(calls) == 1  # not retried
        # only the dropped backend's warning counts: a broken optional install elsewhere on
        # the machine (an xformers built for another torch) may warn once on its own
        warnings = [
            r for r in caplog.records
            if r.levelno == logging.WARNING and "flash_attn_2" in r.getMessage()
        ]
        assert len(warnings) == 1
        torch.testing.assert_close(out1.double(), _reference(q, k, v), rtol=1e-4, atol=1e-5)
        assert torch.equal(out1, out2)
        # an explicit choice is never replaced silently
        with pytest.raises(AttentionBackendError, match="failed: RuntimeError"):
            A.AttentionDispatcher("flash_attn_2")(q, k, v)
    finally:
        monkeypatch.setitem(A.SPECS, "flash_attn_2", spec)
        A._loaded.cache_clear()


def test_environment_sets_the_default(monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "math")
    disp = A.AttentionDispatcher()
    assert disp.choice == "math" and A.AttentionDispatcher("auto").choice == "math"
    assert A.AttentionDispatcher("sdpa").choice == "sdpa"  # an explicit name wins
    q, k, v = _qkv()
    disp(q, k, v)
    assert disp.backend_used == "math"
    monkeypatch.setenv(A.ENV_VAR, "fastest")
    with pytest.raises(AttentionBackendError, match="STEADYDANCER_ATTENTION"):
        A.AttentionDispatcher()
    monkeypatch.delenv(A.ENV_VAR)
    with pytest.raises(AttentionBackendError, match="unknown attention backend"):
        A.AttentionDispatcher("flash")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_available_backends_agree_with_reference_on_cpu(dtype, monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    q, k, v = _qkv(dtype)
    names = A.available_backends("cpu", dtype, q.shape[-1])
    assert {"sdpa", "math"} <= set(names)
    ref = _reference(q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in names:
        disp = A.AttentionDispatcher(name)
        out = disp(q, k, v)
        assert disp.backend_used == name and out.dtype == dtype and out.shape == q.shape
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (name, err)


def test_math_chunks_give_the_same_result(monkeypatch):
    q, k, v = _qkv(lq=50)
    whole = A.math_attention(q, k, v)
    monkeypatch.setattr(A, "MATH_CHUNK_ELEMENTS", 2 * 3 * 29 * 7)  # 7 queries per chunk
    torch.testing.assert_close(A.math_attention(q, k, v), whole, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_available_backends_agree_with_reference_on_gpu(dtype):
    q, k, v = (t.cuda() for t in _qkv(dtype, lq=300, lk=300, h=8, d=128))
    ref = _reference(q, k, v)
    for name in A.available_backends(q.device, dtype, 128):
        out = A.AttentionDispatcher(name)(q, k, v)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < (5e-2 if name == "sage" else 1e-2), (name, err)


def test_sdpa_asks_for_cudnn_first_on_hopper_whatever_order_others_set(monkeypatch):
    """In a ComfyUI server PyTorch's SDPA ran its flash kernel, 1.6x slower than cuDNN's for
    the 14B self-attention (H100), because ComfyUI sets a kernel priority around its own
    attention and PyTorch then stops preferring cuDNN on sm90+. The sdpa backend asks for
    cuDNN first there itself (sm90, sm100); kernels switched off globally stay off; elsewhere it leaves
    PyTorch's order alone. (No GPU here: the capability is faked, the order is checked.)"""
    from torch.nn.attention import SDPBackend

    cuda = torch.device("cuda")
    monkeypatch.setattr(A, "cuda_capability", lambda device: (9, 0))
    assert A.sdpa_priority(cuda) == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # fmt: skip
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(False)
        assert SDPBackend.CUDNN_ATTENTION not in A.sdpa_priority(cuda)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
    for capability in ((8, 9), (8, 0), (12, 0)):  # Ada, Ampere, consumer Blackwell: PyTorch's order
        monkeypatch.setattr(A, "cuda_capability", lambda device, c=capability: c)
        assert A.sdpa_priority(cuda) is None
    assert A.sdpa_priority(torch.device("cpu")) is None


def test_sdpa_with_a_priority_is_exact_and_leaves_the_global_order_as_it_was(monkeypatch):
    """The priority is asked for around each call only: the result is exact attention and the
    process-wide order (other code's) is the same afterwards. Run on the CPU by handing the
    CPU the Hopper order."""
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(A, "sdpa_priority", lambda device: [SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH])
    before = torch._C._get_sdp_priority_order()
    q, k, v = (torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = A.SPECS["sdpa"].load()(q, k, v)
    torch.testing.assert_close(out, A.math_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.parametrize(("user_value", "seen"), [(None, "1"), ("0", "0")])
def test_flash_attn_4_is_imported_with_its_disk_cache_on_unless_the_user_said_otherwise(
    tmp_path, monkeypatch, user_value, seen
):
    """FA4 compiles per shape in each process; its disk cache (read at import) saves that on
    later starts. A stand-in `flash_attn.cute` records the variable at import: the real one
    needs an sm90+ GPU and the CUTLASS DSL."""
    package = tmp_path / "flash_attn" / "cute"
    package.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(
        "import os\n"
        f"SEEN = os.environ.get({A.FA4_DISK_CACHE_ENV!r})\n"
        "def flash_attn_func(q, k, v, causal=False):\n    return q\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setenv(A.FA4_DISK_CACHE_ENV, "before")  # so that teardown restores what was there
    if user_value is None:
        monkeypatch.delenv(A.FA4_DISK_CACHE_ENV)
    else:
        monkeypatch.setenv(A.FA4_DISK_CACHE_ENV, user_value)
    A.SPECS["flash_attn_4"].load()
    assert seen == sys.modules["flash_attn.cute"].SEEN
    for name in ("flash_attn", "flash_attn.cute"):
        sys.modules.pop(name, None)
