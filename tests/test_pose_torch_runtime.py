"""The torch runtime of the onnx pose backend: ONNX files executed with PyTorch operators.

Every operator it implements is checked against onnxruntime (the reference runtime) on a
one-node graph built with the `onnx` package; networks shaped like YOLOX-L and DWPose-L
(Focus slices, SPP pooling, nearest upsampling, channel attention, a GAU with ScaleNorm)
are exported by torch at two opsets and run by both; the file reader is compared field by
field with `onnx.load`; and the whole detector gives the same keypoints with either
runtime. The GPU test runs where CUDA is (the device machine), else it skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from pose_onnx_models import (  # noqa: E402
    ConstantDetector,
    ProfilePoseNet,
    RandomDetector,
    RandomPoseNet,
    cross_frame,
    export,
)
from torch import nn  # noqa: E402

from pose.backends import (  # noqa: E402
    load_detector,
    onnx_backend,
)
from pose.backends.onnx_proto import read_graph  # noqa: E402
from pose.backends.torch_onnx import OPS, TorchOnnxSession  # noqa: E402
from pose.errors import InvalidCheckpointError, PoseDependencyError  # noqa: E402

F, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(7)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# (id, op, data inputs, constant inputs (initializers, "" = absent), attributes, opset)
CASES: list[tuple] = [
    ("conv-asym-pads-groups", "Conv", [rand(2, 4, 9, 11)], [rand(6, 2, 3, 3), rand(6)],
     {"pads": [1, 0, 2, 1], "strides": [2, 1], "group": 2, "dilations": [1, 2]}, 17),
    ("conv-1d", "Conv", [rand(2, 3, 10)], [rand(4, 3, 3)], {"pads": [1, 1]}, 17),
    ("maxpool-spp", "MaxPool", [rand(1, 3, 10, 10)], [], {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]}, 17),
    ("maxpool-ceil-asym", "MaxPool", [rand(1, 3, 9, 10)], [],
     {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1}, 17),
    ("avgpool", "AveragePool", [rand(1, 3, 8, 8)], [], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 17),
    ("avgpool-count-pad", "AveragePool", [rand(1, 3, 8, 8)], [],
     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 17),
    ("global-avg", "GlobalAveragePool", [rand(2, 3, 5, 4)], [], {}, 17),
    ("global-max", "GlobalMaxPool", [rand(2, 3, 5, 4)], [], {}, 17),
    ("batchnorm", "BatchNormalization", [rand(2, 3, 4, 4)],
     [rand(3), rand(3), rand(3), np.abs(rand(3)) + 0.5], {"epsilon": 1e-3}, 15),
    ("layernorm", "LayerNormalization", [rand(2, 5, 8)], [rand(8), rand(8)], {"axis": -1, "epsilon": 1e-6}, 17),
    *[(op.lower(), op, [rand(3, 4)], [], {}, 17) for op in
      ("Relu", "Sigmoid", "Tanh", "Exp", "Erf", "Abs", "Neg", "Floor", "Ceil", "Softplus", "HardSwish",
       "Identity")],
    ("log", "Log", [np.abs(rand(3, 4)) + 0.1], [], {}, 17),
    ("sqrt", "Sqrt", [np.abs(rand(3, 4))], [], {}, 17),
    ("reciprocal", "Reciprocal", [np.abs(rand(3, 4)) + 0.1], [], {}, 17),
    ("hardsigmoid", "HardSigmoid", [rand(3, 4) * 4], [], {"alpha": 1 / 6, "beta": 0.5}, 17),
    ("leakyrelu", "LeakyRelu", [rand(3, 4)], [], {"alpha": 0.1}, 17),
    ("dropout", "Dropout", [rand(3, 4)], [], {}, 17),
    ("not", "Not", [rand(3, 4) > 0], [], {}, 17),
    ("add-broadcast", "Add", [rand(2, 3, 4)], [rand(4)], {}, 17),
    ("sub", "Sub", [rand(2, 3, 4)], [rand(3, 1)], {}, 17),
    ("mul", "Mul", [rand(2, 3, 4)], [rand(1, 3, 4)], {}, 17),
    ("div", "Div", [rand(2, 3, 4)], [np.abs(rand(4)) + 0.5], {}, 17),
    ("div-int-truncates", "Div", [ints(-7, 7, -9, 5)], [ints(2, -2, 4, 3)], {}, 17),
    ("pow", "Pow", [np.abs(rand(3, 4))], [np.asarray(2.0, np.float32)], {}, 17),
    ("equal", "Equal", [ints(1, 2, 3)], [ints(1, 0, 3)], {}, 17),
    ("less", "Less", [rand(3, 4)], [rand(4)], {}, 17),
    ("greater", "Greater", [rand(3, 4)], [rand(4)], {}, 17),
    ("and", "And", [rand(3, 4) > 0], [rand(3, 4) > 0], {}, 17),
    ("max-3", "Max", [rand(3, 4), rand(3, 4)], [rand(4)], {}, 17),
    ("min", "Min", [rand(3, 4)], [rand(3, 4)], {}, 17),
    ("sum", "Sum", [rand(3, 4), rand(3, 4)], [], {}, 17),
    ("matmul-batched", "MatMul", [rand(2, 5, 3)], [rand(3, 6)], {}, 17),
    ("gemm-trans", "Gemm", [rand(4, 3)], [rand(5, 3), rand(5)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 17),
    ("gemm-transA", "Gemm", [rand(3, 4)], [rand(3, 5)], {"transA": 1}, 17),
    ("clip-min-only", "Clip", [rand(3, 4)], [np.asarray(0.1, np.float32)], {}, 17),
    ("clip-both", "Clip", [rand(3, 4)], [np.asarray(-0.2, np.float32), np.asarray(0.3, np.float32)], {}, 17),
    ("clip-opset6", "Clip", [rand(3, 4)], [], {"min": -0.1, "max": 0.2}, 6),
    ("softmax-13", "Softmax", [rand(2, 3, 4)], [], {"axis": 1}, 13),
    ("softmax-11-flattens", "Softmax", [rand(2, 3, 4)], [], {"axis": 1}, 11),
    ("reducemean-17", "ReduceMean", [rand(2, 3, 4)], [], {"axes": [1, -1], "keepdims": 1}, 17),
    ("reducemean-18", "ReduceMean", [rand(2, 3, 4)], [ints(-1)], {"keepdims": 0}, 18),
    ("reducesum-13", "ReduceSum", [rand(2, 3, 4)], [ints(1)], {}, 13),
    ("reducesum-all", "ReduceSum", [rand(2, 3, 4)], [], {"keepdims": 0}, 13),
    ("reducemax", "ReduceMax", [rand(2, 3, 4)], [], {"axes": [0, 2]}, 17),
    ("reducemin", "ReduceMin", [rand(2, 3, 4)], [], {"axes": [1], "keepdims": 0}, 17),
    ("reducel2", "ReduceL2", [rand(2, 3, 4)], [], {"axes": [-1], "keepdims": 1}, 17),
    ("concat", "Concat", [rand(2, 3), rand(2, 5)], [], {"axis": 1}, 17),
    ("split-13", "Split", [rand(2, 9)], [ints(2, 3, 4)], {"axis": 1}, 13),
    ("split-11", "Split", [rand(6, 2)], [], {"axis": 0, "split": [1, 5]}, 11),
    ("split-18-uneven", "Split", [rand(2, 7)], [], {"axis": 1, "num_outputs": 3}, 18),
    ("slice-focus", "Slice", [rand(1, 3, 8, 8)], [ints(1, 0), ints(2**63 - 1, 2**63 - 1), ints(2, 3), ints(2, 2)],
     {}, 13),
    ("slice-negative-step", "Slice", [rand(5, 6)], [ints(-1, 4), ints(-(2**63), 0), ints(0, 1), ints(-2, -1)],
     {}, 13),
    ("slice-opset9", "Slice", [rand(5, 6)], [], {"starts": [1], "ends": [-1], "axes": [1]}, 9),
    ("gather-negative", "Gather", [rand(5, 4)], [ints(-1, 0, 2)], {"axis": 0}, 13),
    ("gather-scalar", "Gather", [rand(5, 4)], [np.asarray(2, np.int64)], {"axis": 1}, 13),
    ("reshape-zero-minus-one", "Reshape", [rand(2, 3, 4)], [ints(0, -1)], {}, 14),
    ("flatten", "Flatten", [rand(2, 3, 4, 5)], [], {"axis": 2}, 13),
    ("transpose", "Transpose", [rand(2, 3, 4)], [], {"perm": [2, 0, 1]}, 13),
    ("squeeze-13", "Squeeze", [rand(2, 1, 4, 1)], [ints(1)], {}, 13),
    ("squeeze-11", "Squeeze", [rand(2, 1, 4, 1)], [], {"axes": [-1]}, 11),
    ("unsqueeze-13", "Unsqueeze", [rand(2, 4)], [ints(0, -1)], {}, 13),
    ("unsqueeze-11", "Unsqueeze", [rand(2, 4)], [], {"axes": [1]}, 11),
    ("expand", "Expand", [rand(3, 1)], [ints(2, 3, 4)], {}, 13),
    ("tile", "Tile", [rand(2, 3)], [ints(2, 1)], {}, 13),
    ("shape", "Shape", [rand(2, 3, 4)], [], {}, 13),
    ("shape-15-start", "Shape", [rand(2, 3, 4)], [], {"start": 1}, 15),
    ("constant-of-shape", "ConstantOfShape", [], [ints(2, 3)],
     {"value": numpy_helper.from_array(np.asarray([1.5], np.float32))}, 13),
    ("range", "Range", [], [np.asarray(1, np.int64), np.asarray(9, np.int64), np.asarray(3, np.int64)], {}, 13),
    ("cast", "Cast", [rand(3, 4) * 5], [], {"to": TensorProto.INT64}, 13),
    ("where", "Where", [rand(3, 4) > 0, rand(3, 4)], [rand(4)], {}, 13),
    ("resize-nearest-2x", "Resize", [rand(1, 2, 3, 4)], [np.zeros(0, np.float32), np.asarray([1, 1, 2, 2], np.float32)],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 13),
    ("resize-linear-sizes", "Resize", [rand(1, 2, 5, 4)], ["", "", ints(1, 2, 7, 9)],
     {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, 13),
    ("resize-linear-corners", "Resize", [rand(1, 2, 5, 4)], ["", np.asarray([1, 1, 2, 1.5], np.float32)],
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 13),
    ("resize-nearest-exact-down", "Resize", [rand(1, 2, 8, 6)], ["", np.asarray([1, 1, 0.5, 0.5], np.float32)],
     {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"}, 13),
    ("upsample-9", "Upsample", [rand(1, 2, 3, 4)], [np.asarray([1, 1, 2, 2], np.float32)], {"mode": "nearest"}, 9),
    ("pad-constant", "Pad", [rand(1, 2, 3, 4)], [ints(0, 0, 1, 2, 0, 0, 2, 1), np.asarray(0.5, np.float32)], {}, 13),
    ("pad-reflect", "Pad", [rand(1, 2, 5, 6)], [ints(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}, 13),
    ("pad-edge", "Pad", [rand(1, 2, 5, 6)], [ints(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"}, 13),
]
# "Constant" is the one operator without a case of its own: every exported network below uses it.
UNCOVERED = {"Constant"}


def one_node_model(op: str, data: list, constants: list, attributes: dict, opset: int):
    names = [f"x{i}" for i in range(len(data))]
    inits, const_names = [], []
    for i, value in enumerate(constants):
        if isinstance(value, str):
            const_names.append(value)
            continue
        inits.append(numpy_helper.from_array(np.asarray(value), f"c{i}"))
        const_names.append(f"c{i}")
    outputs = 1
    if op == "Split":
        outputs = len(attributes.get("split", [])) or attributes.get("num_outputs") or len(constants[0])
    node = helper.make_node(op, names + const_names, [f"y{i}" for i in range(outputs)], **attributes)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(names, data, strict=True)]  # fmt: skip
    outs = [helper.make_empty_tensor_value_info(f"y{i}") for i in range(outputs)]
    graph = helper.make_graph([node], "case", inputs, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_operator_matches_onnxruntime(case, tmp_path):
    _, op, data, constants, attributes, opset = case
    path = tmp_path / "m.onnx"
    onnx.save(one_node_model(op, data, constants, attributes, opset), path)
    feed = {f"x{i}": v for i, v in enumerate(data)}
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    got = TorchOnnxSession(path).run(None, feed)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert g.dtype == e.dtype or (e.dtype == np.int64 and g.dtype == np.int64)
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_every_operator_has_a_case():
    covered = {case[1] for case in CASES} | UNCOVERED
    assert set(OPS) <= covered, f"operators without a conformance case: {sorted(set(OPS) - covered)}"


class ConvBNSiLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class MiniYolox(nn.Module):
    """YOLOX-L's operators: Focus slices, CSP convs, SPP max pools, nearest upsampling,
    per-level heads with sigmoid scores, [N, anchors, 85] output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNSiLU(12, 8)
        self.down = nn.ModuleList([ConvBNSiLU(8, 8, 3, 2) for _ in range(3)])
        self.spp = ConvBNSiLU(32, 8, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = ConvBNSiLU(16, 8, 1)
        self.head = nn.Conv2d(8, 85, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        f = self.stem(x)
        levels = []
        for down in self.down:
            f = down(f)
            levels.append(f)
        pooled = [nn.functional.max_pool2d(levels[-1], k, 1, k // 2) for k in (5, 9, 13)]
        top = self.spp(torch.cat([levels[-1], *pooled], dim=1))
        mid = self.fuse(torch.cat([self.up(top), levels[-2]], dim=1))
        outs = []
        for level in (mid, top):
            raw = self.head(level)
            outs.append(self.flat(torch.cat([raw[:, :4], raw[:, 4:].sigmoid()], dim=1)))
        return torch.cat(outs, dim=2).permute(0, 2, 1)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2)


class ScaleNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale, self.g = dim**-0.5, nn.Parameter(torch.ones(1) * 1.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=1e-5) * self.g


class MiniRTMPose(nn.Module):
    """DWPose-L's (RTMPose) operators: CSPNeXt channel attention (hard sigmoid), a SimCC
    head with ScaleNorm and a gated attention unit (relu-squared attention), two outputs."""

    def __init__(self, k: int = 133, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBNSiLU(3, 8, 3, 4), ConvBNSiLU(8, 16, 3, 4))
        self.attention = nn.Conv2d(16, 16, 1)
        self.final = nn.Conv2d(16, k, 1)
        self.mlp = nn.Sequential(ScaleNorm(24 * 18), nn.Linear(24 * 18, hidden))
        self.norm = ScaleNorm(hidden)
        self.uv = nn.Linear(hidden, 2 * hidden + 16)
        self.gamma = nn.Parameter(torch.randn(2, 16))
        self.beta = nn.Parameter(torch.randn(2, 16))
        self.o = nn.Linear(hidden, hidden)
        self.x, self.y = nn.Linear(hidden, 576), nn.Linear(hidden, 768)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        f = f * nn.functional.hardsigmoid(self.attention(f.mean(dim=(2, 3), keepdim=True)))
        f = self.mlp(self.flat(self.final(f)))
        u, v, base = torch.split(nn.functional.silu(self.uv(self.norm(f))), [32, 32, 16], dim=-1)
        qk = self.per_head(base) * self.gamma[None, None] + self.beta[None, None]
        q, k = torch.unbind(qk, dim=2)
        attention = torch.square(nn.functional.relu(torch.bmm(q, k.transpose(1, 2)) / 4.0))
        f = self.o(u * torch.bmm(attention, v)) + f
        return self.x(f), self.y(f)

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2)

    def per_head(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(2)


# Input shape of one frame, input names, output names of the Mini networks' exports.
MINI_IO = {"detector": ((3, 64, 64), ["images"], ["output"]), "pose": ((3, 384, 288), ["input"], ["simcc_x", "simcc_y"])}


def export_graph(module: nn.Module, path: Path, frame: tuple, names: list[str], outputs: list[str], *,
                 batch: int = 1, opset: int = 17, dynamic: bool = False) -> Path:  # fmt: skip
    """torch.onnx.export of `module` at `batch` frames; `dynamic`: a symbolic batch axis."""
    module.eval()
    axes = {n: {0: "batch"} for n in names + outputs} if dynamic else None
    torch.onnx.export(module, (torch.zeros(batch, *frame),), str(path), input_names=names, output_names=outputs,
                      dynamic_axes=axes, opset_version=opset, dynamo=False)  # fmt: skip
    return path


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("network", ["detector", "pose"])
def test_networks_match_onnxruntime(network, opset, tmp_path):
    torch.manual_seed(opset)
    module = (MiniYolox() if network == "detector" else MiniRTMPose()).eval()
    for m in module.modules():  # non-trivial batch norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    frame, names, outputs = MINI_IO[network]
    path = export_graph(module, tmp_path / f"{network}.onnx", frame, names, outputs, batch=2, opset=opset, dynamic=True)
    x = rand(2, *frame)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {names[0]: x})
    got = TorchOnnxSession(path).run(None, {names[0]: x})
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


def test_reader_matches_onnx_load(tmp_path):
    """Nodes, attributes, weights (raw and typed storage, float16, int64) and the signature
    as the `onnx` package reads them."""
    path = tmp_path / "pose.onnx"
    torch.manual_seed(0)
    export_graph(MiniRTMPose(), path, *MINI_IO["pose"])
    model = onnx.load(path)
    model.graph.initializer.extend([
        helper.make_tensor("typed_f32", F, [2, 2], [1.0, -2.0, 3.5, 4.0]),
        helper.make_tensor("typed_i64", I64, [3], [-1, 2**40, 7]),
        numpy_helper.from_array(np.asarray([[0.5, -1.25]], np.float16), "half"),
        helper.make_tensor("typed_half", TensorProto.FLOAT16, [2], np.asarray([0.5, -3.0], np.float16).view(np.uint16)),
    ])  # fmt: skip
    onnx.save(model, path)
    graph = read_graph(path)
    assert graph.opset == 17
    assert [n.op_type for n in graph.nodes] == [n.op_type for n in model.graph.node]
    for ours, theirs in zip(graph.nodes, model.graph.node, strict=True):
        assert ours.inputs == list(theirs.input) and ours.outputs == list(theirs.output)
        for attribute in theirs.attribute:
            expected = helper.get_attribute_value(attribute)
            got = ours.attributes[attribute.name]
            if isinstance(expected, onnx.TensorProto):
                np.testing.assert_array_equal(got, numpy_helper.to_array(expected))
            elif isinstance(expected, float):
                assert got == pytest.approx(expected)
            else:
                assert got == (list(expected) if isinstance(expected, (list, tuple)) else expected)
    assert set(graph.initializers) == {t.name for t in model.graph.initializer}
    for tensor in model.graph.initializer:
        expected = numpy_helper.to_array(tensor)
        assert graph.initializers[tensor.name].dtype == expected.dtype
        np.testing.assert_array_equal(graph.initializers[tensor.name], expected)
    assert [i.name for i in graph.inputs] == ["input"] and graph.inputs[0].shape == [1, 3, 384, 288]
    assert [o.name for o in graph.outputs] == ["simcc_x", "simcc_y"]


def test_external_data_is_read_from_the_models_folder(tmp_path):
    path = tmp_path / "pose.onnx"
    torch.manual_seed(0)
    export_graph(MiniRTMPose(), path, *MINI_IO["pose"])
    x = rand(1, 3, 384, 288)
    expected = TorchOnnxSession(path).run(None, {"input": x})
    onnx.save(onnx.load(path), tmp_path / "split.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=64)  # fmt: skip
    got = TorchOnnxSession(tmp_path / "split.onnx").run(None, {"input": x})
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


def test_unknown_operator_is_named_at_load(tmp_path):
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["selected"])
    graph = helper.make_graph([node], "nms", [helper.make_tensor_value_info("boxes", F, [1, 4, 4]),
                                              helper.make_tensor_value_info("scores", F, [1, 1, 4])],
                              [helper.make_tensor_value_info("selected", I64, None)])  # fmt: skip
    path = tmp_path / "nms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(InvalidCheckpointError, match=r"NonMaxSuppression.*onnxruntime"):
        TorchOnnxSession(path)


@pytest.mark.parametrize("content", [b"", b"\x08\x07", b"not an onnx file at all" * 10, b"\x3a\xff\xff\xff\x0f"])
def test_not_an_onnx_file(content, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidCheckpointError, match=r"broken\.onnx"):
        read_graph(path)


def test_truncated_real_file_is_reported(tmp_path):
    path = tmp_path / "pose.onnx"
    export(RandomPoseNet(), path, "pose")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InvalidCheckpointError, match="cut short or corrupt"):
        read_graph(path)


@pytest.fixture(scope="module")
def cross_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("torch_runtime")
    export(ConstantDetector([(200.0, 100.0, 400.0, 460.0, 0, 0.9)]), directory / "yolox_l.onnx", "detector",
           dynamic_batch=False)  # fmt: skip
    export(ProfilePoseNet(), directory / "dw-ll_ucoco_384.onnx", "pose")
    return directory


def test_detector_keypoints_equal_between_runtimes(cross_model_dir):
    frames = np.stack([cross_frame(512, 640, x, y) for x, y in ((300, 200), (260, 380), (350, 150))])
    poses = {rt: load_detector("onnx", cross_model_dir, device="cpu", runtime=rt).detect(
        frames, detect_resolution=512, batch_size=2) for rt in ("onnxruntime", "torch")}  # fmt: skip
    for a, b in zip(poses["onnxruntime"], poses["torch"], strict=True):
        assert a is not None and b is not None
        np.testing.assert_allclose(a.body, b.body, atol=1e-6)
        np.testing.assert_allclose(a.body_scores, b.body_scores, rtol=1e-5)
        np.testing.assert_allclose(a.hands, b.hands, atol=1e-6)


def test_random_networks_give_the_same_raw_keypoints(tmp_path):
    """Random convolutional networks: boxes and SimCC keypoints before any thresholding."""
    export(RandomDetector(), tmp_path / "yolox_l.onnx", "detector")
    export(RandomPoseNet(), tmp_path / "dw-ll_ucoco_384.onnx", "pose")
    images = [(RNG.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(3)]
    results = {rt: load_detector("onnx", tmp_path, device="cpu", runtime=rt).estimate(images)
               for rt in ("onnxruntime", "torch")}  # fmt: skip
    for (ka, sa), (kb, sb) in zip(results["onnxruntime"], results["torch"], strict=True):
        np.testing.assert_allclose(ka, kb, atol=1e-3)
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)


def test_torch_runtime_frees_its_device_copy_after_detect(cross_model_dir):
    detector = load_detector("onnx", cross_model_dir, device="cpu", runtime="torch")
    detector.detect(cross_frame(512, 640, 300, 200)[None], detect_resolution=512)
    assert detector._det._on_device is None and detector._pose._on_device is None


def test_loading_leaves_no_device_copy_when_the_output_shapes_are_probed(tmp_path):
    """RandomPoseNet's exported outputs are symbolic, so loading runs the pose network once to
    find them; the detector must not keep that run's device copy of the weights."""
    export(RandomDetector(), tmp_path / "yolox_l.onnx", "detector")
    export(RandomPoseNet(), tmp_path / "dw-ll_ucoco_384.onnx", "pose")
    detector = load_detector("onnx", tmp_path, device="cpu", runtime="torch")
    assert detector._pose._on_device is None and detector._det._on_device is None


class FakeOrt:
    """onnxruntime's provider list, faked: which builds a user has is out of reach here."""

    def __init__(self, providers: list[str]) -> None:
        self.providers = providers

    def get_available_providers(self) -> list[str]:
        return self.providers


@pytest.mark.parametrize(
    ("providers", "cuda", "device", "expected"),
    [
        (["CPUExecutionProvider"], False, None, "onnxruntime"),
        (["CPUExecutionProvider"], True, None, "torch"),  # CUDA 13 torch + CPU-only onnxruntime
        (["CPUExecutionProvider"], True, "cuda:1", "torch"),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], True, "cuda", "onnxruntime"),
        (["CPUExecutionProvider"], True, "cpu", "onnxruntime"),
        (None, False, "cpu", "torch"),  # no onnxruntime installed at all
        (["CPUExecutionProvider"], False, "mps", "torch"),
    ],
)
def test_auto_runtime(providers, cuda, device, expected, monkeypatch):
    monkeypatch.setattr(onnx_backend, "_onnxruntime_or_none", lambda: None if providers is None else FakeOrt(providers))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert onnx_backend.choose_runtime("auto", device) == expected
    assert onnx_backend.choose_runtime("onnxruntime", device) == "onnxruntime"


