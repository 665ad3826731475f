"""DWPose from its ONNX files (yolox_l.onnx + dw-ll_ucoco_384.onnx), no mmcv needed.

Two runtimes execute the files: onnxruntime, and torch (torch_onnx.py: the same graph with
PyTorch operators, on any device torch has). `auto` takes onnxruntime on the CPU and where
its CUDA provider starts, torch on a GPU that onnxruntime cannot use (a CPU build, a build
for another CUDA: PyPI's onnxruntime-gpu needs CUDA 12 up to 1.26 and CUDA 13 from 1.27), so
the networks run on the GPU wherever ComfyUI does.

The networks run bare; geometry.py reproduces what mmdet/mmpose do around them, including
mmpose's flip test of the reference config (on by default), so both backends give the same
keypoints for the same weights. Batches are sent whole when a model's batch axis is
dynamic; when it is fixed (the public yolox_l.onnx takes [1, 3, 640, 640]) onnxruntime gets
one image at a time, and the torch runtime the whole batch once it has checked that the
file gives the same at that batch size (torch_onnx.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InvalidCheckpointError, PoseDependencyError
from . import geometry as g
from .base import PoseDetector, WholeBody

logger = logging.getLogger(__name__)

SIMCC_X_BINS = int(g.POSE_INPUT_SIZE[0] * g.SIMCC_SPLIT_RATIO)  # 576
SIMCC_Y_BINS = int(g.POSE_INPUT_SIZE[1] * g.SIMCC_SPLIT_RATIO)  # 768


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise PoseDependencyError(
            "the onnx pose backend needs onnxruntime: `pip install onnxruntime` "
            "(or `onnxruntime-gpu` for CUDA), or `pip install .[onnx]` in this repository"
        ) from exc
    return onnxruntime


RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "torch")


def _onnxruntime_or_none() -> ModuleType | None:
    try:
        return import_onnxruntime()
    except PoseDependencyError:
        return None


def _torch_device(device: str | None) -> str:
    from .torch_onnx import import_torch

    torch = import_torch()
    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise PoseDependencyError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or another torch device") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PoseDependencyError(f"device {device!r} asked for, but this PyTorch has no usable CUDA device")
    return str(parsed) if parsed.type != "cuda" or parsed.index is not None else "cuda:0"


def _has_cuda(*sessions: Any) -> bool:
    return all("CUDAExecutionProvider" in session.get_providers() for session in sessions)


def _torch_cuda_available() -> bool:
    try:
        from .torch_onnx import import_torch

        return bool(import_torch().cuda.is_available())
    except PoseDependencyError:
        return False


def choose_runtime(runtime: str, device: str | None) -> str:
    """The runtime `auto` stands for on `device` (module docstring); others are returned as given."""
    if runtime not in RUNTIMES:
        raise PoseDependencyError(f"unknown ONNX runtime {runtime!r}: use one of {list(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    ort = _onnxruntime_or_none()
    if device == "cpu":
        return "onnxruntime" if ort is not None else "torch"
    if device is None or device.startswith("cuda"):
        if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            return "onnxruntime"
        if _torch_cuda_available():
            return "torch"
        if device is None and ort is not None:
            return "onnxruntime"  # no GPU at all: the CPU
    return "torch"  # mps, xpu, ... : only torch runs there


def providers_for(ort: ModuleType, device: str | None) -> tuple[list, str]:
    """onnxruntime providers for a device string ("cpu", "cuda", "cuda:1", None = best)."""
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device is None:
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if device.startswith("cuda"):
        if not has_cuda:
            raise PoseDependencyError(
                f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                f"(it has {available}): `pip install onnxruntime-gpu` matching your CUDA"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [
            ("CUDAExecutionProvider", {"device_id": index}),
            "CPUExecutionProvider",
        ], f"cuda:{index}"
    raise PoseDependencyError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


def _session(ort: ModuleType, path: Path, providers: list, threads: int | None) -> Any:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise InvalidCheckpointError(f"{path} could not be loaded by onnxruntime: {exc}") from exc


def _fixed_batch(shape: list) -> int | None:
    return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None


class OnnxPoseDetector(PoseDetector):
    backend = "onnx"

    def __init__(
        self,
        detector_path: str | Path,
        pose_path: str | Path,
        *,
        device: str | None = None,
        flip_test: bool = True,
        threads: int | None = None,
        runtime: str = "auto",
    ) -> None:
        self.runtime = choose_runtime(runtime, device)
        self.flip_test = flip_test
        if self.runtime == "torch":
            self._open_with_torch(detector_path, pose_path, device)
        else:
            ort = import_onnxruntime()
            providers, self.device = providers_for(ort, device)
            self._det = _session(ort, Path(detector_path), providers, threads)
            self._pose = _session(ort, Path(pose_path), providers, threads)
            if self.device != "cpu" and not _has_cuda(self._det, self._pose):
                # Listed is not started: a build for another CUDA, or missing cuDNN, falls back
                # to the CPU with only a log line. `auto` takes torch's GPU instead.
                if runtime == "auto" and _torch_cuda_available():
                    logger.warning("onnxruntime's CUDA provider did not start (%s); running the DWPose files "
                                   "with PyTorch on %s instead", ort.__version__, self.device)  # fmt: skip
                    self.runtime = "torch"
                    self._open_with_torch(detector_path, pose_path, device)
                else:
                    logger.warning("onnxruntime's CUDA provider did not start (%s): the DWPose networks run on "
                                   "the CPU; onnx_runtime 'auto' or 'torch' runs them on the GPU", ort.__version__)  # fmt: skip
                    self.device = "cpu"
        self._check_signatures(Path(detector_path), Path(pose_path))

    def _open_with_torch(self, detector_path: str | Path, pose_path: str | Path, device: str | None) -> None:
        from .torch_onnx import TorchOnnxSession

        self.device = _torch_device(device)
        self._det = TorchOnnxSession(detector_path, self.device)
        self._pose = TorchOnnxSession(pose_path, self.device)

    def release(self) -> None:
        for session in (self._det, self._pose):
            if hasattr(session, "release"):
                session.release()

    def _check_signatures(self, detector_path: Path, pose_path: Path) -> None:
        det_in = self._det.get_inputs()[0]
        dims = list(det_in.shape)
        if not (
            len(dims) == 4
            and dims[1] == 3
            and all(d == g.DETECTOR_SIZE or not isinstance(d, int) for d in dims[2:])
        ):
            raise InvalidCheckpointError(
                f"{detector_path} is not a YOLOX detector: input {dims}, expected [N, 3, 640, 640]"
            )
        self._det_input = det_in.name
        self._det_batch = _fixed_batch(det_in.shape)
        pose_in = self._pose.get_inputs()[0]
        if list(pose_in.shape[1:]) != [3, g.POSE_INPUT_SIZE[1], g.POSE_INPUT_SIZE[0]]:
            raise InvalidCheckpointError(
                f"{pose_path} is not a DWPose 384x288 model: input {pose_in.shape}, expected [N, 3, 384, 288]"
            )
        self._pose_input = pose_in.name
        self._pose_batch = _fixed_batch(pose_in.shape)
        outputs = {o.shape[-1]: o.name for o in self._pose.get_outputs()}
        if SIMCC_X_BINS not in outputs or SIMCC_Y_BINS not in outputs:
            outputs = self._probe_output_widths()
        if SIMCC_X_BINS not in outputs or SIMCC_Y_BINS not in outputs:
            raise InvalidCheckpointError(
                f"{pose_path} does not output SimCC vectors [N, 133, 576] and [N, 133, 768]"
            )
        self._simcc_names = [outputs[SIMCC_X_BINS], outputs[SIMCC_Y_BINS]]

    def _probe_output_widths(self) -> dict:
        """{last axis size: output name} from one run on a blank crop, for files whose output
        shapes are symbolic (torch's exporter names reshaped axes instead of sizing them)."""
        names = [o.name for o in self._pose.get_outputs()]
        blank = np.zeros((self._pose_batch or 1, 3, g.POSE_INPUT_SIZE[1], g.POSE_INPUT_SIZE[0]), np.float32)
        try:
            results = self._pose.run(names, {self._pose_input: blank})
        except Exception:  # a file that cannot run is reported below as not a DWPose model
            return {}
        finally:
            self.release()  # a loaded detector holds no device memory until it detects
        return {np.shape(r)[-1]: name for r, name in zip(results, names, strict=True) if np.ndim(r) == 3}

    def _run(
        self,
        session: Any,
        feed_name: str,
        outputs: list[str] | None,
        x: np.ndarray,
        fixed: int | None,
    ) -> list[np.ndarray]:
        step = len(x) if getattr(session, "any_batch", False) else (fixed or len(x))
        parts = [session.run(outputs, {feed_name: x[i : i + step]}) for i in range(0, len(x), step)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    def person_boxes(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """BGR images -> person boxes [P, 4] (xyxy pixels, best first) per image."""
        boxed = [g.letterbox(image) for image in images]
        batch = np.stack([padded.transpose(2, 0, 1) for padded, _ in boxed]).astype(np.float32)
        raw = self._run(self._det, self._det_input, None, batch, self._det_batch)[0]
        if raw.ndim != 3 or raw.shape[0] != len(images) or raw.shape[1] != len(g.yolox_grid()[0]):
            raise InvalidCheckpointError(
                f"the detector's output has shape {list(raw.shape)}, expected YOLOX's [N, 8400, 85]"
            )
        return [
            g.select_people(*g.decode_yolox(out, scale))
            for out, (_, scale) in zip(raw, boxed, strict=True)
        ]

    def estimate(self, images: list[np.ndarray]) -> list[WholeBody]:
        boxes = self.person_boxes(images)
        centres, scales, crops = [], [], []
        for image, people in zip(images, boxes, strict=True):
            height, width = image.shape[:2]
            box = people[0] if len(people) else np.array([0, 0, width, height], dtype=np.float32)
            centre, scale = g.box_to_centre_scale(box)
            centres.append(centre)
            scales.append(scale)
            crops.append(g.crop_person(np.ascontiguousarray(image[..., ::-1]), centre, scale))
        x = g.normalise_crops(np.stack(crops))
        simcc_x, simcc_y = self._run(
            self._pose, self._pose_input, self._simcc_names, x, self._pose_batch
        )
        if self.flip_test:
            flipped = np.ascontiguousarray(x[..., ::-1])
            fx, fy = self._run(
                self._pose, self._pose_input, self._simcc_names, flipped, self._pose_batch
            )
            fx, fy = g.flip_simcc(fx, fy, g.wholebody_flip_indices())
            simcc_x, simcc_y = (simcc_x + fx) * 0.5, (simcc_y + fy) * 0.5
        locs, vals = g.decode_simcc(simcc_x, simcc_y)
        return [
            (g.to_image(loc, centre, scale), val)
            for loc, val, centre, scale in zip(locs, vals, centres, scales, strict=True)
        ]
