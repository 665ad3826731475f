"""Small torch networks with the real DWPose ONNX signatures, exported for the onnx backend tests.

- ConstantDetector: [N, 3, 640, 640] -> [N, 8400, 85] like yolox_l.onnx (raw box, sigmoid
  objectness, sigmoid class scores), with chosen boxes (letterbox pixels) and scores.
- ProfilePoseNet: [N, 3, 384, 288] -> simcc_x [N, 133, 576], simcc_y [N, 133, 768] whose
  peaks are at the brightest column / row of the crop, so keypoints land on a bright cross
  drawn in the frame (exactly mirror-equivariant, so the flip test changes nothing).
- RandomDetector / RandomPoseNet: randomly initialised convolutional nets with the same
  signatures, for structure checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

STRIDES = (8, 16, 32)


def anchor_index(cx: float, cy: float, stride: int = 32) -> tuple[int, int, int]:
    """(flat anchor index, grid x, grid y) of the stride-`stride` cell containing (cx, cy)."""
    offset = sum((640 // s) ** 2 for s in STRIDES if s < stride)
    gx, gy = int(cx // stride), int(cy // stride)
    return offset + gy * (640 // stride) + gx, gx, gy


class ConstantDetector(nn.Module):
    """Emits the given boxes [(x1, y1, x2, y2, class, score)] in letterbox pixels."""

    def __init__(self, boxes: list[tuple[float, float, float, float, int, float]]) -> None:
        super().__init__()
        table = torch.zeros(8400, 85)
        table[:, 2:4] = math.log(1.0 / 32)  # tiny boxes elsewhere, zero scores
        for x1, y1, x2, y2, cls, score in boxes:
            cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            k, gx, gy = anchor_index(cx, cy)
            table[k, 0], table[k, 1] = cx / 32 - gx, cy / 32 - gy
            table[k, 2], table[k, 3] = math.log(w / 32), math.log(h / 32)
            table[k, 4] = 1.0
            table[k, 5 + cls] = score
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.expand(x.shape[0], -1, -1) + 0.0 * x.mean()


class ProfilePoseNet(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        intensity = x.sum(dim=1)  # [N, 384, 288]
        cols = intensity.mean(dim=1).repeat_interleave(2, dim=-1)  # [N, 576]
        rows = intensity.mean(dim=2).repeat_interleave(2, dim=-1)  # [N, 768]
        return cols[:, None].expand(-1, 133, -1), rows[:, None].expand(-1, 133, -1)


class RandomDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.down = nn.ModuleList(
            [nn.Identity(), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)]
        )
        self.head = nn.Conv2d(8, 85, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, f = [], torch.relu(self.stem(x / 255.0))
        for down in self.down:
            f = down(f)
            feats.append(self.head(f).flatten(2).transpose(1, 2))
        out = torch.cat(feats, dim=1)
        return torch.cat([out[..., :4], out[..., 4:].sigmoid()], dim=-1)


class RandomPoseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.SiLU(), nn.AdaptiveAvgPool2d((4, 3)))
        self.x = nn.Linear(96, 133 * 576)
        self.y = nn.Linear(96, 133 * 768)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).flatten(1)
        return self.x(f).view(-1, 133, 576), self.y(f).view(-1, 133, 768)


def export(module: nn.Module, path: Path, kind: str, *, dynamic_batch: bool = True) -> Path:
    """Export to ONNX with the public files' input/output names."""
    module.eval()
    torch.manual_seed(0)
    if kind == "detector":
        args, inputs, outputs = (torch.zeros(1, 3, 640, 640),), ["images"], ["output"]
    else:
        args, inputs, outputs = (torch.zeros(1, 3, 384, 288),), ["input"], ["simcc_x", "simcc_y"]
    axes = {name: {0: "batch"} for name in inputs + outputs} if dynamic_batch else None
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes,
        dynamo=False,
    )
    return path


def cross_frame(height: int, width: int, x: int, y: int) -> np.ndarray:
    """Black RGB frame with white lines 3 px wide centred on column x and row y.

    3 px: after the bilinear crop at least one crop column/row is fully white, so the
    profile maxima are strongly positive wherever the lines fall.
    """
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[:, max(x - 1, 0) : x + 2] = 255
    frame[max(y - 1, 0) : y + 2, :] = 255
    return frame
