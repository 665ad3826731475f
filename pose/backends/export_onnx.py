"""Export the mmpose backend's networks to ONNX files the onnx backend reads.

    python -m pose.backends.export_onnx OUT_DIR [--yolox FILE.pth] [--dwpose FILE.pth]

Without checkpoints the networks keep random weights (benchmarks, tests). The detector is
written in the layout of the public yolox_l.onnx ([N, 8400, 85]: raw box offsets, sigmoid
objectness, sigmoid class scores; mmdet's YOLOX decodes its boxes the same way), the pose
model as [N, 3, 384, 288] -> simcc_x [N, 133, 576], simcc_y [N, 133, 768]. Needs the
mmpose stack and torch's TorchScript-based ONNX exporter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .files import DWPOSE_ONNX, YOLOX_ONNX


def _wrappers():
    import torch
    from torch import nn

    class YoloxOnnx(nn.Module):
        def __init__(self, detector: nn.Module) -> None:
            super().__init__()
            self.detector = detector

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cls_scores, bbox_preds, objectness = self.detector.bbox_head(
                self.detector.extract_feat(x)
            )
            levels = [
                torch.cat([box, obj.sigmoid(), cls.sigmoid()], dim=1).flatten(2)
                for cls, box, obj in zip(cls_scores, bbox_preds, objectness, strict=True)
            ]
            return torch.cat(levels, dim=2).permute(0, 2, 1)

    class DWPoseOnnx(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.model.head(self.model.extract_feat(x))

    return YoloxOnnx, DWPoseOnnx


def export_models(detector, pose_model, out_dir: str | Path) -> tuple[Path, Path]:
    """Write yolox_l.onnx and dw-ll_ucoco_384.onnx (dynamic batch) into out_dir."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    yolox_cls, dwpose_cls = _wrappers()
    det_path, pose_path = out / YOLOX_ONNX.filename, out / DWPOSE_ONNX.filename
    jobs = (
        (yolox_cls(detector), torch.zeros(1, 3, 640, 640), det_path, ["images"], ["output"]),
        (
            dwpose_cls(pose_model),
            torch.zeros(1, 3, 384, 288),
            pose_path,
            ["input"],
            ["simcc_x", "simcc_y"],
        ),
    )
    for module, example, path, inputs, outputs in jobs:
        module = module.cpu().eval()
        with torch.no_grad():
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
                opset_version=17,
                dynamo=False,
            )
    return det_path, pose_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--yolox", type=Path, help="yolox_l_8x8_300e_coco_20211126_140236-d3bd2b23.pth"
    )
    parser.add_argument("--dwpose", type=Path, help="dw-ll_ucoco_384.pth")
    args = parser.parse_args(argv)
    from .mmpose_backend import build_models, import_stack

    import_stack()
    detector, pose_model = build_models(args.yolox, args.dwpose, "cpu", flip_test=False)
    for path in export_models(detector, pose_model, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