def test_unknown_runtime_is_one_clear_error(cross_model_dir):
    with pytest.raises(PoseDependencyError, match="unknown ONNX runtime 'tensorrt'"):
        load_detector("onnx", cross_model_dir, runtime="tensorrt")


@pytest.mark.gpu
def test_gpu_keypoints_match_cpu(tmp_path):
    """The torch runtime on CUDA against onnxruntime on the CPU (float32, TF32 off)."""
    export(RandomDetector(), tmp_path / "yolox_l.onnx", "detector")
    export(RandomPoseNet(), tmp_path / "dw-ll_ucoco_384.onnx", "pose")
    images = [(RNG.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(4)]
    cpu = load_detector("onnx", tmp_path, device="cpu", runtime="onnxruntime").estimate(images)
    gpu_detector = load_detector("onnx", tmp_path, device="cuda")
    assert gpu_detector.runtime in ("torch", "onnxruntime") and gpu_detector.device.startswith("cuda")
    gpu = load_detector("onnx", tmp_path, device="cuda", runtime="torch").estimate(images)
    for (ka, sa), (kb, sb) in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(ka, kb, atol=1e-3)
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)


SKELETONS = Path(__file__).parent / "data" / "dwpose_skeletons"


@pytest.fixture(scope="module")
def dwpose_architectures(tmp_path_factory):
    """YOLOX-L and DWPose-L as mmdet/mmpose export them (opset 17, 88 M parameters), from
    skeletons in tests/data: the exporter's graphs with the large weights stripped
    (scripts/onnx_skeleton.py), re-filled with seeded random values. The real checkpoints
    cannot be downloaded here; the graphs, operators and shapes are the real networks'."""
    from scripts.onnx_skeleton import fill

    directory = tmp_path_factory.mktemp("dwpose_architectures")
    for name in ("yolox_l", "dw-ll_ucoco_384"):
        fill(str(SKELETONS / f"{name}.skel.onnx"), str(directory / f"{name}.onnx"))
    return directory


