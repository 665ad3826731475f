"""The SteadyDancer model loader node and the `.gguf` entry in ComfyUI's model folders."""

from __future__ import annotations

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..steadydancer.attention import BACKENDS
from ..steadydancer.errors import ModelFileError
from ..steadydancer.weights import from_safetensors, load_weights
from .comfy_model import COMPUTE_DTYPES, build_model_patcher
from .validation import bool_error, choice_error, first_error

MODEL_FOLDER = "diffusion_models"  # `models/unet` is one of its paths
GGUF_FOLDER = "steadydancer_gguf"
EXTENSIONS = (".gguf", ".safetensors")
ATTENTION_CHOICES = ("auto", "comfy", *BACKENDS)


def register_gguf_folder() -> None:
    """List `.gguf` files of the diffusion model folders under a key of their own.

    The key's path list IS diffusion_models' list object, so extra_model_paths.yaml and
    later additions apply to both; its extension set is a new one. ComfyUI's
    `supported_pt_extensions`, shared by most folder keys, is never touched.
    """
    paths = folder_paths.folder_names_and_paths[MODEL_FOLDER][0]
    current = folder_paths.folder_names_and_paths.get(GGUF_FOLDER)
    if current is None or current[0] is not paths:
        folder_paths.folder_names_and_paths[GGUF_FOLDER] = (paths, {".gguf"})


def model_files() -> list[str]:
    """SteadyDancer candidates: .safetensors and .gguf files of diffusion_models / unet."""
    register_gguf_folder()
    names = set(folder_paths.get_filename_list(GGUF_FOLDER))
    names.update(
        n for n in folder_paths.get_filename_list(MODEL_FOLDER) if n.lower().endswith(EXTENSIONS)
    )
    return sorted(names)


def model_path(name: str) -> str:
    """Full path of a listed file; ModelFileError naming the folders when it is not there."""
    register_gguf_folder()
    folder = GGUF_FOLDER if name.lower().endswith(".gguf") else MODEL_FOLDER
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(MODEL_FOLDER))
        raise ModelFileError(
            f"{name!r} is not in the diffusion model folders ({searched}); put it there and refresh"
        )
    return path


def read_weights(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of a SteadyDancer file; .safetensors are read by ComfyUI's own reader.

    ComfyUI's reader memory-maps the file in the way its dynamic VRAM expects (0.3x reads
    weights straight from the file into GPU memory). Scaled fp8 weights stay fp8
    (`Fp8Tensor`, expanded per layer and forward pass like GGUF blocks): a bf16 copy would
    double the model in host and GPU memory and take minutes to make on the CPU.
    """
    if not path.lower().endswith(".safetensors"):
        return load_weights(path, dtype=dtype)
    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # ComfyUI raises plain exceptions for unreadable files
        raise ModelFileError(f"{path}: not a readable safetensors file: {exc}") from exc
    return from_safetensors(tensors, dtype=dtype, source=path, keep_fp8=True)


class SteadyDancerModelLoader(io.ComfyNode):
    """Loads a SteadyDancer DiT (.gguf stays quantised, or .safetensors) as a ComfyUI MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SteadyDancerModelLoader",
            display_name="Load SteadyDancer Model",
            category="loaders/video_models",
            description="Loads SteadyDancer-14B (Wan2.1-I2V + pose path) from models/diffusion_models. "
            "GGUF weights stay quantised and are dequantised per layer; LoRA loaders work on both kinds.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=model_files(),
                    tooltip="A SteadyDancer .gguf or .safetensors file in models/diffusion_models (or models/unet). "
                    "Plain Wan2.1 files are refused.",
                ),
                io.Combo.Input(
                    "compute_dtype",
                    options=list(COMPUTE_DTYPES),
                    default="default",
                    tooltip="Dtype of the computation (and of float weights). 'default' lets ComfyUI pick for your "
                    "GPU (bf16 on recent NVIDIA cards).",
                ),
                io.Combo.Input(
                    "attention",
                    options=list(ATTENTION_CHOICES),
                    default="auto",
                    tooltip="Attention kernel for this model only. 'auto' takes the fastest installed for your GPU "
                    "(on Hopper and newer flash-attn 4, flash-attn 3, PyTorch SDPA (cuDNN), then flash-attn 2 / "
                    "xformers; before Hopper flash-attn 2 / xformers / SDPA); SageAttention is lossy and only used "
                    "when chosen; 'comfy' uses ComfyUI's own choice (its --use-*-attention flags).",
                ),
                io.Boolean.Input(
                    "fp8_matmul",
                    default=False,
                    optional=True,
                    tooltip="Scaled fp8 .safetensors on GPUs with fp8 tensor cores (RTX 40xx, L40S, H100 and newer): "
                    "multiply in fp8 instead of expanding the weights (H100: 0.86x the time per step, the output "
                    "changes by about 3 %). Lossy, so off by default; ignored for GGUF files. A LoRA is written into the fp8 weights at load.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The SteadyDancer model; use it with the SteadyDancer guider."
                )
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        model_name: str | None = None,
        compute_dtype: str | None = None,
        attention: str | None = None,
        fp8_matmul: bool | None = None,
    ) -> bool | str:
        return first_error(
            choice_error("model_name", model_name, model_files()),
            choice_error("compute_dtype", compute_dtype, list(COMPUTE_DTYPES)),
            choice_error("attention", attention, ATTENTION_CHOICES),
            bool_error("fp8_matmul", fp8_matmul),
        )

    @classmethod
    def execute(
        cls, model_name: str, compute_dtype: str = "default", attention: str = "auto", fp8_matmul: bool = False
    ) -> io.NodeOutput:
        # fp8 .safetensors are dequantised into the compute dtype (bf16 unless one is chosen).
        state_dict = read_weights(
            model_path(model_name), COMPUTE_DTYPES[compute_dtype] or torch.bfloat16
        )
        return io.NodeOutput(
            build_model_patcher(
                state_dict, compute_dtype=compute_dtype, attention=attention, fp8_matmul=bool(fp8_matmul)
            )
        )


MODEL_NODES: list[type[io.ComfyNode]] = [SteadyDancerModelLoader]
