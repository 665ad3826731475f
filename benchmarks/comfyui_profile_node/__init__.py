"""Benchmark-only ComfyUI node: where the time of a sampling goes, inside the ComfyUI server.

Loaded only by `benchmarks.comfyui_pipeline --profile`, through a symlink in that run's
custom_nodes folder; not part of the package. "SteadyDancer Bench Profile" passes its MODEL
on with ComfyUI's own wrappers installed (the seams ComfyUI's caches and patches use):

- OUTER_SAMPLE: the whole sampling, its wall time;
- PREDICT_NOISE > CALC_COND_BATCH > APPLY_MODEL > DIFFUSION_MODEL: each level of one model
  call, timed with the GPU synchronised before and after, so what each level adds around the
  next one is a difference of sums;
- at DiT call number `profile_call` (1 = the first), after the call itself, three extra runs
  of the DiT on that call's own arguments: one under torch.profiler (its operators), one
  timed again (same inputs: is the call's time repeatable here?), one timed on random
  tensors of the same shapes and dtypes (do this call's inputs make it slower than a
  benchmark's random ones?). The extras' time is taken out of every level and of the
  sampling, so the levels stay what the sampler alone spent.
- with `profile_as_run`, call `profile_call` itself runs under torch.profiler instead (its
  one-time work is what is asked about, e.g. the first call's), followed by the timed and
  random-input reruns; that call's level times then include the profiler's overhead.

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


class _State:
    """What the wrappers of one sampling share."""

    def __init__(self, profile_call: int, top: int, profile_as_run: bool = False) -> None:
        self.profile_call = profile_call
        self.profile_as_run = profile_as_run
        self.top = top
        self.levels: dict[str, list[float]] = {name: [] for name, _ in LEVELS}
        self.extras_s = 0.0  # time spent in the extra runs, taken out of every level
        self.extras: dict = {}

    def clear(self) -> None:
        for seconds in self.levels.values():
            seconds.clear()
        self.extras_s = 0.0
        self.extras = {}


def _timed(state: _State, executor, args, kwargs) -> tuple[object, float]:
    _sync()
    extras_before = state.extras_s
    start = time.perf_counter()
    out = executor(*args, **kwargs)
    _sync()
    return out, time.perf_counter() - start - (state.extras_s - extras_before)


def _timer(state: _State, name: str):
    def wrapper(executor, *args, **kwargs):
        chosen = name == "diffusion_model" and len(state.levels[name]) + 1 == state.profile_call
        as_run = chosen and state.profile_as_run
        run = (lambda *a, **k: _profiled(executor, a, k)) if as_run else executor
        result, seconds = _timed(state, run, args, kwargs)
        out, rows = result if as_run else (result, None)
        state.levels[name].append(seconds)
        if chosen:
            _extras(state, executor, args, kwargs, (rows, seconds) if as_run else None)
        return out

    return wrapper


def _randomised(value: object, generator: torch.Generator) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim > 1:
        noise = torch.randn(value.shape, generator=generator, device="cpu", dtype=torch.float32)
        return noise.to(device=value.device, dtype=value.dtype)
    return value


def operator_rows(prof: torch.profiler.profile) -> list[dict]:
    """Each operator of a finished torch.profiler run: calls and self time on the device and
    the host, longest first (`benchmarks.comfyui_forward` reads its profiles with this too)."""
    rows = []
    for event in prof.key_averages():
        device = getattr(event, "self_device_time_total", None)
        if device is None:
            device = getattr(event, "self_cuda_time_total", 0)
        rows.append({"op": event.key, "calls": event.count, "device_s": device / 1e6,
                     "cpu_s": event.self_cpu_time_total / 1e6})  # fmt: skip
    rows.sort(key=lambda r: -max(r["device_s"], r["cpu_s"]))
    return rows


def attention_probe(config: object, x: torch.Tensor) -> dict:
    """One bare SDPA of the self-attention shape of a DiT call on latent `x` ([B, C, F, H, W],
    with SteadyDancer's two reference frames): which kernel PyTorch picks and its time.
    The profiled call runs it in the server; `benchmarks.comfyui_forward` in its own process."""
    tokens = (x.shape[2] + 2) * (x.shape[3] // config.patch[1]) * (x.shape[4] // config.patch[2])
    q = torch.randn(1, config.num_heads, tokens, config.head_dim, device=x.device, dtype=torch.bfloat16)
    chosen = None
    if hasattr(torch, "_fused_sdp_choice"):
        from torch.nn.attention import SDPBackend

        chosen = SDPBackend(torch._fused_sdp_choice(q, q, q)).name
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    _sync()
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    _sync()
    return {"tokens": tokens, "sdpa_backend": chosen, "sdpa_s": time.perf_counter() - start}


def _profiled(executor, args, kwargs) -> tuple[object, list[dict]]:
    """One run of the DiT call under torch.profiler: its result and its operators."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        out = executor(*args, **kwargs)
        _sync()
    return out, operator_rows(prof)


def _extras(state: _State, executor, args, kwargs, as_run: tuple[list[dict], float] | None = None) -> None:
    """The profiled (unless the call itself was: `as_run`), repeated and random-input runs of
    this DiT call (see the module doc)."""
    _sync()
    start = time.perf_counter()
    if as_run is None:
        _, rows = _profiled(executor, args, kwargs)
        profiled_s = time.perf_counter() - start
    else:
        rows, profiled_s = as_run
    _, repeat_s = _timed(state, executor, args, kwargs)
    generator = torch.Generator().manual_seed(0)
    random_args = [_randomised(a, generator) for a in args]
    random_kwargs = {k: _randomised(v, generator) for k, v in kwargs.items()}
    _, random_s = _timed(state, executor, random_args, random_kwargs)
    named = {**dict(zip(("x", "timestep"), args, strict=False)), **kwargs}
    shapes = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in named.items() if isinstance(v, torch.Tensor)}
    dit = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
    probe = attention_probe(dit.config, args[0]) if hasattr(dit, "config") else {}
    state.extras = {
        "call": state.profile_call,
        "profiled_as_run": as_run is not None,
        "attention_probe": probe,
        "call_s": state.levels["diffusion_model"][-1],
        "repeat_s": repeat_s,
        "random_inputs_s": random_s,
        "profiled_wall_s": profiled_s,
        "device_busy_s": sum(r["device_s"] for r in rows),
        "host_busy_s": sum(r["cpu_s"] for r in rows),
        "inputs": shapes,
        "operators": rows[: state.top],
    }
    _sync()
    state.extras_s += time.perf_counter() - start


