"""Pick ComfyUI's device flags for this container and say why.

Prints the flags to add to ComfyUI's command line, one per line (none, `--lowvram` or
`--cpu`), and logs the reason on stderr, so that a container that silently runs on the CPU
or in low-VRAM mode is never a mystery.

usage: python gpu_check.py [-- USER_COMFYUI_ARGS...]
Environment: STEADYDANCER_DEVICE = auto (default) | cpu | lowvram | normal;
STEADYDANCER_LOWVRAM_BELOW_GB (default 20): VRAM below which --lowvram is added.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# ComfyUI arguments that already choose the device or the VRAM mode.
DEVICE_ARGS = frozenset(
    {"--cpu", "--lowvram", "--novram", "--normalvram", "--highvram", "--gpu-only", "--directml"}
)
DEVICE_MODES = ("auto", "cpu", "lowvram", "normal")
GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    total_bytes: int


_HINT = (
    "start the container with `--gpus all` (or the compose file's GPU reservation) on a host "
    "with the NVIDIA container toolkit and a driver new enough for this torch build"
)


def _cuda_init_error(torch) -> str:  # torch: the module
    """Why CUDA is unavailable, in torch's words (no driver, driver too old, no device)."""
    try:
        torch.cuda.init()
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "torch sees no device"


def probe_gpus() -> tuple[list[GPU], str | None]:
    """The CUDA devices torch sees, or ([], why none) when there is none."""
    try:
        import torch
    except Exception as exc:  # a broken torch install must not stop the container
        return [], f"torch could not be imported ({exc})"
    if torch.version.cuda is None:
        return [], f"torch {torch.__version__} is a CPU build"
    try:
        if not torch.cuda.is_available():
            return [], f"no usable CUDA GPU ({_cuda_init_error(torch)}); {_HINT}"
        gpus = [
            GPU(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())
        ]
    except Exception as exc:  # e.g. a driver older than torch's CUDA build
        return [], f"CUDA initialisation failed ({exc})"
    return gpus, None


def choose_flags(
    user_args: list[str],
    mode: str,
    gpus: list[GPU],
    no_gpu_reason: str | None,
    lowvram_below_gb: float,
) -> tuple[list[str], str]:
    """(flags to add, reason). `gpus` are the visible devices; ComfyUI uses the first."""
    chosen = sorted(DEVICE_ARGS.intersection(user_args))
    if chosen:
        return [], f"COMFYUI_ARGS already choose the device mode ({' '.join(chosen)})"
    if mode not in DEVICE_MODES:
        raise ValueError(f"STEADYDANCER_DEVICE={mode!r}: use one of {', '.join(DEVICE_MODES)}")
    if mode == "cpu":
        return ["--cpu"], "STEADYDANCER_DEVICE=cpu"
    if not gpus:
        return ["--cpu"], f"running on the CPU (very slow): {no_gpu_reason or 'no GPU found'}"
    gpu = gpus[0]
    vram = gpu.total_bytes / GIB
    if mode == "lowvram":
        return ["--lowvram"], f"STEADYDANCER_DEVICE=lowvram ({gpu.name}, {vram:.1f} GiB)"
    if mode == "auto" and vram < lowvram_below_gb:
        return ["--lowvram"], (
            f"{gpu.name} has {vram:.1f} GiB, below STEADYDANCER_LOWVRAM_BELOW_GB="
            f"{lowvram_below_gb:g}: weights are streamed from system memory (--lowvram)"
        )
    return [], f"GPU {gpu.name} with {vram:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    mode = os.environ.get("STEADYDANCER_DEVICE", "auto").strip().lower() or "auto"
    try:
        threshold = float(os.environ.get("STEADYDANCER_LOWVRAM_BELOW_GB", "20"))
    except ValueError:
        print("[gpu_check] STEADYDANCER_LOWVRAM_BELOW_GB is not a number", file=sys.stderr)
        return 2
    gpus, why = ([], None) if mode == "cpu" else probe_gpus()
    try:
        flags, reason = choose_flags(args, mode, gpus, why, threshold)
    except ValueError as exc:
        print(f"[gpu_check] {exc}", file=sys.stderr)
        return 2
    print(f"[gpu_check] {reason}" + (f" -> {' '.join(flags)}" if flags else ""), file=sys.stderr)
    for flag in flags:
        print(flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
