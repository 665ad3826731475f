"""Whole-model GPU benchmarks: one 14B forward per weight format, 16 GB mode, guidance step.

Used by `python -m benchmarks.gpu model|guidance ...`; one configuration per
process (this module imports `benchmarks.common`, never `benchmarks.gpu`). Weights are random but shaped like the published 14B checkpoint and generated on
the GPU (host generation of 16 billion values would take minutes): bf16 tensors, or for a
GGUF quant type random packed blocks with small finite fp16 scales for every 2-D weight a
GGUF converter would quantise. Timings do not depend on the values; outputs are still
checked to be finite and, for the memory-saving modes, compared with the full-VRAM output.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    GIB,
    Shapes,
    cuda_time,
    forward_flops,
    random_inputs,
    random_weight,
    shapes_for_video,
)
from steadydancer.model import SteadyDancerConfig

# the published 14B checkpoint's sizes (keys.model_shapes' arguments), from the config defaults
DIMS_14B = {
    name: getattr(SteadyDancerConfig(), name)
    for name in (
        "dim",
        "ffn_dim",
        "num_layers",
        "in_dim",
        "out_dim",
        "text_dim",
        "clip_dim",
        "freq_dim",
    )
}


# ------------------------------------------------------------------------------ weights
def random_state_dict(
    weights: str,
    *,
    seed: int = 0,
    device: str = "cuda",
    dims: dict[str, int] | None = None,
    min_elements: int = 1 << 20,
) -> dict[str, torch.Tensor]:
    """A 14B-shaped state dict of random weights made on `device`: bf16 tensors, and for a
    GGUF type packed blocks for the tensors a converter would quantise (large 2-D weights)."""
    from steadydancer.keys import model_shapes

    shapes = model_shapes(**(dims or DIMS_14B))
    g = torch.Generator(device=device).manual_seed(seed)
    quant = None if weights.lower() in ("bf16", "bfloat16") else weights.upper()
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        # bf16, scaled in place: no float32 temporaries, so each weight gets its own
        # allocator segment, as when a file is loaded (no fragmentation of our making)
        sd[name] = random_weight(
            name,
            tuple(shape),
            quant=quant,
            dtype=torch.bfloat16,
            device=device,
            generator=g,
            min_elements=min_elements,
        )
    return sd


def build_model(
    weights: str,
    *,
    attention: str = "auto",
    seed: int = 0,
    device: str = "cuda",
    dims: dict[str, int] | None = None,
    min_elements: int = 1 << 20,
) -> torch.nn.Module:
    """The 14B SteadyDancer with random weights, on the GPU, through the public loader."""
    from steadydancer.model import load_model

    sd = random_state_dict(weights, seed=seed, device=device, dims=dims, min_elements=min_elements)
    operations = None
    if weights.lower() not in ("bf16", "bfloat16"):
        from steadydancer.gguf.ops import GGMLOps

        operations = GGMLOps
    model = load_model(
        sd, device=device, dtype=torch.bfloat16, attention=attention, operations=operations
    )
    del sd
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return model.eval()


def _inputs(model: torch.nn.Module, shapes: Shapes, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random float32 forward inputs on the GPU (t = 700, as in the recorded runs)."""
    return random_inputs(model.config, shapes, "cuda", seed=seed, timestep=700.0)


def _run_and_time(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeat: int
) -> tuple[torch.Tensor, float]:
    """One untimed forward (its output, to compare with), then the median of `repeat`."""
    with torch.inference_mode():
        out = model(**inputs)
        return out, cuda_time(lambda: model(**inputs), warmup=0, repeat=repeat)


