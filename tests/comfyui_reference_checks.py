"""Checks of the reference-sampling and CLIP nodes, run inside a real ComfyUI's Python.

`tests/test_reference_nodes_comfyui.py` runs this file once with $COMFYUI_PYTHON and
asserts on the JSON report it writes:

    COMFYUI_DIR=/path/to/ComfyUI $COMFYUI_PYTHON tests/comfyui_reference_checks.py OUT.json

It reuses the tiny SteadyDancer models of comfyui_model_checks.py. The main check samples
the tiny SteadyDancer through ComfyUI (SteadyDancer Model Sampling, Scheduler and Sampler,
ComfyUI's guider machinery) and through `reference_sampling.py`, an independent
re-implementation of the reference loop that calls the DiT directly.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from comfyui_model_checks import World, import_comfyui, load, load_package, max_diff

STEPS, SHIFT = 8, 3.0


def check_model_sampling(world: World) -> dict:
    import comfy.model_sampling
    from comfyui_steadydancer.nodes.sampling import ReferenceFlowSampling, SteadyDancerModelSampling
    from comfyui_steadydancer.steadydancer.schedule import reference_first_sigma

    torch = world.torch
    base = load(world, "tiny.safetensors")
    patched = SteadyDancerModelSampling.execute(base, SHIFT, "integer").result[0]
    floated = SteadyDancerModelSampling.execute(base, SHIFT, "float").result[0]
    ms, ms_float = patched.get_model_object("model_sampling"), floated.get_model_object("model_sampling")
    noise, latent = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    first = torch.tensor(reference_first_sigma(SHIFT), dtype=torch.float32)
    half = torch.tensor(0.5)
    return {
        "class": type(ms).__name__,
        "base_untouched": not isinstance(base.get_model_object("model_sampling"), ReferenceFlowSampling),
        "shift": float(ms.shift),
        "timesteps": ms.timestep(torch.tensor([0.99979, 0.5, 0.0005])).tolist(),
        "float_class_is_flow": isinstance(ms_float, comfy.model_sampling.ModelSamplingDiscreteFlow),
        "float_timestep": float(ms_float.timestep(torch.tensor(0.99979))),
        "starts_from_noise": bool(torch.equal(ms.noise_scaling(first, noise, latent), noise)),
        "one_starts_from_noise": bool(torch.equal(ms.noise_scaling(torch.tensor(1.0), noise, latent), noise)),
        "partial_is_comfyui": max_diff(ms.noise_scaling(half, noise, latent), 0.5 * noise + 0.5 * latent),
        "validate": SteadyDancerModelSampling.validate_inputs(timesteps="exact"),
    }


def check_scheduler(world: World) -> dict:
    import comfy.model_sampling
    import comfy.samplers
    from comfyui_steadydancer.nodes.sampling import (
        STEADYDANCER,
        SteadyDancerModelSampling,
        SteadyDancerScheduler,
    )
    from comfyui_steadydancer.steadydancer.schedule import reference_schedule

    torch = world.torch
    base = load(world, "tiny.safetensors")  # the loader's shift: 5
    patched = SteadyDancerModelSampling.execute(base, SHIFT, "integer").result[0]

    class NotFlow:
        def get_model_object(self, name: str) -> object:
            return comfy.model_sampling.ModelSamplingDiscrete()

    try:
        SteadyDancerScheduler.execute(NotFlow(), 10)
        not_flow = None
    except ValueError as exc:
        not_flow = str(exc)
    return {
        "patched": bool(torch.equal(SteadyDancerScheduler.execute(patched, 40).result[0], reference_schedule(40, SHIFT)[0])),
        "loader_shift": bool(torch.equal(SteadyDancerScheduler.execute(base, 40).result[0], reference_schedule(40, 5.0)[0])),
        "not_flow": not_flow,
        "not_registered": STEADYDANCER not in comfy.samplers.KSampler.SAMPLERS + comfy.samplers.KSampler.SCHEDULERS,
    }


def _reference_run(world: World, text_scale: float, pose_scale: float) -> tuple[object, list[int]]:
    """The reference loop on the tiny DiT called directly (three predictions in the window)."""
    import reference_sampling as ref
    from comfyui_steadydancer.steadydancer.model import load_model

    torch = world.torch
    dit = load_model(str(world.unet / "tiny.safetensors"), dtype=torch.float32, attention="math")
    inputs = {
        "cond": world.model_inputs(),
        "uncond_text": world.model_inputs(text=world.text_negative),
        "uncond_pose": world.model_inputs(pose=world.pose_negative),
    }
    step = [0]

    def velocity(x: object, t: object) -> object:
        with torch.no_grad():
            v = {k: dit(x, t.reshape(1).float(), **i).float() for k, i in inputs.items()}
        inside = 0.1 < step[0] / STEPS < 0.4
        step[0] += 1
        out = v["uncond_text"] + text_scale * (v["cond"] - v["uncond_text"])
        return out + pose_scale * (v["cond"] - v["uncond_pose"]) if inside else out

    return ref.sample(velocity, world.noise.clone(), STEPS, SHIFT)


def _comfyui_run(world: World, text_scale: float, pose_scale: float) -> tuple[object, list[int]]:
    """The same through ComfyUI: the three nodes, our guider, ComfyUI's sampling machinery."""
    from comfyui_steadydancer.nodes.guider import make_guider
    from comfyui_steadydancer.nodes.sampling import (
        SteadyDancerModelSampling,
        SteadyDancerScheduler,
        SteadyDancerUniPCSampler,
    )

    torch = world.torch
    model = SteadyDancerModelSampling.execute(load(world, "tiny.safetensors"), SHIFT, "integer").result[0]
    sigmas = SteadyDancerScheduler.execute(model, STEPS).result[0]
    sampler = SteadyDancerUniPCSampler.execute().result[0]
    guider = make_guider(model, world.conditioning(world.text, world.pose), world.conditioning(world.text_negative, world.pose),
                         world.conditioning(world.text, world.pose_negative), text_scale, pose_scale, 0.1, 0.4)  # fmt: skip
    dit = model.model.diffusion_model
    forward, seen = dit.forward, []

    def recording(x: object, t: object, **kwargs: object) -> object:
        seen.extend(float(v) for v in t.flatten()[:1])
        return forward(x, t, **kwargs)

    dit.forward = recording
    try:
        out = guider.sample(world.noise.clone(), torch.zeros_like(world.noise), sampler, sigmas, seed=0)
    finally:
        dit.forward = forward
    return model.model.latent_format.process_in(out), seen


