"""Frames per second of DWPose extraction per backend.

    python -m benchmarks.pose_extract [--backend onnx mmpose] [--model-dir DIR] [--frames 8]
                                      [--height 480 --width 640] [--detect-resolution 512]
                                      [--batch-size 4] [--device cpu|cuda] [--no-flip] [--json]
                                      [--runtime auto onnxruntime torch] [--check-against-cpu N]

--runtime picks how the onnx backend executes its files (several: one row each);
--check-against-cpu N also runs onnxruntime on the CPU on the first N frames and prints the
largest keypoint and score differences of each row against it (the same raw keypoints,
before any score threshold).

With --model-dir the real checkpoints are used; without it the networks have random
weights: the mmpose backend builds them from its configs, the onnx backend uses ONNX files
exported from those (pose.backends.export_onnx, needs the mmpose stack once). Random
weights give the real compute (same architectures, same input sizes) but find no person,
so the pose model runs on the whole frame, as it does for a frame without a detection.
One warm-up batch is excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import time_calls
from pose.backends import load_detector
from pose.backends.base import PoseDetector
from pose.backends.onnx_backend import RUNTIMES
from pose.errors import PoseError


def _random_detector(
    backend: str, device: str | None, flip_test: bool, workdir: Path
) -> PoseDetector:
    from pose.backends.mmpose_backend import MMPoseDetector, build_models, import_stack
    from pose.errors import PoseDependencyError

    try:
        import_stack()
    except PoseDependencyError as exc:
        if backend == "onnx":
            raise PoseDependencyError(
                "random-weight ONNX files are exported from the mmpose configs, which needs the "
                "mmpose stack here; or pass --model-dir with yolox_l.onnx and dw-ll_ucoco_384.onnx"
            ) from exc
        raise
    if backend == "mmpose":
        return MMPoseDetector(None, None, device=device, flip_test=flip_test)
    from pose.backends.export_onnx import export_models
    from pose.backends.onnx_backend import OnnxPoseDetector

    det_path, pose_path = export_models(*build_models(None, None, "cpu", False), workdir)
    return OnnxPoseDetector(det_path, pose_path, device=device, flip_test=flip_test)


def compare_with_cpu(detector: PoseDetector, cpu: PoseDetector, frames: np.ndarray, detect_resolution: int) -> dict:
    """Largest differences of raw keypoints (pixels of the detection image) and scores."""
    from pose.backends.geometry import resize_for_detection

    images = [np.ascontiguousarray(resize_for_detection(f, detect_resolution)) for f in frames]
    ours, theirs = detector.estimate(images), cpu.estimate(images)
    return {
        "keypoints_max_px": round(max(float(np.abs(a - b).max()) for (a, _), (b, _) in zip(ours, theirs, strict=True)), 4),
        "scores_max": float(max(np.abs(a - b).max() for (_, a), (_, b) in zip(ours, theirs, strict=True))),
    }


def measure(
    detector: PoseDetector, frames: np.ndarray, *, detect_resolution: int, batch_size: int
) -> dict:
    """Time detect() on frames after one warm-up batch (host clock: detect returns host
    results, so there is no device to synchronise)."""
    detector.detect(frames[:batch_size], detect_resolution=detect_resolution, batch_size=batch_size)
    (seconds,) = time_calls(
        lambda: detector.detect(frames, detect_resolution=detect_resolution, batch_size=batch_size)
    )
    return {
        "backend": detector.backend,
        "device": detector.device,
        "frames": len(frames),
        "seconds": round(seconds, 3),
        "frames_per_s": round(len(frames) / seconds, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pose_extract", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--backend", nargs="+", default=["onnx", "mmpose"], choices=["onnx", "mmpose"]
    )
    parser.add_argument(
        "--model-dir", type=Path, help="folder with the real checkpoints (default: random weights)"
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--detect-resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)"
    )
    parser.add_argument("--no-flip", action="store_true", help="disable the flip test")
    parser.add_argument("--json", action="store_true", help="print one JSON object per backend")
    parser.add_argument("--runtime", nargs="+", default=["auto"], choices=RUNTIMES,
                        help="how the onnx backend runs its files (one row each)")
    parser.add_argument("--check-against-cpu", type=int, default=0, metavar="N",
                        help="compare the first N frames' keypoints with onnxruntime on the CPU (needs --model-dir)")
    args = parser.parse_args(argv)

    frames = np.random.default_rng(0).integers(
        0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8
    )
    status = 0
    runs = [(b, r) for b in args.backend for r in (args.runtime if b == "onnx" else ["-"])]
    with tempfile.TemporaryDirectory() as tmp:
        for backend, runtime in runs:
            try:
                if args.model_dir is not None:
                    options = {"runtime": runtime} if backend == "onnx" else {}
                    detector = load_detector(
                        backend, args.model_dir, device=args.device, flip_test=not args.no_flip, **options
                    )
                else:
                    detector = _random_detector(backend, args.device, not args.no_flip, Path(tmp))
                result = measure(
                    detector,
                    frames,
                    detect_resolution=args.detect_resolution,
                    batch_size=args.batch_size,
                )
                if args.check_against_cpu and args.model_dir is not None:
                    cpu = load_detector(backend, args.model_dir, device="cpu", flip_test=not args.no_flip,
                                        **({"runtime": "onnxruntime"} if backend == "onnx" else {}))  # fmt: skip
                    result.update(compare_with_cpu(detector, cpu, frames[: args.check_against_cpu],
                                                   args.detect_resolution))  # fmt: skip
            except PoseError as exc:
                print(f"{backend}: skipped: {exc}")
                status = 1
                continue
            result["runtime"] = getattr(detector, "runtime", "-")
            result.update(
                size=f"{args.width}x{args.height}",
                detect_resolution=args.detect_resolution,
                batch_size=args.batch_size,
                flip_test=not args.no_flip,
                weights=f"files in {args.model_dir}" if args.model_dir else "random",
            )
            if args.json:
                print(json.dumps(result))
            else:
                check = (f"; vs CPU: keypoints {result['keypoints_max_px']} px, scores {result['scores_max']:.2e}"
                         if "keypoints_max_px" in result else "")  # fmt: skip
                print(
                    f"{backend:7s} {result['runtime']:11s} {result['device']:7s} {result['frames_per_s']:8.3f} frames/s "
                    f"({result['seconds'] / result['frames']:.3f} s/frame; {result['frames']} frames "
                    f"{result['size']}, detect {args.detect_resolution}, batch {args.batch_size}, "
                    f"flip {result['flip_test']}, weights: {result['weights']}){check}"
                )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
