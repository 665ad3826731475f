"""ComfyUI imported into this process, and this package loaded the way ComfyUI loads it.

For the checks and benchmarks that need ComfyUI's modules in-process (model management,
samplers, folder_paths): run them with ComfyUI's Python, COMFYUI_DIR pointing at ComfyUI.

    import_comfyui()                      # as main.py on the CPU (--cpu)
    import_comfyui(dynamic_vram=True)     # plus dynamic VRAM, as main.py turns it on for NVIDIA
    package = load_package()              # `comfyui_steadydancer`, from this checkout
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_steadydancer"


def import_comfyui(
    dynamic_vram: bool = False,
    comfyui_dir: str | os.PathLike[str] | None = None,
    gpu: bool = False,
    args: tuple[str, ...] = (),
) -> str | None:
    """Import ComfyUI as its main.py would, on the CPU; None, or why dynamic VRAM is not possible.

    `gpu`: on the GPU instead (no `--cpu`), with the CUDA allocator main.py picks
    (`cuda_malloc`: cudaMallocAsync where supported). `args`: more of ComfyUI's flags.

    `dynamic_vram`: what main.py does on an NVIDIA GPU with ComfyUI 0.3x: comfy-aimdo
    initialised before ComfyUI's modules are imported, `aimdo_enabled` (lazily built layers,
    ComfyUI's memory-mapped safetensors reader) and ModelPatcherDynamic as the core patcher.
    On a CPU that patcher hands over to the classic one, as ComfyUI does for CPU devices.
    """
    sys.path.insert(0, str(comfyui_dir or os.environ["COMFYUI_DIR"]))
    sys.argv = [sys.argv[0], *(() if gpu else ("--cpu",)), *args]
    if dynamic_vram:
        try:
            import comfy_aimdo.control
        except ImportError:
            return "this ComfyUI has no dynamic VRAM (comfy-aimdo is not installed)"
        comfy_aimdo.control.init()  # main.py does this before ComfyUI's modules are imported
    import comfy.options

    comfy.options.enable_args_parsing()
    if gpu:
        import cuda_malloc  # noqa: F401  (sets PYTORCH_CUDA_ALLOC_CONF before torch is imported)
    import comfy.cli_args
    import comfy.model_patcher

    import nodes  # noqa: F401  (ComfyUI's node module, as custom nodes see it)

    if dynamic_vram:
        if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
            return "this ComfyUI has no ModelPatcherDynamic"
        import comfy.memory_management

        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return None


def load_package() -> ModuleType:
    """Import the repository root as the package `comfyui_steadydancer` (as ComfyUI and pip do).

    The nodes use relative imports (`from ..steadydancer import ...`), so they are only
    importable through the package; this registers it without installing anything. One copy
    per process: every later import of `comfyui_steadydancer.*` gets the same classes.
    """
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
