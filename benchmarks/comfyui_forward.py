"""One prediction through ComfyUI's model call against the DiT's own forward: same weights,
same inputs, same process.

    COMFYUI_DIR=... $COMFYUI_PYTHON -m benchmarks.comfyui_forward --model FILE
        [--batch 2] [--size 832x480x81] [--repeat 3] [--profile] [--fp8-matmul] [--lora-rank 64]
        [--compare-attention sdpa,flash_attn_4,sage] [--compare-fused] [--first-calls 3] [--cpu]

The whole-graph benchmark (`benchmarks.comfyui_pipeline`) times sampling steps as ComfyUI
reports them; the library benchmark (`benchmarks.gpu model`) times `load_model`'s forward
on weights it draws itself. When the two disagree, this tells where the difference is:
ComfyUI is imported in-process as main.py sets it up (its CUDA allocator choice included),
the file is loaded by "Load SteadyDancer Model" and moved to the GPU by ComfyUI's model
management, and then, on one batch of random inputs (cond + uncond, as a guided step
batches them):

- `comfyui`: `model.apply_model` (what ComfyUI's sampler calls: input conversion, ComfyUI's
  attention route and wrappers, the DiT, the denoised arithmetic);
- `dit`: the same DiT module called directly with the same inputs in the compute dtype and
  its own attention dispatcher.

- `comfyui + LoRA` (with --lora-rank): `apply_model` of the MODEL after ComfyUI's
  "LoraLoaderModelOnly" applied a random LoRA of a distilled-step LoRA's layout (every
  attention and FFN linear of every block; `benchmarks.random_models.write_lora`).

- `comfyui, fp8 matmul` (with --fp8-matmul, scaled-fp8 files): `apply_model` with
  STEADYDANCER_FP8_MATMUL=1 (fp8 weights multiply in fp8, `torch._scaled_mm`), and its
  relative error against the expanded weights' prediction. With --lora-rank too: a LoRA'd
  MODEL loaded while fp8 matmul is on (the LoRA merged into the fp8 weights), its time
  against fp8 matmul without the LoRA and its error against the exact LoRA's prediction.

- `first calls` (with --first-calls N): before anything else, each of the process's first N
  calls timed one by one (of the LoRA'd MODEL with --lora-rank, as in the fast preset): what
  a fresh ComfyUI pays once (CUDA kernel loading, cuBLAS/cuDNN set-up, the Triton kernels'
  loading, or compiling when Triton's cache, TRITON_CACHE_DIR, is cold).

- `unfused` (with --compare-fused): `apply_model` with STEADYDANCER_FUSED_KERNELS=0 (the
  blocks' norms, modulation and RoPE, and with --fp8-matmul the input quantisation, as
  PyTorch kernels instead of the fused Triton ones), its time against the fused run and the
  largest difference of the two predictions.

- `attention X` (with --compare-attention): `apply_model` with the loader's attention choice
  X instead (the MODEL's attention override swapped), the backend that really ran, and the
  relative error of its velocity against the first prediction's (--attention's).

Each is timed (median of --repeat, after one warm-up) and, with --profile, run once under
torch.profiler: the sum of kernel time against the wall time shows whether the GPU waits on
the host, and the operators that differ most are listed. Dynamic VRAM is not turned on:
GGUF and scaled-fp8 models run on the classic patcher either way (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.comfyui_inprocess import import_comfyui, load_package  # noqa: E402

SIGMA = 0.7  # timestep 700, as in the library benchmark


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        width, height, frames = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHTxFRAMES, e.g. 832x480x81") from None
    return width, height, frames


def timed(fn, device, repeat: int) -> tuple[object, float]:
    """(result of a warm-up call, median seconds of `repeat` further calls), with the
    benchmarks' one timer (imported here: torch must come after ComfyUI's allocator choice)."""
    from benchmarks.common import time_calls

    results: list[object] = []
    times = time_calls(fn, device=device, warmup=1, repeat=repeat,
                       each=lambda out: None if results else results.append(out))  # fmt: skip
    return results[0], statistics.median(times)


def profile(fn, device) -> dict:
    """Wall time, summed kernel time and the operators' device self time of one call."""
    import torch
    from torch.profiler import ProfilerActivity

    from benchmarks.comfyui_profile_node import operator_rows

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    own = "device_s" if device.type == "cuda" else "cpu_s"
    ops = {row["op"]: (row[own], row["calls"]) for row in operator_rows(prof) if row[own]}
    return {"wall": wall, "kernels": sum(s for s, _ in ops.values()), "ops": ops}


