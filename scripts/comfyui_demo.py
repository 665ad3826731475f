"""Run the example graph in a real ComfyUI with this package, on the embedded tiny models.

    python scripts/comfyui_demo.py --comfyui DIR [--python COMFYUI_PYTHON] [--keep-running]

builds the tiny models (scripts/make_tiny_models.py, with ComfyUI's Python), starts ComfyUI
on a free loopback port with this package, submits the example API graph rewritten for the
tiny models, waits for it, prints where the video was written, and stops the server
(`scripts/comfyui_server.py`: the package is loaded from the checkout, nothing is copied).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file by setup.sh

from scripts.comfyui_server import (
    REPO_ROOT,
    ComfyServer,
    comfyui_python,
    messages_until_done,
    saved_files,
)


def build_demo(python: str, comfyui: Path, models: Path, work: Path) -> dict:
    """Tiny models into `models`, inputs into work/input; returns the demo API graph."""
    graph = work / "demo_graph.json"
    subprocess.run(
        [python, str(REPO_ROOT / "scripts" / "make_tiny_models.py"), "--comfyui", str(comfyui), "--out", str(models),
         "--input", str(work / "input"), "--graph", str(graph)],
        cwd=REPO_ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )  # fmt: skip
    return json.loads(graph.read_text())


def run_demo(server: ComfyServer, graph: dict, timeout: float = 1800.0) -> Path:
    """Submit the graph, report progress on stderr, return the saved video's path."""
    classes = {k: v["class_type"] for k, v in graph.items()}

    def report(message: dict) -> None:
        data = message["data"]
        if message["type"] == "executing" and data.get("node"):
            print(f"  running {classes.get(data['node'], data['node'])}", file=sys.stderr, flush=True)

    ws = server.websocket()  # before submitting: the first messages come at once
    try:
        response = server.submit(graph)
        if response.status_code != 200:
            raise RuntimeError(f"ComfyUI refused the graph ({response.status_code}): {response.text}")
        prompt_id = response.json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id, timeout, on_message=report)
    finally:
        ws.close()
    if messages[-1]["type"] != "execution_success":
        raise RuntimeError(f"the graph failed: {json.dumps(messages[-1]['data'])[:2000]}")
    videos = [f for f in saved_files(server.wait(prompt_id)) if f["filename"].endswith((".mp4", ".webm", ".mov"))]
    if not videos:
        raise RuntimeError("the graph finished without saving a video")
    return server.output_dir / videos[0].get("subfolder", "") / videos[0]["filename"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the example graph in ComfyUI on the tiny models.")
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (0.3.64 or 0.33.0)")
    parser.add_argument("--python", help="ComfyUI's Python (default: COMFYUI_PYTHON, DIR/.venv, python3)")
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "tiny_models", help="tiny models folder")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "out" / "demo", help="input/output/log folder")
    args = parser.parse_args(argv)
    if args.python:
        os.environ["COMFYUI_PYTHON"] = args.python
    python = comfyui_python(args.comfyui)
    args.work.mkdir(parents=True, exist_ok=True)
    print("building the tiny demo models (first run: about a minute) ...", file=sys.stderr, flush=True)
    graph = build_demo(python, args.comfyui, args.models.resolve(), args.work.resolve())
    with tempfile.TemporaryDirectory(prefix="steadydancer-comfyui-") as scratch:
        server = ComfyServer(args.comfyui, Path(scratch), args.models.resolve(), input_dir=args.work / "input",
                             output_dir=args.work / "output")  # fmt: skip
        try:
            print(f"starting ComfyUI on {server.url} (log: {args.work / 'comfyui.log'}) ...", file=sys.stderr, flush=True)
            server.wait_ready()
            video = run_demo(server, graph)
        finally:
            server.stop()
            (args.work / "comfyui.log").write_text(server.log_path.read_text(errors="replace"))
    print(f"video written to {video}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
