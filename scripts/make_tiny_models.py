"""Build the embedded demo: tiny random-weight models in the real file formats, and inputs.

Run it with ComfyUI's Python from the repository root (it imports ComfyUI's own model
classes so that every file is exactly what ComfyUI's loaders read):

    $COMFYUI_PYTHON scripts/make_tiny_models.py --comfyui $COMFYUI_DIR --out tiny_models

It writes, under OUT (ComfyUI's folder layout, usable as an extra_model_paths base):
- diffusion_models/steadydancer_tiny_Q8_0.gguf: a SteadyDancer DiT with every tensor of the
  real model at tiny width, converted by `python -m steadydancer.gguf.convert`; its text and
  CLIP widths match the two encoders below;
- text_encoders/tiny_sd1_clip_l.safetensors: an SD1.x CLIP-L text encoder (CLIPLoader type
  stable_diffusion; 768-wide hidden states) with random weights;
- clip_vision/tiny_clip_vit_l14.safetensors: a CLIP ViT-L/14 vision model (257 x 1024
  penultimate states) with random weights;
- vae/wan_2.1_vae_random.safetensors: ComfyUI's Wan 2.1 VAE at its real size, random weights;
- dwpose/yolox_l.onnx, dwpose/dw-ll_ucoco_384.onnx: ONNX stand-ins with the real models'
  inputs and outputs that always find one person in a fixed pose;
- input/steadydancer_reference.png and input/steadydancer_driving.mp4: a synthetic reference
  image and driving video.
`--graph FILE` also writes workflows/api/steadydancer_api.json rewritten to use these files at a
tiny size (what `scripts/setup.sh`, the integration tests and the container test submit).
Random weights produce noise, not a dance: this proves the plumbing, not the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

TEXT_ENCODER = "tiny_sd1_clip_l.safetensors"
CLIP_VISION = "tiny_clip_vit_l14.safetensors"
VAE = "wan_2.1_vae_random.safetensors"
DIT = "steadydancer_tiny_Q8_0.gguf"
REFERENCE = "steadydancer_reference.png"
DRIVING = "steadydancer_driving.mp4"
TEXT_DIM = 768  # SD1 CLIP-L hidden size
CLIP_DIM = 1024  # ViT-L/14 hidden size

# Tiny generation settings of the demo graph: 2 latent frames of 4x4 tokens, 2 steps.
DEMO = {"width": 64, "height": 64, "length": 5, "steps": 2, "driving_frames": 7, "fps": 8}


EMBEDDING_STD = 0.14  # token/position embeddings: rows of unit-ish norm, as trained ones


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """An initialised-looking random float32 tensor on the generator's device: norms 1,
    biases 0, matrices ~ N(0, 1/fan_in), so that activations stay finite through
    real-depth models (24 ViT or T5 blocks, 40 DiT blocks, the VAE)."""
    import torch

    lower = name.lower()
    device = gen.device
    if any(k in lower for k in ("norm", "gamma", "ln_", "layrnorm")) and (lower.endswith("weight") or "gamma" in lower):
        return torch.ones(shape, device=device)
    if lower.endswith("bias") or len(shape) <= 1:
        return torch.zeros(shape, device=device)
    if "embedding" in lower:
        return torch.randn(shape, generator=gen, device=device) * EMBEDDING_STD
    return torch.randn(shape, generator=gen, device=device) / float(np.sqrt(max(int(np.prod(shape[1:])), 1)))


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: str) -> dict[str, torch.Tensor]:
    """`init_tensor` for every name, in `dtype`, on the CPU."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {name: init_tensor(name, shape, gen).to(getattr(torch, dtype)).contiguous() for name, shape in shapes.items()}


def use_comfyui(comfyui: Path) -> None:
    """Make ComfyUI importable, on the CPU: building the models needs no accelerator."""
    sys.path[:0] = [str(comfyui.resolve()), str(REPO_ROOT)]
    from comfy.cli_args import args

    args.cpu = True


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def write_text_encoder(path: Path) -> None:
    """SD1.x CLIP-L text model, HF key layout (what CLIPLoader detects as CLIP-L)."""
    import comfy.sd1_clip
    from safetensors.torch import save_file

    model = comfy.sd1_clip.SDClipModel(device="cpu")
    save_file(random_weights(_shapes(model.transformer), 1, "float16"), str(path))


def write_clip_vision(path: Path) -> None:
    """CLIP ViT-L/14 vision model with projection, HF key layout (CLIPVisionLoader)."""
    import comfy.clip_vision
    from safetensors.torch import save_file

    config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json"
    model = comfy.clip_vision.ClipVisionModel(str(config))
    save_file(random_weights(_shapes(model.model), 2, "float16"), str(path))


