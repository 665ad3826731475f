"""Variants of the example API workflow, derived from it so that they never drift apart.

    python scripts/workflow_variants.py long [--length 481] [--check]

writes workflows/api/steadydancer_long_api.json: the example graph with ComfyUI's
"WAN Context Windows (Manual)" node between the model and the guider (windows of 81 frames
overlapping by 16) and a long `length`. `--check` only compares the file with what would be
written (exit 1 when it differs). The UI-format twin is made from it as for the example:
`scripts/api_to_ui_workflow.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
API = REPO_ROOT / "workflows" / "api" / "steadydancer_api.json"
LONG_API = REPO_ROOT / "workflows" / "api" / "steadydancer_long_api.json"
WINDOWS_NODE_ID = "100"
CONTEXT_LENGTH = 81  # the frames the model was trained on
CONTEXT_OVERLAP = 16
LONG_LENGTH = 481  # 30 s at 16 fps


def node_id(graph: dict, class_type: str) -> str:
    """The id of the (first) node of `class_type`."""
    for key, node in graph.items():
        if node["class_type"] == class_type:
            return key
    raise KeyError(f"the graph has no {class_type} node")


def with_context_windows(
    graph: dict, length: int | None = None, context_length: int = CONTEXT_LENGTH, context_overlap: int = CONTEXT_OVERLAP
) -> dict:
    """`graph` sampled in context windows: a WanContextWindowsManual node feeds the guider's model.

    Inputs are given for both tested ComfyUIs: 0.33's extra ones (freenoise, retain_first_frame,
    split_conds_to_windows) are ignored by 0.3.64. `retain_first_frame` stays off: windows
    after the first must not be given the reference image as their first frame.
    """
    out = copy.deepcopy(graph)
    guider = out[node_id(out, "SteadyDancerGuider")]["inputs"]
    inputs = {
        "model": guider["model"], "context_length": context_length, "context_overlap": context_overlap,
        "context_schedule": "standard_uniform", "context_stride": 1, "closed_loop": False,
        "fuse_method": "pyramid", "freenoise": True, "retain_first_frame": False, "split_conds_to_windows": False,
    }  # fmt: skip
    out[WINDOWS_NODE_ID] = {
        "inputs": inputs, "class_type": "WanContextWindowsManual", "_meta": {"title": "WAN Context Windows (Manual)"},
    }
    guider["model"] = [WINDOWS_NODE_ID, 0]
    if length is not None:
        out[node_id(out, "SteadyDancerImageToVideo")]["inputs"]["length"] = length
    return out


CACHE_NODES = {"easycache": "EasyCache", "lazycache": "LazyCache"}
CACHE_NODE_ID = "101"


def with_cache(graph: dict, kind: str, reuse_threshold: float = 0.2) -> dict:
    """`graph` with ComfyUI's EasyCache or LazyCache (its defaults: threshold 0.2, steps 15-95 %)
    on the guider's model: model calls whose output barely changes are skipped."""
    out = copy.deepcopy(graph)
    guider = out[node_id(out, "SteadyDancerGuider")]["inputs"]
    inputs = {"model": guider["model"], "reuse_threshold": reuse_threshold, "start_percent": 0.15,
              "end_percent": 0.95, "verbose": False}  # fmt: skip
    out[CACHE_NODE_ID] = {"inputs": inputs, "class_type": CACHE_NODES[kind], "_meta": {"title": CACHE_NODES[kind]}}
    guider["model"] = [CACHE_NODE_ID, 0]
    return out


# Guider and scheduler settings of the two presets (the reference's, and the distilled-step
# LoRA's: 4 steps at text scale 1, the pose window kept); "lora" says a LoRA is needed.
PRESETS = {
    "reference": {"steps": 40, "text_scale": 5.0, "pose_scale": 1.5, "start": 0.1, "end": 0.4, "lora": False},
    "fast": {"steps": 4, "text_scale": 1.0, "pose_scale": 1.5, "start": 0.1, "end": 0.4, "lora": True},
}
LORA_NODE_ID = "102"


def with_preset(graph: dict, preset: str, lora_name: str | None = None, lora_strength: float = 1.0) -> dict:
    """`graph` with a preset's steps and guidance; "fast" also puts `lora_name` (a distilled-step
    LoRA) on the DiT with ComfyUI's LoraLoaderModelOnly, before everything else that wraps it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    settings = PRESETS[preset]
    if settings["lora"] and not lora_name:
        raise ValueError(f"the {preset} preset needs a distilled-step LoRA (lora_name)")
    out = copy.deepcopy(graph)
    out[node_id(out, "SteadyDancerScheduler")]["inputs"]["steps"] = settings["steps"]
    out[node_id(out, "SteadyDancerGuider")]["inputs"].update(
        {k: settings[k] for k in ("text_scale", "pose_scale", "start", "end")}
    )
    if settings["lora"]:
        loader = [node_id(out, "SteadyDancerModelLoader"), 0]
        for node in out.values():  # everything that took the loaded model now takes it with the LoRA
            for key, value in node["inputs"].items():
                if value == loader:
                    node["inputs"][key] = [LORA_NODE_ID, 0]
        out[LORA_NODE_ID] = {
            "inputs": {"model": loader, "lora_name": lora_name, "strength_model": lora_strength},
            "class_type": "LoraLoaderModelOnly", "_meta": {"title": "LoraLoaderModelOnly"},
        }  # fmt: skip
    return out


def with_fp8_matmul(graph: dict) -> dict:
    """`graph` with the loader's fp8_matmul on (scaled fp8 weights multiply in fp8)."""
    out = copy.deepcopy(graph)
    out[node_id(out, "SteadyDancerModelLoader")]["inputs"]["fp8_matmul"] = True
    return out


def calls_per_step(preset: str) -> list[int]:
    """Predictions each step of `preset` makes (cond, uncond_text, uncond_pose as needed)."""
    from steadydancer.guidance import calls_needed, in_pose_window

    s = PRESETS[preset]
    return [
        len(calls_needed(s["text_scale"], s["pose_scale"] != 0 and in_pose_window(i, s["steps"], s["start"], s["end"])))
        for i in range(s["steps"])
    ]


def long_workflow(length: int = LONG_LENGTH) -> dict:
    """The long-video example API workflow."""
    return with_context_windows(json.loads(API.read_text()), length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=["long"])
    parser.add_argument("--length", type=int, default=LONG_LENGTH, help="frames of the long example (4k+1)")
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args(argv)
    text = json.dumps(long_workflow(args.length), indent=2, ensure_ascii=False) + "\n"
    if args.check:
        if not LONG_API.is_file() or LONG_API.read_text() != text:
            print(f"{LONG_API} is not what `scripts/workflow_variants.py long` writes", file=sys.stderr)
            return 1
        return 0
    LONG_API.write_text(text)
    print(f"wrote {LONG_API}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
