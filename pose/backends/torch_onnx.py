"""Run an ONNX graph with PyTorch operators: DWPose's networks on any GPU torch can use.

The pose networks are plain convolutional graphs. onnxruntime runs them on the GPU only
with a build for the installed CUDA, and otherwise on CPU cores at a few frames per second.
Torch is always there and always matches the GPU, so this runtime executes the same files,
node by node, with the torch operator of the ONNX operator's definition. Weights are read
by onnx_proto.py; numerics are float32 (TF32 off), so the CPU path's keypoints come back.

`TorchOnnxSession` answers the part of onnxruntime's InferenceSession the detector uses
(`get_inputs`, `get_outputs`, `run`). An operator it does not know raises one
InvalidCheckpointError naming it, at load time, never half-way through a video.

Files exported with a fixed batch (the public yolox_l.onnx takes [1, 3, 640, 640]) carry
that batch in their reshape targets. At one frame per call a GPU is mostly idle (12 frames/s
on an H100, against 28 at 8 frames per call), so this runtime also runs such a file at other
batch sizes: a reshape whose target starts with the file's batch, applied to a tensor whose
first axis is this run's batch, keeps this run's batch. That reading is checked, not assumed:
the first call at each batch size also runs frame by frame, and only if the two agree are
later calls of that size sent whole; otherwise they go frame by frame, as onnxruntime would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidCheckpointError, PoseDependencyError
from .onnx_proto import NUMPY_TYPES, Graph, Node, ValueInfo, read_graph

INT64_MAX = (1 << 63) - 1
logger = logging.getLogger(__name__)


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise PoseDependencyError("the torch pose runtime needs PyTorch (ComfyUI brings it)") from exc
    return torch


@dataclass
class _Port:
    """An input or output as onnxruntime describes it (name, shape with None/str for dynamic)."""

    name: str
    shape: list


class TorchOnnxSession:
    """An ONNX model file executed with torch operators on `device`."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        torch = import_torch()
        self.path = Path(path)
        self.device = torch.device(device)
        graph = read_graph(self.path)
        unknown = sorted({n.op_type for n in graph.nodes if n.domain not in ("", "ai.onnx") or n.op_type not in OPS})
        if unknown:
            raise InvalidCheckpointError(
                f"{self.path} uses ONNX operators the torch pose runtime does not implement: {', '.join(unknown)}. "
                f"Use the onnxruntime runtime for this file"
            )
        _check_wiring(graph, self.path)
        self._last_use = _last_uses(graph)
        #: most activations alive at once in the last run (diagnostics; weights not counted)
        self.peak_live_values = 0
        self.graph = graph
        self.opset = graph.opset
        self.weights = {name: _to_torch(torch, array, "cpu") for name, array in graph.initializers.items()}
        self._on_device: dict[str, Any] | None = None
        first = graph.inputs[0].shape if graph.inputs and graph.inputs[0].shape else [None]
        #: the batch the file was exported with (None: a dynamic batch axis)
        self.fixed_batch = first[0] if isinstance(first[0], int) and first[0] > 0 else None
        #: batch size -> whether batches of that size run whole: False after a check against
        #: frame-by-frame runs failed (one-frame files) or after running out of GPU memory
        self.batch_checked: dict[int, bool] = {}

    @property
    def any_batch(self) -> bool:
        """Whether `run` takes any batch size: dynamic files, and files fixed at one frame (module doc)."""
        return self.fixed_batch in (None, 1)

    def release(self) -> None:
        """Drop the weights' copy on the device (the next run copies them again): a
        detector kept in ComfyUI's cache then holds no GPU memory while the DiT samples."""
        self._on_device = None

    def get_inputs(self) -> list[_Port]:
        return [_port(info) for info in self.graph.inputs]

    def get_outputs(self) -> list[_Port]:
        return [_port(info) for info in self.graph.outputs]

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like InferenceSession.run: numpy in, numpy out, on this session's device; any batch."""
        wanted = output_names or [info.name for info in self.graph.outputs]
        missing = [info.name for info in self.graph.inputs if info.name not in feed]
        unknown = [name for name in wanted if name not in self._last_use and name not in feed]
        if missing or unknown:
            raise ValueError(f"{self.path}: inputs {missing} not fed, or outputs {unknown} not in the graph")
        first = feed[self.graph.inputs[0].name] if self.graph.inputs else None
        batch = len(first) if first is not None and np.ndim(first) else None
        if batch is None or batch == self.fixed_batch or (batch == 1 and self.fixed_batch is None):
            return self._execute(wanted, feed, None)
        if not self.any_batch or not all(np.ndim(v) and len(v) == batch for v in feed.values()):
            raise ValueError(f"{self.path} takes a batch of {self.fixed_batch}; it was given {batch}")
        if self.batch_checked.get(batch) is False:
            return self._one_by_one(wanted, feed, batch)
        widen = self.fixed_batch == 1  # the file's 1 in its reshapes stands for this run's batch
        torch = import_torch()
        try:
            whole = self._execute(wanted, feed, batch if widen else None)
        except torch.cuda.OutOfMemoryError:
            # a smaller card: the same frames one at a time need a batch's worth less memory
            logger.warning("%s: out of GPU memory at %d frames per call; running them one at a time",
                           self.path.name, batch)  # fmt: skip
            torch.cuda.empty_cache()
            self.batch_checked[batch] = False
            return self._one_by_one(wanted, feed, batch)
        except InvalidCheckpointError:
            if not widen or batch in self.batch_checked:
                raise
            whole = None  # another operator holds the file's batch: frame by frame
        if not widen or self.batch_checked.get(batch):
            return whole
        single = self._one_by_one(wanted, feed, batch)
        self.batch_checked[batch] = whole is not None and all(
            _close(a, b) for a, b in zip(whole, single, strict=True)
        )
        return single

    def _one_by_one(self, wanted: list[str], feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        parts = [self._execute(wanted, {k: v[i : i + 1] for k, v in feed.items()}, None) for i in range(batch)]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(wanted))]

    def _execute(self, wanted: list[str], feed: dict[str, np.ndarray], batch: int | None) -> list[np.ndarray]:
        """One pass over the graph; `batch`: this run's batch where it differs from the file's."""
        torch = import_torch()
        relaxed = (self.fixed_batch, batch) if batch is not None else None
        with torch.inference_mode(), _exact_float32(torch, self.device):
            if self._on_device is None:
                self._on_device = {name: w.to(self.device, non_blocking=True) for name, w in self.weights.items()}
            values = dict(self._on_device)
            for name, array in feed.items():
                values[name] = _to_torch(torch, np.asarray(array), self.device)
            keep = set(wanted)
            self.peak_live_values = 0
            for index, node in enumerate(self.graph.nodes):
                args = [values[name] if name else None for name in node.inputs]
                try:
                    results = OPS[node.op_type](Call(torch, node, self.opset, relaxed), *args)
                except (InvalidCheckpointError, torch.cuda.OutOfMemoryError):
                    raise  # already clear; out of memory is the machine's state, not the file's fault
                except Exception as exc:  # an operator failing on this file's values is the file's fault
                    raise InvalidCheckpointError(
                        f"{self.path}: node {node.name or node.op_type} ({node.op_type}) failed in the torch "
                        f"runtime: {exc}"
                    ) from exc
                if not isinstance(results, tuple):
                    results = (results,)
                for name, value in zip(node.outputs, results, strict=False):
                    if name:
                        values[name] = value
                del args, results
                self.peak_live_values = max(self.peak_live_values, len(values) - len(self._on_device))
                for name in node.inputs:  # free activations after their last reader: peak memory of
                    if self._last_use.get(name) == index and name not in keep:  # a few layers, not the graph
                        values.pop(name, None)
            return [values[name].cpu().numpy() for name in wanted]


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Whole-batch and frame-by-frame outputs agree up to float32 rounding of other kernels
    (a batch mixed up across frames differs by the values' own size)."""
    if a.shape != b.shape:
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return bool(np.array_equal(a, b))
    scale = float(np.abs(b).max()) if b.size else 0.0
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)))