def write_wan_vae(path: Path) -> None:
    """ComfyUI's Wan 2.1 VAE (dim 96, z 16) at its real size: the VAELoader detects it by keys."""
    import comfy.ldm.wan.vae
    from safetensors.torch import save_file

    model = comfy.ldm.wan.vae.WanVAE(
        dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True]
    )
    save_file(random_weights(_shapes(model), 3, "bfloat16"), str(path))


def write_dit(path: Path, work: Path) -> None:
    """Tiny SteadyDancer DiT (1 head of 128, 2 blocks) as safetensors, then the GGUF converter."""
    from safetensors.numpy import save_file

    from steadydancer.keys import TinyConfig, tiny_state_dict

    config = TinyConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=TEXT_DIM, clip_dim=CLIP_DIM)
    source = work / "steadydancer_tiny.safetensors"
    save_file(tiny_state_dict(config, seed=4), str(source))
    subprocess.run(
        [sys.executable, "-m", "steadydancer.gguf.convert", str(source), str(path), "--type", "Q8_0", "--overwrite", "--quiet"],
        cwd=REPO_ROOT,
        check=True,
    )
    source.unlink()


# A standing, left-right symmetric person in DWPose's 288x384 crop (COCO-WholeBody order):
# the pose model's flip test then averages two identical heat vectors.
_BODY = [(144, 60), (152, 52), (136, 52), (162, 58), (126, 58), (184, 110), (104, 110), (200, 170), (88, 170),
         (206, 225), (82, 225), (166, 220), (122, 220), (168, 290), (120, 290), (170, 355), (118, 355)]  # fmt: skip
_FEET = [(176, 372), (184, 370), (166, 360), (112, 372), (104, 370), (122, 360)]


def _wholebody_points() -> np.ndarray:
    """133 keypoints [x, y] in crop pixels: body, feet, face (at the nose), hands at the wrists.

    Drawn 0.7x about the crop's centre: the crop is the whole frame padded by 1.25, so the
    person then lies inside the frame.
    """
    left_hand = [(206 + (f - 2) * 4, 225 + j * 5) for f in range(5) for j in range(1, 5)]
    hands = [(206, 225), *left_hand, (82, 225), *[(288 - x, y) for x, y in left_hand]]
    points = np.array(_BODY + _FEET + [_BODY[0]] * 68 + hands, dtype=np.float32)
    centre = np.array([144.0, 192.0], dtype=np.float32)
    return centre + (points - centre) * 0.7


def _heat(centres: np.ndarray, bins: int, sigma: float = 2.0) -> np.ndarray:
    """SimCC vectors [1, K, bins]: a Gaussian of height 1 at each centre (in bins)."""
    grid = np.arange(bins, dtype=np.float32)
    return np.exp(-((grid[None, :] - centres[:, None]) ** 2) / (2 * sigma**2))[None].astype(np.float32)


