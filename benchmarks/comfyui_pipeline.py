"""The whole example graph through a real ComfyUI server: time per stage and GPU memory.

    python -m benchmarks.comfyui_pipeline --comfyui DIR [--scale 14b] [--weights gguf,fp8]
        [--modes default,no-dynamic-vram,16gb,16gb-card] [--frames 81[,241,481]] [--context 81:16] [--steps 2]
        [--preset fast|reference] [--library] [--profile] [--videos N] [--out DIR]

For each weights file and each mode it starts ComfyUI (`main.py`, this package loaded from
the checkout), submits `workflows/api/steadydancer_api.json` pointed at random-weight models
of the chosen scale (`benchmarks.random_models`, built once into --models), and listens on
ComfyUI's websocket. Stages are the nodes' run times as ComfyUI reports them (`executing`
messages, timed here on arrival); sampling steps are the sampler's progress messages; GPU
memory is the device's used memory sampled by nvidia-smi every 100 ms (everything on the
card: weights, activations, the CUDA context, ComfyUI's dynamic-VRAM reservations), with
the idle figure before ComfyUI started subtracted. Modes:
- `default`: ComfyUI's flags as a user starts it (0.3x on an NVIDIA GPU: dynamic VRAM on);
- `no-dynamic-vram`: `--disable-dynamic-vram` (skipped where ComfyUI has no such flag);
- `16gb`: `--reserve-vram` set so that 16 GiB of the card remain, as on a 16 GB card
  (ComfyUI plans for 16 GiB; what the process really takes is not held to it);
- `16gb-card`: default flags, with all but 16 GiB of the card taken by another process
  before ComfyUI starts (`Ballast`): the run must fit what a 16 GB card has free, or fail.
`--preset fast` (the distilled-step LoRA from --models put on the DiT by LoraLoaderModelOnly,
4 steps, text scale 1, the reference's pose window: 5 model calls) or `--preset reference`
(40 steps, text scale 5, pose scale 1.5 in 0.1-0.4: 91 calls) replaces --steps and the
guidance; the model calls and seconds per call (steps after the first, which also moves the
weights) are printed. `--library` also times the DiT's
own forward on the same file in ComfyUI's process (`benchmarks.comfyui_forward`, batch 1) and
prints the ComfyUI path's seconds per call as a ratio of it. `--profile` puts a
benchmark-only node (`benchmarks/comfyui_profile_node`) on the guider's model: inside the
server it times every level of each model call (the guider, ComfyUI's cond batching,
apply_model, the DiT) with the GPU synchronised, profiles DiT call 2 (`--profile-call N`;
`--profile-as-run`: that call itself, not a rerun, for its one-time work) with torch.profiler
and reruns it on the same and on random inputs; the report says what each level adds around the
next, which kernels the call ran, and whether its inputs matter. With `--library` too, the
library's own operator table is printed beside it. Each run also prints
ComfyUI's own model-loading lines (whether the DiT was loaded completely or partially).
`--videos N` submits N videos in turn to each server: from the second on the models are
already loaded, as on a server that keeps running (their input files are copies under other
names, so every node that reads them runs again; the unchanged prompt's text encoding is
ComfyUI's cached one; `--profile` profiles the first video only).
`--cpu` runs everything with ComfyUI's `--cpu` (for checking this script on a machine
without a GPU: use `--scale tiny`). Prints one table per run, then a summary; writes
report.json (and ComfyUI's logs) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.comfyui_server import ComfyServer, comfyui_python, messages_until_done, saved_files  # noqa: E402
from scripts.workflow_variants import PRESETS  # noqa: E402

MODES = ("default", "no-dynamic-vram", "16gb", "16gb-card")
SMALL_CARD_GIB = 16
# Node classes -> the stage they belong to (everything else is "other").
STAGES = {
    "SteadyDancerPoseExtract": "pose extraction",
    "SteadyDancerPoseAlign": "pose align + render",
    "CLIPTextEncode": "text encoder",
    "CLIPVisionEncode": "CLIP vision encoder",
    "SteadyDancerCLIPVisionEncode": "CLIP vision encoder",
    "SteadyDancerImageToVideo": "VAE encode (image to video)",
    "SamplerCustomAdvanced": "sampling",
    "SteadyDancerSampler": "sampling",
    "VAEDecode": "VAE decode",
    "CreateVideo": "video file",
    "SaveVideo": "video file",
    "LoadVideo": "load inputs",
    "GetVideoComponents": "load inputs",
    "LoadImage": "load inputs",
    # ComfyUI's loaders read files; weights reach the GPU when a node first uses them
    "SteadyDancerModelLoader": "load model files",
    "CLIPLoader": "load model files",
    "CLIPVisionLoader": "load model files",
    "VAELoader": "load model files",
    "SteadyDancerPoseDetectorLoader": "load model files",
}
STAGE_ORDER = (
    "load model files", "load inputs", "pose extraction", "pose align + render", "text encoder", "CLIP vision encoder",
    "VAE encode (image to video)", "sampling", "VAE decode", "video file", "other",
)  # fmt: skip


@dataclass
class RunResult:
    name: str
    weights: str
    mode: str
    comfy_args: list[str]
    ok: bool = False
    error: str | None = None
    total_s: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    stage_peak_gib: dict[str, float] = field(default_factory=dict)  # stage -> peak GPU GiB above idle
    steps_s: list[float] = field(default_factory=list)  # each sampling step (the first includes loading)
    peak_gib: float | None = None
    idle_gib: float | None = None
    windows: int | None = None  # context windows per model call (from ComfyUI's log; 0.33 logs them)
    cache: str | None = None  # EasyCache / LazyCache's own summary line ("skipped N/M steps ...")
    calls: list[int] = field(default_factory=list)  # predictions per sampling step (preset runs)
    library_s: float | None = None  # the DiT's own forward, seconds per prediction (--library)
    video: dict | None = None
    card_free_gib: float | None = None  # 16gb-card: free on the card with the ballast held
    model_loads: list[str] = field(default_factory=list)  # ComfyUI's "loaded completely/partially" lines
    profile: dict | None = None  # --profile: the sampling's levels and operators, from the server
    video_number: int = 1  # --videos: the how-many-th video on this server (from 2 on the models are loaded)


class GpuMemory:
    """The card's used memory over time (nvidia-smi every `interval_ms`), in GiB."""

    def __init__(self, interval_ms: int = 100, gpu: int = 0) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = subprocess.Popen(
            ["nvidia-smi", "-i", str(gpu), "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"-lms={interval_ms}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip()) / 1024))
            except ValueError:
                continue

    def now(self) -> float:
        time.sleep(0.3)
        return self.samples[-1][1] if self.samples else 0.0

    def peak(self, start: float = 0.0, end: float = float("inf")) -> float:
        inside = [gib for t, gib in self.samples if start <= t <= end]
        return max(inside, default=0.0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def card_total_gib(gpu: int = 0) -> float:
    out = subprocess.run(["nvidia-smi", "-i", str(gpu), "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return float(out.strip()) / 1024


def mode_args(mode: str, comfyui: Path, cpu: bool) -> list[str] | None:
    """ComfyUI flags of a mode, or None where this ComfyUI/machine cannot run it."""
    if cpu:
        return ["--cpu"] if mode == "default" else None
    if mode == "default":
        return []
    if mode == "no-dynamic-vram":
        has_flag = "disable-dynamic-vram" in (comfyui / "comfy" / "cli_args.py").read_text()
        return ["--disable-dynamic-vram"] if has_flag else None
    if mode == "16gb":
        return ["--reserve-vram", f"{max(card_total_gib() - SMALL_CARD_GIB, 0):.1f}"]
    if mode == "16gb-card":
        return []  # the Ballast does it
    raise ValueError(f"unknown mode {mode!r}; use {', '.join(MODES)}")


class Ballast:
    """Another process holding the card's memory, all but `free_gib`: a smaller card.

    Plain device allocations (cudaMalloc through PyTorch's caching allocator), taken before
    ComfyUI starts and held until `stop`; ComfyUI then sees `free_gib` free, as on a card of
    that size after its driver and desktop took their share.
    """

    CODE = (
        "import sys, torch\n"
        "free, _ = torch.cuda.mem_get_info()\n"
        "take = free - int(float(sys.argv[1]) * 2**30)\n"
        "held = [torch.empty(min(take - i, 2**30), dtype=torch.uint8, device='cuda') for i in range(0, max(take, 0), 2**30)]\n"
        "torch.cuda.synchronize()\n"
        "print(f'{torch.cuda.mem_get_info()[0] / 2**30:.2f}', flush=True)\n"
        "sys.stdin.read()\n"
    )

    def __init__(self, free_gib: float, python: str = sys.executable) -> None:
        self.process = subprocess.Popen([python, "-c", self.CODE, str(free_gib)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            self.stop()
            raise RuntimeError("the ballast process could not take the card's memory")
        self.free_gib = float(line)  # free on the card with the ballast held

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def stage_times(messages: list[tuple[float, dict]], classes: dict[str, str], end: float) -> tuple[list, list[float]]:
    """[(stage, start, stop)] of every node that ran, and the sampler's step times."""
    spans, steps = [], []
    running: tuple[str, float] | None = None
    sampler_start, last_step = None, None
    for t, message in messages:
        kind, data = message["type"], message.get("data", {})
        if kind == "executing":
            if running is not None:
                spans.append((STAGES.get(classes.get(running[0], ""), "other"), running[1], t))
            running = (data["node"], t) if data.get("node") else None
            if running and STAGES.get(classes.get(running[0], "")) == "sampling":
                sampler_start = last_step = t
        elif (
            kind == "progress" and sampler_start is not None
            and STAGES.get(classes.get(data.get("node"), "")) == "sampling"
            and int(data["value"]) > len(steps)  # a new finished step (repeats are not)
        ):  # fmt: skip
            steps.append(t - last_step)
            last_step = t
    if running is not None:
        spans.append((STAGES.get(classes.get(running[0], ""), "other"), running[1], end))
    return spans, steps


def probe_video(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {"path": str(path), "frames": frames, "width": stream.width, "height": stream.height,
                "fps": float(stream.average_rate or 0)}  # fmt: skip


PROFILE_FILE = "profile.json"
PROFILE_NODE = REPO_ROOT / "benchmarks" / "comfyui_profile_node"
PROFILE_NODE_ID = "990"
PROFILE_CALL = 2  # the DiT call profiled and rerun: the first after the one that moved the weights


def with_profile(graph: dict, work: Path, call: int = PROFILE_CALL, as_run: bool = False) -> dict:
    """`graph` with the benchmark's profile node on the guider's model, and the node linked into
    this run's custom_nodes (the server loads it next to this package). The node profiles DiT
    call `call`: a rerun of it, or (`as_run`) the call itself, its one-time work included."""
    nodes_dir = work / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    link = nodes_dir / "steadydancer_bench_profile"
    if not link.exists():
        link.symlink_to(PROFILE_NODE, target_is_directory=True)
    out = json.loads(json.dumps(graph))
    guider = next(k for k, v in out.items() if v["class_type"] == "SteadyDancerGuider")
    out[PROFILE_NODE_ID] = {
        "inputs": {"model": out[guider]["inputs"]["model"], "path": str(work / PROFILE_FILE),
                   "profile_call": call, "top": 30, "profile_as_run": as_run},
        "class_type": "SteadyDancerBenchProfile",
    }  # fmt: skip
    out[guider]["inputs"]["model"] = [PROFILE_NODE_ID, 0]
    return out


def bench_graph(
    api: dict, args: argparse.Namespace, weights: str, files: dict, settings: dict, context: tuple | None, video: int
) -> dict:
    """The example graph on these files and settings, with the run's options, for its
    `video`-th video: the later videos read their inputs under other names, so that ComfyUI
    recomputes every node that depends on them (its cache is keyed on inputs)."""
    from scripts.make_tiny_models import DRIVING, REFERENCE, demo_graph
    from scripts.workflow_variants import (
        with_cache,
        with_context_windows,
        with_fp8_matmul,
        with_preset,
    )

    inputs = {"reference": video_file(REFERENCE, video), "driving": video_file(DRIVING, video)}
    dit_files = {k: v for k, v in files.items() if k != "lora"}
    graph = demo_graph(api, prefix=f"bench/{weights}", files={**dit_files, **inputs}, settings=settings,
                       detect_resolution=args.detect_resolution)  # fmt: skip
    if context:
        graph = with_context_windows(graph, None, *context)
    if args.cache:
        graph = with_cache(graph, args.cache)
    if args.preset:
        graph = with_preset(graph, args.preset, files["lora"])
    if args.fp8_matmul:
        graph = with_fp8_matmul(graph)
    return graph


def video_file(name: str, video: int) -> str:
    """The input file `name` as the `video`-th video of a run reads it (the first: unchanged)."""
    if video == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}-video{video}{dot}{suffix}"


def run_videos(
    comfyui: Path, models: Path, work: Path, runs: list[tuple[dict, RunResult]], gpu: bool, timeout: float
) -> list[RunResult]:
    """Each graph in turn on one ComfyUI server (the later ones find the models loaded)."""
    memory = GpuMemory() if gpu else None
    results = [result for _, result in runs]
    server = None
    try:
        idle = memory.now() if memory else None
        server = ComfyServer(comfyui, work, models, input_dir=work / "input", output_dir=work / "output",
                             comfy_args=tuple(results[0].comfy_args))  # fmt: skip
        server.wait_ready(timeout=600)
        for graph, result in runs:
            result.idle_gib = idle
            try:
                submit_and_time(server, graph, result, memory, timeout)
            except Exception as error:  # reported with this video; the next ones still run
                result.error = f"{type(error).__name__}: {error}"
    except Exception as error:  # the server did not start: every video fails with its reason
        for result in results:
            result.error = result.error or f"{type(error).__name__}: {error}"
    finally:
        if server is not None:
            server.stop()
            read_server_log(server.log_path.read_text(errors="replace"), results)
            shutil.copy(server.log_path, work.parent / f"comfyui-{results[0].name.replace('/', '-')}.log")
        if (work / PROFILE_FILE).is_file():
            results[0].profile = json.loads((work / PROFILE_FILE).read_text())
        if memory:
            memory.stop()
    return results


def submit_and_time(server: ComfyServer, graph: dict, result: RunResult, memory: GpuMemory | None, timeout: float) -> None:
    classes = {k: v["class_type"] for k, v in graph.items()}
    ws = server.websocket()
    received: list[tuple[float, dict]] = []
    try:
        start = time.monotonic()
        response = server.submit(graph)
        if response.status_code != 200:
            raise RuntimeError(f"ComfyUI refused the graph ({response.status_code}): {response.text[:2000]}")
        prompt_id = response.json()["prompt_id"]
        messages_until_done(ws, prompt_id, timeout, on_message=lambda m: received.append((time.monotonic(), m)))
        end = time.monotonic()
    finally:
        ws.close()
    last = received[-1][1]
    if last["type"] != "execution_success":
        raise RuntimeError(f"the graph failed: {json.dumps(last.get('data'))[:3000]}")
    result.total_s = end - start
    spans, result.steps_s = stage_times(received, classes, end)
    for stage, t0, t1 in spans:
        result.stages[stage] = result.stages.get(stage, 0.0) + (t1 - t0)
        if memory:
            peak = memory.peak(t0, t1) - (result.idle_gib or 0.0)
            result.stage_peak_gib[stage] = max(result.stage_peak_gib.get(stage, 0.0), peak)
    if memory:
        result.peak_gib = memory.peak(start, end) - (result.idle_gib or 0.0)
    videos = [f for f in saved_files(server.wait(prompt_id)) if f["filename"].endswith(".mp4")]
    if videos:
        result.video = probe_video(server.output_dir / videos[0].get("subfolder", "") / videos[0]["filename"])
    result.ok = True


def read_server_log(log: str, results: list[RunResult]) -> None:
    """What ComfyUI's log says about each video: the log is cut after each "Prompt executed"."""
    parts = re.split(r"Prompt executed in [^\n]*\n", log)
    for i, result in enumerate(results):
        part = parts[i] if i < len(parts) else ""
        counts = [int(m) for m in re.findall(r"Context window \d+/(\d+)", part)]
        result.windows = max(counts) if counts else None
        summary = re.findall(r"(?:EasyCache|LazyCache) - skipped .*", part)
        result.cache = summary[-1].strip() if summary else None
        result.model_loads = [line.strip() for line in re.findall(
            r"(?:Requested to load \S+|loaded (?:completely|partially)[^\n]*)", part)]  # fmt: skip


LIBRARY_TIMEOUT_S = 900


def library_seconds(python: str, comfyui: Path, model: Path, width: int, height: int, frames: int, cpu: bool,
                    profile: bool = False, fp8_matmul: bool = False) -> float | None:  # fmt: skip
    """Seconds per prediction of the DiT's own forward on `model` (benchmarks.comfyui_forward);
    with `profile`, its operator table is printed too (to set beside the server's); with
    `fp8_matmul`, fp8 weights multiply in fp8 there too, as the graph's loader option made them."""
    from steadydancer.quantized import FP8_MATMUL_ENV

    command = [python, "-m", "benchmarks.comfyui_forward", "--model", str(model), "--batch", "1",
               "--size", f"{width}x{height}x{frames}", "--repeat", "2", *(["--cpu"] if cpu else []),
               *(["--profile"] if profile else [])]  # fmt: skip
    try:
        run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LIBRARY_TIMEOUT_S,
                             env={**os.environ, "COMFYUI_DIR": str(comfyui),
                                  **({FP8_MATMUL_ENV: "1"} if fp8_matmul else {})})  # fmt: skip
    except subprocess.TimeoutExpired:
        print(f"   library timing gave no figure within {LIBRARY_TIMEOUT_S} s", file=sys.stderr)
        return None
    found = re.search(r"dit forward\s+([\d.]+) s", run.stdout)
    if run.returncode or not found:
        print(f"   library timing failed: {(run.stderr or run.stdout)[-500:]}", file=sys.stderr)
        return None
    if profile:
        print("   library path, batch 1, in a process of its own (benchmarks.comfyui_forward --profile):")
        print("\n".join("     " + line for line in run.stdout.splitlines()))
    return float(found.group(1))


def profile_extras_s(r: RunResult) -> float:
    """Seconds --profile's extra runs of one DiT call added to the sampling (0 without it)."""
    return float((r.profile or {}).get("extras_s", 0.0))


def server_steps_s(r: RunResult) -> list[float]:
    """Each sampling step as --profile timed it in the server (its extra runs left out); [] without."""
    return (r.profile or {}).get("levels", {}).get("predict_noise", {}).get("each_s", [])


def seconds_per_call(r: RunResult) -> tuple[float, str]:
    """Seconds per model call from the sampler's steps, and what they were taken over."""
    steps = server_steps_s(r)
    if len(steps) == len(r.calls) > 1:  # --profile: the steps timed in the server, its extra runs left out
        return sum(steps[1:]) / sum(r.calls[1:]), f"steps 2-{len(r.calls)}, timed in the server"
    if len(r.steps_s) == len(r.calls) > 1:  # step 1 also moves the weights: use the later steps
        return sum(r.steps_s[1:]) / sum(r.calls[1:]), f"steps 2-{len(r.calls)}"
    # ComfyUI throttles progress messages: short steps may go unreported
    return r.stages.get("sampling", 0.0) / sum(r.calls), "whole sampling, loading included"


def print_library(r: RunResult) -> None:
    if r.library_s and r.calls and not r.cache:
        per_call, _ = seconds_per_call(r)
        print(f"   library path {r.library_s:.2f} s per call: ComfyUI / library = {per_call / r.library_s:.2f}")
    elif r.library_s:
        print(f"   library path {r.library_s:.2f} s per call")


def print_run(r: RunResult) -> None:
    print(f"\n== {r.name}: ComfyUI {' '.join(r.comfy_args) or '(default flags)'}")
    if not r.ok:
        print(f"   FAILED: {r.error}")
        return
    extras = profile_extras_s(r)
    for stage in STAGE_ORDER:
        if stage in r.stages:
            peak = f"{r.stage_peak_gib[stage]:6.2f} GiB" if stage in r.stage_peak_gib else ""
            seconds = r.stages[stage] - (extras if stage == "sampling" else 0.0)
            print(f"   {stage:30s} {seconds:8.2f} s  {peak}")
    for i, step in enumerate(r.steps_s, 1):
        per_window = f"  ({step / r.windows:.2f} s per window, {r.windows} windows)" if r.windows else ""
        loading = " (with model loading)" if i == 1 and r.video_number == 1 else ""
        print(f"     step {i}{loading:22s} {step:8.2f} s{per_window}")
    peak = f", peak GPU memory {r.peak_gib:.2f} GiB above idle ({r.idle_gib:.2f} GiB)" if r.peak_gib is not None else ""
    print(f"   whole graph {r.total_s - extras:.2f} s{peak}")
    if extras:
        print(f"   (sampling and whole graph without the {extras:.2f} s of --profile's extra runs of one DiT call; "
              "the step times above include them)")  # fmt: skip
    if r.card_free_gib is not None:
        print(f"   the card had {r.card_free_gib:.2f} GiB free (the rest held by the ballast)")
    if r.calls:
        if r.cache:  # skipped predictions still count in r.calls: no per-call figure from the steps
            print(f"   {sum(r.calls)} predictions planned (some skipped by the cache, below), "
                  f"sampling {r.stages.get('sampling', 0.0) - extras:.2f} s")  # fmt: skip
        else:
            per_call, over = seconds_per_call(r)
            print(f"   {sum(r.calls)} model calls, {per_call:.2f} s per call ({over}), "
                  f"sampling {r.stages.get('sampling', 0.0) - extras:.2f} s")  # fmt: skip
    if r.cache:
        print(f"   {r.cache}")
    if r.model_loads:
        print("   ComfyUI's model loading: " + "; ".join(r.model_loads))
    if r.profile:
        print_profile(r.profile)
    if r.video:
        v = r.video
        print(f"   video: {v['frames']} frames {v['width']}x{v['height']} at {v['fps']:g} fps, {v['path']}")


def print_profile(profile: dict) -> None:
    """What each level of a model call adds around the next (--profile), and the operators."""
    levels = profile.get("levels", {})
    print(f"   profile: sampling {profile.get('sampling_s', 0.0):.2f} s inside the server")
    names = ["predict_noise", "calc_cond_batch", "apply_model", "diffusion_model"]
    what = {"predict_noise": "the guider around ComfyUI's cond batching",
            "calc_cond_batch": "ComfyUI's cond batching around apply_model",
            "apply_model": "input conversion and denoising around the DiT",
            "diffusion_model": "the DiT (and its wrappers)"}  # fmt: skip
    for outer, inner in zip(names, [*names[1:], None], strict=True):
        level = levels.get(outer)
        if not level:
            continue
        own = level["total_s"] - (levels[inner]["total_s"] if inner and inner in levels else 0.0)
        per = level["total_s"] / max(level["calls"], 1)
        print(f"     {outer:16s} {level['calls']:3d} calls, {level['total_s']:8.2f} s ({per:.3f} s each); "
              f"{what[outer]}: {own:.2f} s")  # fmt: skip
    outside = profile.get("sampling_s", 0.0) - levels.get("predict_noise", {}).get("total_s", 0.0)
    print(f"     sampler outside predict_noise: {outside:.2f} s "
          f"(the profiled call's extra runs, {profile.get('extras_s', 0.0):.2f} s, are left out of every figure)")
    call = profile.get("profiled_call")
    if call:
        how = " (profiled as it ran)" if call.get("profiled_as_run") else ""
        print(f"     DiT call {call['call']}{how}: {call['call_s']:.3f} s; again on the same inputs {call['repeat_s']:.3f} s; "
              f"on random inputs of the same shapes {call['random_inputs_s']:.3f} s")  # fmt: skip
        print(f"     under torch.profiler: wall {call['profiled_wall_s']:.3f} s, operators' device time "
              f"{call['device_busy_s']:.3f} s, host time {call['host_busy_s']:.3f} s")  # fmt: skip
        probe = call.get("attention_probe") or {}
        if probe:
            print(f"     one bare SDPA of {probe['tokens']} tokens here: {probe['sdpa_s'] * 1000:.1f} ms, "
                  f"PyTorch's choice {probe['sdpa_backend']}")  # fmt: skip
        print("     inputs: " + ", ".join(f"{k} {tuple(v[0])} {v[1]}" for k, v in call["inputs"].items()))
        print(f"     {'operator':60s} {'device s':>9s} {'host s':>8s} {'calls':>7s}")
        for row in call["operators"][:20]:
            print(f"     {row['op'][:60]:60s} {row['device_s']:9.3f} {row['cpu_s']:8.3f} {row['calls']:7d}")


def print_summary(results: list[RunResult]) -> None:
    print("\nSUMMARY (steps after the first exclude model loading)")
    print(f"{'run':32s} {'graph s':>8s} {'step 1 s':>9s} {'later steps s':>14s} {'peak GiB':>9s}  video")
    for r in results:
        if not r.ok:
            print(f"{r.name:32s} FAILED: {(r.error or '')[:80]}")
            continue
        steps = server_steps_s(r) or r.steps_s
        later = sum(steps[1:]) / max(len(steps) - 1, 1) if len(steps) > 1 else float("nan")
        peak = f"{r.peak_gib:9.2f}" if r.peak_gib is not None else f"{'-':>9s}"
        video = f"{r.video['frames']}f {r.video['width']}x{r.video['height']}" if r.video else "none"
        first = r.steps_s[0] if r.steps_s else float("nan")  # with loading: the sampler's own step
        print(f"{r.name:32s} {r.total_s - profile_extras_s(r):8.2f} {first:9.2f} {later:14.2f} {peak}  {video}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder")
    parser.add_argument("--python", help="ComfyUI's Python (default: COMFYUI_PYTHON, DIR/.venv, python3)")
    parser.add_argument("--models", type=Path, help="models folder (default: OUT/models); built when missing")
    parser.add_argument("--scale", choices=("14b", "tiny"), default="14b")
    parser.add_argument("--weights", default="gguf,fp8", help="DiT files to run: gguf (Q4_K), fp8 (scaled)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=832)
    parser.add_argument("--frames", default="81", help="comma-separated video lengths (4k+1), e.g. 81,241,481")
    parser.add_argument("--cache", choices=("easycache", "lazycache"),
                        help="ComfyUI's EasyCache or LazyCache at its default threshold on the model")
    parser.add_argument("--context", metavar="LENGTH:OVERLAP",
                        help="sample in ComfyUI's WAN context windows of LENGTH frames overlapping by OVERLAP (e.g. 81:16)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--preset", choices=tuple(PRESETS), help="fast (distilled-step LoRA, 4 steps) or reference (40)")
    parser.add_argument("--library", action="store_true", help="also time the DiT's own forward on the same file")
    parser.add_argument("--profile", action="store_true",
                        help="time each level of every model call inside the server, profile DiT call 2 and "
                             "rerun it (benchmarks/comfyui_profile_node)")  # fmt: skip
    parser.add_argument("--profile-call", type=int, default=PROFILE_CALL, metavar="N",
                        help=f"with --profile: the DiT call profiled (1 = the first; default {PROFILE_CALL})")
    parser.add_argument("--profile-as-run", action="store_true",
                        help="with --profile: profile that call as it runs (its one-time work, e.g. the first "
                             "call's, included; its time then includes the profiler's overhead), not a rerun")
    parser.add_argument("--videos", type=int, default=1, metavar="N",
                        help="make N videos in turn on the same server: the later ones find the models loaded, "
                             "as a server that keeps running does (their input files are copies under other names, "
                             "so every node that reads them runs again; the prompt's text encoding is reused)")
    parser.add_argument("--fp8-matmul", action="store_true",
                        help="the loader's fp8_matmul on (scaled fp8 weights multiply in fp8; a LoRA is written into them)")
    parser.add_argument("--detect-resolution", type=int, default=1024)
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu (checks on a machine without GPU)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per graph")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "pipeline")
    args = parser.parse_args(argv)
    if args.python:
        os.environ["COMFYUI_PYTHON"] = args.python
    python = comfyui_python(args.comfyui)
    out = args.out.resolve()
    models = (args.models or out / "models").resolve()
    out.mkdir(parents=True, exist_ok=True)

    print(f"building {args.scale} models into {models} (first run only) ...", file=sys.stderr, flush=True)
    subprocess.run([python, "-m", "benchmarks.random_models", "--comfyui", str(args.comfyui), "--out", str(models),
                    "--scale", args.scale], cwd=REPO_ROOT, check=True)  # fmt: skip
    names = json.loads(subprocess.run(
        [python, "-c", f"import json; from benchmarks.random_models import file_names; print(json.dumps(file_names({args.scale!r})))"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout)  # fmt: skip
    lengths = [int(v) for v in args.frames.split(",")]
    context = tuple(int(v) for v in args.context.split(":")) if args.context else None
    # One driving video per length (8 frames of margin): the graph extracts and draws every
    # frame it is given, so a run fed the longest run's video would time work it never uses.
    inputs = {}
    for length in lengths:
        inputs[length] = out / f"input-{length}f"
        inputs[length].mkdir(exist_ok=True)
        subprocess.run([python, "-c", "import sys; from pathlib import Path; from scripts.make_tiny_models import "
                        f"write_inputs; write_inputs(Path({str(inputs[length])!r}), {args.width}, {args.height}, "
                        f"{length + 8}, 16)"], cwd=REPO_ROOT, check=True)  # fmt: skip

    from scripts.make_tiny_models import DRIVING, REFERENCE
    from scripts.workflow_variants import calls_per_step

    api = json.loads((REPO_ROOT / "workflows" / "api" / "steadydancer_api.json").read_text())
    results: list[RunResult] = []
    for weights in args.weights.split(","):
        files = {"dit": names[{"gguf": "gguf", "fp8": "fp8"}[weights]], **{k: names[k] for k in
                 ("text_encoder", "text_encoder_type", "clip_vision", "vae")}}  # fmt: skip
        for length in lengths:
            settings = {"width": args.width, "height": args.height, "length": length, "steps": args.steps}
            for mode in args.modes.split(","):
                flags = mode_args(mode, args.comfyui, args.cpu)
                name = f"{weights}/{mode}/{length}f"
                if flags is None:
                    print(f"skipping {name}: not possible with this ComfyUI / machine", file=sys.stderr)
                    continue
                print(f"running {name} ...", file=sys.stderr, flush=True)
                work = out / "runs" / name.replace("/", "-")
                work.mkdir(parents=True, exist_ok=True)
                (work / PROFILE_FILE).unlink(missing_ok=True)
                runs = []
                for video in range(1, args.videos + 1):
                    graph = bench_graph(api, args, weights, {**files, "lora": names["lora"]}, settings, context, video)
                    if args.profile and video == 1:
                        graph = with_profile(graph, work, args.profile_call, args.profile_as_run)
                    label = name if video == 1 else f"{name} video {video}"
                    runs.append((graph, RunResult(label, weights, mode, flags, video_number=video)))
                if (work / "input").exists():
                    shutil.rmtree(work / "input")
                shutil.copytree(inputs[length], work / "input")
                for video in range(2, args.videos + 1):
                    for file in (REFERENCE, DRIVING):
                        shutil.copy(work / "input" / file, work / "input" / video_file(file, video))
                ballast = Ballast(SMALL_CARD_GIB, python) if mode == "16gb-card" else None
                try:
                    if ballast:
                        print(f"  ballast held: {ballast.free_gib:.2f} GiB of the card free", file=sys.stderr)
                    done = run_videos(args.comfyui, models, work, runs, not args.cpu, args.timeout)
                finally:
                    if ballast:
                        ballast.stop()
                for result in done:
                    if ballast:
                        result.card_free_gib = ballast.free_gib
                    if args.preset:
                        result.calls = calls_per_step(args.preset)
                    results.append(result)
                    print_run(result)  # before the library timing: a run cut short later keeps these figures
                (out / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
                result = done[0]
                if args.preset and args.library and result.ok:
                    result.library_s = library_seconds(python, args.comfyui, models / "diffusion_models" / files["dit"],
                                                       args.width, args.height, length, args.cpu,
                                                       profile=args.profile, fp8_matmul=args.fp8_matmul)  # fmt: skip
                    print_library(result)
                    (out / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print_summary(results)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