def _check_wiring(graph: Graph, path: Path) -> None:
    """Every value a node reads is a graph input, a weight or an earlier node's output, and
    every graph output is produced: a broken file fails here, not half-way through a video."""
    known = {info.name for info in graph.inputs} | set(graph.initializers) | {""}
    for node in graph.nodes:
        missing = [name for name in node.inputs if name not in known]
        if missing:
            raise InvalidCheckpointError(
                f"{path}: node {node.name or node.op_type} reads {missing[0]!r}, which no earlier node, input "
                f"or weight provides (a damaged or unsorted ONNX file)"
            )
        known.update(node.outputs)
    for info in graph.outputs:
        if info.name not in known:
            raise InvalidCheckpointError(f"{path}: the output {info.name!r} is produced by no node")


def _last_uses(graph: Graph) -> dict[str, int]:
    """Index of the last node reading each value (for node outputs and graph inputs; weights
    are kept: they live in the session's device copy anyway)."""
    last: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for name in node.outputs:
            last.setdefault(name, index)
        for name in node.inputs:
            if name and name not in graph.initializers:
                last[name] = index
    return last


def _port(info: ValueInfo) -> _Port:
    return _Port(info.name, [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in info.shape])


def _to_torch(torch: Any, array: np.ndarray, device: Any) -> Any:
    if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
        array = array.astype(np.int64)
    return torch.from_numpy(np.require(array, requirements="C")).to(device)  # keeps 0-d arrays 0-d