def _constant_model(input_shape: list, outputs: dict[str, np.ndarray | tuple[int, ...]], path: Path) -> None:
    """An ONNX model whose outputs ignore the image: constant + 0 * mean(input), batch-sized.

    `outputs` maps a name to a constant [1, ...] array, or to a shape to fill with zeros.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1, axes=[1, 2, 3]),
        helper.make_node("Reshape", ["mean", "batch_shape"], ["per_item"]),
        helper.make_node("Mul", ["per_item", "zero"], ["nothing"]),
    ]
    inits = [numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "batch_shape"), numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        if isinstance(value, tuple):  # zeros of this shape: expand instead of storing them
            inits.append(numpy_helper.from_array(np.array(value, np.int64), f"{name}_shape"))
            nodes.append(helper.make_node("Expand", ["nothing", f"{name}_shape"], [name]))
            dims = ["N", *value[1:]]
        else:
            inits.append(numpy_helper.from_array(value, f"{name}_value"))
            nodes.append(helper.make_node("Add", ["nothing", f"{name}_value"], [name]))
            dims = ["N", *value.shape[1:]]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)], graph_outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_pose_standins(folder: Path) -> None:
    """ONNX stand-ins for yolox_l.onnx and dw-ll_ucoco_384.onnx with the real inputs/outputs.

    The detector finds no box (so the whole frame is the person's box); the pose model always
    reports the same standing person, confidently. Needs the `onnx` package.
    """
    _constant_model(["N", 3, 640, 640], {"output": (1, 8400, 85)}, folder / "yolox_l.onnx")
    points = _wholebody_points() * 2.0  # SimCC split ratio 2
    outputs = {"simcc_x": _heat(points[:, 0], 576), "simcc_y": _heat(points[:, 1], 768)}
    _constant_model(["N", 3, 384, 288], outputs, folder / "dw-ll_ucoco_384.onnx")


def write_inputs(
    folder: Path, width: int = 96, height: int = 96, frames: int = DEMO["driving_frames"], fps: int = DEMO["fps"]
) -> None:
    """A reference image and a driving video of `frames` frames (a moving figure on a plain background)."""
    import av
    import cv2

    def at(x: float, y: float) -> tuple[int, int]:  # drawn on a 96x96 canvas, scaled to the size
        return round(x * width / 96), round(y * height / 96)

    thick = max(1, round(min(width, height) / 24))
    frame = np.full((height, width, 3), 200, np.uint8)
    cv2.circle(frame, at(48, 20), max(1, round(9 * min(width, height) / 96)), (230, 180, 150), -1)
    cv2.rectangle(frame, at(38, 30), at(58, 62), (40, 60, 160), -1)
    cv2.imwrite(str(folder / REFERENCE), frame[..., ::-1])
    with av.open(str(folder / DRIVING), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 30, np.uint8)
            cv2.line(image, at(48, 30), at(20 + 8 * (i % 8), 70), (255, 255, 255), thick)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


DEMO_FILES = {  # what demo_graph puts into the loaders by default: the tiny models
    "dit": DIT, "text_encoder": TEXT_ENCODER, "text_encoder_type": "stable_diffusion", "clip_vision": CLIP_VISION,
    "vae": VAE, "reference": REFERENCE, "driving": DRIVING,
}  # fmt: skip


def demo_graph(
    api_workflow: dict, *, prefix: str = "steadydancer/demo", files: dict | None = None, settings: dict | None = None,
    detect_resolution: int = 128,
) -> dict:
    """The example API graph with other files and sizes (same nodes, same links): by default
    the tiny models at the demo's tiny size; `files` and `settings` override DEMO_FILES and DEMO."""
    files = {**DEMO_FILES, **(files or {})}
    settings = {**DEMO, **(settings or {})}
    graph = json.loads(json.dumps(api_workflow))
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPLoader":
            inputs.update(clip_name=files["text_encoder"], type=files["text_encoder_type"])
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = files["clip_vision"]
        elif kind == "VAELoader":
            inputs["vae_name"] = files["vae"]
        elif kind == "SteadyDancerModelLoader":
            inputs["model_name"] = files["dit"]
        elif kind == "LoadImage":
            inputs["image"] = files["reference"]
        elif kind == "LoadVideo":
            inputs["file"] = files["driving"]
        elif kind in ("SteadyDancerImageToVideo", "SteadyDancerPoseAlign", "SteadyDancerGenerationSize"):
            # the literal sizes (the auto-size node's width/height force the size); links stay links
            inputs.update({k: settings[k] for k in ("width", "height") if k in inputs and not isinstance(inputs[k], list)})
            if "length" in inputs:
                inputs["length"] = settings["length"]
        elif kind == "BasicScheduler" or "steps" in inputs:
            inputs["steps"] = settings["steps"]
        elif kind == "SaveVideo":
            inputs["filename_prefix"] = prefix
        elif kind == "SteadyDancerPoseExtract":
            inputs["detect_resolution"] = detect_resolution
    return graph


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (its model classes are imported)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tiny_models", help="models folder to fill (default: tiny_models)")
    parser.add_argument("--input", type=Path, help="where the reference image and driving video go (default: OUT/input)")
    parser.add_argument("--graph", type=Path, help="also write the demo API graph here")
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args(argv)
    use_comfyui(args.comfyui)
    input_dir = args.input or args.out / "input"
    steps = [
        (args.out / "diffusion_models" / DIT, lambda p: write_dit(p, p.parent)),
        (args.out / "text_encoders" / TEXT_ENCODER, write_text_encoder),
        (args.out / "clip_vision" / CLIP_VISION, write_clip_vision),
        (args.out / "vae" / VAE, write_wan_vae),
        (args.out / "dwpose" / "dw-ll_ucoco_384.onnx", lambda p: write_pose_standins(p.parent)),
        (input_dir / DRIVING, lambda p: write_inputs(p.parent)),
    ]
    for path, build in steps:
        if path.is_file() and not args.force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path}", flush=True)
        build(path)
    if args.graph:
        api = json.loads((REPO_ROOT / "workflows" / "api" / "steadydancer_api.json").read_text())
        args.graph.write_text(json.dumps(demo_graph(api), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
