"""Carry a large random-weight ONNX network as a small "skeleton" and re-fill it elsewhere.

    python scripts/onnx_skeleton.py strip SRC.onnx DST.skel.onnx   # drop big weight tensors
    python scripts/onnx_skeleton.py fill  SRC.skel.onnx DST.onnx   # refill them with random values

Why: the DWPose benchmark networks (yolox_l.onnx 217 MB, dw-ll_ucoco_384.onnx 134 MB, exported
with random weights) are too large to send to the GPU machine, which cannot download them
either. Timing does not depend on the weight values, only on the graph and tensor shapes, so
the skeleton keeps the graph, every small tensor (biases, norm parameters, shape constants)
and the shape and type of each large one; `fill` draws the large ones from N(0, 1/fan_in)
with a fixed seed. The result runs the same operators on the same shapes as the original.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

MIN_ELEMENTS = 4096  # float tensors at least this large (and 2-D or more) are stripped
STRIPPED = "skeleton:stripped"


def strip(src: str, dst: str) -> int:
    import onnx
    from onnx import TensorProto

    model = onnx.load(src)
    count = 0
    for init in model.graph.initializer:
        n = math.prod(init.dims)
        if init.data_type == TensorProto.FLOAT and len(init.dims) >= 2 and n >= MIN_ELEMENTS:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.doc_string = STRIPPED
            count += 1
    onnx.save(model, dst)
    return count


def fill(src: str, dst: str, seed: int = 0) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    rng = np.random.default_rng(seed)
    count = 0
    for i, init in enumerate(model.graph.initializer):
        if init.doc_string != STRIPPED:
            continue
        dims = tuple(init.dims)
        fan_in = math.prod(dims[1:])
        values = (rng.standard_normal(dims, dtype=np.float32) / math.sqrt(fan_in)).astype(
            np.float32
        )
        new = numpy_helper.from_array(values, init.name)
        model.graph.initializer[i].CopyFrom(new)
        count += 1
    onnx.save(model, dst)
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["strip", "fill"])
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args(argv)
    n = strip(args.src, args.dst) if args.command == "strip" else fill(args.src, args.dst)
    print(f"{args.command}: {n} tensors, {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