@pytest.mark.slow
def test_dwpose_architectures_give_the_same_keypoints(dwpose_architectures):
    images = [(RNG.random((512, 896, 3)) * 255).astype(np.uint8)]
    results = {rt: load_detector("onnx", dwpose_architectures, device="cpu", runtime=rt).estimate(images)
               for rt in ("onnxruntime", "torch")}  # fmt: skip
    for (ka, sa), (kb, sb) in zip(results["onnxruntime"], results["torch"], strict=True):
        np.testing.assert_allclose(ka, kb, atol=1e-2)
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("runtime", "expected"), [("auto", "torch"), ("onnxruntime", "onnxruntime")])
def test_a_cuda_provider_that_does_not_start_is_noticed(runtime, expected, cross_model_dir, monkeypatch, caplog):
    """onnxruntime lists CUDAExecutionProvider for every GPU build, also where it cannot start
    (a build for another CUDA, no cuDNN): the session then runs on the CPU with one log line.
    Faked here (no GPU): the provider list claims CUDA and torch claims a CUDA device; the
    sessions are real CPU sessions, and the torch runtime runs on the CPU in the GPU's place."""
    monkeypatch.setattr(onnx_backend, "_onnxruntime_or_none", lambda: FakeOrt(["CUDAExecutionProvider"]))
    monkeypatch.setattr(onnx_backend, "providers_for", lambda ort, device: (["CPUExecutionProvider"], "cuda:0"))
    monkeypatch.setattr(onnx_backend, "_torch_cuda_available", lambda: True)
    monkeypatch.setattr(onnx_backend, "_torch_device", lambda device: "cpu")
    with caplog.at_level("WARNING"):
        detector = load_detector("onnx", cross_model_dir, device="cuda:0", runtime=runtime)
    assert detector.runtime == expected
    assert "CUDA provider did not start" in caplog.text
    if expected == "onnxruntime":
        assert detector.device == "cpu"  # says where it really runs
    poses = detector.detect(cross_frame(512, 640, 300, 200)[None], detect_resolution=512)
    assert poses[0] is not None