class _exact_float32:
    """TF32 off for this run only: the keypoints must match the float32 CPU path."""

    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.cuda = torch, device.type == "cuda"

    def __enter__(self) -> None:
        if self.cuda:
            backends = self.torch.backends
            self.saved = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32)
            backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.torch.backends.cudnn.allow_tf32, self.torch.backends.cuda.matmul.allow_tf32 = self.saved


@dataclass
class Call:
    """What an operator needs besides its inputs: torch, the node's attributes, the opset."""

    torch: Any
    node: Node
    opset: int
    batch: tuple[int, int] | None = None  # (the file's fixed batch, this run's) when they differ

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.node.attributes.get(name)
        return default if value is None else value

    def fail(self, why: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(f"{self.node.op_type} node {self.node.name!r}: {why}")


def _ints(tensor: Any) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _spatial_padding(call: Call, pads: list[int], dims: int) -> tuple[list[int] | None, list[int]]:
    """ONNX pads [b1..bn, e1..en] -> (F.pad argument when asymmetric, symmetric padding)."""
    if call.attr("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise call.fail("auto_pad SAME_* is not supported")
    pads = pads or [0] * (2 * dims)
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return None, begin
    explicit: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        explicit += [b, e]
    return explicit, [0] * dims


def _conv(call: Call, x: Any, weight: Any, bias: Any = None) -> Any:
    f = call.torch.nn.functional
    dims = weight.dim() - 2
    explicit, padding = _spatial_padding(call, call.attr("pads", []), dims)
    if explicit:
        x = f.pad(x, explicit)
    conv = {1: f.conv1d, 2: f.conv2d, 3: f.conv3d}[dims]
    return conv(x, weight, bias, call.attr("strides", [1] * dims), padding, call.attr("dilations", [1] * dims),
                call.attr("group", 1))  # fmt: skip


def _pool(call: Call, x: Any, kind: str) -> Any:
    f = call.torch.nn.functional
    kernel = call.attr("kernel_shape")
    dims = len(kernel)
    explicit, padding = _spatial_padding(call, call.attr("pads", []), dims)
    if explicit:
        x = f.pad(x, explicit, value=-math.inf if kind == "max" else 0.0)
    strides = call.attr("strides", [1] * dims)
    ceil = bool(call.attr("ceil_mode", 0))
    if kind == "max":
        if call.attr("storage_order", 0):
            raise call.fail("storage_order 1 is not supported")
        pool = {1: f.max_pool1d, 2: f.max_pool2d, 3: f.max_pool3d}[dims]
        return pool(x, kernel, strides, padding, call.attr("dilations", [1] * dims), ceil)
    if explicit and not call.attr("count_include_pad", 0):
        raise call.fail("asymmetric padding without count_include_pad is not supported")
    pool = {1: f.avg_pool1d, 2: f.avg_pool2d, 3: f.avg_pool3d}[dims]
    return pool(x, kernel, strides, padding, ceil, bool(call.attr("count_include_pad", 0)) or bool(explicit))


def _axes(call: Call, axes_input: Any, rank: int, attribute_until: int) -> list[int] | None:
    """Axes from the attribute (opsets before `attribute_until`) or the second input."""
    axes = call.attr("axes") if call.opset < attribute_until else (_ints(axes_input) if axes_input is not None else None)
    return None if axes is None else [a % rank for a in axes]


def _reduce(kind: str) -> Callable[..., Any]:
    def op(call: Call, x: Any, axes_input: Any = None) -> Any:
        until = 13 if kind == "sum" else 18
        axes = _axes(call, axes_input, x.dim(), until)
        keep = bool(call.attr("keepdims", 1))
        if axes is None or axes == []:
            if call.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        t = call.torch
        if kind == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=axes, keepdim=keep)
        if kind == "l2":
            return t.linalg.vector_norm(x, 2, dim=axes, keepdim=keep)
        out = x
        for axis in sorted(axes, reverse=True):
            out = (out.amax if kind == "max" else out.amin)(dim=axis, keepdim=keep)
        return out

    return op


def _slice(call: Call, x: Any, starts: Any = None, ends: Any = None, axes: Any = None, steps: Any = None) -> Any:
    if call.opset < 10:
        starts_l, ends_l = call.attr("starts"), call.attr("ends")
        axes_l, steps_l = call.attr("axes", list(range(len(starts_l)))), [1] * len(starts_l)
    else:
        starts_l, ends_l = _ints(starts), _ints(ends)
        axes_l = _ints(axes) if axes is not None else list(range(len(starts_l)))
        steps_l = _ints(steps) if steps is not None else [1] * len(starts_l)
    index: list[Any] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts_l, ends_l, axes_l, steps_l, strict=True):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            index[axis] = slice(max(0, min(size, start + size if start < 0 else start)),
                                max(0, min(size, end + size if end < 0 else end)), step)  # fmt: skip
        elif step < 0:  # torch slicing has no negative step: slice the reversed axis
            s = min(size - 1, start + size if start < 0 else start)
            e = end + size if end < 0 else end
            e = -1 if end <= -INT64_MAX or e < -1 else e
            index[axis] = slice(size - 1 - s, size - 1 - e, -step)
            flips.append(axis)
        else:
            raise call.fail("a slice step of 0")
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