def with_lora(patcher, config, rank: int):
    """`patcher` with a random LoRA of `rank` applied by LoraLoaderModelOnly, and its layer count."""
    import folder_paths

    import nodes
    from benchmarks.random_models import write_lora

    folder = Path(folder_paths.get_temp_directory()) / "steadydancer-bench-loras"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"random_rank{rank}.safetensors"
    layers = write_lora(folder / name, config, rank=rank)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)[0]
    if len(patched.patches) != layers:
        raise RuntimeError(f"ComfyUI patched {len(patched.patches)} weights of the LoRA's {layers} layers")
    return patched, layers


def model_call(patcher, x, sigma, inputs):
    """One `apply_model` of `patcher` (loaded on the GPU first), as the sampler makes it."""
    import comfy.model_management
    import torch

    comfy.model_management.load_models_gpu([patcher])
    options = patcher.model_options["transformer_options"]

    def run() -> object:
        with torch.inference_mode():
            return patcher.model.apply_model(x, sigma, **inputs, transformer_options=options)

    return run


def compare_attention(choice: str, model, options: dict, x, sigma, inputs: dict, device, repeat: int,
                      baseline, baseline_s: float) -> None:  # fmt: skip
    """Time apply_model with attention `choice` in place of the MODEL's own; print its error."""
    import torch
    from comfyui_steadydancer.nodes.comfy_attention import OVERRIDE_KEY, attention_override

    try:
        override = attention_override(choice)
    except Exception as error:  # an explicit backend that cannot run here says why
        print(f"  attention {choice:14s} not usable here: {error}")
        return
    changed = {k: v for k, v in options.items() if k != OVERRIDE_KEY}
    if override is not None:
        changed[OVERRIDE_KEY] = override

    def call() -> object:
        with torch.inference_mode():
            return model.apply_model(x, sigma, **inputs, transformer_options=changed)

    try:
        out, seconds = timed(call, device, repeat)
    except Exception as error:
        print(f"  attention {choice:14s} failed: {type(error).__name__}: {str(error)[:300]}")
        return
    velocity, reference = ((x - d.float()) / SIGMA for d in (out, baseline))
    error = float((velocity - reference).norm() / reference.norm())
    used = override.backend_used if override is not None else "ComfyUI's own"
    print(f"  apply_model, attention {choice:14s} {seconds:8.3f} s  ({seconds / baseline_s:.3f}x; ran {used}; "
          f"relative error of the velocity {error:.2e})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a SteadyDancer .gguf or .safetensors")
    parser.add_argument("--batch", type=int, default=2, help="predictions per call (2: cond + uncond)")
    parser.add_argument("--size", type=parse_size, default=(832, 480, 81), help="WIDTHxHEIGHTxFRAMES")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--attention", default="auto", help="the loader's attention choice")
    parser.add_argument("--profile", action="store_true", help="also profile one call of each")
    parser.add_argument("--top", type=int, default=12, help="operators listed per profile")
    parser.add_argument("--fp8-matmul", action="store_true",
                        help="also time STEADYDANCER_FP8_MATMUL=1 (fp8 weights multiply in fp8) and print its error")
    parser.add_argument("--lora-rank", type=int, default=0, help="also time the MODEL with a random LoRA of this rank")
    parser.add_argument("--first-calls", type=int, default=0, metavar="N",
                        help="first time each of the first N calls of this process one by one (of the LoRA'd MODEL "
                             "with --lora-rank): kernel loading, and Triton compiling where its cache is cold")
    parser.add_argument("--compare-attention", default="",
                        help="comma-separated attention choices to time against --attention (e.g. sdpa,flash_attn_4,sage)")
    parser.add_argument("--compare-fused", action="store_true",
                        help="also time the blocks' norms unfused (STEADYDANCER_FUSED_KERNELS=0)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a check, with a tiny model)")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")

    import_comfyui(gpu=not args.cpu)
    load_package()
    import comfy.model_management
    import folder_paths
    import torch
    from comfyui_steadydancer.nodes.model_loader import SteadyDancerModelLoader
    from comfyui_steadydancer.steadydancer.fused import ENV_SWITCH as FUSED_ENV
    from comfyui_steadydancer.steadydancer.quantized import FP8_MATMUL_ENV

    from benchmarks.common import GIB, random_inputs, shapes_for_video, time_calls

    folder_paths.add_model_folder_path("diffusion_models", str(args.model.parent), is_default=True)
    start = time.perf_counter()
    patcher = SteadyDancerModelLoader.execute(args.model.name, "default", args.attention).result[0]
    comfy.model_management.load_models_gpu([patcher])
    load_s = time.perf_counter() - start
    model = patcher.model
    dit = model.diffusion_model
    device = comfy.model_management.get_torch_device()
    dtype = model.manual_cast_dtype or model.get_dtype()

    width, height, frames = args.size
    shapes = shapes_for_video(width, height, frames, batch=args.batch, text_len=dit.config.text_len)
    inputs = random_inputs(dit.config, shapes, device, seed=1, timestep=SIGMA * 1000)
    x, t = inputs.pop("x"), inputs.pop("t")
    options = patcher.model_options["transformer_options"]
    sigma = torch.full((args.batch,), SIGMA, device=device)
    cast = {k: v.to(dtype) for k, v in inputs.items()}
    if args.lora_rank:
        lora_patcher, layers = with_lora(patcher, dit.config, args.lora_rank)
    first_s: list[float] = []
    if args.first_calls:  # a fresh process's first calls, one by one (no warm-up)
        first = model_call(lora_patcher if args.lora_rank else patcher, x, sigma, inputs)
        first_s = time_calls(first, device=device, repeat=args.first_calls)
        comfy.model_management.load_models_gpu([patcher])  # the LoRA's clone, if any, is unpatched again

    def comfyui() -> object:
        with torch.inference_mode():
            return model.apply_model(x, sigma, **inputs, transformer_options=options)

    def direct() -> object:
        with torch.inference_mode():
            return dit(x.to(dtype), t, **cast)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    denoised, comfy_s = timed(comfyui, device, args.repeat)
    velocity, dit_s = timed(direct, device, args.repeat)
    diff = float((denoised - (x - SIGMA * velocity.float())).abs().max())
    scale = float(denoised.abs().max())

    print(f"{args.model.name}: {width}x{height}x{frames}, batch {args.batch}, {dtype}, "
          f"{type(patcher).__name__}, attention {args.attention}, device {device}")
    if device.type == "cuda":
        print(f"  {torch.cuda.get_device_name(device)}, allocator "
              f"{torch.cuda.get_allocator_backend()}, peak {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB")
    print(f"  load (node + model management)  {load_s:8.2f} s")
    for number, seconds in enumerate(first_s, 1):
        print(f"  first calls of the process, call {number}{' (with the LoRA)' if args.lora_rank else ''}"
              f"  {seconds:8.3f} s")  # fmt: skip
    print(f"  comfyui apply_model            {comfy_s:8.3f} s  ({comfy_s / args.batch:.3f} s per prediction)")
    print(f"  dit forward                    {dit_s:8.3f} s  ({dit_s / args.batch:.3f} s per prediction)")
    print(f"  ratio comfyui / dit            {comfy_s / dit_s:8.3f}")
    print(f"  max |difference|               {diff:.3g} (output scale {scale:.3g})")
    if args.profile:
        from benchmarks.comfyui_profile_node import attention_probe

        probe = attention_probe(dit.config, x)
        print(f"  one bare SDPA of {probe['tokens']} tokens: {probe['sdpa_s'] * 1000:.1f} ms, "
              f"PyTorch's choice {probe['sdpa_backend']}")  # fmt: skip
    if args.compare_fused:
        with mock.patch.dict(os.environ, {FUSED_ENV: "0"}):
            unfused, unfused_s = timed(comfyui, device, args.repeat)
        diff = float((unfused.float() - denoised.float()).abs().max())
        print(f"  comfyui apply_model, unfused    {unfused_s:8.3f} s  (fused: {comfy_s / unfused_s:.3f}x of this; "
              f"max |difference| {diff:.3g})")
    if args.fp8_matmul:
        with mock.patch.dict(os.environ, {FP8_MATMUL_ENV: "1"}):
            fast, fast_s = timed(comfyui, device, args.repeat)
        error = float((fast.float() - denoised.float()).norm() / denoised.float().norm())
        print(f"  comfyui apply_model, fp8 matmul {fast_s:8.3f} s  ({fast_s / comfy_s:.3f}x the expanded weights; "
              f"relative error {error:.2e})")
        if args.compare_fused:
            with mock.patch.dict(os.environ, {FP8_MATMUL_ENV: "1", FUSED_ENV: "0"}):
                slow, slow_s = timed(comfyui, device, args.repeat)
            error = float((slow.float() - denoised.float()).norm() / denoised.float().norm())
            print(f"  comfyui apply_model, fp8 matmul, unfused {slow_s:8.3f} s  (fused: {fast_s / slow_s:.3f}x of this; "
                  f"relative error {error:.2e})")
    for choice in filter(None, args.compare_attention.split(",")):
        compare_attention(choice, model, options, x, sigma, inputs, device, args.repeat, denoised, comfy_s)
    if args.lora_rank:
        lora_out, lora_s = timed(model_call(lora_patcher, x, sigma, inputs), device, args.repeat)
        print(f"  comfyui apply_model + LoRA     {lora_s:8.3f} s  (rank {args.lora_rank} on {layers} layers: "
              f"{lora_s / comfy_s:.3f}x without)")
    if args.lora_rank and args.fp8_matmul:
        # a fresh LoRA'd MODEL loaded while fp8 matmul is on: the LoRA is merged into its fp8 weights
        with mock.patch.dict(os.environ, {FP8_MATMUL_ENV: "1"}):
            merged_patcher = with_lora(patcher, dit.config, args.lora_rank)[0]
            merged, merged_s = timed(model_call(merged_patcher, x, sigma, inputs), device, args.repeat)
        error = float((merged.float() - lora_out.float()).norm() / lora_out.float().norm())
        print(f"  comfyui apply_model, fp8 matmul + LoRA merged {merged_s:8.3f} s  ({merged_s / fast_s:.3f}x fp8 "
              f"matmul without; relative error against the exact LoRA {error:.2e})")

    if args.profile:
        runs = {"comfyui": profile(comfyui, device), "dit": profile(direct, device)}
        for name, run in runs.items():
            print(f"  profile {name:8s} wall {run['wall']:.3f} s, operators' device time {run['kernels']:.3f} s "
                  f"({run['kernels'] / run['wall']:.0%} busy)")
        a, b = runs["comfyui"]["ops"], runs["dit"]["ops"]
        rows = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0]))
        print(f"  {'operator':60s} {'comfyui s':>10s} {'dit s':>10s} {'calls c/d':>12s}")
        for key in rows[: args.top]:
            (sa, ca), (sb, cb) = a.get(key, (0.0, 0)), b.get(key, (0.0, 0))
            print(f"  {key[:60]:60s} {sa:10.4f} {sb:10.4f} {ca:>6d}/{cb:<6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