def test_damaged_files_give_one_clear_error(tmp_path):
    """Seeded byte-level damage to a real exported network: reading, loading and running
    either work or raise InvalidCheckpointError; never another exception (KeyError, ...)."""
    path = tmp_path / "pose.onnx"
    torch.manual_seed(0)
    export_graph(MiniRTMPose(k=3), path, *MINI_IO["pose"])
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(300):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 6))):
            position = int(rng.integers(0, len(data)))
            if rng.random() < 0.2:
                del data[position : position + int(rng.integers(1, 64))]
            else:
                data[position] = int(rng.integers(0, 256))
        damaged = tmp_path / f"damaged{case}.onnx"
        damaged.write_bytes(bytes(data))
        try:
            session = TorchOnnxSession(damaged)
            session.run(None, {port.name: np.zeros((1, 3, 384, 288), np.float32) for port in session.get_inputs()})
            outcomes["loaded"] += 1
        except InvalidCheckpointError:
            outcomes["refused"] += 1
        damaged.unlink()
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 300, outcomes


def test_a_node_reading_an_undefined_value_is_refused_at_load(tmp_path):
    node = helper.make_node("Relu", ["nowhere"], ["y"])
    graph = helper.make_graph([node], "broken", [helper.make_tensor_value_info("x", F, [1])],
                              [helper.make_tensor_value_info("y", F, [1])])  # fmt: skip
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(InvalidCheckpointError, match="reads 'nowhere'"):
        TorchOnnxSession(path)


