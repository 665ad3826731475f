"""Host memory of the pose nodes on a long video: extraction, alignment and rendering.

    COMFYUI_DIR=... $COMFYUI_PYTHON -m benchmarks.pose_nodes_memory [--frames 481] [--width 480 --height 832]

Runs SteadyDancer Pose Extract and Pose Align inside ComfyUI (on the CPU) on random frames of
the given size, with the demo's ONNX pose stand-ins (the networks' cost is not what is
measured here), and prints for each node its time, the peak resident memory above what the
process held before the node started, and the size of the node's outputs. The difference is
what the node held besides its results: it should be a few frames, not a video.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import GIB, PeakRSS  # noqa: E402
from scripts.comfyui_inprocess import import_comfyui, load_package  # noqa: E402


def nbytes(value: object) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=481)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=832)
    parser.add_argument("--detect-resolution", type=int, default=1024)
    args = parser.parse_args(argv)
    import_comfyui()
    load_package()
    import folder_paths
    import torch
    from comfyui_steadydancer.nodes import pose_nodes

    from scripts.make_tiny_models import write_pose_standins

    models = Path(tempfile.mkdtemp(prefix="pose-memory-"))
    write_pose_standins(models)
    folder_paths.add_model_folder_path("dwpose", str(models), is_default=True)
    detector = pose_nodes.SteadyDancerPoseDetectorLoader.execute("onnx").result[0]

    frames = torch.rand(args.frames, args.height, args.width, 3)  # what GetVideoComponents gives
    reference = torch.rand(1, args.height, args.width, 3)
    # onnxruntime grows its arenas on the first frames: not the node's memory
    pose_nodes.SteadyDancerPoseExtract.execute(detector, frames[:2], args.detect_resolution, 1)
    print(f"input: {args.frames} frames of {args.width}x{args.height}, {nbytes(frames) / GIB:.2f} GiB as ComfyUI IMAGE")
    frame_gib = args.height * args.width * 3 * 4 / GIB

    with PeakRSS() as extract:
        poses, preview = pose_nodes.SteadyDancerPoseExtract.execute(detector, frames, args.detect_resolution, 1).result
    with PeakRSS() as align:
        outputs = pose_nodes.SteadyDancerPoseAlign.execute(reference, poses, args.width, args.height, 0, "hold", 42,
                                                           pose_detector=detector).result  # fmt: skip
    print(f"{'node':24s} {'seconds':>8s} {'peak above start GiB':>21s} {'outputs GiB':>12s} {'held besides outputs':>21s}")
    for name, run, out in (("Pose Extract", extract, (preview,)), ("Pose Align", align, outputs)):
        above = (run.peak - run.start) / GIB
        held = above - nbytes(out) / GIB
        print(f"{name:24s} {run.seconds:8.1f} {above:21.2f} {nbytes(out) / GIB:12.2f} "
              f"{held:12.2f} ({held / frame_gib:.1f} frames)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
