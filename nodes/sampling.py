"""The reference's sampling in ComfyUI: flow shift with integer timesteps, its schedule, its UniPC.

Three nodes replace ModelSamplingSD3, BasicScheduler and KSamplerSelect in a
SamplerCustomAdvanced graph (docs/REFERENCE.md, "Sampling"):
- SteadyDancer Model Sampling: the flow shift, and the model called with the integer
  timestep floor(sigma * 1000) as the reference calls it (the sampler keeps the exact
  sigma); a schedule that starts at the reference's first sigma starts from pure noise.
- SteadyDancer Scheduler: the reference's sigmas (from 0.999, shifted) for the model's shift.
- SteadyDancer Sampler (flow UniPC): the reference's multistep UniPC, order 2.
Nothing is added to ComfyUI's global sampler or scheduler lists; the SteadyDancer Sampler
shortcut node offers "steadydancer" next to ComfyUI's names through `sigmas_for` and
`sampler_for`.
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.samplers
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io
from comfy_extras.nodes_model_advanced import ModelSamplingSD3
from tqdm.auto import tqdm

from ..steadydancer.schedule import reference_first_sigma, reference_schedule, reference_timestep
from ..steadydancer.unipc import sample_flow_unipc
from .validation import choice_error, first_error, number_error

STEADYDANCER = "steadydancer"
DEFAULT_STEPS = 40  # the reference's default for image-to-video
DEFAULT_SHIFT = 5.0
TIMESTEP_MODES = ("integer", "float")
# Relative slack when comparing a schedule's first sigma with the reference's (float32 copies).
_START_TOL = 1e-6


class ReferenceFlowSampling(
    comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST
):
    """Wan's flow matching (CONST) as the reference samples it.

    timestep(): floor(sigma * 1000), the integer timestep the reference hands the model.
    noise_scaling(): a schedule starting at (or above) the reference's first sigma, 0.9998 at
    shift 5, starts from the noise itself, as the reference does; ComfyUI's own rule would
    start from sigma * noise there. Below it (partial denoise) ComfyUI's rule applies.
    """

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return reference_timestep(sigma, self.multiplier)

    def noise_scaling(
        self,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        latent_image: torch.Tensor,
        max_denoise: bool = False,
    ) -> torch.Tensor:
        first = float(torch.as_tensor(sigma).flatten()[0])
        if max_denoise or first >= reference_first_sigma(self.shift) * (1 - _START_TOL):
            scale = getattr(self, "noise_scale", 1.0)
            return noise if scale == 1.0 else noise * scale
        return super().noise_scaling(sigma, noise, latent_image, max_denoise)


def flow_shift(model: ModelPatcher) -> float:
    """The flow shift of a MODEL's sampling; a clear error when it is not flow matching."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        raise ValueError(
            f"the SteadyDancer schedule needs a flow-matching model (SteadyDancer / Wan); this MODEL samples "
            f"with {type(sampling).__name__}: load it with Load SteadyDancer Model"
        )
    return float(sampling.shift)


def patch_model_sampling(
    model: ModelPatcher, shift: float, timesteps: str = "integer"
) -> ModelPatcher:
    """A clone of `model` that samples flow matching at `shift`; `timesteps` "integer" is the
    reference's (ReferenceFlowSampling), "float" ComfyUI's own (as ModelSamplingSD3)."""
    if timesteps not in TIMESTEP_MODES:
        raise ValueError(f"timesteps must be one of {list(TIMESTEP_MODES)}; got {timesteps!r}")
    if timesteps == "float":
        return ModelSamplingSD3().patch(model, shift)[0]
    patched = model.clone()
    original = patched.get_model_object("model_sampling")
    sampling = ReferenceFlowSampling(model.model.model_config)
    sampling.set_parameters(shift=shift, multiplier=1000)
    if hasattr(original, "noise_scale") and hasattr(sampling, "set_noise_scale"):
        sampling.set_noise_scale(original.noise_scale)
    patched.add_object_patch("model_sampling", sampling)
    return patched


