"""The shipped workflows and the demo graph derived from them (no ComfyUI needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.comfyui_server import write_extra_paths
from scripts.make_tiny_models import DEMO, demo_graph

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


@pytest.fixture(scope="module")
def api() -> dict:
    return json.loads((WORKFLOWS / "api" / "steadydancer_api.json").read_text())


def _links(graph: dict) -> set[tuple[str, str, str, int]]:
    return {(k, name, v[0], v[1]) for k, n in graph.items() for name, v in n["inputs"].items() if isinstance(v, list)}


def test_api_workflow_links_point_at_existing_nodes(api: dict) -> None:
    for node_id, name, source, slot in _links(api):
        assert source in api, f"{node_id}.{name} links to missing node {source}"
        assert slot >= 0


def test_api_workflow_goes_from_image_and_video_to_saved_video(api: dict) -> None:
    kinds = {n["class_type"] for n in api.values()}
    assert {"LoadImage", "LoadVideo", "GetVideoComponents", "SaveVideo"} <= kinds
    assert {"CLIPLoader", "CLIPVisionLoader", "VAELoader"} <= kinds  # ComfyUI's own loaders
    clip = next(n for n in api.values() if n["class_type"] == "CLIPLoader")
    assert clip["inputs"]["type"] == "wan"
    i2v = next(n for n in api.values() if n["class_type"] == "SteadyDancerImageToVideo")
    assert (i2v["inputs"]["length"] - 1) % 4 == 0


REFERENCE_NEGATIVE = (
    "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def test_reference_defaults(api: dict) -> None:
    """Reference settings: text 5, pose 1.5, window 0.1-0.4, 40 flow-UniPC steps on its schedule
    with integer timesteps, shift 3 at the 480p area, the i2v negative prompt, 16 fps."""
    by_kind = {n["class_type"]: n["inputs"] for n in api.values()}
    guider = by_kind["SteadyDancerGuider"]
    assert (guider["text_scale"], guider["pose_scale"], guider["start"], guider["end"]) == (5.0, 1.5, 0.1, 0.4)
    assert by_kind["SteadyDancerScheduler"]["steps"] == 40
    assert "SteadyDancerUniPCSampler" in by_kind
    assert by_kind["SteadyDancerModelSampling"] == {"model": by_kind["SteadyDancerModelSampling"]["model"], "shift": 3.0, "timesteps": "integer"}
    assert by_kind["SteadyDancerGenerationSize"]["area"] == "832*480"  # shift 3.0 goes with it
    assert (by_kind["SteadyDancerGenerationSize"]["width"], by_kind["SteadyDancerGenerationSize"]["height"]) == (0, 0)
    assert by_kind["CreateVideo"]["fps"] == 16.0
    assert by_kind["SteadyDancerPoseDetectorLoader"]["colour_order"] == "reference"
    negative = api[by_kind["SteadyDancerImageToVideo"]["negative"][0]]["inputs"]["text"]
    assert negative == REFERENCE_NEGATIVE


def test_sizes_come_from_the_reference_image(api: dict) -> None:
    size = next(k for k, n in api.items() if n["class_type"] == "SteadyDancerGenerationSize")
    for kind in ("SteadyDancerImageToVideo", "SteadyDancerPoseAlign"):
        inputs = next(n["inputs"] for n in api.values() if n["class_type"] == kind)
        assert (inputs["width"], inputs["height"]) == ([size, 0], [size, 1])


def test_clip_vision_is_encoded_as_the_reference(api: dict) -> None:
    """Both CLIP inputs go through SteadyDancer CLIP Vision Encode; the pose one gets the first
    pose frame at the reference image's size (Pose Align's third output)."""
    i2v = next(n["inputs"] for n in api.values() if n["class_type"] == "SteadyDancerImageToVideo")
    reference, pose = api[i2v["clip_vision_reference"][0]], api[i2v["clip_vision_pose"][0]]
    assert reference["class_type"] == pose["class_type"] == "SteadyDancerCLIPVisionEncode"
    assert api[pose["inputs"]["image"][0]]["class_type"] == "SteadyDancerPoseAlign" and pose["inputs"]["image"][1] == 2
    assert api[reference["inputs"]["image"][0]]["class_type"] == "LoadImage"


def test_demo_graph_keeps_the_graph_and_swaps_models_and_size(api: dict) -> None:
    demo = demo_graph(api)
    assert _links(demo) == _links(api)
    assert {k: v["class_type"] for k, v in demo.items()} == {k: v["class_type"] for k, v in api.items()}
    by_kind = {n["class_type"]: n["inputs"] for n in demo.values()}
    assert by_kind["CLIPLoader"]["type"] == "stable_diffusion"
    assert by_kind["SteadyDancerImageToVideo"]["length"] == DEMO["length"]
    size = by_kind["SteadyDancerGenerationSize"]
    assert (size["width"], size["height"]) == (DEMO["width"], DEMO["height"])  # forced; the nodes stay linked to it
    assert by_kind["SteadyDancerScheduler"]["steps"] == DEMO["steps"]
    assert api == json.loads((WORKFLOWS / "api" / "steadydancer_api.json").read_text()), "the source graph was modified"


def test_extra_paths_load_the_package_without_copying_it(tmp_path: Path) -> None:
    config = write_extra_paths(tmp_path, tmp_path / "models").read_text()
    link = tmp_path / "custom_nodes" / "comfyui-steadydancer"
    assert link.is_symlink() and (link / "__init__.py").is_file()
    assert f"custom_nodes: {tmp_path / 'custom_nodes'}" in config
    assert "  dwpose: dwpose" in config and "  diffusion_models: diffusion_models" in config


def test_every_served_template_is_ui_format() -> None:
    """ComfyUI lists every workflows/*.json as a template; an API graph there fails to load."""
    for path in sorted(WORKFLOWS.glob("*.json")):
        assert "nodes" in json.loads(path.read_text()), f"{path.name} is served as a template but is not UI format"


def test_long_video_workflow_is_the_example_sampled_in_context_windows(api: dict) -> None:
    """workflows/api/steadydancer_long_api.json is exactly what scripts/workflow_variants.py
    derives from the example: the same graph, a WAN Context Windows node (81 frames
    overlapping by 16, no first frame retained) between the model and the guider, 481 frames."""
    from scripts.workflow_variants import long_workflow

    long = json.loads((WORKFLOWS / "api" / "steadydancer_long_api.json").read_text())
    assert long == long_workflow()
    windows = next(k for k, n in long.items() if n["class_type"] == "WanContextWindowsManual")
    inputs = long[windows]["inputs"]
    assert (inputs["context_length"], inputs["context_overlap"], inputs["retain_first_frame"]) == (81, 16, False)
    guider = next(n["inputs"] for n in long.values() if n["class_type"] == "SteadyDancerGuider")
    assert guider["model"] == [windows, 0] and inputs["model"] == next(n["inputs"] for n in api.values() if n["class_type"] == "SteadyDancerGuider")["model"]
    assert next(n["inputs"] for n in long.values() if n["class_type"] == "SteadyDancerImageToVideo")["length"] == 481
    assert {k: v for k, v in long.items() if k != windows and v["class_type"] not in ("SteadyDancerGuider", "SteadyDancerImageToVideo")} == {
        k: v for k, v in api.items() if v["class_type"] not in ("SteadyDancerGuider", "SteadyDancerImageToVideo")
    }


def test_ui_workflows_have_the_nodes_of_their_api_twins() -> None:
    for ui_name, api_name in (("steadydancer.json", "steadydancer_api.json"), ("steadydancer_long.json", "steadydancer_long_api.json")):
        ui = json.loads((WORKFLOWS / ui_name).read_text())
        api_graph = json.loads((WORKFLOWS / "api" / api_name).read_text())
        assert sorted(str(n["id"]) for n in ui["nodes"]) == sorted(api_graph, key=str), ui_name
        assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api_graph.items()}
