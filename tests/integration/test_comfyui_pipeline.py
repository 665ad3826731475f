"""The example graph runs end to end in a real ComfyUI on the tiny models."""

from __future__ import annotations

import copy
import threading

import cv2
import pytest

from scripts.comfyui_server import messages_until_done, saved_files
from scripts.make_tiny_models import DEMO

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def _node(graph: dict, class_type: str) -> str:
    return next(k for k, v in graph.items() if v["class_type"] == class_type)


def _frames(path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a video file, decoded."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    count, size = 0, (0, 0)
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, size = count + 1, frame.shape[:2]
    capture.release()
    return count, *size, fps


def test_demo_graph_writes_video_and_reports_progress(comfy_server, demo_graph: dict) -> None:
    # Another test may have run this graph on the shared server: ComfyUI would then take every
    # node from its cache and report no progress. A batch size no other test uses (it does not
    # change the result) makes pose extraction and everything after it run again.
    demo_graph = copy.deepcopy(demo_graph)
    demo_graph[_node(demo_graph, "SteadyDancerPoseExtract")]["inputs"]["batch_size"] = 3
    ws = comfy_server.websocket()
    try:
        response = comfy_server.submit(demo_graph)
        assert response.status_code == 200, response.text
        prompt_id = response.json()["prompt_id"]
        messages = messages_until_done(ws, prompt_id)
    finally:
        ws.close()
    assert messages[-1]["type"] == "execution_success", f"{messages[-1]}\n{comfy_server.log()}"

    progress_nodes = {m["data"]["node"] for m in messages if m["type"] == "progress"}
    assert _node(demo_graph, "SteadyDancerPoseExtract") in progress_nodes, "no per-frame progress from pose extraction"
    assert _node(demo_graph, "SamplerCustomAdvanced") in progress_nodes, "no per-step progress from the sampler"

    videos = [f for f in saved_files(comfy_server.wait(prompt_id)) if f["filename"].endswith((".mp4", ".webm"))]
    assert len(videos) == 1
    path = comfy_server.output_dir / videos[0]["subfolder"] / videos[0]["filename"]
    i2v = demo_graph[_node(demo_graph, "SteadyDancerImageToVideo")]["inputs"]
    size = demo_graph[_node(demo_graph, "SteadyDancerGenerationSize")]["inputs"]
    # the generated length and size, at the model's 16 fps (the reference's, whatever the driving video's)
    assert DEMO["fps"] != 16
    assert _frames(path) == (i2v["length"], size["height"], size["width"], pytest.approx(16))


def test_interrupt_stops_sampling_and_next_prompt_runs(comfy_server, demo_graph: dict) -> None:
    long_graph = copy.deepcopy(demo_graph)
    long_graph[_node(long_graph, "SteadyDancerScheduler")]["inputs"]["steps"] = 500
    long_graph[_node(long_graph, "RandomNoise")]["inputs"]["noise_seed"] = 12345
    sampler = _node(long_graph, "SamplerCustomAdvanced")
    interrupted = threading.Event()

    def interrupt_once_sampling(message: dict) -> None:
        data = message["data"]
        if message["type"] == "progress" and data.get("node") == sampler and data["value"] >= 2 and not interrupted.is_set():
            interrupted.set()
            comfy_server.interrupt()

    ws = comfy_server.websocket()
    try:
        response = comfy_server.submit(long_graph)
        assert response.status_code == 200, response.text
        messages = messages_until_done(ws, response.json()["prompt_id"], on_message=interrupt_once_sampling)
    finally:
        ws.close()
    assert interrupted.is_set(), "sampling never reported progress"
    assert messages[-1]["type"] == "execution_interrupted"
    assert messages[-1]["data"]["node_id"] == sampler
    steps_done = max(m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == sampler)
    assert steps_done < 500

    again = copy.deepcopy(demo_graph)
    again[_node(again, "RandomNoise")]["inputs"]["noise_seed"] = 777  # not a cached result
    response = comfy_server.submit(again)
    assert response.status_code == 200, response.text
    entry = comfy_server.wait(response.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