def _resize(call: Call, x: Any, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
    f = call.torch.nn.functional
    if call.opset < 11:  # Upsample / Resize-10: (X, scales)
        scales, sizes = roi, None
    mode = call.attr("mode", b"nearest").decode()
    transform = call.attr("coordinate_transformation_mode", b"half_pixel").decode()
    if call.opset < 11:
        transform = "asymmetric"
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        target: dict[str, Any] = {"size": size}
    else:
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise call.fail("scaling the batch or channel axis is not supported")
        target = {"scale_factor": factors[2:]}
    if mode == "nearest":
        rounding = call.attr("nearest_mode", b"round_prefer_floor").decode()
        if transform == "asymmetric" and (rounding == "floor" or call.opset < 11):
            return f.interpolate(x, mode="nearest", **target)
        if transform == "half_pixel" and rounding == "round_prefer_ceil":  # torch's nearest-exact, ties too
            return f.interpolate(x, mode="nearest-exact", **target)
        raise call.fail(f"nearest resize with {transform} coordinates and {rounding} rounding is not supported")
    if mode == "linear":
        linear = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return f.interpolate(x, mode=linear, align_corners=False, **target)
        if transform == "align_corners":
            return f.interpolate(x, mode=linear, align_corners=True, **target)
    raise call.fail(f"{mode} resize with {transform} coordinates is not supported")


def _split(call: Call, x: Any, split: Any = None) -> tuple:
    axis = call.attr("axis", 0) % x.dim()
    parts = _ints(split) if split is not None else call.attr("split")
    if not parts:
        count = call.attr("num_outputs") or len(call.node.outputs)
        size = -(-x.shape[axis] // count)
        parts = [min(size, x.shape[axis] - i * size) for i in range(count)]
    return tuple(call.torch.split(x, parts, dim=axis))


def _softmax(call: Call, x: Any) -> Any:
    axis = call.attr("axis", -1 if call.opset >= 13 else 1) % x.dim()
    if call.opset >= 13 or axis == x.dim() - 1:
        return x.softmax(dim=axis)
    flat = x.reshape(*x.shape[:axis], -1)  # opset < 13: softmax over all axes from `axis` on
    return flat.softmax(dim=-1).reshape(x.shape)


def _gemm(call: Call, a: Any, b: Any, c: Any = None) -> Any:
    a = a.t() if call.attr("transA", 0) else a
    b = b.t() if call.attr("transB", 0) else b
    out = call.attr("alpha", 1.0) * (a @ b)
    return out if c is None else out + call.attr("beta", 1.0) * c


def _cast(call: Call, x: Any) -> Any:
    to = call.attr("to")
    if to not in NUMPY_TYPES:
        raise call.fail(f"cast to ONNX type {to} is not supported")
    return x.to(getattr(call.torch, NUMPY_TYPES[to].name))


def _constant(call: Call) -> Any:
    t = call.torch
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        value = call.node.attributes.get(name)
        if value is not None:
            array = value if isinstance(value, np.ndarray) else np.asarray(value, np.float32 if "float" in name else np.int64)
            return _to_torch(t, array, "cpu")
    raise call.fail("a constant without a value")


def _reshape(call: Call, x: Any, shape: Any) -> Any:
    target = _ints(shape)
    if not call.attr("allowzero", 0):
        target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
    if call.batch and target and target[0] == call.batch[0] and x.dim() and x.shape[0] == call.batch[1]:
        target[0] = call.batch[1]  # the file's batch in its reshape, run at another (module doc)
    return x.reshape(target)


def _squeeze(call: Call, x: Any, axes: Any = None) -> Any:
    dims = _axes(call, axes, x.dim(), 13)
    return x.squeeze() if dims is None else x.squeeze(tuple(dims))


def _unsqueeze(call: Call, x: Any, axes: Any = None) -> Any:
    dims = call.attr("axes") if call.opset < 13 else _ints(axes)
    rank = x.dim() + len(dims)
    for axis in sorted(a % rank for a in dims):
        x = x.unsqueeze(axis)
    return x


def _pad(call: Call, x: Any, pads: Any = None, value: Any = None, axes: Any = None) -> Any:
    mode = call.attr("mode", b"constant").decode()
    pads_l = call.attr("pads") if call.opset < 11 else _ints(pads)
    if axes is not None:
        raise call.fail("Pad with axes is not supported")
    rank = x.dim()
    explicit: list[int] = []
    for axis in reversed(range(rank)):
        explicit += [pads_l[axis], pads_l[axis + rank]]
    fill = float(call.attr("value", 0.0)) if call.opset < 11 else (float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0)
    f = call.torch.nn.functional
    if mode == "constant":
        return f.pad(x, explicit, value=fill)
    return f.pad(x, explicit[: 2 * (rank - 2)], mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _binary(fn: Callable[[Any, Any, Any], Any]) -> Callable[..., Any]:
    def op(call: Call, a: Any, b: Any) -> Any:
        if a.device != b.device:  # constants and shape arithmetic live on the CPU: move them to the data
            a, b = (a.to(b.device), b) if a.device.type == "cpu" else (a, b.to(a.device))
        return fn(call.torch, a, b)

    return op


def _div(t: Any, a: Any, b: Any) -> Any:
    if not a.is_floating_point() and not b.is_floating_point():
        return t.div(a, b, rounding_mode="trunc")
    return a / b


def _variadic(name: str) -> Callable[..., Any]:
    def op(call: Call, *xs: Any) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = getattr(call.torch, name)(out, x.to(out.device))
        return out

    return op


def _gather(call: Call, x: Any, indices: Any) -> Any:
    axis = call.attr("axis", 0) % x.dim()
    index = indices.to(x.device).long()
    index = call.torch.where(index < 0, index + x.shape[axis], index)
    return x.index_select(axis, index.reshape(-1)).reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])


def _clip(call: Call, x: Any, low: Any = None, high: Any = None) -> Any:
    if call.opset < 11:
        low_v, high_v = call.attr("min"), call.attr("max")
    else:
        low_v = None if low is None else low.reshape(()).item()
        high_v = None if high is None else high.reshape(()).item()
    return x.clamp(low_v, high_v)


def _layer_norm(call: Call, x: Any, scale: Any, bias: Any = None) -> Any:
    axis = call.attr("axis", -1) % x.dim()
    return call.torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, call.attr("epsilon", 1e-5))


