"""Benchmark-only ComfyUI node: where the time of a sampling goes, inside the ComfyUI server.

Loaded only by `benchmarks.comfyui_pipeline --profile`, through a symlink in that run's
custom_nodes folder; not part of the package. "SteadyDancer Bench Profile" passes its MODEL
on with ComfyUI's own wrappers installed (the seams ComfyUI's caches and patches use):

- OUTER_SAMPLE: the whole sampling, its wall time, and (optionally) under torch.profiler;
- PREDICT_NOISE > CALC_COND_BATCH > APPLY_MODEL > DIFFUSION_MODEL: each level of one model
  call, timed with the GPU synchronised before and after, so what each level adds around the
  next one is a difference of sums.

The report (JSON) is written to the node's `path` when the sampling ends.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import comfy.patcher_extension as extension
import torch

LEVELS = (
    ("predict_noise", extension.WrappersMP.PREDICT_NOISE),
    ("calc_cond_batch", extension.WrappersMP.CALC_COND_BATCH),
    ("apply_model", extension.WrappersMP.APPLY_MODEL),
    ("diffusion_model", extension.WrappersMP.DIFFUSION_MODEL),
)
KEY = "steadydancer_bench_profile"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timer(seconds: list[float]):
    def wrapper(executor, *args, **kwargs):
        _sync()
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        _sync()
        seconds.append(time.perf_counter() - start)
        return out

    return wrapper


def _outer(report: dict, levels: dict[str, list[float]], path: Path, profile: bool, top: int):
    def wrapper(executor, *args, **kwargs):
        for seconds in levels.values():
            seconds.clear()
        _sync()
        start = time.perf_counter()
        if profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                out = executor(*args, **kwargs)
                _sync()
        else:
            out = executor(*args, **kwargs)
            _sync()
        report["sampling_s"] = time.perf_counter() - start
        report["levels"] = {name: {"calls": len(s), "total_s": sum(s), "each_s": s} for name, s in levels.items()}
        if profile:
            rows = []
            for event in prof.key_averages():
                device = getattr(event, "self_device_time_total", None)
                if device is None:
                    device = getattr(event, "self_cuda_time_total", 0)
                rows.append({"op": event.key, "calls": event.count, "device_s": device / 1e6,
                             "cpu_s": event.self_cpu_time_total / 1e6})  # fmt: skip
            rows.sort(key=lambda r: -max(r["device_s"], r["cpu_s"]))
            report["operators"] = rows[:top]
            report["device_busy_s"] = sum(r["device_s"] for r in rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        return out

    return wrapper


class SteadyDancerBenchProfile:
    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL",),
                "path": ("STRING", {"default": "profile.json"}),
                "torch_profiler": ("BOOLEAN", {"default": True}),
                "top": ("INT", {"default": 30, "min": 1, "max": 1000}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "SteadyDancer/benchmark"

    def patch(self, model, path: str, torch_profiler: bool, top: int):
        model = model.clone()
        levels: dict[str, list[float]] = {name: [] for name, _ in LEVELS}
        for name, kind in LEVELS:
            model.add_wrapper_with_key(kind, KEY, _timer(levels[name]))
        report: dict = {}
        model.add_wrapper_with_key(
            extension.WrappersMP.OUTER_SAMPLE, KEY, _outer(report, levels, Path(path), torch_profiler, top)
        )
        return (model,)


NODE_CLASS_MAPPINGS = {"SteadyDancerBenchProfile": SteadyDancerBenchProfile}
