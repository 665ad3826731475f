"""Broken API graphs against a real ComfyUI: refused at /prompt, naming the node and the input.

Each case changes one input of the demo graph (the example workflow on the tiny models) to a
value a careless user or an attacker might send: NaN and infinities (valid for Python's JSON),
out-of-range numbers, wrong types, sizes that are not multiples of 16, unknown choices, files
that are not there, broken links. Every one must come back as HTTP 400 with `node_errors`
for the node, and an error that names the input; nothing may run. Afterwards the valid
graph still runs. docs/reliability.md keeps the count.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import requests

from scripts.comfyui_server import messages_until_done

pytestmark = pytest.mark.comfyui

NAN, INF = math.nan, math.inf

# (node class, input, bad value, text that the error must contain); one node of each class.
BAD_INPUTS = [
    ("SteadyDancerGuider", "text_scale", NAN, "text_scale"),
    ("SteadyDancerGuider", "text_scale", INF, "text_scale"),
    ("SteadyDancerGuider", "text_scale", -INF, "text_scale"),
    ("SteadyDancerGuider", "text_scale", -1.0, "text_scale"),
    ("SteadyDancerGuider", "text_scale", 31.0, "text_scale"),
    ("SteadyDancerGuider", "text_scale", "five", "text_scale"),
    ("SteadyDancerGuider", "pose_scale", NAN, "pose_scale"),
    ("SteadyDancerGuider", "pose_scale", -0.5, "pose_scale"),
    ("SteadyDancerGuider", "pose_scale", 11.0, "pose_scale"),
    ("SteadyDancerGuider", "start", NAN, "start"),
    ("SteadyDancerGuider", "start", -0.1, "start"),
    ("SteadyDancerGuider", "start", 0.5, "start"),  # after end (0.4): an empty pose window
    ("SteadyDancerGuider", "end", NAN, "end"),
    ("SteadyDancerGuider", "end", 0.05, "end"),  # before start (0.1)
    ("SteadyDancerGuider", "end", 2.0, "end"),
    ("SteadyDancerModelSampling", "shift", NAN, "shift"),
    ("SteadyDancerModelSampling", "shift", INF, "shift"),
    ("SteadyDancerModelSampling", "shift", 0.0, "shift"),
    ("SteadyDancerModelSampling", "shift", 1000.0, "shift"),
    ("SteadyDancerModelSampling", "timesteps", "round", "timesteps"),
    ("SteadyDancerScheduler", "steps", 0, "steps"),
    ("SteadyDancerScheduler", "steps", -5, "steps"),
    ("SteadyDancerScheduler", "steps", 100_000, "steps"),
    ("SteadyDancerScheduler", "steps", "many", "steps"),
    ("SteadyDancerGenerationSize", "area", "999*999", "area"),
    ("SteadyDancerGenerationSize", "width", 70, "width"),
    ("SteadyDancerGenerationSize", "height", 70, "height"),
    ("SteadyDancerGenerationSize", "width", -16, "width"),
    ("SteadyDancerImageToVideo", "length", 6, "length"),
    ("SteadyDancerImageToVideo", "length", 0, "length"),
    ("SteadyDancerImageToVideo", "length", -3, "length"),
    ("SteadyDancerImageToVideo", "length", 100_001, "length"),
    ("SteadyDancerImageToVideo", "batch_size", 0, "batch_size"),
    ("SteadyDancerImageToVideo", "short_video", "mirror", "short_video"),
    ("SteadyDancerImageToVideo", "width", 70, "width"),
    ("SteadyDancerPoseAlign", "width", 70, "width"),
    ("SteadyDancerPoseAlign", "missing_person", "guess", "missing_person"),
    ("SteadyDancerPoseAlign", "colours", "rainbow", "colours"),
    ("SteadyDancerPoseAlign", "align_frame", -1, "align_frame"),
    ("SteadyDancerPoseAlign", "seed", -1, "seed"),
    ("SteadyDancerPoseExtract", "detect_resolution", 0, "detect_resolution"),
    ("SteadyDancerPoseExtract", "detect_resolution", 10_000, "detect_resolution"),
    ("SteadyDancerPoseExtract", "batch_size", 0, "batch_size"),
    ("SteadyDancerPoseDetectorLoader", "backend", "tensorrt", "backend"),
    ("SteadyDancerPoseDetectorLoader", "colour_order", "bgr", "colour_order"),
    ("SteadyDancerModelLoader", "model_name", "nope.gguf", "model_name"),
    ("SteadyDancerModelLoader", "model_name", "../../../etc/passwd", "model_name"),
    ("SteadyDancerModelLoader", "compute_dtype", "fp4", "compute_dtype"),
    ("SteadyDancerModelLoader", "attention", "fast", "attention"),
]


def _node(graph: dict, class_type: str) -> str:
    return next(k for k, v in graph.items() if v["class_type"] == class_type)


def _submit(comfy_server, graph: dict) -> requests.Response:
    """POST /prompt with Python's JSON, which writes NaN and Infinity (requests refuses to)."""
    body = json.dumps({"prompt": graph, "client_id": comfy_server.client_id})
    return requests.post(f"{comfy_server.url}/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60)


def _refused(comfy_server, graph: dict, node_id: str, mentions: str) -> None:
    response = _submit(comfy_server, graph)
    assert response.status_code == 400, f"accepted ({response.status_code}): {response.text[:500]}"
    body = response.json()
    assert node_id in body.get("node_errors", {}), body
    errors = body["node_errors"][node_id]["errors"]
    named = [e for e in errors if mentions in e.get("details", "") + e.get("extra_info", {}).get("input_name", "")]
    assert named, f"no error names {mentions!r}: {errors}"


@pytest.mark.parametrize(("class_type", "name", "value", "mentions"), BAD_INPUTS,
                         ids=[f"{c}.{n}={v!r}" for c, n, v, _ in BAD_INPUTS])  # fmt: skip
def test_bad_input_is_refused_at_prompt_naming_node_and_input(comfy_server, demo_graph, class_type, name, value, mentions) -> None:
    graph = copy.deepcopy(demo_graph)
    node_id = _node(graph, class_type)
    graph[node_id]["inputs"][name] = value
    _refused(comfy_server, graph, node_id, mentions)


def _missing_link(graph: dict) -> str:
    node_id = _node(graph, "SteadyDancerGuider")
    graph[node_id]["inputs"]["model"] = ["999", 0]  # a node that is not in the graph
    return node_id


def _wrong_type_link(graph: dict) -> str:
    node_id = _node(graph, "SteadyDancerImageToVideo")
    graph[node_id]["inputs"]["positive"] = [_node(graph, "SteadyDancerPoseDetectorLoader"), 0]  # not CONDITIONING
    return node_id


def _removed_input(graph: dict) -> str:
    node_id = _node(graph, "SteadyDancerGuider")
    del graph[node_id]["inputs"]["pose_negative"]
    return node_id


def _wrong_slot(graph: dict) -> str:
    node_id = _node(graph, "SteadyDancerGuider")
    graph[node_id]["inputs"]["pose_negative"] = [_node(graph, "SteadyDancerImageToVideo"), 9]  # it has 4 outputs
    return node_id


@pytest.mark.parametrize("breakage", [_missing_link, _wrong_type_link, _removed_input, _wrong_slot],
                         ids=["missing-node", "wrong-type", "missing-input", "missing-output-slot"])  # fmt: skip
def test_broken_links_are_refused_at_prompt(comfy_server, demo_graph, breakage) -> None:
    """ComfyUI's own checks: a 400 with node_errors (it files some under the node downstream)."""
    graph = copy.deepcopy(demo_graph)
    breakage(graph)
    response = _submit(comfy_server, graph)
    assert response.status_code == 400, response.text[:500]
    assert response.json().get("node_errors") or response.json().get("error"), response.text[:500]


def test_the_valid_graph_still_runs_after_the_broken_ones(comfy_server, demo_graph) -> None:
    ws = comfy_server.websocket()
    try:
        response = comfy_server.submit(demo_graph)
        assert response.status_code == 200, response.text
        messages = messages_until_done(ws, response.json()["prompt_id"])
    finally:
        ws.close()
    assert messages[-1]["type"] == "execution_success", messages[-1]

