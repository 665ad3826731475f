"""Checks of the pose and conditioning nodes, run inside a real ComfyUI's Python.

`tests/test_graph_nodes_comfyui.py` runs this file once with $COMFYUI_PYTHON and asserts on
the JSON report it writes:

    COMFYUI_DIR=/path/to/ComfyUI $COMFYUI_PYTHON tests/comfyui_graph_checks.py OUT.json

ComfyUI is imported in-process on the CPU and this package is loaded as ComfyUI loads it.
The pose nodes run the ONNX DWPose stand-ins of scripts/make_tiny_models.py; the
conditioning node runs with a recording VAE, so the checks see exactly what it encodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_steadydancer"
sys.path.insert(0, str(REPO_ROOT))

from scripts.comfyui_inprocess import import_comfyui, load_package  # noqa: E402


class RecordingVAE:
    """Stands in for ComfyUI's Wan VAE: records each encoded video, returns a latent of the
    right shape whose values are the mean colour of each 4-frame/8-pixel block."""

    def __init__(self) -> None:
        self.encoded: list = []

    def encode(self, images):  # images [N, H, W, 3] in 0..1 -> [1, 16, F, H/8, W/8]
        import torch

        self.encoded.append(images.clone())
        video = images.movedim(-1, 0)[None]  # [1, 3, N, H, W]
        first = torch.nn.functional.avg_pool3d(video[:, :, :1], (1, 8, 8))
        rest = torch.nn.functional.avg_pool3d(video[:, :, 1:], (4, 8, 8)) if images.shape[0] > 1 else first[:, :, :0]
        pooled = torch.cat([first, rest], dim=2).mean(1, keepdim=True)
        return pooled.expand(1, 16, *pooled.shape[2:]).clone()


def _check(report: dict, name: str, fn: Callable[[], dict]) -> None:
    try:
        report[name] = {"ok": True, **fn()}
    except Exception as error:  # the report says what failed; pytest asserts on it
        report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def run(out: Path) -> dict:
    import_comfyui()
    import comfy.clip_vision
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    import torch

    work = Path(tempfile.mkdtemp(prefix="graph_checks_"))
    extra = work / "extra_dwpose"
    extra.mkdir()
    # an extra_model_paths entry registered before the package loads, as main.py does
    folder_paths.add_model_folder_path("dwpose", str(extra))
    load_package()
    pose_nodes = importlib.import_module(f"{PACKAGE}.nodes.pose_nodes")
    cond_nodes = importlib.import_module(f"{PACKAGE}.nodes.conditioning")
    sys.path.insert(0, str(REPO_ROOT))
    from scripts.make_tiny_models import write_pose_standins

    write_pose_standins(extra)
    report: dict = {}

    def folders() -> dict:
        paths, extensions = folder_paths.folder_names_and_paths["dwpose"]
        shared = [k for k, (_, ext) in folder_paths.folder_names_and_paths.items() if k != "dwpose" and ext is extensions]
        return {
            "paths": paths,
            "default": os.path.join(folder_paths.models_dir, "dwpose"),
            "extra": str(extra),
            "extensions": sorted(extensions),
            "shared_with": shared,
            "pt_extensions_has_onnx": ".onnx" in folder_paths.supported_pt_extensions,
            "files": sorted(folder_paths.get_filename_list("dwpose")),
        }

    _check(report, "folders", folders)

    detector = pose_nodes.SteadyDancerPoseDetectorLoader.execute("onnx").result[0]
    frames = torch.rand(6, 96, 96, 3)

    def colour_order() -> dict:
        loader = pose_nodes.SteadyDancerPoseDetectorLoader
        return {
            "default": detector.colour_order,
            "trained": loader.execute("onnx", "trained").result[0].colour_order,
            "validate": loader.validate_inputs(backend="onnx", colour_order="bgr"),
        }

    _check(report, "colour_order", colour_order)

    def extract_progress(batch_size: int = 1) -> dict:
        # `reported`: what the node tells ComfyUI's progress bar; `sent`: what reaches the UI's
        # hook (ComfyUI 0.3x throttles it: first and last always, others 100 ms apart).
        reported, sent = [], []
        bar_class, update = comfy.utils.ProgressBar, comfy.utils.ProgressBar.update_absolute

        def recording_update(bar: object, value: int, total: int | None = None, preview: object = None) -> None:
            reported.append([value, total])
            update(bar, value, total, preview)

        previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: sent.append([value, total]))
        bar_class.update_absolute = recording_update
        try:
            poses, preview = pose_nodes.SteadyDancerPoseExtract.execute(detector, frames, 128, batch_size).result
        finally:
            bar_class.update_absolute = update
            comfy.utils.set_progress_bar_global_hook(previous)
        return {"reported": reported, "sent": sent, "frames": len(poses), "people": [len(p["people"]) for p in poses],
                "preview": list(preview.shape)}

    _check(report, "extract_progress", extract_progress)
    def extract_progress_batched() -> dict:
        schema = pose_nodes.SteadyDancerPoseExtract.define_schema()
        default = next(i.default for i in schema.inputs if i.id == "batch_size")
        return {**extract_progress(4), "schema_default": default}

    _check(report, "extract_progress_batched", extract_progress_batched)

    def extract_cancel() -> dict:
        mm.interrupt_current_processing(True)
        try:
            pose_nodes.SteadyDancerPoseExtract.execute(detector, frames, 128)
            raised = None
        except BaseException as error:  # a BaseException since ComfyUI 0.3x
            raised = type(error).__name__
        return {"raised": raised, "flag_after": mm.processing_interrupted()}

    _check(report, "extract_cancel", extract_cancel)

    def reference_chain_input(image: torch.Tensor) -> object:
        """The reference image as the reference detects its pose: OpenCV bicubic to the 1024x576 area."""
        import cv2
        from comfyui_steadydancer.steadydancer.size import POSE_AREA, fit_to_area

        height, width = fit_to_area(*image.shape[1:3], POSE_AREA)
        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)

    keypoints = pose_nodes.SteadyDancerPoseExtract.execute(detector, frames, 128).result[0]
    reference = torch.rand(1, 120, 80, 3)
    align = pose_nodes.SteadyDancerPoseAlign.execute

    def alignment() -> dict:
        pos, neg, clip_pose = align(reference, keypoints, 48, 64, 2, "hold", 7, "steadydancer", detector, None).result
        pos_again, neg_again, _ = align(reference, keypoints, 48, 64, 2, "hold", 7, "steadydancer", detector, None).result
        _, neg_other, _ = align(reference, keypoints, 48, 64, 2, "hold", 8, "steadydancer", detector, None).result
        fitted = torch.from_numpy(reference_chain_input(reference)).float().div(255)[None]
        ref_pose = pose_nodes.SteadyDancerPoseExtract.execute(detector, fitted, 1024).result[0]
        pos_given, _, _ = align(reference, keypoints, 48, 64, 2, "hold", 7, "steadydancer", None, ref_pose).result
        try:
            align(reference, keypoints, 48, 64, 2, "hold", 7, "steadydancer", None, None)
            no_reference = None
        except Exception as error:
            no_reference = f"{type(error).__name__}: {error}"
        return {
            "shape": list(pos.shape),
            "negative_shape": list(neg.shape),
            "range": [float(pos.min()), float(pos.max())],
            "drawn": float((pos > 0.05).float().mean()),
            "negative_differs": bool((pos - neg).abs().max() > 0.1),
            "deterministic": bool(torch.equal(pos, pos_again) and torch.equal(neg, neg_again)),
            "seed_matters": not torch.equal(neg, neg_other),
            "reference_pose_input_equal": bool(torch.equal(pos, pos_given)),
            "no_reference": no_reference,
            "clip_pose_shape": list(clip_pose.shape),
        }

    _check(report, "alignment", alignment)

    def pose_chain() -> dict:
        """Pose Align's frames are the library's reference chain on the reference's own pose."""
        from comfyui_steadydancer.pose import (
            align_poses,
            augment_poses,
            from_pose_keypoint,
            reference_frame,
        )
        from comfyui_steadydancer.steadydancer.size import (
            POSE_AREA,
            fit_to_area,
            resize_like_reference,
        )

        pos, neg, clip_pose = align(reference, keypoints, 48, 64, 2, "hold", 7, "steadydancer", detector, None).result
        ref_pose = detector.detect_image(reference_chain_input(reference))
        aligned = align_poses(ref_pose, from_pose_keypoint(keypoints), align_frame=2, missing="hold")
        draw, size = fit_to_area(120, 80, POSE_AREA), (120, 80)

        def expected(poses: list) -> torch.Tensor:
            full = [torch.from_numpy(reference_frame(p, draw, size)).float().div(255)[None] for p in poses]
            return torch.cat([resize_like_reference(f, 64, 48) for f in full]), full[0]

        exp_pos, exp_clip = expected(aligned)
        exp_neg, _ = expected(augment_poses(aligned, 7))
        threads_equal = []  # frames drawn on 1 and 3 threads (chunks of 1 and 3) come out the same, in order
        for threads in (1, 3):
            saved, pose_nodes.RENDER_THREADS = pose_nodes.RENDER_THREADS, threads
            try:
                again = align(reference, keypoints, 48, 64, 2, "hold", 7, "steadydancer", detector, None).result[0]
            finally:
                pose_nodes.RENDER_THREADS = saved
            threads_equal.append(bool(torch.equal(again, pos)))
        return {
            "frames": len(aligned),
            "threads_equal": threads_equal,
            "reference_width_height": [ref_pose.width, ref_pose.height],
            "positive_equal": bool(torch.equal(pos, exp_pos)),
            "negative_equal": bool(torch.equal(neg, exp_neg)),
            "clip_pose_equal": bool(torch.equal(clip_pose, exp_clip)),
            "unclamped": [float(pos.min()), float(pos.max())],
        }

    _check(report, "pose_chain", pose_chain)

    size_node = cond_nodes.SteadyDancerGenerationSize

    def generation_size() -> dict:
        portrait = torch.zeros(1, 1920, 1080, 3)
        try:
            size_node.execute(portrait, "832*480", 480, 0)
            half_forced = None
        except Exception as error:
            half_forced = f"{type(error).__name__}: {error}"
        return {
            "auto": list(size_node.execute(portrait, "832*480", 0, 0).result),
            "auto_720p": list(size_node.execute(portrait, "1280*720", 0, 0).result),
            "forced": list(size_node.execute(portrait, "832*480", 512, 768).result),
            "half_forced": half_forced,
            "validate": [size_node.validate_inputs(area="640*640"), size_node.validate_inputs(area="1024*576"), size_node.validate_inputs(area=None)],
        }

    _check(report, "generation_size", generation_size)

    def vision(rows: int) -> comfy.clip_vision.Output:
        output = comfy.clip_vision.Output()
        output["penultimate_hidden_states"] = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1).expand(rows, 257, 8).clone()
        return output

    i2v = cond_nodes.SteadyDancerImageToVideo

    def resize_unclamped() -> dict:
        """Images reach the VAE resized as the reference resizes them: bicubic, no clamping."""
        vae = RecordingVAE()
        text = [[torch.zeros(1, 7, 8), {}]]
        ref = torch.zeros(1, 40, 24, 3)
        ref[:, 10:30, 8:16] = 1.0  # hard edges: bicubic overshoots
        pose = torch.rand(5, 48, 32, 3)
        i2v.execute(text, text, vae, vision(1), vision(1), ref, pose, pose, 32, 48, 5, 1, "pad")
        video, ref_x_in = vae.encoded[0], vae.encoded[1]
        expected = torch.nn.functional.interpolate(ref.movedim(-1, 1) * 2 - 1, size=(48, 32), mode="bicubic").movedim(1, -1)
        return {
            "ref_range": [float(ref_x_in.min()), float(ref_x_in.max())],
            "ref_diff": float((ref_x_in * 2 - 1 - expected[0]).abs().max()),
            "first_frame_is_ref": bool(torch.equal(video[:1], ref_x_in)),
            "pose_at_size_untouched": bool(torch.equal(vae.encoded[3], pose)),
        }

    def conditioning() -> dict:
        vae = RecordingVAE()
        text = [[torch.zeros(1, 7, 8), {"pooled_output": None}]]
        text_neg = [[torch.ones(1, 7, 8), {}]]
        ref = torch.rand(1, 40, 24, 3)
        pose = torch.rand(3, 80, 48, 3)
        pose_neg = torch.rand(3, 80, 48, 3)
        ref_vision, pose_vision = vision(1), vision(5)
        positive, negative, pose_negative, latent = i2v.execute(
            text, text_neg, vae, ref_vision, pose_vision, ref, pose, pose_neg, 32, 48, 9, 2, "pad"
        ).result
        video, ref_x_in, ref_c_in, pose_in, pose_neg_in = vae.encoded
        values = [c[0][1] for c in (positive, negative, pose_negative)]
        shapes = {k: list(v.shape) for k, v in values[0].items() if isinstance(v, torch.Tensor)}
        same_except_pose = all(
            torch.equal(values[0][k], values[2][k]) for k in shapes if k != "steadydancer_pose"
        )
        try:
            i2v.execute(text, text_neg, vae, ref_vision, pose_vision, ref, pose, pose_neg, 32, 48, 9, 1, "error")
            short_error = None
        except Exception as error:
            short_error = f"{type(error).__name__}: {error}"
        return {
            "keys": sorted(values[0]),
            "shapes": shapes,
            "latent": list(latent["samples"].shape),
            "text_kept": [torch.equal(positive[0][0], text[0][0]), torch.equal(negative[0][0], text_neg[0][0]), torch.equal(pose_negative[0][0], text[0][0])],
            "pose_same_pos_neg": torch.equal(values[0]["steadydancer_pose"], values[1]["steadydancer_pose"]),
            "pose_negative_differs": not torch.equal(values[0]["steadydancer_pose"], values[2]["steadydancer_pose"]),
            "same_except_pose": same_except_pose,
            "encoded_shapes": [list(t.shape) for t in vae.encoded],
            "video_first_is_reference": torch.allclose(video[0], ref_x_in[0]),
            "video_rest_grey": bool((video[1:] == 0.5).all()),
            "ref_c_is_first_pose": torch.equal(ref_c_in[0], pose_in[0]),
            "padded_with_last": bool(torch.equal(pose_in[3], pose_in[2]) and torch.equal(pose_in[8], pose_in[2])),
            "negative_padded_with_last": bool(torch.equal(pose_neg_in[8], pose_neg_in[2])),
            "ref_x_mask": float(values[0]["steadydancer_ref_x"][:, 16:20].mean()),
            "ref_c_mask": float(values[0]["steadydancer_ref_c"][:, 16:20].abs().max()),
            "clip_reference_rows": int(values[0]["clip_vision_output"].penultimate_hidden_states.shape[0]),
            "clip_pose_first_row": float(values[0]["steadydancer_clip_c"].penultimate_hidden_states.max()),
            "clip_pose_rows": int(values[0]["steadydancer_clip_c"].penultimate_hidden_states.shape[0]),
            "concat_mask_first": float(values[0]["concat_mask"][:, :, 0].max()),
            "concat_mask_rest": float(values[0]["concat_mask"][:, :, 1:].min()),
            "short_error": short_error,
            "validate": [i2v.validate_inputs(length=8), i2v.validate_inputs(length=81), i2v.validate_inputs(length=None)],
        }

    _check(report, "conditioning", conditioning)
    _check(report, "resize_unclamped", resize_unclamped)
    out.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    run(Path(sys.argv[1]))