def _batch_norm(call: Call, x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
    return call.torch.nn.functional.batch_norm(x, mean, var, scale, bias, False, 0.0, call.attr("epsilon", 1e-5))


def _transpose(call: Call, x: Any) -> Any:
    return x.permute(call.attr("perm", list(reversed(range(x.dim())))))


def _flatten(call: Call, x: Any) -> Any:
    axis = call.attr("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _constant_of_shape(call: Call, shape: Any) -> Any:
    value = call.attr("value")
    fill = _to_torch(call.torch, value, "cpu") if value is not None else call.torch.zeros(1)
    return fill.reshape(-1)[0].expand(_ints(shape)).clone()


def _range(call: Call, start: Any, limit: Any, delta: Any) -> Any:
    return call.torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


def _expand(call: Call, x: Any, shape: Any) -> Any:
    target = _ints(shape)
    rank = max(len(target), x.dim())
    target = [1] * (rank - len(target)) + target
    dims = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(dims).expand([max(a, b) if 1 in (a, b) else a for a, b in zip(dims, target, strict=True)])


def _tile(call: Call, x: Any, repeats: Any) -> Any:
    return x.repeat(_ints(repeats))


def _mat_mul(call: Call, a: Any, b: Any) -> Any:
    return call.torch.matmul(a, b)


def _leaky_relu(call: Call, x: Any) -> Any:
    return call.torch.nn.functional.leaky_relu(x, call.attr("alpha", 0.01))


def _hard_sigmoid(call: Call, x: Any) -> Any:
    return (call.attr("alpha", 0.2) * x + call.attr("beta", 0.5)).clamp(0.0, 1.0)


def _unary(name: str) -> Callable[..., Any]:
    return lambda call, x: getattr(call.torch, name)(x)


def _where(call: Call, condition: Any, a: Any, b: Any) -> Any:
    device = a.device if a.device.type != "cpu" else b.device
    return call.torch.where(condition.to(device), a.to(device), b.to(device))


OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv,
    "MaxPool": lambda call, x: _pool(call, x, "max"),
    "AveragePool": lambda call, x: _pool(call, x, "avg"),
    "GlobalAveragePool": lambda call, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda call, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "Relu": _unary("relu"),
    "Sigmoid": _unary("sigmoid"),
    "Tanh": _unary("tanh"),
    "Exp": _unary("exp"),
    "Log": _unary("log"),
    "Sqrt": _unary("sqrt"),
    "Erf": _unary("erf"),
    "Abs": _unary("abs"),
    "Neg": _unary("neg"),
    "Reciprocal": _unary("reciprocal"),
    "Floor": _unary("floor"),
    "Ceil": _unary("ceil"),
    "Not": _unary("logical_not"),
    "Softplus": lambda call, x: call.torch.nn.functional.softplus(x),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda call, x: call.torch.nn.functional.hardswish(x),
    "LeakyRelu": _leaky_relu,
    "Identity": lambda call, x: x,
    "Dropout": lambda call, x, *rest: x,
    "Add": _binary(lambda t, a, b: a + b),
    "Sub": _binary(lambda t, a, b: a - b),
    "Mul": _binary(lambda t, a, b: a * b),
    "Div": _binary(_div),
    "Pow": _binary(lambda t, a, b: t.pow(a, b)),
    "Equal": _binary(lambda t, a, b: a == b),
    "Less": _binary(lambda t, a, b: a < b),
    "Greater": _binary(lambda t, a, b: a > b),
    "And": _binary(lambda t, a, b: a & b),
    "Max": _variadic("maximum"),
    "Min": _variadic("minimum"),
    "Sum": _variadic("add"),
    "MatMul": _mat_mul,
    "Gemm": _gemm,
    "Clip": _clip,
    "Softmax": _softmax,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
    "ReduceL2": _reduce("l2"),
    "Concat": lambda call, *xs: call.torch.cat([x.to(xs[0].device) for x in xs], dim=call.attr("axis")),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": _expand,
    "Tile": _tile,
    "Shape": lambda call, x: call.torch.tensor(list(x.shape)[call.attr("start", 0) : call.attr("end")], dtype=call.torch.int64),
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "Where": _where,
    "Resize": _resize,
    "Upsample": _resize,
    "Pad": _pad,
}