def check_sampling_matches_reference(world: World) -> dict:
    out = {}
    for label, scales in (("single", (1.0, 0.0)), ("guided", (5.0, 1.5))):
        expected, expected_t = _reference_run(world, *scales)
        got, seen = _comfyui_run(world, *scales)
        out[label] = {
            "max_diff": max_diff(got, expected),
            "scale": float(expected.abs().max()),
            "timesteps_seen": sorted(set(seen), reverse=True),
            "reference_timesteps": expected_t,
        }
    return out


def check_shortcut(world: World) -> dict:
    """SteadyDancer Sampler's defaults are the reference's, and give what the three nodes give."""
    import comfy.sample
    from comfyui_steadydancer.nodes.guider import SteadyDancerSampler, make_guider
    from comfyui_steadydancer.nodes.sampling import (
        SteadyDancerModelSampling,
        SteadyDancerScheduler,
        SteadyDancerUniPCSampler,
    )

    torch = world.torch
    schema = SteadyDancerSampler.define_schema()
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs if i.id in ("steps", "sampler_name", "scheduler", "shift")}
    conds = (world.conditioning(world.text, world.pose), world.conditioning(world.text_negative, world.pose),
             world.conditioning(world.text, world.pose_negative))  # fmt: skip
    latent = {"samples": torch.zeros_like(world.noise)}
    model = load(world, "tiny.safetensors")
    got = SteadyDancerSampler.execute(model, *conds, 5.0, 1.5, 0.1, 0.4, latent, 3, 4, SHIFT, "steadydancer", "steadydancer").result[0]
    patched = SteadyDancerModelSampling.execute(model, SHIFT, "integer").result[0]
    guider = make_guider(patched, *conds, 5.0, 1.5, 0.1, 0.4)
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    expected = guider.sample(noise, latent["samples"], SteadyDancerUniPCSampler.execute().result[0],
                             SteadyDancerScheduler.execute(patched, 4).result[0], seed=3)  # fmt: skip
    return {
        "defaults": defaults,
        "max_diff": max_diff(got["samples"], expected),
        "validate": SteadyDancerSampler.validate_inputs(sampler_name="steadydancer", scheduler="steadydancer"),
        "validate_bad": SteadyDancerSampler.validate_inputs(sampler_name="steadydancer", scheduler="steady"),
        "comfyui_choices_still_run": bool(torch.isfinite(SteadyDancerSampler.execute(
            model, *conds, 5.0, 1.5, 0.1, 0.4, latent, 3, 2, SHIFT, "uni_pc_bh2", "simple").result[0]["samples"]).all()),
    }