def test_activations_are_freed_after_their_last_reader(tmp_path):
    """A 40-layer chain keeps a couple of activations alive, not 40: on a 12-16 GB card the
    detector must not hold every feature map of YOLOX-L at once (4.5 GiB at batch 4)."""
    nodes = [helper.make_node("Relu" if i % 2 else "Sigmoid", [f"v{i}"], [f"v{i + 1}"]) for i in range(40)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("v0", F, [2, 3])],
                              [helper.make_tensor_value_info("v40", F, [2, 3])])  # fmt: skip
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    session = TorchOnnxSession(path)
    x = rand(2, 3)
    (out,) = session.run(None, {"v0": x})
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"v0": x})[0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert session.peak_live_values <= 2


def _batch_reshapes(path: Path) -> int:
    """Reshapes whose constant target starts with the file's batch of 1 (what the public files hold)."""
    graph = read_graph(path)
    constants = dict(graph.initializers)
    for node in graph.nodes:
        if node.op_type == "Constant" and "value" in node.attributes:
            constants[node.outputs[0]] = np.asarray(node.attributes["value"])
    return sum(1 for node in graph.nodes if node.op_type == "Reshape" and node.inputs[1] in constants
               and np.asarray(constants[node.inputs[1]]).reshape(-1)[:1].tolist() == [1])  # fmt: skip


class MiniYoloxOneFrame(MiniYolox):
    """MiniYolox as a static export writes it: the frame count in its reshapes is a literal 1."""

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, 85, -1)