def _timed_row(
    model: torch.nn.Module, weights: str, mode: str, seconds: float, flops: float, **extra: Any
) -> dict[str, Any]:
    """A result row of a timed forward: speed, peak memory since the last reset, backend."""
    return {
        "part": "model",
        "weights": weights,
        "mode": mode,
        "seconds": seconds,
        "tflops": flops / seconds / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "attention": getattr(model.attention, "backend_used", None),
        **extra,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _weights_bytes(model: torch.nn.Module) -> int:
    from steadydancer.streaming import module_bytes

    return module_bytes(model)


# ------------------------------------------------------------------------------ runs
def run_model(
    weights: str,
    *,
    width: int = 832,
    height: int = 480,
    frames: int = 81,
    attention: str = "auto",
    backends: tuple[str, ...] = (),
    modes: tuple[tuple[str, float | None, str | int], ...] = (),
    repeat: int = 2,
    profile: bool = False,
    snapshot: bool = False,
) -> list[dict[str, Any]]:
    """Full-VRAM forward of one weight format, then each (label, cap_gib, memory) mode.

    `backends`: extra attention backends timed on the same model ("sdpa_cudnn" = SDPA held
    to its cuDNN kernel). `profile`: also time the full-VRAM forward with FFN chunking and
    record the per-module memory peaks. `modes`: the memory-saving configurations, run last
    because the process memory cap is set for them.
    """
    rows: list[dict[str, Any]] = []
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    t0 = time.time()
    model = build_model(weights, attention=attention)
    if snapshot:
        rows.extend(
            dict(r, weights=weights, when="after build") for r in persistent_allocations(model)
        )
    build_s = time.time() - t0
    shapes = shapes_for_video(width, height, frames)
    inputs = _inputs(model, shapes)
    tokens = shapes.tokens(model.config)
    flops = forward_flops(model.config, shapes)["total"]
    torch.cuda.reset_peak_memory_stats()
    ref, seconds = _run_and_time(model, inputs, repeat)
    rows.append(
        _timed_row(
            model,
            weights,
            "full VRAM",
            seconds,
            flops,
            weights_gib=_weights_bytes(model) / GIB,
            tokens=tokens,
            finite=bool(torch.isfinite(ref).all()),
            build_s=build_s,
        )
    )
    print(rows[-1], flush=True)
    if snapshot:
        rows.extend(
            dict(r, weights=weights, when="after forwards") for r in persistent_allocations(model)
        )
        torch.cuda.memory._record_memory_history(enabled=None)
    if profile:
        for block in model.blocks:
            block.ffn_chunk_size = 8192
        with torch.inference_mode():
            s = cuda_time(lambda: model(**inputs), warmup=1, repeat=repeat)
            torch.cuda.reset_peak_memory_stats()
            out = model(**inputs)
        rows.append(
            _timed_row(
                model,
                weights,
                "full VRAM, FFN chunks of 8192",
                s,
                flops,
                rel_err_vs_full=_rel(out, ref),
            )
        )
        print(rows[-1], flush=True)
        for r in profile_memory(model, inputs):
            r["weights"] = weights
            rows.append(r)
        for block in model.blocks:
            block.ffn_chunk_size = None
    for backend in backends:
        from steadydancer.attention import AttentionDispatcher

        row: dict[str, Any] = {
            "part": "model",
            "weights": weights,
            "mode": f"full VRAM, attention={backend}",
        }
        try:
            if backend == "sdpa_cudnn":
                model.attention = _SdpaCudnn()
            else:
                model.attention = AttentionDispatcher(backend=backend)
            out, s = _run_and_time(model, inputs, repeat)
            row.update(
                seconds=s,
                tflops=flops / s / 1e12,
                attention=model.attention.backend_used,
                rel_err_vs_default=_rel(out, ref),
            )
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        rows.append(row)
        print(row, flush=True)
    if backends:
        from steadydancer.attention import AttentionDispatcher

        model.attention = AttentionDispatcher(backend=attention)
    for label, cap_gib, memory in modes:
        rows.append(_run_mode(model, inputs, ref, weights, label, cap_gib, memory, flops, repeat))
        print(rows[-1], flush=True)
    return rows


class _SdpaCudnn:
    """PyTorch SDPA restricted to its cuDNN kernel (to compare with SDPA's own choice)."""

    backend_used = "sdpa[cudnn]"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            )
        return out.transpose(1, 2)


