"""Videos longer than the model's 81 frames: the example graph with ComfyUI's "WAN Context
Windows (Manual)" node, on the tiny models in a real ComfyUI (32x32 pixels keep the real-size
VAE affordable on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from scripts.comfyui_server import REPO_ROOT, comfyui_python, messages_until_done, saved_files
from scripts.workflow_variants import node_id, with_context_windows
from tests.integration.test_comfyui_pipeline import _frames

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SIZE = 32
LONGEST = 241
DRIVING = "steadydancer_driving_long.mp4"


@pytest.fixture(scope="module")
def long_driving_video(comfy_server) -> str:
    """A LONGEST-frame driving video in ComfyUI's input folder (written with ComfyUI's Python)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; from pathlib import Path; from scripts.make_tiny_models import write_inputs; "
                f"write_inputs(Path(sys.argv[1]), {SIZE}, {SIZE}, {LONGEST}, 16)")  # fmt: skip
        subprocess.run([comfyui_python(Path(os.environ["COMFYUI_DIR"])), "-c", code, tmp], cwd=REPO_ROOT, check=True)
        (Path(tmp) / "steadydancer_driving.mp4").replace(comfy_server.input_dir / DRIVING)
    return DRIVING


def long_graph(demo_graph: dict, length: int, driving: str) -> dict:
    """The demo graph at `length` frames, sampled in windows of 81 frames overlapping by 16."""
    graph = with_context_windows(demo_graph, length)
    graph[node_id(graph, "LoadVideo")]["inputs"]["file"] = driving
    for kind in ("SteadyDancerImageToVideo", "SteadyDancerPoseAlign"):
        graph[node_id(graph, kind)]["inputs"].update(width=SIZE, height=SIZE)
    return graph


@pytest.mark.parametrize("length", [161, 241])
def test_long_graph_writes_the_whole_video_through_context_windows(comfy_server, demo_graph, long_driving_video, length) -> None:
    graph = long_graph(demo_graph, length, long_driving_video)
    ws = comfy_server.websocket()
    try:
        response = comfy_server.submit(graph)
        assert response.status_code == 200, response.text
        prompt_id = response.json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id, timeout=1800)
    finally:
        ws.close()
    assert messages[-1]["type"] == "execution_success", f"{json.dumps(messages[-1])[:2000]}\n{comfy_server.log()}"
    assert "context window" in comfy_server.log(200_000).lower(), "ComfyUI did not sample in context windows"
    videos = [f for f in saved_files(comfy_server.wait(prompt_id)) if f["filename"].endswith(".mp4")]
    assert len(videos) == 1
    frames, height, width, _ = _frames(comfy_server.output_dir / videos[0]["subfolder"] / videos[0]["filename"])
    assert (frames, height, width) == (length, SIZE, SIZE)
