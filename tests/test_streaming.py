"""Block streaming must give exactly the plain path's outputs, and keep weights where it says.

CPU: the copy into the staging buffers is synchronous, but the hooks, storage swaps, buffer
alternation and prefetch order run as on the GPU. The real tiny SteadyDancer model is used
when steadydancer.model is present; a small stand-in with the same `blocks`/`run_blocks`/
`ffn_chunk_size` seams otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from steadydancer.errors import MemoryOptionError
from steadydancer.streaming import (
    BlockStreamer,
    auto_resident_blocks,
    enable_streaming,
    module_bytes,
    parse_memory_option,
)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))
        self.ffn_chunk_size: int | None = None

    def forward(self, x: torch.Tensor, *, shift: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * self.scale + shift
        if self.ffn_chunk_size is None:
            return x + self.ffn(h)
        return x + torch.cat([self.ffn(c) for c in h.split(self.ffn_chunk_size, dim=1)], dim=1)


class _Model(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(layers))
        self.out = nn.Linear(dim, dim)

    def run_blocks(self, x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, **kw)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = x.mean(dim=1, keepdim=True)
        return self.out(self.run_blocks(self.inp(x), shift=shift))


def _stand_in():
    torch.manual_seed(0)
    model = _Model().eval()
    x = torch.randn(2, 40, 16)
    return model, (lambda m: m(x))


def _tiny_steadydancer():
    model_mod = pytest.importorskip("steadydancer.model")
    from steadydancer.keys import TinyConfig, tiny_state_dict

    sd = {k: torch.from_numpy(v) for k, v in tiny_state_dict(TinyConfig(), seed=3).items()}
    model = model_mod.load_model(sd, device="cpu", dtype=torch.float32, attention="math")
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    B, F, h, w = 1, 3, 4, 4
    clip_dim = TinyConfig().clip_dim
    text_dim = TinyConfig().text_dim
    inputs = dict(
        x=torch.randn(B, 16, F, h, w, generator=g),
        t=torch.tensor([500.0]),
        text=torch.randn(B, 7, text_dim, generator=g),
        clip_x=torch.randn(B, 257, clip_dim, generator=g),
        clip_c=torch.randn(B, 257, clip_dim, generator=g),
        y=torch.randn(B, 20, F, h, w, generator=g),
        pose=torch.randn(B, 16, F, h, w, generator=g),
        ref_x=torch.randn(B, 36, 1, h, w, generator=g),
        ref_c=torch.randn(B, 36, 1, h, w, generator=g),
    )
    del cfg
    return model, (lambda m: m(**inputs))


MODELS = {"stand-in": _stand_in, "tiny-steadydancer": _tiny_steadydancer}


@pytest.mark.parametrize("which", sorted(MODELS))
@pytest.mark.parametrize("resident", [0, 2, 99])
def test_streaming_output_identical_to_plain(which, resident):
    model, run = MODELS[which]()
    with torch.no_grad():
        expected = run(model)
        streamed_model = copy.deepcopy(model)
        streamer = BlockStreamer(streamed_model, "cpu", resident, ffn_chunk_size=None)
        first = run(streamed_model)
        second = run(streamed_model)  # the prefetch of the next call's first block is reused
    n_blocks = len(model.blocks)
    assert streamer.resident == min(resident, n_blocks)
    assert len(streamer.streamed) == n_blocks - streamer.resident
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)
    # each streamed block was copied once per call (plus at most one prefetch ahead)
    assert 2 * len(streamer.streamed) <= streamer.copies <= 2 * len(streamer.streamed) + 1


def test_streamed_weights_return_to_host_storage_after_each_block():
    model, run = _stand_in()
    streamer = BlockStreamer(model, "cpu", 1, ffn_chunk_size=None)
    host_ptrs = {i: [h.data_ptr() for _, h, _ in streamer._host[i]] for i in streamer.streamed}
    seen = []

    def spy(module, args):
        seen.append([p.data_ptr() for p in module.parameters()])

    model.blocks[3].register_forward_pre_hook(spy)
    with torch.no_grad():
        run(model)
    # during its forward the block ran on a copy, not the host storage ...
    assert seen and set(seen[0]).isdisjoint(host_ptrs[3])
    # ... and afterwards every streamed parameter points at its host storage again
    for i in streamer.streamed:
        assert [p.data_ptr() for p in model.blocks[i].parameters()] == host_ptrs[i][
            : len(list(model.blocks[i].parameters()))
        ]


def test_ffn_chunking_changes_nothing_but_memory():
    model, run = _stand_in()
    with torch.no_grad():
        expected = run(model)
        chunked = copy.deepcopy(model)
        BlockStreamer(chunked, "cpu", 99, ffn_chunk_size=7)
        assert all(b.ffn_chunk_size == 7 for b in chunked.blocks)
        torch.testing.assert_close(run(chunked), expected, rtol=0, atol=1e-6)


def test_detach_restores_plain_model():
    model, run = _stand_in()
    with torch.no_grad():
        expected = run(model)
        streamer = BlockStreamer(model, "cpu", 0, ffn_chunk_size=None)
        streamer.detach()
        copies = streamer.copies
        assert torch.equal(run(model), expected)
    assert streamer.copies == copies  # no hooks left


@pytest.mark.parametrize(
    ("option", "expected"),
    [(None, "full"), ("full", "full"), ("AUTO", "auto"), (" 12 ", 12), (0, 0), (40, 40)],
)
def test_parse_memory_option(option, expected):
    assert parse_memory_option(option) == expected


@pytest.mark.parametrize("bad", [-1, "lots", "1.5", True, 2.0])
def test_parse_memory_option_rejects(bad):
    with pytest.raises(MemoryOptionError, match=r"memory option|block count"):
        parse_memory_option(bad)


def test_auto_resident_blocks_budget():
    blocks = [100] * 10
    # everything fits: all resident, no in-flight room needed
    assert (
        auto_resident_blocks(blocks, free_bytes=1000 + 50 + 200, other_bytes=50, reserve_bytes=200)
        == 10
    )
    # not everything fits: keep two blocks of room for streaming
    assert auto_resident_blocks(blocks, free_bytes=1000, other_bytes=50, reserve_bytes=200) == 5
    assert auto_resident_blocks(blocks, free_bytes=300, other_bytes=50, reserve_bytes=200) == 0


def test_enable_streaming_full_moves_and_returns_none():
    model, _ = _stand_in()
    assert enable_streaming(model, "cpu", "full") is None
    assert model.streamer is None
    assert module_bytes(model) > 0


def test_attach_rejects_model_without_blocks():
    with pytest.raises(MemoryOptionError, match="blocks"):
        BlockStreamer.attach(nn.Linear(2, 2), "cpu", 3)


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [0, 3])
def test_gpu_streaming_identical_and_smaller(resident):
    torch.manual_seed(0)
    model = _Model(dim=256, layers=6).eval()
    x = torch.randn(2, 512, 256)
    with torch.no_grad():
        plain = copy.deepcopy(model).cuda()
        expected = plain(x.cuda())
        del plain
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        streamer = BlockStreamer(model, "cuda", resident, ffn_chunk_size=None)
        resident_bytes = torch.cuda.memory_allocated() - base
        out = model(x.cuda())
        out2 = model(x.cuda())
        torch.cuda.synchronize()
    assert torch.equal(out, expected) and torch.equal(out2, expected)
    block = module_bytes(model.blocks[0])
    staging = 2 * block + 4096  # the two staging buffers of the streamed blocks
    assert resident_bytes <= module_bytes(model) - (6 - resident) * block + staging
    assert streamer.summary()["staging_bytes"] <= staging
    assert all(p.is_pinned() for i in streamer.streamed for p in model.blocks[i].parameters())


class _QuantBlock(nn.Module):
    """A block whose weights are packed GGUF tensors (GGMLOps layers), as in a Q4_K model."""

    def __init__(self, dim: int, ops) -> None:
        super().__init__()
        self.fc1 = ops.Linear(dim, 2 * dim)
        self.fc2 = ops.Linear(2 * dim, dim)
        self.ffn_chunk_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _quant_model(dim: int = 256, layers: int = 4):
    np = pytest.importorskip("numpy")
    from steadydancer.gguf.ops import GGMLOps, GGMLTensor
    from steadydancer.gguf.quantize import quantize

    model = nn.Module()
    model.blocks = nn.ModuleList(_QuantBlock(dim, GGMLOps) for _ in range(layers))
    rng = np.random.default_rng(0)
    sd = {}
    for name, p in model.state_dict(keep_vars=True).items():
        shape = tuple(p.shape)
        values = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if len(shape) == 2:
            qtype = "Q4_K" if name.endswith("fc1.weight") else "Q8_0"
            raw = torch.from_numpy(quantize(values, qtype).reshape(-1).copy())
            sd[name] = GGMLTensor(raw, tensor_type=qtype, tensor_shape=shape)
        else:
            sd[name] = torch.from_numpy(values)
    model.load_state_dict(sd)

    def run(m):
        x = torch.randn(2, 8, dim, generator=torch.Generator().manual_seed(5))
        for block in m.blocks:
            x = block(x)
        return x

    return model, run


@pytest.mark.parametrize("resident", [0, 1])
def test_streaming_keeps_ggml_tensors_packed_and_identical(resident):
    from steadydancer.gguf.ops import GGMLTensor

    model, run = _quant_model()
    with torch.no_grad():
        expected = run(model)
        streamer = BlockStreamer(model, "cpu", resident, ffn_chunk_size=None)
        out = run(model)
    assert torch.equal(out, expected)
    for i in streamer.streamed:
        w = model.blocks[i].fc1.weight
        # still the same packed GGMLTensor object, with its type and logical shape
        assert isinstance(w, GGMLTensor) and w.tensor_type.name == "Q4_K"
        assert tuple(w.shape) == (512, 256)
    # streamed bytes are the packed size, not the float size
    packed = sum(module_bytes(model.blocks[i]) for i in streamer.streamed)
    assert packed == streamer.summary()["streamed_bytes"]
    as_float32 = sum(
        4 * (p.dequantize().numel() if isinstance(p, GGMLTensor) else p.numel())
        for i in streamer.streamed
        for p in model.blocks[i].parameters()
    )
    assert packed < 0.35 * as_float32


def test_load_model_memory_option_streams_and_matches():
    model_mod = pytest.importorskip("steadydancer.model")
    from steadydancer.keys import TinyConfig, tiny_state_dict

    plain, run = _tiny_steadydancer()
    sd = {k: torch.from_numpy(v) for k, v in tiny_state_dict(TinyConfig(), seed=3).items()}
    streamed = model_mod.load_model(
        sd, device="cpu", dtype=torch.float32, attention="math", memory=1
    )
    assert streamed.streamer is not None and streamed.streamer.resident == 1
    assert all(b.ffn_chunk_size is not None for b in streamed.blocks)
    with torch.no_grad():
        torch.testing.assert_close(run(streamed), run(plain), rtol=0, atol=1e-6)
    with pytest.raises(MemoryOptionError):
        model_mod.load_model(sd, device="cpu", dtype=torch.float32, memory="most")


@pytest.mark.parametrize("which", ["stand-in", "quantised"])
def test_streamed_out_storage_is_released(which, monkeypatch):
    """Moving a block to the host must free its device storage, also for GGMLTensor weights
    (created as views through as_subclass, whose base would otherwise keep it alive)."""
    import gc
    import weakref

    from steadydancer import streaming

    def move(t, device):  # on the CPU, pretend the host is another device: a real copy
        with streaming.plain_tensors():
            return t.detach().clone()

    monkeypatch.setattr(streaming, "_to", move)
    model, run = _stand_in() if which == "stand-in" else _quant_model()
    with torch.no_grad():
        expected = run(model)
    old = [weakref.ref(p.untyped_storage()) for p in model.blocks[1].parameters()]
    BlockStreamer(model, "cpu", 1, ffn_chunk_size=None)
    gc.collect()
    assert all(r() is None for r in old)
    with torch.no_grad():
        assert torch.equal(run(model), expected)


def test_blocks_called_out_of_order_still_get_their_own_weights():
    model, run = _stand_in()
    x = torch.randn(2, 40, 16)
    shift = x.mean(dim=1, keepdim=True)
    with torch.no_grad():
        expected = run(model)
        alone = [model.blocks[i](x.clone(), shift=shift) for i in (4, 2, 3)]
        BlockStreamer(model, "cpu", 1, ffn_chunk_size=None)
        run(model)  # leaves block 1 prefetched for the next call
        # a caller that runs single blocks in another order (a prefetched block is evicted)
        for i, want in zip((4, 2, 3), alone, strict=True):
            assert torch.equal(model.blocks[i](x.clone(), shift=shift), want)
        assert torch.equal(run(model), expected)
