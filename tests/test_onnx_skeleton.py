"""The ONNX skeleton used to carry the pose benchmark networks keeps what timing depends on."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _load_script(repo_root):
    spec = importlib.util.spec_from_file_location(
        "onnx_skeleton", repo_root / "scripts" / "onnx_skeleton.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnx_skeleton"] = module
    spec.loader.exec_module(module)
    return module


def _model(path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((128, 64)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.array([2, 64], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 128])],
        initializer=[w, b, shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_strip_then_fill_keeps_graph_shapes_and_small_tensors(tmp_path, repo_root):
    sk = _load_script(repo_root)
    src, skel, filled = tmp_path / "m.onnx", tmp_path / "m.skel.onnx", tmp_path / "m2.onnx"
    _model(src)
    assert sk.strip(str(src), str(skel)) == 1  # only the 128x64 weight is large enough
    assert skel.stat().st_size < src.stat().st_size / 4
    assert sk.fill(str(skel), str(filled)) == 1
    a, b = onnx.load(src), onnx.load(filled)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    inits_a = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    inits_b = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert {k: v.shape for k, v in inits_a.items()} == {k: v.shape for k, v in inits_b.items()}
    np.testing.assert_array_equal(inits_a["b"], inits_b["b"])  # small tensors kept as they were
    np.testing.assert_array_equal(inits_a["shape"], inits_b["shape"])
    assert not np.array_equal(inits_a["w"], inits_b["w"])  # the large one was re-drawn
    x = np.ones((2, 8, 8), dtype=np.float32)
    out = ort.InferenceSession(str(filled), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    assert out.shape == (2, 128) and np.isfinite(out).all()
