"""GGMLTensor behaves like a weight; GGMLOps layers compute what float layers compute."""

from __future__ import annotations

import copy
import pickle

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from steadydancer.errors import GGUFError, ModelFileError
from steadydancer.gguf.ops import GGMLOps, GGMLTensor, dequantize_tensor, is_quantized
from steadydancer.gguf.quantize import quantize

Q = gguf.GGMLQuantizationType


def packed(values: np.ndarray, qtype: Q) -> GGMLTensor:
    """`values` quantised along a flattened last axis of 256, as a GGMLTensor of their shape."""
    raw = quantize(values.reshape(-1, 256), qtype).reshape(-1)
    return GGMLTensor(torch.from_numpy(raw), tensor_type=qtype, tensor_shape=values.shape)


def weights(shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


@pytest.fixture
def q_weight():
    return packed(weights((64, 128)), Q.Q4_K)


# --- GGMLTensor -------------------------------------------------------------------------------


def test_shape_is_logical_and_size_is_packed(q_weight):
    assert q_weight.shape == torch.Size([64, 128])
    assert q_weight.tensor_shape == torch.Size([64, 128])
    assert q_weight.size() == torch.Size([64 * 128 // 256 * 144])
    assert q_weight.dtype == torch.uint8 and is_quantized(q_weight)
    assert not is_quantized(torch.zeros(3)) and not is_quantized(None)


def test_metadata_survives_moves_copies_and_pickling(q_weight):
    for t in (
        q_weight.to("cpu"),
        q_weight.to(torch.device("cpu"), non_blocking=True),
        q_weight.cpu(),
        q_weight.detach(),
        q_weight.clone(),
        q_weight.contiguous(),
        copy.deepcopy(q_weight),
        pickle.loads(pickle.dumps(q_weight)),
    ):
        assert isinstance(t, GGMLTensor)
        assert t.tensor_type == Q.Q4_K and t.shape == (64, 128)
        assert torch.equal(t.dequantize(), q_weight.dequantize())


def test_other_ops_give_plain_tensors_and_casts_are_refused(q_weight):
    assert type(q_weight[:10]) is torch.Tensor
    assert type(q_weight.view(-1)) is torch.Tensor
    with pytest.raises(GGUFError, match="cannot be cast"):
        q_weight.to(torch.float16)
    with pytest.raises(GGUFError, match="cannot be cast"):
        q_weight.float()


def test_construction_checks_bytes_and_dtype():
    with pytest.raises(GGUFError, match="needs 288 bytes"):
        GGMLTensor(torch.zeros(10, dtype=torch.uint8), tensor_type=Q.Q4_K, tensor_shape=(2, 256))
    with pytest.raises(GGUFError, match="uint8"):
        GGMLTensor(torch.zeros(144), tensor_type=Q.Q4_K, tensor_shape=(256,))


def test_dequantize_tensor_handles_both_kinds(q_weight):
    out = dequantize_tensor(q_weight, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (64, 128) and type(out) is torch.Tensor
    assert torch.equal(out, q_weight.dequantize().to(torch.bfloat16))
    plain = torch.ones(3)
    assert dequantize_tensor(plain, torch.float16).dtype == torch.float16
    assert dequantize_tensor(plain) is plain


# --- layers -----------------------------------------------------------------------------------


def _float_twin(layer: nn.Module, ref: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`ref` with the (dequantised) parameters of `layer` in `dtype`."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            getattr(ref, name).data = dequantize_tensor(p, dtype)
    return ref


CASES = [
    ("Linear", (64, 128), {}, (3, 5, 128), lambda: nn.Linear(128, 64)),
    ("Conv2d", (64, 16, 4, 4), {"padding": 1}, (2, 16, 8, 8), lambda: nn.Conv2d(16, 64, 4, padding=1)),
    ("Conv3d", (64, 36, 1, 2, 2), {"stride": (1, 2, 2)}, (1, 36, 3, 8, 8), lambda: nn.Conv3d(36, 64, (1, 2, 2), stride=(1, 2, 2))),
    ("LayerNorm", (256,), {}, (4, 256), lambda: nn.LayerNorm(256)),
    ("GroupNorm", (256,), {}, (2, 256, 3), lambda: nn.GroupNorm(4, 256)),
]  # fmt: skip


def _make(kind: str, wshape, kwargs):
    if kind == "Linear":
        return GGMLOps.Linear(wshape[1], wshape[0])
    if kind == "Conv2d":
        return GGMLOps.Conv2d(wshape[1], wshape[0], wshape[2:], **kwargs)
    if kind == "Conv3d":
        return GGMLOps.Conv3d(wshape[1], wshape[0], wshape[2:], **kwargs)
    if kind == "LayerNorm":
        return GGMLOps.LayerNorm(wshape[0])
    return GGMLOps.GroupNorm(4, wshape[0])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0], ids=lambda q: q.name)
@pytest.mark.parametrize(
    ("kind", "wshape", "kwargs", "xshape", "make_ref"), CASES, ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_equals_float_layer_with_the_dequantised_weight(
    qtype, kind, wshape, kwargs, xshape, make_ref, dtype
):
    n = int(np.prod(wshape))
    w = weights(wshape, 1)
    weight = packed(w, qtype) if n % 256 == 0 else torch.from_numpy(w)  # small ones stay float
    bias = torch.from_numpy(weights((wshape[0],), 2))
    layer = _make(kind, wshape, kwargs)
    assert layer.weight.device.type == "meta"  # nothing allocated before loading
    layer.load_state_dict({"weight": weight, "bias": bias})
    assert layer.weight is not None and type(layer.weight) is type(weight)
    ref = _float_twin(layer, make_ref(), dtype)
    x = torch.from_numpy(weights(xshape, 3)).to(dtype)
    with torch.no_grad():
        out, expected = layer(x), ref(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_embedding_and_plain_float_weights():
    emb = GGMLOps.Embedding(16, 256)
    table = weights((16, 256), 4)
    emb.load_state_dict({"weight": packed(table, Q.Q8_0)})
    ids = torch.tensor([[0, 3, 15]])
    expected = nn.functional.embedding(ids, emb.weight.dequantize())
    assert torch.equal(emb(ids), expected)
    assert emb(ids, out_dtype=torch.float16).dtype == torch.float16
    plain = GGMLOps.Linear(4, 2)
    plain.load_state_dict(
        {"weight": torch.ones(2, 4, dtype=torch.bfloat16), "bias": torch.zeros(2)}
    )
    assert plain.weight.dtype == torch.bfloat16  # stored as loaded, cast per forward
    assert torch.equal(plain(torch.ones(1, 4)), torch.full((1, 2), 4.0))


def test_layernorm_without_affine_and_linear_without_bias():
    ln = GGMLOps.LayerNorm(8, elementwise_affine=False)
    ln.load_state_dict({})
    x = torch.randn(2, 8)
    assert torch.equal(ln(x), nn.functional.layer_norm(x, (8,)))
    lin = GGMLOps.Linear(256, 4, bias=False)
    w = packed(weights((4, 256)), Q.Q8_0)
    lin.load_state_dict({"weight": w})
    assert torch.equal(lin(torch.ones(1, 256)), torch.ones(1, 256) @ w.dequantize().T)


def test_state_dict_errors_are_reported_like_torch():
    lin = GGMLOps.Linear(256, 4)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        lin.load_state_dict({"weight": packed(weights((8, 256)), Q.Q8_0), "bias": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="Missing key"):
        lin.load_state_dict({"weight": packed(weights((4, 256)), Q.Q8_0)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        lin.load_state_dict(
            {
                "weight": packed(weights((4, 256)), Q.Q8_0),
                "bias": torch.zeros(4),
                "extra": torch.ones(1),
            }
        )


def test_forward_before_loading_is_a_clear_error():
    with pytest.raises(ModelFileError, match="never loaded"):
        GGMLOps.Linear(4, 2)(torch.ones(1, 4))


class Tiny(nn.Module):
    def __init__(self, ops=GGMLOps):
        super().__init__()
        self.a = ops.Linear(256, 256)
        self.b = ops.Linear(256, 8)
        self.norm = ops.LayerNorm(256)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@pytest.fixture
def tiny():
    model = Tiny()
    model.load_state_dict(
        {
            "a.weight": packed(weights((256, 256), 5), Q.Q4_K),
            "a.bias": torch.zeros(256),
            "b.weight": packed(weights((8, 256), 6), Q.Q8_0),
            "b.bias": torch.zeros(8),
            "norm.weight": torch.ones(256),
            "norm.bias": torch.zeros(256),
        }
    )
    return model


def test_module_to_state_dict_and_deepcopy_keep_weights_packed(tiny):
    tiny.to("cpu")
    assert isinstance(tiny.a.weight, GGMLTensor) and isinstance(tiny.a.weight, nn.Parameter)
    sd = tiny.state_dict()
    assert isinstance(sd["a.weight"], GGMLTensor) and sd["a.weight"].tensor_type == Q.Q4_K
    twin = copy.deepcopy(tiny)
    x = torch.randn(2, 256)
    assert torch.equal(twin(x), tiny(x))
    reloaded = Tiny()
    reloaded.load_state_dict(sd)
    assert torch.equal(reloaded(x), tiny(x))


def test_cache_dequantized_keeps_outputs_and_can_be_dropped(tiny):
    x = torch.randn(3, 256)
    expected = tiny(x)
    size = GGMLOps.cache_dequantized(tiny)
    assert size == (256 * 256 + 8 * 256) * 4
    assert "weight_dequantized" in dict(tiny.a.named_buffers())
    assert set(tiny.state_dict()) == {
        "a.weight",
        "a.bias",
        "b.weight",
        "b.bias",
        "norm.weight",
        "norm.bias",
    }
    calls = []
    original = GGMLTensor.dequantize
    GGMLTensor.dequantize = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        assert torch.equal(tiny(x), expected)
    finally:
        GGMLTensor.dequantize = original
    assert calls == []  # the forward used the cache
    assert GGMLOps.cache_dequantized(tiny, enabled=False) == 0
    assert "weight_dequantized" not in dict(tiny.a.named_buffers())
    assert torch.equal(tiny(x), expected)


def test_cache_in_bf16_serves_bf16_inputs(tiny):
    x = torch.randn(3, 256).bfloat16()
    expected = tiny(x)
    GGMLOps.cache_dequantized(tiny, dtype=torch.bfloat16)
    assert tiny.a.weight_dequantized.dtype == torch.bfloat16
    assert torch.equal(tiny(x), expected)


def test_loading_new_weights_drops_a_stale_cache(tiny):
    GGMLOps.cache_dequantized(tiny)
    w = packed(weights((8, 256), 9), Q.Q8_0)
    tiny.b.load_state_dict({"weight": w, "bias": torch.zeros(8)})
    assert "weight_dequantized" not in dict(tiny.b.named_buffers())
    x = torch.randn(1, 256)
    assert torch.equal(tiny.b(x), nn.functional.linear(x, w.dequantize(), torch.zeros(8)))


@pytest.mark.gpu
def test_layers_follow_the_model_to_cuda(tiny):
    x = torch.randn(2, 256)
    expected = tiny(x)
    tiny.to("cuda")
    assert isinstance(tiny.a.weight, GGMLTensor) and tiny.a.weight.device.type == "cuda"
    assert torch.allclose(tiny(x.cuda()).cpu(), expected, atol=1e-5)


def test_load_state_dict_pre_hooks_still_run():
    lin = GGMLOps.Linear(256, 4)
    seen = []
    lin._register_load_state_dict_pre_hook(lambda sd, prefix, *rest: seen.append(sorted(sd)))
    lin.load_state_dict({"weight": packed(weights((4, 256)), Q.Q8_0), "bias": torch.zeros(4)})
    assert seen == [["bias", "weight"]]
