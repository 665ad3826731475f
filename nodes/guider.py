"""SteadyDancer's three-prediction guidance as a ComfyUI GUIDER, and a one-node sampler.

Per step the guider asks the model for the predictions that step needs (docs/REFERENCE.md,
"Guidance"): `cond` (positive text and pose), `uncond_text` (negative text) and, inside the
pose window, `uncond_pose` (augmented pose). They go to ComfyUI's `calc_cond_batch` in one
list, so ComfyUI batches them into as few forward passes as memory allows; a prediction
that is not needed is passed as None and costs nothing.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..steadydancer.guidance import combine
from ..steadydancer.schedule import predictions_for
from .sampling import (
    DEFAULT_STEPS,
    STEADYDANCER,
    patch_model_sampling,
    sampler_choices,
    sampler_for,
    scheduler_choices,
    sigmas_for,
)
from .validation import choice_error, first_error, number_error

# Prediction name (steadydancer.guidance) -> the conditioning it is made with.
MODEL_LATENT_FRAMES = 21  # 81 video frames: what the model was trained on
PREDICTIONS = {"cond": "positive", "uncond_text": "negative", "uncond_pose": "pose_negative"}
DEFAULT_SAMPLER = STEADYDANCER  # the reference's flow UniPC (order 2)
DEFAULT_SCHEDULER = STEADYDANCER  # the reference's sigmas and integer timesteps


class SteadyDancerCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider with a text scale, a pose scale and the pose window on the step index."""

    def set_conds(self, positive: list, negative: list, pose_negative: list) -> None:
        self.inner_set_conds(
            {"positive": positive, "negative": negative, "pose_negative": pose_negative}
        )

    def set_scales(self, text_scale: float, pose_scale: float, start: float, end: float) -> None:
        self.text_scale, self.pose_scale, self.start, self.end = text_scale, pose_scale, start, end

    def sample(self, noise: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        frames = noise.shape[2] if noise.ndim == 5 else 0
        if frames > MODEL_LATENT_FRAMES and "context_handler" not in self.model_options:
            logging.warning(
                "SteadyDancer: sampling %d latent frames (%d video frames) in one window; the model was trained on "
                "%d (81 video frames), and memory and time grow with the square of the length. For long videos put "
                "'WAN Context Windows (Manual)' (81 frames, overlap 16) before the guider "
                "(workflows/steadydancer_long.json).", frames, (frames - 1) * 4 + 1, MODEL_LATENT_FRAMES,
            )  # fmt: skip
        return super().sample(noise, *args, **kwargs)

    def predict_noise(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        model_options: dict | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The guided prediction at `timestep`, from only the predictions this step needs."""
        model_options = model_options or {}
        needed = set(
            predictions_for(
                model_options.get("transformer_options", {}).get("sample_sigmas"),
                timestep,
                text_scale=self.text_scale,
                pose_scale=self.pose_scale,
                start=self.start,
                end=self.end,
            )
        )
        if model_options.get("disable_cfg1_optimization", False):
            needed.add("uncond_text")
        conds = [
            self.conds.get(PREDICTIONS[name]) if name in needed else None for name in PREDICTIONS
        ]
        cond, uncond_text, uncond_pose = comfy.samplers.calc_cond_batch(
            self.inner_model, conds, x, timestep, model_options
        )
        return combine(
            cond,
            uncond_text if "uncond_text" in needed else None,
            uncond_pose if "uncond_pose" in needed else None,
            self.text_scale,
            self.pose_scale,
        )


def make_guider(
    model: ModelPatcher,
    positive: list,
    negative: list,
    pose_negative: list,
    text_scale: float,
    pose_scale: float,
    start: float,
    end: float,
) -> SteadyDancerCFGGuider:
    """A configured guider (shared by both nodes)."""
    guider = SteadyDancerCFGGuider(model)
    guider.set_conds(positive, negative, pose_negative)
    guider.set_scales(text_scale, pose_scale, start, end)
    return guider


# The guidance inputs' ranges: the schema's, and what validate_inputs enforces (it replaces ComfyUI's checks).
RANGES = {
    "text_scale": (0.0, 30.0),
    "pose_scale": (0.0, 10.0),
    "start": (0.0, 1.0),
    "end": (0.0, 1.0),
}


def guidance_error(
    text_scale: object, pose_scale: object, start: object, end: object
) -> str | None:
    """Why guidance settings are refused (None: fine or linked): NaN, out of range, an empty window."""
    return (
        number_error("text_scale", text_scale, *RANGES["text_scale"])
        or number_error("pose_scale", pose_scale, *RANGES["pose_scale"])
        or number_error("start", start, *RANGES["start"]) or number_error("end", end, *RANGES["end"])
        or (f"start ({start}) must be below end ({end}): the pose guidance window would be empty"
            if start is not None and end is not None and start >= end else None)
    )  # fmt: skip


def guidance_inputs() -> list[io.Input]:
    """Inputs of the guidance, with the reference's defaults."""
    return [
        io.Model.Input("model", tooltip="The SteadyDancer model."),
        io.Conditioning.Input(
            "positive", tooltip="'positive' of SteadyDancer Image to Video (prompt + pose)."
        ),
        io.Conditioning.Input(
            "negative",
            tooltip="'negative' of SteadyDancer Image to Video (negative prompt + pose).",
        ),
        io.Conditioning.Input(
            "pose_negative",
            tooltip="'pose_negative' of SteadyDancer Image to Video (prompt + augmented pose).",
        ),
        io.Float.Input(
            "text_scale",
            default=5.0,
            min=RANGES["text_scale"][0],
            max=RANGES["text_scale"][1],
            step=0.1,
            round=0.01,
            tooltip="Text guidance scale. 1.0 (for distilled-step LoRAs) skips the negative-prompt prediction.",
        ),
        io.Float.Input(
            "pose_scale",
            default=1.5,
            min=RANGES["pose_scale"][0],
            max=RANGES["pose_scale"][1],
            step=0.1,
            round=0.01,
            tooltip="Pose guidance scale inside the window (1.5 in the reference, 1.0 in its README example). 0 "
            "disables pose guidance.",
        ),
        io.Float.Input(
            "start",
            default=0.1,
            min=RANGES["start"][0],
            max=RANGES["start"][1],
            step=0.01,
            tooltip="Pose guidance applies to steps with start < step/steps < end (strict).",
        ),
        io.Float.Input(
            "end",
            default=0.4,
            min=RANGES["end"][0],
            max=RANGES["end"][1],
            step=0.01,
            tooltip="End of the pose guidance window, as a fraction of the steps.",
        ),
    ]


class SteadyDancerGuider(io.ComfyNode):
    """GUIDER for SamplerCustomAdvanced: text guidance always, pose guidance in a window."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerGuider",
            display_name="SteadyDancer Guider",
            category="sampling/custom_sampling/guiders",
            description="pred = uncond_text + text_scale*(cond - uncond_text) + pose_scale*(cond - uncond_pose), "
            "the pose term only inside the window. Makes only the model calls a step needs.",
            inputs=guidance_inputs(),
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(
        cls,
        text_scale: float | None = None,
        pose_scale: float | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> bool | str:
        return first_error(guidance_error(text_scale, pose_scale, start, end))

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        positive: list,
        negative: list,
        pose_negative: list,
        text_scale: float,
        pose_scale: float,
        start: float,
        end: float,
    ) -> io.NodeOutput:
        return io.NodeOutput(
            make_guider(
                model, positive, negative, pose_negative, text_scale, pose_scale, start, end
            )
        )


def sample(
    guider: SteadyDancerCFGGuider,
    latent: dict,
    seed: int,
    steps: int,
    sampler_name: str,
    scheduler: str,
) -> dict:
    """Run `guider` over `steps` from `latent` (what SamplerCustomAdvanced does, in one call)."""
    patcher = guider.model_patcher
    sigmas = sigmas_for(patcher, scheduler, steps)
    samples = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    out = guider.sample(
        noise,
        samples,
        sampler_for(sampler_name),
        sigmas,
        denoise_mask=latent.get("noise_mask"),
        callback=latent_preview.prepare_callback(patcher, steps),
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    return {**latent, "samples": out.to(comfy.model_management.intermediate_device())}


class SteadyDancerSampler(io.ComfyNode):
    """KSampler-like: shift + sigmas + sampler + the SteadyDancer guidance in one node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerSampler",
            display_name="SteadyDancer Sampler",
            category="sampling",
            description="Samples SteadyDancer with the reference's settings: flow shift, its schedule with integer "
            "timesteps, flow UniPC of order 2, 40 steps, text and pose guidance. 'steadydancer' is the reference's "
            "sampler / scheduler; ComfyUI's are offered next to it.",
            inputs=[
                *guidance_inputs(),
                io.Latent.Input("latent", tooltip="'latent' of SteadyDancer Image to Video."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True
                ),
                io.Int.Input(
                    "steps",
                    default=DEFAULT_STEPS,
                    min=1,
                    max=1000,
                    tooltip="Sampling steps (40 in the reference for image to video; fewer with a distilled-step "
                    "LoRA).",
                ),
                io.Float.Input(
                    "shift",
                    default=5.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Flow-matching shift: 5.0 in the reference, 3.0 at 480p.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=sampler_choices(),
                    default=DEFAULT_SAMPLER,
                    tooltip="steadydancer: the reference's flow UniPC of order 2 (ComfyUI's uni_pc_bh2 runs at order "
                    "3).",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=scheduler_choices(),
                    default=DEFAULT_SCHEDULER,
                    tooltip="steadydancer: the reference's sigmas (from 0.999, shifted) with the model called at "
                    "integer timesteps floor(sigma*1000); ComfyUI's schedulers keep float timesteps.",
                ),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(
        cls,
        text_scale: float | None = None,
        pose_scale: float | None = None,
        start: float | None = None,
        end: float | None = None,
        shift: float | None = None,
        sampler_name: str | None = None,
        scheduler: str | None = None,
    ) -> bool | str:
        return first_error(
            guidance_error(text_scale, pose_scale, start, end),
            number_error("shift", shift, 0.0, 100.0),
            choice_error("sampler_name", sampler_name, sampler_choices()),
            choice_error("scheduler", scheduler, scheduler_choices()),
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        positive: list,
        negative: list,
        pose_negative: list,
        text_scale: float,
        pose_scale: float,
        start: float,
        end: float,
        latent: dict,
        seed: int,
        steps: int,
        shift: float,
        sampler_name: str,
        scheduler: str,
    ) -> io.NodeOutput:
        shifted = patch_model_sampling(
            model, shift, "integer" if scheduler == STEADYDANCER else "float"
        )
        guider = make_guider(
            shifted, positive, negative, pose_negative, text_scale, pose_scale, start, end
        )
        return io.NodeOutput(sample(guider, latent, seed, steps, sampler_name, scheduler))


MODEL_NODES: list[type[io.ComfyNode]] = [SteadyDancerGuider, SteadyDancerSampler]
