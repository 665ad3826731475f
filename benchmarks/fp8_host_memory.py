"""Host memory of loading a scaled-fp8 SteadyDancer through ComfyUI's loader node.

    COMFYUI_DIR=... $COMFYUI_PYTHON -m benchmarks.fp8_host_memory [--models DIR] [--scale 14b]
        [--dynamic-vram] [--expanded]

Runs "Load SteadyDancer Model" inside ComfyUI (on the CPU) on the DiT as Kijai's
`*_fp8_e4m3fn_scaled` safetensors (written once into --models by `benchmarks.random_models`,
tensor by tensor: 16.4 GB at 14B), then ComfyUI's model management loading it, then reads
every page of every weight once (as moving the model to a GPU does; on the CPU the
memory-mapped file is otherwise never read), and prints the peak resident memory of the
process above what it held before (file pages it mapped count), against the file size.
Weights stay fp8 (`Fp8Tensor`); `--expanded` loads them the old way, as bf16 (about 2x the
file on top of it: it needs more than 48 GB of RAM at 14B). `--dynamic-vram` imports
ComfyUI as 0.3x starts on an NVIDIA GPU (comfy-aimdo, its memory-mapped reader).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import GIB, PAGE, PeakRSS  # noqa: E402
from scripts.comfyui_inprocess import import_comfyui, load_package  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "out" / "fp8-models")
    parser.add_argument("--scale", choices=("14b", "tiny"), default="14b")
    parser.add_argument("--dynamic-vram", action="store_true")
    parser.add_argument("--expanded", action="store_true", help="the old way: fp8 weights become bf16 at load")
    args = parser.parse_args(argv)

    from benchmarks.random_models import dit_config, file_names, write_dit_fp8, write_file

    folder = args.models / "diffusion_models"
    name = file_names(args.scale)["fp8"]
    path = folder / name
    if not path.is_file():
        write_file(path, lambda part: write_dit_fp8(part, dit_config(args.scale)))
    size = path.stat().st_size

    why_not = import_comfyui(dynamic_vram=args.dynamic_vram)
    if why_not:
        print(f"dynamic VRAM not possible here: {why_not}", file=sys.stderr)
        return 2
    load_package()
    import comfy.model_management
    import folder_paths
    import torch
    from comfyui_steadydancer.nodes import model_loader

    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    if args.expanded:
        read = model_loader.from_safetensors
        model_loader.from_safetensors = lambda *a, **k: read(*a, **{**k, "keep_fp8": False})
    with PeakRSS() as load:
        patcher = model_loader.SteadyDancerModelLoader.execute(name, "default", "auto").result[0]
    with PeakRSS() as manage:
        comfy.model_management.load_models_gpu([patcher])
    weights = patcher.model.diffusion_model.state_dict().values()
    with PeakRSS() as read:  # what moving the model to a GPU reads: every page of every weight
        for tensor in weights:
            raw = tensor.as_subclass(torch.Tensor).detach().reshape(-1).view(torch.uint8)
            raw[::PAGE].sum()
    stored = sum(t.numel() * t.element_size() for t in weights)
    peak = max(load.peak, manage.peak, read.peak) - load.start

    mode = "expanded to bf16 (old)" if args.expanded else "kept fp8"
    vram = "dynamic VRAM" if args.dynamic_vram else "classic"
    print(f"{name}: {size / 1e9:.2f} GB file, ComfyUI {vram}, weights {mode}")
    print(f"  model in memory        {stored / 1e9:8.2f} GB  ({stored / size:.2f}x the file)")
    print(f"  loader node            {load.seconds:8.1f} s   peak RSS above start {(load.peak - load.start) / GIB:.2f} GiB")
    print(f"  model management load  {manage.seconds:8.1f} s   peak RSS above start {(manage.peak - load.start) / GIB:.2f} GiB")
    print(f"  every weight read once {read.seconds:8.1f} s   peak RSS above start {(read.peak - load.start) / GIB:.2f} GiB")
    print(f"  peak host memory       {peak / 1e9:8.2f} GB  = {peak / size:.2f}x the file (target < 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