@torch.no_grad()
def sample_steadydancer_unipc(
    model: object,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: object = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """ComfyUI sampler function (k-diffusion convention) around the library's flow UniPC."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    bar = tqdm(total=len(sigmas) - 1, disable=disable)

    def denoise(sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(sample, sigma * s_in, **extra_args)

    def step_done(i: int, sample: torch.Tensor, denoised: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback(
                {
                    "x": sample,
                    "i": i,
                    "sigma": sigmas[i],
                    "sigma_hat": sigmas[i],
                    "denoised": denoised,
                }
            )

    try:
        return sample_flow_unipc(denoise, x, sigmas, callback=step_done)
    finally:
        bar.close()


def steadydancer_sampler() -> comfy.samplers.KSAMPLER:
    """The reference's sampler as a ComfyUI SAMPLER."""
    return comfy.samplers.KSAMPLER(sample_steadydancer_unipc)


def scheduler_choices() -> list[str]:
    return [STEADYDANCER, *comfy.samplers.KSampler.SCHEDULERS]


def sampler_choices() -> list[str]:
    return [STEADYDANCER, *comfy.samplers.KSampler.SAMPLERS]


def sigmas_for(model: ModelPatcher, scheduler: str, steps: int) -> torch.Tensor:
    """Sigmas of `scheduler` (ours or one of ComfyUI's) for `model`, on the CPU."""
    if scheduler == STEADYDANCER:
        return reference_schedule(steps, flow_shift(model))[0]
    return comfy.samplers.calculate_sigmas(
        model.get_model_object("model_sampling"), scheduler, steps
    ).cpu()


def sampler_for(name: str) -> comfy.samplers.Sampler:
    """The SAMPLER called `name`: ours, or one of ComfyUI's."""
    return steadydancer_sampler() if name == STEADYDANCER else comfy.samplers.sampler_object(name)


class SteadyDancerModelSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerModelSampling",
            display_name="SteadyDancer Model Sampling",
            category="advanced/model",
            description="Flow-matching shift (as ModelSamplingSD3) with the reference's integer timesteps: the model "
            "is called at floor(sigma*1000), and the reference's schedule starts from pure noise.",
            inputs=[
                io.Model.Input("model", tooltip="The SteadyDancer model."),
                io.Float.Input(
                    "shift",
                    default=DEFAULT_SHIFT,
                    min=0.01,
                    max=100.0,
                    step=0.01,
                    tooltip="Flow shift: 5.0 in the reference, 3.0 at the 480p areas (832*480, 480*832).",
                ),
                io.Combo.Input(
                    "timesteps",
                    options=list(TIMESTEP_MODES),
                    default="integer",
                    tooltip="integer: floor(sigma*1000) as the reference. float: ComfyUI's sigma*1000 "
                    "(ModelSamplingSD3).",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(
        cls, shift: float | None = None, timesteps: str | None = None
    ) -> bool | str:
        return first_error(
            number_error("shift", shift, 0.01, 100.0),
            choice_error("timesteps", timesteps, TIMESTEP_MODES),
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, shift: float, timesteps: str = "integer"
    ) -> io.NodeOutput:
        return io.NodeOutput(patch_model_sampling(model, shift, timesteps))


class SteadyDancerScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerScheduler",
            display_name="SteadyDancer Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="The reference's sigmas: `steps` values spaced linearly from 0.999 (not 1.0), shifted by the "
            "model's flow shift, then 0. Use with SteadyDancer Model Sampling for its integer timesteps.",
            inputs=[
                io.Model.Input("model", tooltip="The SteadyDancer model (its flow shift is used)."),
                io.Int.Input(
                    "steps",
                    default=DEFAULT_STEPS,
                    min=1,
                    max=1000,
                    tooltip="Sampling steps (40 in the reference for image to video; fewer with a distilled-step "
                    "LoRA).",
                ),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model: ModelPatcher, steps: int) -> io.NodeOutput:
        return io.NodeOutput(sigmas_for(model, STEADYDANCER, steps))


class SteadyDancerUniPCSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerUniPCSampler",
            display_name="SteadyDancer Sampler (flow UniPC)",
            category="sampling/custom_sampling/samplers",
            description="The reference's sampler: multistep UniPC (bh2) of order 2 for flow matching, the last step "
            "at order 1 (ComfyUI's uni_pc_bh2 runs at order 3).",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(steadydancer_sampler())


SAMPLING_NODES: list[type[io.ComfyNode]] = [
    SteadyDancerModelSampling,
    SteadyDancerScheduler,
    SteadyDancerUniPCSampler,
]