def _run_mode(model, inputs, ref, weights, label, cap_gib, memory, flops, repeat) -> dict[str, Any]:
    from steadydancer.streaming import BlockStreamer, tensor_bytes

    row: dict[str, Any] = {
        "part": "model",
        "weights": weights,
        "mode": label,
        "memory": memory,
        "cap_gib": cap_gib,
    }
    streamer = getattr(model, "streamer", None)
    if streamer is not None:
        streamer.detach()
        model.streamer = None
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0)
    try:
        t0 = time.time()
        available = None
        if cap_gib:
            # what a card of cap_gib would have free with this model's weights not yet on it
            on_device = sum(
                tensor_bytes(t) for t in [*model.parameters(), *model.buffers()] if t.is_cuda
            )
            available = int(cap_gib * GIB) - (torch.cuda.memory_allocated() - on_device)
        streamer = BlockStreamer.attach(model, "cuda", memory, available_bytes=available)
        model.streamer = streamer
        gc.collect()
        torch.cuda.empty_cache()
        row["attach_s"] = time.time() - t0
        if streamer is not None:
            row.update(streamer.summary())
        row["allocated_after_attach_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        out, s = _run_and_time(model, inputs, repeat)
        row.update(
            seconds=s,
            tflops=flops / s / 1e12,
            peak_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
            rel_err_vs_full=_rel(out, ref),
            finite=bool(torch.isfinite(out).all()),
        )
    except torch.OutOfMemoryError as exc:
        row["error"] = "OutOfMemoryError: " + " ".join(str(exc).split())[:420]
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        streamer = getattr(model, "streamer", None)
        if streamer is not None:
            try:
                torch.cuda.set_per_process_memory_fraction(1.0)
                streamer.detach()
            except Exception as exc:
                row["detach_error"] = str(exc)[:200]
            model.streamer = None
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()
    return row


def run_guidance(
    weights: str, *, width: int = 832, height: int = 480, frames: int = 81, repeat: int = 2
) -> list[dict[str, Any]]:
    """One guided step inside the pose window: cond, uncond_text, uncond_pose.

    Separate: three batch-1 forwards. Batched: one batch-3 forward (what ComfyUI's
    calc_cond_batch does when memory allows). Both combined with guidance.combine; the two
    predictions must agree.
    """
    from steadydancer import guidance

    model = build_model(weights)
    shapes = shapes_for_video(width, height, frames)
    base = _inputs(model, shapes)
    neg = _inputs(model, shapes, seed=2)
    calls = {
        "cond": base,
        "uncond_text": {**base, "text": neg["text"]},
        "uncond_pose": {**base, "pose": neg["pose"]},
    }
    batched = {k: torch.cat([calls[c][k] for c in calls]) for k in base}
    names = guidance.calls_needed(5.0, True)

    def separate():
        outs = {c: model(**calls[c]) for c in names}
        return guidance.combine(outs["cond"], outs["uncond_text"], outs["uncond_pose"], 5.0, 1.5)

    def together():
        out = model(**batched)
        cond, unc_t, unc_p = out.chunk(3)
        return guidance.combine(cond, unc_t, unc_p, 5.0, 1.5)

    rows = []
    with torch.inference_mode():
        model(**base)
        t_one = cuda_time(lambda: model(**base), warmup=0, repeat=repeat)
        torch.cuda.reset_peak_memory_stats()
        a = separate()
        t_sep = cuda_time(separate, warmup=0, repeat=repeat)
        peak_sep = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        try:
            b = together()
            t_bat = cuda_time(together, warmup=0, repeat=repeat)
            peak_bat = torch.cuda.max_memory_allocated() / GIB
            err = _rel(b, a)
        except torch.OutOfMemoryError:
            t_bat, peak_bat, err = float("nan"), float("nan"), float("nan")
    rows.append(
        {
            "part": "guidance",
            "weights": weights,
            "calls": len(names),
            "one_forward_s": t_one,
            "separate_s": t_sep,
            "batched_s": t_bat,
            "separate_over_3_forwards": t_sep / (3 * t_one),
            "batched_over_separate": t_bat / t_sep,
            "peak_separate_gib": peak_sep,
            "peak_batched_gib": peak_bat,
            "rel_err_batched_vs_separate": err,
        }
    )
    print(rows[-1], flush=True)
    return rows


def profile_memory(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Peak allocated memory inside each top-level part and each part of block 0, one forward.

    Nested peaks are tracked with a stack (an inner reset of the peak counter is folded
    into its parent's running maximum), so every figure is the true peak while that module
    ran. Tells which activation dominates the memory-saving modes.
    """
    rows: list[dict[str, Any]] = []
    stack: list[list[Any]] = []

    def pre(name: str):
        def hook(*_: Any) -> None:
            now = torch.cuda.memory_allocated()
            if stack:
                stack[-1][2] = max(stack[-1][2], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            stack.append([name, now, now])

        return hook

    def post(*_: Any) -> None:
        name, before, running = stack.pop()
        peak = max(running, torch.cuda.max_memory_allocated())
        rows.append(
            {
                "part": "memory",
                "module": name,
                "before_gib": before / GIB,
                "peak_gib": peak / GIB,
                "rise_gib": (peak - before) / GIB,
            }
        )
        if stack:
            stack[-1][2] = max(stack[-1][2], peak)

    handles = []
    watched = [(n, m) for n, m in model.named_children() if n != "blocks"]
    watched += [(f"blocks.0.{n}", m) for n, m in model.blocks[0].named_modules() if n]
    watched += [("blocks.0", model.blocks[0]), ("blocks.1", model.blocks[1])]
    for name, module in watched:
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(lambda *a: post()))
    inner = model.attention

    def attention(q, k, v):
        pre(f"attention L={q.shape[1]}x{k.shape[1]}")()
        out = inner(q, k, v)
        post()
        return out

    model.attention = attention
    try:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            pre("forward")()
            model(**inputs)
            post()
    finally:
        model.attention = inner
        for h in handles:
            h.remove()
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:  # keep the largest occurrence of each module (attention runs several times)
        if r["module"] not in seen or r["peak_gib"] > seen[r["module"]]["peak_gib"]:
            seen[r["module"]] = r
    out = sorted(seen.values(), key=lambda r: -r["peak_gib"])
    for r in out:
        r["start_gib"] = start / GIB
    return out


def persistent_allocations(model: torch.nn.Module, top: int = 12) -> list[dict[str, Any]]:
    """Live device allocations that are not the model's weights, largest first, with the
    source line that made each (needs torch.cuda.memory._record_memory_history() enabled
    before they were made). Finds caches and leaks that eat into the 16 GB budget."""
    from steadydancer.streaming import plain_tensors

    owned = set()
    with plain_tensors():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_cuda:
                owned.add(t.untyped_storage().data_ptr())
    snap = torch.cuda.memory._snapshot()
    found: list[dict[str, Any]] = []
    for seg in snap.get("segments", []):
        addr = seg["address"]
        for blk in seg.get("blocks", []):
            start = blk.get("address", addr)
            addr = start + blk["size"]
            if blk.get("state") != "active_allocated" or start in owned:
                continue
            frames = [
                f"{Path(f['filename']).name}:{f['line']}:{f['name']}"
                for f in blk.get("frames", [])
                if any(
                    part in f.get("filename", "")
                    for part in ("steadydancer", "/benchmarks/", "/torch/nn/")
                )
            ]
            found.append(
                {"part": "alloc", "size_mib": blk["size"] / 2**20, "site": " < ".join(frames[:4])}
            )
    found.sort(key=lambda r: -r["size_mib"])
    total = sum(r["size_mib"] for r in found)
    return [
        {
            "part": "alloc",
            "size_mib": total,
            "site": f"TOTAL of {len(found)} non-weight allocations",
        },
        *found[:top],
    ]