def _outer(state: _State, report: dict, path: Path):
    def wrapper(executor, *args, **kwargs):
        state.clear()
        out, seconds = _timed(state, executor, args, kwargs)
        report["sampling_s"] = seconds
        report["extras_s"] = state.extras_s
        report["levels"] = {name: {"calls": len(s), "total_s": sum(s), "each_s": list(s)}
                            for name, s in state.levels.items()}  # fmt: skip
        report["profiled_call"] = state.extras or None
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
                # the DiT call (1 = the first) to profile and rerun; 0: none
                "profile_call": ("INT", {"default": 2, "min": 0, "max": 10000}),
                "top": ("INT", {"default": 30, "min": 1, "max": 1000}),
            },
            # profile call `profile_call` itself, not a rerun of it (its one-time work included)
            "optional": {"profile_as_run": ("BOOLEAN", {"default": False})},
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "SteadyDancer/benchmark"

    def patch(self, model, path: str, profile_call: int, top: int, profile_as_run: bool = False):
        model = model.clone()
        state = _State(profile_call, top, profile_as_run)
        for name, kind in LEVELS:
            model.add_wrapper_with_key(kind, KEY, _timer(state, name))
        report: dict = {}
        model.add_wrapper_with_key(extension.WrappersMP.OUTER_SAMPLE, KEY, _outer(state, report, Path(path)))
        return (model,)


NODE_CLASS_MAPPINGS = {"SteadyDancerBenchProfile": SteadyDancerBenchProfile}