class MiniRTMPoseOneFrame(MiniRTMPose):
    """MiniRTMPose with the static export's literal frame count in its reshapes."""

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, 133, -1)

    def per_head(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, 133, 1, 16)


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("network", ["detector", "pose"])
def test_files_with_a_batch_of_one_run_whole_batches_once_checked(network, opset, tmp_path, monkeypatch):
    """The public DWPose files are exported for one frame ([1, 3, 640, 640]), their reshapes
    hold that 1. The torch runtime runs them at 4 frames: the first call checks the whole
    batch against frame-by-frame runs, later calls go whole, and the outputs are
    onnxruntime's frame by frame."""
    torch.manual_seed(opset)
    module = MiniYoloxOneFrame() if network == "detector" else MiniRTMPoseOneFrame()
    frame, names, outputs = MINI_IO[network]
    path = export_graph(module, tmp_path / f"{network}.onnx", frame, names, outputs, opset=opset)
    assert _batch_reshapes(path) >= 1  # the case this is about, not a file that is dynamic anyway
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    frames = rand(4, *frame)
    expected = [np.concatenate(parts) for parts in zip(*(reference.run(None, {names[0]: frames[i : i + 1]})
                                                         for i in range(4)), strict=True)]  # fmt: skip
    session = TorchOnnxSession(path)
    assert session.fixed_batch == 1 and session.any_batch
    first = session.run(None, {names[0]: frames})
    assert session.batch_checked == {4: True}
    monkeypatch.setattr(session, "_one_by_one", lambda *a: pytest.fail("a checked batch size went frame by frame"))
    later = session.run(None, {names[0]: frames})
    for got in (first, later):
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


