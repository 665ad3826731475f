"""DWPose through mmdet + mmpose, built from the configs shipped in pose/configs/.

This is the reference's pipeline (YOLOX-L, then RTMPose-L top-down with the config's flip
test) with two changes: checkpoints are read with `torch.load(weights_only=True)` and
loaded with `load_state_dict` (mmengine would unpickle them fully), and frames of a batch
go through each network together (mmdet/mmpose's inference helpers take one image at a
time). BGR images reach both networks in the channel order they were trained on (BGR for
YOLOX; the pose data preprocessor turns BGR into RGB); which order they get is the
detector's `colour_order` (base.py).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from ..errors import InvalidCheckpointError, PoseDependencyError
from .base import PoseDetector, WholeBody
from .geometry import select_people

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DETECTOR_CONFIG = CONFIG_DIR / "yolox_l_8xb8-300e_coco.py"
POSE_CONFIG = CONFIG_DIR / "dwpose-l_384x288.py"
INSTALL_HINT = (
    "the mmpose pose backend needs torch, mmcv 2.1.0 (built from source), mmdet 3.3.0 and "
    "mmpose 1.3.2: see the README, 'DWPose through mmpose' (`pip install .[mmpose]` after "
    "building mmcv), or use the onnx backend, which needs only onnxruntime"
)


def import_stack() -> None:
    """Import the optional stack once, turning any failure into one clear message."""
    try:
        import mmcv.ops  # noqa: F401  (compiled ops: NMS)
        import mmdet.apis  # noqa: F401
        import mmpose.apis  # noqa: F401
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, and the numpy-ABI errors of a broken install
        raise PoseDependencyError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc


def load_weights(model, path: Path) -> None:
    """Safe checkpoint load: tensors only, keys checked."""
    import torch

    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InvalidCheckpointError(
            f"{path} could not be read as a weights-only PyTorch checkpoint ({exc}); "
            "download the public file again"
        ) from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidCheckpointError(f"{path} holds no state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InvalidCheckpointError(
            f"{path} does not fit the model of its config: {len(missing)} missing tensors "
            f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected (e.g. "
            f"{result.unexpected_keys[:3]}); is it the right file?"
        )


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PoseDependencyError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def mmcv_has_cuda_ops(device: str) -> bool:
    """Whether mmcv's compiled NMS runs on `device` (a build without FORCE_CUDA=1 has CPU ops only)."""
    import torch
    from mmcv.ops import nms

    try:
        nms(torch.zeros(1, 4, device=device), torch.ones(1, device=device), 0.5)
    except (RuntimeError, AssertionError):
        return False
    return True


def build_models(detector_ckpt: Path | None, pose_ckpt: Path | None, device: str, flip_test: bool):
    """(detector, pose model) from the shipped configs; random weights where ckpt is None."""
    from mmdet.apis import init_detector
    from mmengine.config import Config
    from mmpose.apis import init_model

    det_cfg = Config.fromfile(str(DETECTOR_CONFIG))
    detector = init_detector(det_cfg, None, device="cpu")
    pose_cfg = Config.fromfile(str(POSE_CONFIG))
    pose_cfg.model.test_cfg.flip_test = flip_test
    pose_model = init_model(pose_cfg, None, device="cpu")
    for model, ckpt in ((detector, detector_ckpt), (pose_model, pose_ckpt)):
        if ckpt is None:
            model.init_weights()  # the models' own init: activations of a sane scale
        else:
            load_weights(model, ckpt)
    return detector.to(device).eval(), pose_model.to(device).eval()


class MMPoseDetector(PoseDetector):
    backend = "mmpose"

    def __init__(
        self,
        detector_ckpt: str | Path | None,
        pose_ckpt: str | Path | None,
        *,
        device: str | None = None,
        flip_test: bool = True,
    ) -> None:
        """Checkpoint paths (None = random weights, for tests and benchmarks)."""
        import_stack()
        resolved = resolve_device(device)
        detector, pose_model = build_models(
            None if detector_ckpt is None else Path(detector_ckpt),
            None if pose_ckpt is None else Path(pose_ckpt),
            resolved,
            flip_test,
        )
        self._setup(detector, pose_model, resolved, flip_test)

    @classmethod
    def from_models(
        cls, detector, pose_model, *, device: str = "cpu", flip_test: bool = True
    ) -> MMPoseDetector:
        """Wrap already built mmdet/mmpose models (as build_models returns them)."""
        import_stack()
        self = cls.__new__(cls)
        self._setup(detector.to(device), pose_model.to(device), device, flip_test)
        return self

    def _setup(self, detector, pose_model, device: str, flip_test: bool) -> None:
        from mmcv.transforms import Compose
        from mmengine.dataset import pseudo_collate

        self.device, self.flip_test = device, flip_test
        pose_model.test_cfg = {**pose_model.test_cfg, "flip_test": flip_test}  # read per predict
        self._det, self._pose = detector, pose_model
        if device != "cpu" and not mmcv_has_cuda_ops(device):
            log.warning(
                "mmcv was built without CUDA ops: the YOLOX detector runs on the CPU, the pose "
                "model on %s (rebuild mmcv with FORCE_CUDA=1 for GPU detection)",
                device,
            )
            self._det = self._det.cpu()
        self._det_pipeline = Compose(self._det.cfg.test_dataloader.dataset.pipeline)
        self._pose_pipeline = Compose(self._pose.cfg.test_dataloader.dataset.pipeline)
        self._collate = pseudo_collate

    def person_boxes(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """BGR images -> person boxes [P, 4] (xyxy pixels, best first) per image."""
        import torch

        batch = self._collate(
            [self._det_pipeline({"img": img, "img_id": i}) for i, img in enumerate(images)]
        )
        with torch.no_grad():
            results = self._det.test_step(batch)
        boxes = []
        for result in results:
            pred = result.pred_instances.cpu().numpy()
            boxes.append(select_people(pred.bboxes, pred.scores, pred.labels))
        return boxes

    def estimate(self, images: list[np.ndarray]) -> list[WholeBody]:
        import torch

        samples = []
        for image, people in zip(images, self.person_boxes(images), strict=True):
            height, width = image.shape[:2]
            box = people[:1] if len(people) else np.array([[0, 0, width, height]], dtype=np.float32)
            info = {
                "img": image,
                "bbox": box.astype(np.float32),
                "bbox_score": np.ones(1, np.float32),
            }
            info.update(self._pose.dataset_meta)
            samples.append(self._pose_pipeline(info))
        with torch.no_grad():
            results = self._pose.test_step(self._collate(samples))
        out = []
        for result in results:
            pred = result.pred_instances
            keypoints = pred.get("transformed_keypoints", pred.keypoints)
            out.append(
                (
                    np.asarray(keypoints[0], dtype=np.float64),
                    np.asarray(pred.keypoint_scores[0], np.float64),
                )
            )
        return out
