"""Our nodes as a real ComfyUI (0.3.64 or 0.33.0) sees them: registration, schemas, workflows, validation."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui

# node -> (required inputs with their types, optional inputs, output types)
EXPECTED = {
    "SteadyDancerPoseDetectorLoader": (
        {"backend": "COMBO", "colour_order": "COMBO"}, {"onnx_runtime": "COMBO"}, ["STEADYDANCER_POSE_DETECTOR"],
    ),
    "SteadyDancerPoseExtract": (
        {"pose_detector": "STEADYDANCER_POSE_DETECTOR", "images": "IMAGE", "detect_resolution": "INT", "batch_size": "INT"},
        {},
        ["POSE_KEYPOINT", "IMAGE"],
    ),
    "SteadyDancerPoseAlign": (
        {"reference_image": "IMAGE", "driving_poses": "POSE_KEYPOINT", "width": "INT", "height": "INT",
         "align_frame": "INT", "missing_person": "COMBO", "seed": "INT", "colours": "COMBO"},
        {"pose_detector": "STEADYDANCER_POSE_DETECTOR", "reference_pose": "POSE_KEYPOINT"},
        ["IMAGE", "IMAGE", "IMAGE"],
    ),
    "SteadyDancerGenerationSize": (
        {"reference_image": "IMAGE", "area": "COMBO", "width": "INT", "height": "INT"}, {}, ["INT", "INT"],
    ),
    "SteadyDancerCLIPVisionEncode": ({"clip_vision": "CLIP_VISION", "image": "IMAGE"}, {}, ["CLIP_VISION_OUTPUT"]),
    "SteadyDancerImageToVideo": (
        {"positive": "CONDITIONING", "negative": "CONDITIONING", "vae": "VAE",
         "clip_vision_reference": "CLIP_VISION_OUTPUT", "clip_vision_pose": "CLIP_VISION_OUTPUT",
         "reference_image": "IMAGE", "pose_frames": "IMAGE", "negative_pose_frames": "IMAGE",
         "width": "INT", "height": "INT", "length": "INT", "batch_size": "INT", "short_video": "COMBO"},
        {},
        ["CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT"],
    ),
    # the nodes-model side, as the team contract names them
    "SteadyDancerModelLoader": ({"model_name": "COMBO", "compute_dtype": "COMBO", "attention": "COMBO"},
                                {"fp8_matmul": "BOOLEAN"}, ["MODEL"]),
    "SteadyDancerGuider": (
        {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "pose_negative": "CONDITIONING",
         "text_scale": "FLOAT", "pose_scale": "FLOAT", "start": "FLOAT", "end": "FLOAT"},
        {},
        ["GUIDER"],
    ),
    "SteadyDancerModelSampling": ({"model": "MODEL", "shift": "FLOAT", "timesteps": "COMBO"}, {}, ["MODEL"]),
    "SteadyDancerScheduler": ({"model": "MODEL", "steps": "INT"}, {}, ["SIGMAS"]),
    "SteadyDancerUniPCSampler": ({}, {}, ["SAMPLER"]),
}  # fmt: skip

def _type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.mark.parametrize("node", sorted(EXPECTED))
def test_object_info_lists_node_with_its_inputs(object_info: dict, node: str) -> None:
    required, optional, outputs = EXPECTED[node]
    assert node in object_info, f"{node} is not registered; see test-output/comfyui.log"
    info = object_info[node]
    assert {k: _type(v) for k, v in info["input"]["required"].items()} == required
    assert {k: _type(v) for k, v in info["input"].get("optional", {}).items()} == optional
    assert info["output"] == outputs
    assert info["python_module"].startswith("custom_nodes.")
    for name, spec in {**info["input"]["required"], **info["input"].get("optional", {})}.items():
        assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_detector_loader_offers_both_backends_and_registers_dwpose_folder(object_info: dict, comfy_server) -> None:
    spec = object_info["SteadyDancerPoseDetectorLoader"]["input"]["required"]["backend"]
    assert set(spec[1]["options"] if spec[0] == "COMBO" else spec[0]) == {"onnx", "mmpose"}
    assert "dwpose" in comfy_server.get("/models").json()


def test_every_package_node_registers(object_info: dict, api_workflow: dict) -> None:
    ours = {k for k, v in object_info.items() if "steadydancer" in v["python_module"].lower()}
    assert set(EXPECTED) <= ours
    used = {node["class_type"] for node in api_workflow.values()}
    assert not used - set(object_info), "the workflow uses node types ComfyUI does not have"


def test_api_workflow_is_valid_against_object_info(object_info: dict, api_workflow: dict) -> None:
    """Every link joins an output to an input of the same type; every setting is accepted."""
    model_inputs = {"clip_name", "vae_name", "model_name", "unet_name", "image", "file", "lora_name"}
    for node_id, node in api_workflow.items():
        info = object_info[node["class_type"]]
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        missing = set(info["input"]["required"]) - set(node["inputs"])
        assert not missing, f"node {node_id} ({node['class_type']}) lacks {missing}"
        for name, value in node["inputs"].items():
            assert name in specs, f"node {node_id} ({node['class_type']}) has no input {name}"
            kind = _type(specs[name])
            if isinstance(value, list):
                source = api_workflow[value[0]]
                produced = object_info[source["class_type"]]["output"][value[1]]
                assert produced == kind or kind == "*", f"{node_id}.{name}: {produced} linked to {kind}"
            elif kind == "COMBO" and name not in model_inputs:
                options = specs[name][0] if isinstance(specs[name][0], list) else specs[name][1]["options"]
                assert value in options, f"{node_id}.{name}={value!r} not in {options}"
            elif kind in ("INT", "FLOAT"):
                opts = specs[name][1]
                assert opts.get("min", value) <= value <= opts.get("max", value), f"{node_id}.{name}={value}"


def test_bad_length_is_refused_naming_our_node_and_input(comfy_server, demo_graph: dict) -> None:
    graph = {k: {**v, "inputs": dict(v["inputs"])} for k, v in demo_graph.items()}
    node_id = next(k for k, v in graph.items() if v["class_type"] == "SteadyDancerImageToVideo")
    graph[node_id]["inputs"]["length"] = 6
    response = comfy_server.submit(graph)
    assert response.status_code == 400
    body = response.json()
    errors = body["node_errors"][node_id]
    assert errors["class_type"] == "SteadyDancerImageToVideo"
    # ComfyUI files a failed validate_inputs under each input it checks; the message names length
    assert any(e["extra_info"]["input_name"] == "length" and "length must be 4k+1" in e["details"] for e in errors["errors"])


def test_unknown_missing_person_policy_is_refused(comfy_server, demo_graph: dict) -> None:
    graph = {k: {**v, "inputs": dict(v["inputs"])} for k, v in demo_graph.items()}
    node_id = next(k for k, v in graph.items() if v["class_type"] == "SteadyDancerPoseAlign")
    graph[node_id]["inputs"]["missing_person"] = "guess"
    response = comfy_server.submit(graph)
    assert response.status_code == 400
    errors = response.json()["node_errors"][node_id]["errors"]
    assert "missing_person" in [e["extra_info"]["input_name"] for e in errors]
    assert all("missing_person must be one of" in e["details"] and "'guess'" in e["details"] for e in errors)


def test_workflow_templates_are_served(comfy_server) -> None:
    templates = comfy_server.get("/workflow_templates").json()
    # the UI-format graphs (the API-format ones live in workflows/api/, out of the template list)
    assert sorted(templates.get("comfyui-steadydancer", [])) == ["steadydancer", "steadydancer_long"]
    for name in ("steadydancer", "steadydancer_long"):
        ui = comfy_server.get(f"/api/workflow_templates/comfyui-steadydancer/{name}.json")
        assert ui.ok and ui.json()["nodes"]