class ChannelsAsBatch(nn.Module):
    """At one frame a reshape's leading 1 is the batch only by coincidence: here the tensor
    reshaped holds channels first, so running it at 4 frames by keeping the run's batch would
    mix frames and channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(1, 0, 2, 3).reshape(1, -1)  # [4 channels, 1, H, W] -> [1, 4*H*W]
        return (y * torch.arange(y.shape[1], dtype=y.dtype)).reshape(1, 4, 8, 8)


class ConcatsAConstantFrame(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("plane", torch.ones(1, 1, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.plane], dim=1).flatten(2)


@pytest.mark.parametrize("module", [ChannelsAsBatch(), ConcatsAConstantFrame()], ids=["mixes-frames", "fails"])
def test_a_file_whose_batch_of_one_cannot_be_widened_goes_frame_by_frame(module, tmp_path):
    """When running the whole batch gives other outputs than frame by frame (or fails), the
    check says so, and this and later calls of that size go frame by frame: the outputs are
    always onnxruntime's."""
    path = export_graph(module, tmp_path / "net.onnx", (4, 8, 8), ["input"], ["output"])
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    frames = rand(4, 4, 8, 8)
    expected = np.concatenate([reference.run(None, {"input": frames[i : i + 1]})[0] for i in range(4)])
    session = TorchOnnxSession(path)
    for _ in range(2):
        (got,) = session.run(None, {"input": frames})
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
        assert session.batch_checked == {4: False}