def _tiny_clip_vision(torch: object, root: Path) -> object:
    """ComfyUI's CLIP vision model class with a small ViT config and random weights."""
    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 224,
              "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-5,
              "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 3,
              "patch_size": 14, "projection_dim": 16, "torch_dtype": "float32"}  # fmt: skip
    path = root / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    clip = comfy.clip_vision.ClipVisionModel(str(path))
    gen = torch.Generator().manual_seed(11)
    def is_norm_weight(key: str) -> bool:
        return key.endswith("weight") and ("norm" in key or "layrnorm" in key)

    state = {k: torch.randn(v.shape, generator=gen) * 0.05 + (1.0 if is_norm_weight(k) else 0.0) for k, v in clip.get_sd().items()}
    clip.load_sd(state)
    return clip


def check_clip(world: World) -> dict:
    import comfy.clip_vision
    from comfyui_steadydancer.nodes.clip_encode import SteadyDancerCLIPVisionEncode
    from comfyui_steadydancer.steadydancer.clip_vision import reference_clip_pixels

    torch = world.torch
    with tempfile.TemporaryDirectory() as tmp:
        clip = _tiny_clip_vision(torch, Path(tmp))
    gen = torch.Generator().manual_seed(4)
    square = torch.randint(0, 256, (2, 224, 224, 3), generator=gen).float() / 255  # 8-bit values, already 224
    portrait = torch.randint(0, 256, (1, 300, 200, 3), generator=gen).float() / 255
    ours_square = SteadyDancerCLIPVisionEncode.execute(clip, square).result[0]
    comfy_square = clip.encode_image(square, crop=False)
    ours = SteadyDancerCLIPVisionEncode.execute(clip, portrait).result[0]
    comfy_out = clip.encode_image(portrait, crop=False)
    with torch.no_grad():
        pixels = reference_clip_pixels(portrait, 224, clip.image_mean, clip.image_std)
        direct = clip.model(pixel_values=pixels, intermediate_output=-2)[1]
    return {
        "missing_fields": sorted(set(vars(comfy_square)) - set(vars(ours_square))),
        "square_equal": max(max_diff(ours_square[k], comfy_square[k]) for k in ("penultimate_hidden_states", "last_hidden_state", "image_embeds")),
        "shape": list(ours.penultimate_hidden_states.shape),
        "direct_diff": max_diff(ours.penultimate_hidden_states, direct),
        "differs_from_comfyui": max_diff(ours.penultimate_hidden_states, comfy_out.penultimate_hidden_states),
        "is_output": isinstance(ours, comfy.clip_vision.Output),
    }


CHECKS: dict[str, Callable[[World], dict]] = {
    "model_sampling": check_model_sampling,
    "scheduler": check_scheduler,
    "sampling_matches_reference": check_sampling_matches_reference,
    "shortcut": check_shortcut,
    "clip": check_clip,
}


def main() -> None:
    out_path = Path(sys.argv[1])
    import_comfyui()
    load_package()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        for name, check in CHECKS.items():
            try:
                results[name] = {"ok": True, **check(world)}
            except Exception as exc:  # reported to pytest, which shows the traceback
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out_path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