class RandomDetectorOneFrame(RandomDetector):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, f = [], torch.relu(self.stem(x / 255.0))
        for down in self.down:
            f = down(f)
            feats.append(self.head(f).reshape(1, 85, -1).transpose(1, 2))
        out = torch.cat(feats, dim=1)
        return torch.cat([out[..., :4], out[..., 4:].sigmoid()], dim=-1)


class RandomPoseNetOneFrame(RandomPoseNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).reshape(1, 96)
        return self.x(f).reshape(1, 133, 576), self.y(f).reshape(1, 133, 768)


def test_detector_sends_one_frame_files_whole_batches_with_the_same_keypoints(tmp_path):
    """Public-file layout (both networks fixed at one frame, literal 1s in their reshapes)
    through the pose detector: onnxruntime goes frame by frame, the torch runtime checks and
    then sends the batch whole, and the keypoints agree."""
    export(RandomDetectorOneFrame(), tmp_path / "yolox_l.onnx", "detector", dynamic_batch=False)
    export(RandomPoseNetOneFrame(), tmp_path / "dw-ll_ucoco_384.onnx", "pose", dynamic_batch=False)
    images = [(RNG.random((480, 640, 3)) * 255).astype(np.uint8) for _ in range(3)]
    detectors = {rt: load_detector("onnx", tmp_path, device="cpu", runtime=rt) for rt in ("onnxruntime", "torch")}
    results = {rt: d.estimate(images) for rt, d in detectors.items()}
    for (ka, sa), (kb, sb) in zip(results["onnxruntime"], results["torch"], strict=True):
        np.testing.assert_allclose(ka, kb, atol=1e-3)
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)
    torch_detector = detectors["torch"]
    assert torch_detector._det.batch_checked == {3: True} and torch_detector._pose.batch_checked == {3: True}


@pytest.mark.parametrize("dynamic_batch", [True, False], ids=["dynamic", "one-frame"])
def test_out_of_gpu_memory_at_a_batch_runs_its_frames_one_at_a_time(dynamic_batch, tmp_path, monkeypatch, caplog):
    """Pose Extract sends 8 frames per call by default; a card without room for that many
    gets one warning and the same outputs frame by frame, not a failed extraction. (No GPU
    here: the out-of-memory error is raised for multi-frame passes.)"""
    module = RandomPoseNet() if dynamic_batch else RandomPoseNetOneFrame()
    path = export(module, tmp_path / "pose.onnx", "pose", dynamic_batch=dynamic_batch)
    frames = rand(4, 3, 384, 288)
    expected = TorchOnnxSession(path)._one_by_one(["simcc_x", "simcc_y"], {"input": frames}, 4)
    session = TorchOnnxSession(path)
    real = session._execute

    def tight(wanted, feed, batch):
        if len(feed["input"]) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(wanted, feed, batch)

    monkeypatch.setattr(session, "_execute", tight)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            got = session.run(["simcc_x", "simcc_y"], {"input": frames})
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_array_equal(g, e)
    assert session.batch_checked == {4: False}
    assert sum("out of GPU memory at 4 frames per call" in r.message for r in caplog.records) == 1
