"""Checks of the ComfyUI model glue, run inside a real ComfyUI's Python.

`tests/test_comfy_model.py` runs this file once with $COMFYUI_PYTHON (ComfyUI's venv, which
has no pytest) and asserts on the JSON it writes:

    COMFYUI_DIR=/path/to/ComfyUI $COMFYUI_PYTHON tests/comfyui_model_checks.py OUT.json [--dynamic-vram] [CHECK ...]

ComfyUI is imported in-process on the CPU; this package is loaded as `comfyui_steadydancer`
(as ComfyUI loads it); tiny random SteadyDancer models are written in the real file formats
(.safetensors in fp32, bf16, fp16 and Kijai's scaled fp8, and .gguf with Q8_0 linear weights)
into a temporary models folder.

`--dynamic-vram` turns on what ComfyUI 0.3x's main.py turns on for an NVIDIA GPU: comfy-aimdo
initialised before ComfyUI is imported, `aimdo_enabled` (lazily built layers, ComfyUI's own
memory-mapped safetensors reader) and ModelPatcherDynamic as the core patcher. On a CPU that
patcher hands over to the classic one (ComfyUI does so for every CPU device), so the GPU side
of dynamic VRAM (its weight streaming) is not exercised here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.comfyui_inprocess import import_comfyui, load_package  # noqa: E402

SIGMA = 0.7
LORA_STRENGTH = 0.8
LORA_RANK = 4
LORA_ALPHA = 2.0


# (file, compute_dtype of the loader) for check_formats: every format, float files also in their own dtype
FORMAT_RUNS = (
    ("tiny.safetensors", "default"),
    ("tiny_bf16.safetensors", "default"),
    ("tiny_bf16.safetensors", "bf16"),
    ("tiny_fp16.safetensors", "fp16"),
    ("tiny_fp8_scaled.safetensors", "default"),
    ("tiny_q8.gguf", "default"),
)


# --- tiny models and inputs ---------------------------------------------------------------


class World:
    """Tiny model files in a temporary models folder, and the inputs of one step."""

    def __init__(self, root: Path) -> None:
        import folder_paths
        import numpy as np
        import torch
        from comfyui_steadydancer.steadydancer.keys import TinyConfig, tiny_state_dict
        from safetensors.torch import save_file
        from tiny_files import scaled_fp8, write_safetensors

        self.torch = torch
        self.config = TinyConfig()
        arrays = tiny_state_dict(self.config, seed=1)
        self.float_sd = {k: torch.from_numpy(v) for k, v in arrays.items()}
        unet = root / "diffusion_models"
        loras = root / "loras"
        unet.mkdir()
        loras.mkdir()
        # Appending to ComfyUI's own list objects: the package's .gguf key shares them.
        folder_paths.folder_names_and_paths["diffusion_models"][0].append(str(unet))
        folder_paths.folder_names_and_paths["loras"][0].append(str(loras))
        write_safetensors(unet / "tiny.safetensors", self.float_sd)
        write_safetensors(unet / "tiny_bf16.safetensors", self.float_sd, torch.bfloat16)
        write_safetensors(unet / "tiny_fp16.safetensors", self.float_sd, torch.float16)
        save_file(scaled_fp8(self.float_sd), str(unet / "tiny_fp8_scaled.safetensors"))
        self.gguf_path = unet / "tiny_q8.gguf"
        self.quantised = write_gguf(self.gguf_path, arrays)
        wan = {k: v for k, v in self.float_sd.items() if not k.startswith(("condition_embedding", "patch_embedding_"))}
        save_file(wan, unet / "plain_wan.safetensors")
        (unet / "notes.ckpt").write_bytes(b"not a model")
        self.lora_keys = ("blocks.0.self_attn.q", "blocks.1.ffn.0")
        self.lora = write_lora(loras / "tiny_lora.safetensors", self.float_sd, self.lora_keys)
        self.loras = {
            "tiny_lora.safetensors": self.lora,
            "tiny_lora_peft.safetensors": write_lora_peft(loras / "tiny_lora_peft.safetensors", self.float_sd,
                                                          ("blocks.1.cross_attn.k", "blocks.0.ffn.2")),
        }
        self.unet = unet

        gen = torch.Generator().manual_seed(3)
        f, h, w = 2, 4, 6
        self.noise = torch.randn(1, 16, f, h, w, generator=gen)

        def latent(frames: int = f) -> torch.Tensor:
            return torch.randn(1, 16, frames, h, w, generator=gen) * 2.0

        import comfy.clip_vision

        def vision() -> comfy.clip_vision.Output:
            out = comfy.clip_vision.Output()
            out["penultimate_hidden_states"] = torch.randn(1, 257, self.config.clip_dim, generator=gen)
            return out

        mask = torch.ones(1, 1, f, h, w)
        mask[:, :, :1] = 0.0
        ref, first_pose = latent(1), latent(1)
        self.values = {
            "concat_latent_image": latent(),
            "concat_mask": mask,
            "steadydancer_ref_x": torch.cat([ref, torch.ones(1, 4, 1, h, w), ref], dim=1),
            "steadydancer_ref_c": torch.cat([first_pose, torch.zeros(1, 4, 1, h, w), first_pose], dim=1),
            "clip_vision_output": vision(),
            "steadydancer_clip_c": vision(),
        }
        self.pose, self.pose_negative = latent(), latent()
        self.text, self.text_negative = (torch.randn(1, 7, self.config.text_dim, generator=gen) for _ in range(2))
        del np

    def conditioning(self, text: object, pose: object) -> list:
        return [[text, {**self.values, "steadydancer_pose": pose}]]

    def model_inputs(self, pose: object | None = None, text: object | None = None) -> dict:
        """The DiT's inputs computed here, independently of the glue (normalised latents)."""
        torch = self.torch
        from comfy.latent_formats import Wan21

        fmt = Wan21()

        def norm(x: torch.Tensor) -> torch.Tensor:
            return (x - fmt.latents_mean) / fmt.latents_std

        v = self.values
        y_mask = (1.0 - v["concat_mask"]).repeat(1, 4, 1, 1, 1)
        text = self.text if text is None else text
        padded = torch.zeros(1, 512, text.shape[-1])
        padded[:, : text.shape[1]] = text
        return {
            "text": padded,
            "clip_x": v["clip_vision_output"].penultimate_hidden_states,
            "clip_c": v["steadydancer_clip_c"].penultimate_hidden_states,
            "y": torch.cat([y_mask, norm(v["concat_latent_image"])], dim=1),
            "pose": norm(self.pose if pose is None else pose),
            "ref_x": torch.cat([norm(v["steadydancer_ref_x"][:, :16]), v["steadydancer_ref_x"][:, 16:20], norm(v["steadydancer_ref_x"][:, 20:])], dim=1),
            "ref_c": torch.cat([norm(v["steadydancer_ref_c"][:, :16]), v["steadydancer_ref_c"][:, 16:20], norm(v["steadydancer_ref_c"][:, 20:])], dim=1),
        }


def write_gguf(path: Path, arrays: dict) -> set[str]:
    """A Wan GGUF: Q8_0 for 2-D weights whose rows are whole blocks, F32 for the rest."""
    import gguf
    from comfyui_steadydancer.steadydancer.gguf.quantize import quantize

    writer = gguf.GGUFWriter(str(path), "wan")
    quantised = set()
    for name, array in arrays.items():
        if array.ndim == 2 and array.shape[-1] % 32 == 0 and name.endswith(".weight"):
            packed = quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantised.add(name)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantised


def write_lora(path: Path, float_sd: dict, layers: tuple[str, ...]) -> dict:
    """A LoRA in two of ComfyUI's key formats (kohya `lora_unet_*` and `diffusion_model.*`).

    The first layer also gets a bias difference (`diff_b`, as distilled-step Wan LoRAs carry):
    on a GGUF model that patches a float tensor next to a quantised weight. Returns the
    expected change of every patched tensor.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    tensors, factors = {}, {}
    for i, layer in enumerate(layers):
        out_dim, in_dim = float_sd[f"{layer}.weight"].shape
        down = torch.randn(LORA_RANK, in_dim, generator=gen) * 0.3
        up = torch.randn(out_dim, LORA_RANK, generator=gen) * 0.3
        prefix = f"lora_unet_{layer.replace('.', '_')}" if i == 0 else f"diffusion_model.{layer}"
        tensors[f"{prefix}.lora_down.weight"] = down
        tensors[f"{prefix}.lora_up.weight"] = up
        tensors[f"{prefix}.alpha"] = torch.tensor(LORA_ALPHA)
        factors[f"{layer}.weight"] = up @ down * (LORA_ALPHA / LORA_RANK)
        if i == 0:
            tensors[f"{prefix}.diff_b"] = factors[f"{layer}.bias"] = torch.randn(out_dim, generator=gen) * 0.3
    save_file(tensors, path)
    return factors


def write_lora_peft(path: Path, float_sd: dict, layers: tuple[str, str]) -> dict:
    """A LoRA in the other spellings in circulation: PEFT's `lora_A`/`lora_B` without `.alpha`
    (scale 1, as distilled-step LoRAs such as lightx2v's ship) with a bias difference
    (`diff_b`) on the first layer, and a whole-weight difference (`diff`) on the second.
    Returns the expected change of every patched tensor."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(6)
    low_rank, whole = layers
    out_dim, in_dim = float_sd[f"{low_rank}.weight"].shape
    a = torch.randn(LORA_RANK, in_dim, generator=gen) * 0.3
    b = torch.randn(out_dim, LORA_RANK, generator=gen) * 0.3
    bias = torch.randn(out_dim, generator=gen) * 0.3
    diff = torch.randn(float_sd[f"{whole}.weight"].shape, generator=gen) * 0.05
    save_file({
        f"diffusion_model.{low_rank}.lora_A.weight": a,
        f"diffusion_model.{low_rank}.lora_B.weight": b,
        f"diffusion_model.{low_rank}.diff_b": bias,
        f"diffusion_model.{whole}.diff": diff,
    }, path)  # fmt: skip
    return {f"{low_rank}.weight": b @ a, f"{low_rank}.bias": bias, f"{whole}.weight": diff}


# --- helpers ------------------------------------------------------------------------------


def load(world: World, name: str, dtype: str = "fp32", attention: str = "math", fp8_matmul: bool = False) -> object:
    from comfyui_steadydancer.nodes.model_loader import SteadyDancerModelLoader

    return SteadyDancerModelLoader.execute(name, dtype, attention, fp8_matmul).result[0]


def predict(world: World, patcher: object, noise: object | None = None, *, manage: bool = True) -> object:
    """The MODEL's denoised prediction for one step, through ComfyUI's conditioning path.

    `manage`: load through ComfyUI's model management first (False: the patcher was
    patched by hand and is used as it is).
    """
    import comfy.model_management

    torch = world.torch
    noise = world.noise if noise is None else noise
    if manage:
        comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    kwargs = {**world.values, "steadydancer_pose": world.pose, "cross_attn": world.text}
    conds = model.extra_conds(**kwargs, noise=noise, device=torch.device("cpu"))
    # What calc_cond_batch does to every cond before the forward pass.
    inputs = {k: v.process_cond(batch_size=noise.shape[0], area=None).cond for k, v in conds.items()}
    with torch.no_grad():
        return model.apply_model(noise, torch.tensor([SIGMA] * noise.shape[0]), **inputs,
                                 transformer_options=patcher.model_options["transformer_options"])


def direct(world: World, dit: object, inputs: dict | None = None, sigma: float = SIGMA, noise: object | None = None) -> object:
    """steadydancer.model's forward, turned into the same denoised prediction."""
    torch = world.torch
    inputs = inputs or world.model_inputs()
    noise = world.noise if noise is None else noise
    with torch.no_grad():
        velocity = dit(noise, torch.tensor([sigma * 1000.0]), **inputs)
    return noise - sigma * velocity.float()


def dynamic_vram_on() -> bool:
    memory_management = sys.modules.get("comfy.memory_management")  # absent before ComfyUI 0.3x
    return bool(getattr(memory_management, "aimdo_enabled", False))


def max_diff(a: object, b: object) -> float:
    return float((a.float() - b.float()).abs().max())


# --- checks -------------------------------------------------------------------------------


def check_folders(world: World) -> dict:
    import folder_paths
    from comfyui_steadydancer.nodes import model_loader

    files = model_loader.model_files()
    return {
        "files": files,
        "same_list": folder_paths.folder_names_and_paths[model_loader.GGUF_FOLDER][0]
        is folder_paths.folder_names_and_paths["diffusion_models"][0],
        "gguf_in_pt_extensions": ".gguf" in folder_paths.supported_pt_extensions,
        "path": model_loader.model_path("tiny_q8.gguf"),
    }


def check_parity(world: World) -> dict:
    from comfyui_steadydancer.steadydancer.model import load_model

    torch = world.torch
    out = {}
    batch = torch.cat([world.noise, 0.5 * world.noise.flip(-1)])  # conds of batch 1, latent of batch 2
    for name in ("tiny.safetensors", "tiny_q8.gguf", "tiny_fp8_scaled.safetensors"):
        patcher = load(world, name)  # fp8 stays fp8 here, the library expands it once at load
        dit = load_model(str(world.unet / name), dtype=torch.float32, attention="math")
        reference = direct(world, dit)
        batched = predict(world, patcher, batch)
        out[name] = {
            "max_diff": max_diff(predict(world, patcher), reference),
            "batch_max_diff": max(max_diff(batched[i:i + 1], direct(world, dit, noise=batch[i:i + 1])) for i in range(2)),
            "scale": float(reference.abs().max()),
        }
    return out


def check_gguf_quantised(world: World) -> dict:
    from comfyui_steadydancer.steadydancer.quantized import is_quantized

    patcher = load(world, "tiny_q8.gguf")
    predict(world, patcher)  # loaded by ComfyUI's model management and run once
    sd = patcher.model.diffusion_model.state_dict()
    float_patcher = load(world, "tiny.safetensors")
    return {
        "quantised_in_file": len(world.quantised),
        "quantised_in_model": sorted(k for k, v in sd.items() if is_quantized(v)) == sorted(world.quantised),
        "quantised_float_bytes": sum(world.float_sd[k].numel() * 4 for k in world.quantised),
        "model_size": patcher.model_size(),
        "float_model_size": float_patcher.model_size(),
    }


def check_fp8_compact(world: World) -> dict:
    """Scaled fp8 weights stay fp8 in the MODEL after loading and a prediction."""
    from comfyui_steadydancer.steadydancer.quantized import Fp8Tensor
    from safetensors import safe_open

    torch = world.torch
    name = "tiny_fp8_scaled.safetensors"
    with safe_open(str(world.unet / name), framework="pt") as f:
        in_file = sorted(k.removeprefix("model.diffusion_model.") for k in f.keys()  # noqa: SIM118 (not a Mapping)
                         if k != "scaled_fp8" and f.get_slice(k).get_dtype() == "F8_E4M3")
    patcher = load(world, name)
    predict(world, patcher)
    sd = patcher.model.diffusion_model.state_dict()
    fp8 = sorted(k for k, v in sd.items() if isinstance(v, Fp8Tensor) and v.storage_dtype() == torch.float8_e4m3fn)
    return {
        "fp8_in_file": in_file,
        "fp8_in_model": fp8,
        "patcher": type(patcher).__name__,
        "model_size": patcher.model_size(),
        "float_model_size": load(world, "tiny.safetensors").model_size(),
        "fp8_float_bytes": sum(world.float_sd[k].numel() * 4 for k in in_file),
    }


def check_fp8_matmul(world: World) -> dict:
    """STEADYDANCER_FP8_MATMUL=1: fp8 weights multiply in fp8 inside ComfyUI's model call,
    and a LoRA-patched layer falls back to the expanded weight (the patch needs it)."""
    import os

    from comfyui_steadydancer.steadydancer.quantized import FP8_MATMUL_ENV

    import nodes

    name = "tiny_fp8_scaled.safetensors"

    def both(patcher: object) -> tuple:
        os.environ.pop(FP8_MATMUL_ENV, None)
        exact = predict(world, patcher)
        os.environ[FP8_MATMUL_ENV] = "1"
        try:
            fast = predict(world, patcher)
        finally:
            os.environ.pop(FP8_MATMUL_ENV, None)
        return exact, fast

    exact, fast = both(load(world, name, dtype="bf16"))
    # a strong LoRA: its change must stand well above the fp8 path's own rounding (~2 % here)
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(load(world, name, dtype="bf16"), "tiny_lora.safetensors",
                                                               5.0)[0]  # fmt: skip
    lora_exact, lora_fast = both(patched)
    # the loader's fp8_matmul option, the environment variable unset: the same product
    option = predict(world, load(world, name, dtype="bf16", fp8_matmul=True))
    # and where it cannot apply (no fp8 weights): a warning, the usual result
    import logging

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("comfyui_steadydancer.nodes.comfy_model").addHandler(handler)
    try:
        gguf_option = predict(world, load(world, "tiny_q8.gguf", dtype="bf16", fp8_matmul=True))
    finally:
        logging.getLogger("comfyui_steadydancer.nodes.comfy_model").removeHandler(handler)
    gguf_plain = predict(world, load(world, "tiny_q8.gguf", dtype="bf16"))

    def relative(a: object, b: object) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    merged = _fp8_lora_merge(world, name, option)
    return {
        **merged,
        "option_vs_env": max_diff(option, fast),
        "gguf_option_vs_plain": max_diff(gguf_option, gguf_plain),
        "gguf_option_warnings": warnings,
        "relative": relative(fast, exact),
        "finite": bool(fast.isfinite().all()),
        "lora_relative": relative(lora_fast, lora_exact),  # the fp8 path beside the LoRA's layers
        # what the LoRA changes, with the fp8 path on vs off: ~1.0 if the LoRA were dropped
        "lora_change_vs_exact": relative(lora_fast.float() - fast.float(), lora_exact.float() - exact.float()),
    }


def _fp8_lora_merge(world: World, name: str, option: object) -> dict:
    """A LoRA on a model loaded with the fp8_matmul option: written into its fp8 weights at
    load (stochastic rounding), so its layers keep the fp8 product; unpatching restores them."""
    from comfyui_steadydancer.steadydancer.quantized import Fp8Tensor, dequantize_tensor

    import nodes

    torch = world.torch
    strength = 5.0
    base = load(world, name, dtype="bf16", fp8_matmul=True)
    exact = predict(world, nodes.LoraLoaderModelOnly().load_lora_model_only(
        load(world, name, dtype="bf16"), "tiny_lora.safetensors", strength)[0])  # fmt: skip
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "tiny_lora.safetensors", strength)[0]
    with_lora = predict(world, patched)
    dit = patched.model.diffusion_model
    file = load(world, name, dtype="bf16").model.diffusion_model  # the file's fp8 weights, untouched
    layers = {}
    for layer in world.lora_keys:
        key = f"{layer}.weight"
        module = dit.get_submodule(layer)
        weight = module.weight
        original = file.get_submodule(layer).weight
        want = dequantize_tensor(original, torch.float32) + strength * world.lora[key]
        error = dequantize_tensor(weight, torch.float32) - want
        # what checkpoint saving asks for: the exact patched weight, the LoRA applied once
        saved = patched.patch_weight_to_device(f"diffusion_model.{key}", device_to=torch.device("cpu"), return_weight=True)
        # patched again (a second load): the same weight, not the LoRA added twice
        patched.patch_weight_to_device(f"diffusion_model.{key}", device_to=torch.device("cpu"))
        again = module.weight
        layers[key] = {
            "saved_vs_exact": float((saved.float() - want).abs().max() / want.abs().max()),
            "repatched_same": bool(torch.equal(again.stored().view(torch.uint8), weight.stored().view(torch.uint8))
                                   and float(again.scale) == float(weight.scale)),
            "fp8": isinstance(weight, Fp8Tensor),
            "weight_functions": len(module.weight_function),
            # per element: at most one e4m3 step (2^-3 relative) off the exact merged value
            "worst_step": float((error.abs() / (want.abs() * 2**-3 + float(weight.scale) * 2**-9)).max()),
            # stochastic rounding is unbiased: the mean error is far below the mean step
            "bias": float(error.mean().abs() / error.abs().mean()),
        }
    # ComfyUI freeing VRAM: the partial unload puts the file's weights back and the LoRA
    # returns as a per-forward patch on the expanded weight
    patched.partially_unload(torch.device("cpu"), memory_to_free=1 << 40)
    unloaded = predict(world, patched, manage=False)
    unloaded_functions = sum(len(dit.get_submodule(layer).weight_function) for layer in world.lora_keys)
    patched.unpatch_model()
    restored = all(
        torch.equal(dit.get_submodule(layer).weight.stored().view(torch.uint8), file.get_submodule(layer).weight.stored().view(torch.uint8))
        for layer in world.lora_keys
    )  # fmt: skip

    def relative(a: object, b: object) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    return {
        "merged_layers": layers,
        "merged_vs_exact_lora": relative(with_lora, exact),
        # what the LoRA changes on the merged fp8 path against its exact change
        "merged_change_vs_exact": relative(
            with_lora.float() - option.float(),
            exact.float() - predict(world, load(world, name, dtype="bf16")).float(),
        ),
        "restored_after_unpatch": restored,
        "partial_unload_vs_exact_lora": relative(unloaded, exact),
        "partial_unload_patch_functions": unloaded_functions,
    }


def _merged_patcher(world: World, source: dict, lora: dict | None = None) -> object:
    """A float MODEL whose weights have the LoRA merged in (the expected result)."""
    from comfyui_steadydancer.nodes.comfy_model import build_model_patcher

    merged = {k: v.clone() for k, v in source.items()}
    for key, delta in (world.lora if lora is None else lora).items():
        merged[key] += LORA_STRENGTH * delta
    return build_model_patcher(merged, compute_dtype="fp32", attention="math")


def check_lora(world: World) -> dict:
    from comfyui_steadydancer.steadydancer.quantized import dequantize_tensor, is_quantized
    from comfyui_steadydancer.steadydancer.weights import load_weights

    import nodes

    out = {}
    runs = [(name, lora) for name in ("tiny.safetensors", "tiny_q8.gguf", "tiny_fp8_scaled.safetensors")
            for lora in world.loras]  # fmt: skip
    for name, lora in runs:
        base = load(world, name)
        before = predict(world, base)
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, lora, LORA_STRENGTH)[0]
        with_lora = predict(world, patched)
        weights = load_weights(str(world.unet / name), dtype=world.torch.float32)  # fp8 expanded in float32
        source = {k: dequantize_tensor(v, world.torch.float32) for k, v in weights.items()}
        expected = predict(world, _merged_patcher(world, source, world.loras[lora]))
        # Low-VRAM path: every layer streamed, patches applied per forward as weight functions.
        patched.unpatch_model()
        patched.patch_model(device_to=world.torch.device("cpu"), lowvram_model_memory=1)
        lowvram = predict(world, patched, manage=False)
        patched.unpatch_model()
        # Fully loaded, then partially unloaded (ComfyUI freeing VRAM): patches apply once.
        patched.patch_model(device_to=world.torch.device("cpu"))
        patched.partially_unload(world.torch.device("cpu"), memory_to_free=1 << 40)
        partial = predict(world, patched, manage=False)
        patched.unpatch_model()
        after = predict(world, base)
        q = base.model.diffusion_model.blocks[0].self_attn.q.weight
        out[f"{name}+{lora}"] = {
            "patched_keys": len(patched.patches),
            "expected_keys": len(world.loras[lora]),
            "lora_vs_merged": max_diff(with_lora, expected),
            "lowvram_vs_merged": max_diff(lowvram, expected),
            "partial_unload_vs_merged": max_diff(partial, expected),
            "lora_effect": max_diff(with_lora, before),
            "base_after_vs_before": max_diff(after, before),
            "still_quantised": is_quantized(q) if name != "tiny.safetensors" else None,
        }
    return out


def check_gguf_patcher(world: World) -> dict:
    """GGUFModelPatcher under the running ComfyUI's ModelPatcher API (0.3.64 and 0.3x differ).

    A LoRA-patched GGUF model: the patched weight handed out on request (checkpoint saving and
    LoRA extraction ask for it), shrinking a loaded model through partially_load, and saving.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    from comfyui_steadydancer.steadydancer.quantized import dequantize_tensor, is_quantized
    from comfyui_steadydancer.steadydancer.weights import load_weights
    from safetensors.torch import load_file

    import nodes

    torch = world.torch
    cpu = torch.device("cpu")
    base = load(world, "tiny_q8.gguf")
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "tiny_lora.safetensors", LORA_STRENGTH)[0]
    source = {k: dequantize_tensor(v, torch.float32) for k, v in load_weights(str(world.unet / "tiny_q8.gguf")).items()}
    merged = {k: source[k] + LORA_STRENGTH * delta for k, delta in world.lora.items()}
    expected = predict(world, _merged_patcher(world, source))  # merges the LoRA itself
    key = "blocks.0.self_attn.q.weight"
    out = {}
    weight = patched.patch_weight_to_device(f"diffusion_model.{key}", device_to=cpu, return_weight=True)
    out["return_weight_vs_merged"] = max_diff(weight, merged[key])
    q = patched.model.diffusion_model.blocks[0].self_attn.q
    out["model_untouched"] = is_quantized(q.weight) and not q.weight_function

    comfy.model_management.load_models_gpu([patched])
    patched.partially_load(cpu, extra_memory=-(1 << 40))  # ComfyUI shrinking a loaded model
    out["shrunk_vs_merged"] = max_diff(predict(world, patched, manage=False), expected)
    out["still_quantised"] = is_quantized(q.weight)

    if hasattr(comfy.model_patcher.ModelPatcher, "model_state_dict_for_saving"):  # 0.3x saves via the patcher
        path = world.unet.parent / "saved.safetensors"
        comfy.utils.save_torch_file(patched.state_dict_for_saving(), str(path))
        saved = load_file(str(path))
        out["saved_vs_merged"] = max_diff(saved[f"model.diffusion_model.{key}"], merged[key])
        out["saved_shape"] = list(saved[f"model.diffusion_model.{key}"].shape)
        out["expected_shape"] = list(merged[key].shape)
    return out


WINDOW_FRAMES = 6  # latent frames of the context-window check (21 video frames)


def _window_node_execute(node: type, model: object, length: int, overlap: int, dim: int | None = None) -> object:
    """ComfyUI's (WAN) Context Windows (Manual) node on `model`, for either ComfyUI version's inputs."""
    import inspect

    import comfy.context_windows

    wanted = {
        "model": model, "context_length": length, "context_overlap": overlap,
        "context_schedule": comfy.context_windows.ContextSchedules.STATIC_STANDARD, "context_stride": 1,
        "closed_loop": False, "fuse_method": comfy.context_windows.ContextFuseMethods.PYRAMID, "dim": dim,
        "freenoise": False,  # 0.33's noise shuffling: off, so both versions sample the same noise
    }  # fmt: skip
    params = inspect.signature(node.execute).parameters
    return node.execute(**{k: v for k, v in wanted.items() if k in params}).result[0]


def check_context_windows(world: World) -> dict:
    """ComfyUI's context-window nodes on SteadyDancer: what each window's DiT call receives.

    A 21-frame video (6 latent frames) in windows of 9 frames (3 latent) overlapping by 4
    (1 latent). Per DiT call: the frame indices of its window (0.33 also prepends a causal
    anchor frame), and whether the pose latent and the image-to-video mask it got are the
    full video's at those indices.
    """
    import comfy.latent_formats
    import comfy_extras.nodes_context_windows as windows_nodes
    from comfyui_steadydancer.nodes.guider import make_guider

    torch = world.torch
    frames, h, w = WINDOW_FRAMES, 4, 6
    gen = torch.Generator().manual_seed(11)
    pose = torch.randn(1, 16, frames, h, w, generator=gen)
    mask = torch.ones(1, 1, frames, h, w)
    mask[:, :, :1] = 0.0
    values = {**world.values, "concat_latent_image": torch.randn(1, 16, frames, h, w, generator=gen), "concat_mask": mask}

    def conditioning(text: object, pose_latent: object) -> list:
        return [[text, {**values, "steadydancer_pose": pose_latent}]]

    normalised_pose = comfy.latent_formats.Wan21().process_in(pose)
    out = {}
    for label, node, dim in (("wan", windows_nodes.WanContextWindowsManualNode, None),
                             ("generic", windows_nodes.ContextWindowsManualNode, 2)):  # fmt: skip
        length, overlap = (9, 4) if label == "wan" else (3, 1)  # the Wan node counts video frames
        model = _window_node_execute(node, load(world, "tiny.safetensors"), length, overlap, dim)
        guider = make_guider(model, conditioning(world.text, pose), conditioning(world.text_negative, pose),
                             conditioning(world.text, pose), 1.0, 0.0, 0.1, 0.4)  # fmt: skip
        calls, latent = _record_window_calls(guider, normalised_pose, torch.zeros(1, 16, frames, h, w))
        out[label] = {"calls": calls, "shape": list(latent.shape), "finite": bool(torch.isfinite(latent).all())}
    return out


def check_long_without_windows(world: World) -> dict:
    """Sampling more than 81 frames without context windows works, with one warning that says
    what to add; with ComfyUI's WAN context windows there is no warning."""
    import logging

    import comfy_extras.nodes_context_windows as windows_nodes
    from comfyui_steadydancer.nodes.guider import make_guider, sample

    torch = world.torch
    frames, h, w = 22, 4, 6
    pose = torch.randn(1, 16, frames, h, w)
    mask = torch.ones(1, 1, frames, h, w)
    mask[:, :, :1] = 0.0
    values = {**world.values, "concat_latent_image": torch.randn(1, 16, frames, h, w), "concat_mask": mask}
    cond = [[world.text, {**values, "steadydancer_pose": pose}]]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    out = {}
    try:
        for label in ("plain", "windows"):
            records.clear()
            model = load(world, "tiny.safetensors")
            if label == "windows":
                model = _window_node_execute(windows_nodes.WanContextWindowsManualNode, model, 81, 16)
            guider = make_guider(model, cond, cond, cond, 1.0, 0.0, 0.1, 0.4)
            latent = sample(guider, {"samples": torch.zeros(1, 16, frames, h, w)}, seed=1, steps=1,
                            sampler_name="euler", scheduler="simple")["samples"]  # fmt: skip
            out[label] = {"warnings": [r for r in records if "SteadyDancer" in r], "finite": bool(torch.isfinite(latent).all())}
    finally:
        logging.getLogger().removeHandler(handler)
    return out


def _record_window_calls(guider: object, normalised_pose: object, samples: object) -> tuple[list[dict], object]:
    """Sample 2 steps with `guider`; per DiT call, its window's frame indices and what it got."""
    import torch
    from comfyui_steadydancer.nodes.guider import sample

    model = guider.model_patcher
    calls: list[dict] = []
    window_now: list[object] = []

    def recorder(apply: Callable, args: dict) -> object:
        window_now[:] = [args["c"]["transformer_options"].get("context_window")]
        return apply(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(recorder)
    dit = model.model.diffusion_model
    forward = dit.forward

    def recording_forward(x: object, t: object, **inputs: object) -> object:
        window = window_now[0]
        anchor = getattr(window, "causal_anchor_index", None)  # 0.33 prepends the frame before the window
        indices = ([anchor] if anchor is not None and anchor >= 0 else []) + list(window.index_list)
        y_mask = inputs["y"][:, :4].float().amax(dim=(0, 1, 3, 4))  # 1 where a frame is given
        calls.append({
            "indices": indices,
            "x_frames": x.shape[2],
            "pose_is_slice": bool(torch.allclose(inputs["pose"].float(), normalised_pose[:, :, indices], atol=1e-6)),
            "given_frames": [indices[i] for i, v in enumerate(y_mask.tolist()) if v > 0.5],
        })
        return forward(x, t, **inputs)

    dit.forward = recording_forward
    try:
        latent = sample(guider, {"samples": samples}, seed=1, steps=2, sampler_name="euler", scheduler="simple")
    finally:
        dit.forward = forward
    return calls, latent["samples"]


CACHE_STEPS = 12


def check_caches(world: World) -> dict:
    """ComfyUI's EasyCache and LazyCache nodes on SteadyDancer: model calls made, and the result.

    At threshold 0 nothing may be skipped and the video equals the uncached one; at a high
    threshold calls are skipped (the wrappers reach the SteadyDancer DiT call).
    """
    import comfy_extras.nodes_easycache as cache_nodes
    from comfyui_steadydancer.nodes.guider import make_guider, sample

    torch = world.torch

    def run(model: object) -> tuple[int, object]:
        dit = model.model.diffusion_model
        forward, calls = dit.forward, [0]

        def counting_forward(*args: object, **kwargs: object) -> object:
            calls[0] += 1
            return forward(*args, **kwargs)

        dit.forward = counting_forward
        try:
            guider = make_guider(model, world.conditioning(world.text, world.pose),
                                 world.conditioning(world.text_negative, world.pose),
                                 world.conditioning(world.text, world.pose_negative), 5.0, 1.5, 0.1, 0.4)  # fmt: skip
            latent = sample(guider, {"samples": torch.zeros_like(world.noise)}, seed=3, steps=CACHE_STEPS,
                            sampler_name="euler", scheduler="simple")  # fmt: skip
        finally:
            dit.forward = forward
        return calls[0], latent["samples"]

    base_calls, base = run(load(world, "tiny.safetensors"))
    out = {"uncached_calls": base_calls}
    for name, node in (("easycache", cache_nodes.EasyCacheNode), ("lazycache", cache_nodes.LazyCacheNode)):
        for threshold in (0.0, 3.0):
            # ComfyUI's default window (0.15-0.95). It must not begin before the pose window (0.1):
            # 0.3.64's caches fail on a prediction first made on a step they skip (0.33 copes).
            model = node.execute(load(world, "tiny.safetensors"), threshold, 0.15, 0.95, False).result[0]
            calls, latent = run(model)
            out[f"{name}@{threshold}"] = {"calls": calls, "max_diff": max_diff(latent, base),
                                         "finite": bool(torch.isfinite(latent).all())}  # fmt: skip
    return out


def check_block_patches(world: World) -> dict:
    """ComfyUI's per-block replacements (patches_replace["dit"], as on Wan) reach the DiT's blocks."""
    base = load(world, "tiny.safetensors")
    expected = predict(world, base)
    calls: list[tuple[int, list[str]]] = []

    def passthrough(args: dict, extra: dict) -> dict:
        calls.append((0, sorted(args)))
        return extra["original_block"](args)

    def twice(args: dict, extra: dict) -> dict:  # what a cache does: the block, run more than once
        extra["original_block"](args)
        return extra["original_block"](args)

    def skip(args: dict, extra: dict) -> dict:
        return {"img": args["img"]}

    out = {}
    for name, patch, block in (("passthrough", passthrough, 0), ("twice", twice, 1), ("skip", skip, 1)):
        model = base.clone()
        model.set_model_patch_replace(patch, "dit", "double_block", block)
        out[name] = max_diff(predict(world, model), expected)
    out["calls"] = calls
    return out


def check_lora_hooks(world: World) -> dict:
    """Scheduled/per-conditioning LoRA (hooks): works on float weights, a clear error on GGUF."""
    import comfy.hooks
    import comfy.utils
    from comfyui_steadydancer.nodes.guider import make_guider, sample
    from comfyui_steadydancer.steadydancer.errors import GGUFError

    torch = world.torch
    lora = comfy.utils.load_torch_file(str(world.unet.parent / "loras" / "tiny_lora.safetensors"), safe_load=True)
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=0.0)
    out = {}
    for name in ("tiny.safetensors", "tiny_q8.gguf"):
        if dynamic_vram_on() and not name.endswith(".gguf"):
            # On a GPU ComfyUI's dynamic patcher refuses hooks for every model; the CPU stand-in
            # would patch ComfyUI's read-only file map in place, which no real run does.
            out[name] = {"skipped": "dynamic VRAM"}
            continue
        positive = comfy.hooks.set_hooks_for_conditioning(world.conditioning(world.text, world.pose), hooks)
        guider = make_guider(load(world, name), positive, world.conditioning(world.text_negative, world.pose),
                             world.conditioning(world.text, world.pose_negative), 5.0, 1.5, 0.1, 0.4)
        try:
            result = sample(guider, {"samples": torch.zeros_like(world.noise)}, seed=1, steps=2, sampler_name="euler", scheduler="simple")
            out[name] = {"finite": bool(torch.isfinite(result["samples"]).all())}
        except GGUFError as exc:
            out[name] = {"error": str(exc)}
    return out


def check_attention(world: World) -> dict:
    """The loader's choice is ComfyUI's optimized_attention_override; a ComfyUI override wins."""
    from comfyui_steadydancer.nodes.comfy_attention import OVERRIDE_KEY

    models = {name: load(world, "tiny.safetensors", attention=name) for name in ("math", "sdpa", "comfy")}
    outputs = {name: predict(world, model) for name, model in models.items()}
    overrides = {name: model.model_options["transformer_options"].get(OVERRIDE_KEY) for name, model in models.items()}
    clone = models["math"].clone()
    # What ComfyUI's attention nodes do: their own override on a clone of the MODEL.
    seen: list[tuple[int, ...]] = []

    def comfy_override(func: Callable, q: object, *args: object, **kwargs: object) -> object:
        seen.append(tuple(q.shape))
        return func(q, *args, **kwargs)

    patched = models["sdpa"].clone()
    patched.model_options["transformer_options"][OVERRIDE_KEY] = comfy_override
    with_override = predict(world, patched)
    per_forward = len(seen)
    seen.clear()
    predict(world, models["comfy"])
    return {
        "used": {name: o.backend_used if o is not None else None for name, o in overrides.items()},
        "comfy_vs_math": max_diff(outputs["comfy"], outputs["math"]),
        "sdpa_vs_math": max_diff(outputs["sdpa"], outputs["math"]),
        "clone_shares": clone.model_options["transformer_options"][OVERRIDE_KEY] is overrides["math"],
        "override_calls": per_forward,
        "override_vs_math": max_diff(with_override, outputs["math"]),
        "comfy_choice_calls_without_override": len(seen),
        "layers": world.config.num_layers,
    }


def check_formats(world: World) -> dict:
    """Every weight format through the loader node: the prediction equals the library's forward."""
    import comfy.ops
    from comfyui_steadydancer.steadydancer.model import load_model

    torch = world.torch
    out = {}
    for name, dtype in FORMAT_RUNS:
        patcher = load(world, name, dtype=dtype)
        reference = direct(world, load_model(str(world.unet / name), dtype=torch.float32, attention="math"))
        got = predict(world, patcher)
        q = patcher.model.diffusion_model.blocks[0].self_attn.q
        out[f"{name}@{dtype}"] = {
            "patcher": type(patcher).__name__,
            "rel_diff": float((got.float() - reference).abs().max() / reference.abs().max()),
            "finite": bool(torch.isfinite(got).all()),
            "weight_dtype": str(getattr(q.weight, "tensor_type", q.weight.dtype)),
        }
    return {
        "runs": out,
        "aimdo_enabled": dynamic_vram_on(),
        "lazy_layers": comfy.ops.disable_weight_init.Linear(4, 4).weight is None,
    }


def call_recorder(calls: list) -> Callable:
    """A ComfyUI model wrapper noting (sigma, which predictions) of every forward pass."""

    def wrapper(apply: Callable, args: dict) -> object:
        calls.append((float(args["timestep"][0]), sorted(args["cond_or_uncond"])))
        return apply(args["input"], args["timestep"], **args["c"])

    return wrapper


def check_guider(world: World) -> dict:
    import comfy.samplers
    from comfyui_steadydancer.nodes.guider import SteadyDancerGuider, sample

    torch = world.torch
    out = {}
    for text_scale in (5.0, 1.0):
        model = load(world, "tiny.safetensors").clone()
        calls: list[tuple[float, list[int]]] = []
        model.set_model_unet_function_wrapper(call_recorder(calls))
        guider = SteadyDancerGuider.execute(
            model, world.conditioning(world.text, world.pose), world.conditioning(world.text_negative, world.pose),
            world.conditioning(world.text, world.pose_negative), text_scale, 1.5, 0.1, 0.4,
        ).result[0]
        latent = sample(guider, {"samples": torch.zeros_like(world.noise)}, seed=1, steps=10, sampler_name="euler", scheduler="simple")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 10)
        per_step, forwards = [], []
        for i in range(10):
            at_step = [c for t, c in calls if abs(t - float(sigmas[i])) < 1e-5]
            per_step.append(sorted(index for c in at_step for index in c))
            forwards.append(len(at_step))
        out[str(text_scale)] = {
            "per_step": per_step,
            "forwards_per_step": forwards,
            "finite": bool(torch.isfinite(latent["samples"]).all()),
        }
    return out


class ProbeSampler:
    """A ComfyUI sampler that asks the guider for one prediction, at step `step`, from the noise."""

    def __init__(self, step: int) -> None:
        self.step = step

    def sample(self, model_wrap: Callable, sigmas: object, extra_args: dict, callback: object, noise: object,
               latent_image: object = None, denoise_mask: object = None, disable_pbar: bool = False) -> object:
        return model_wrap(noise, sigmas[self.step].reshape(1), **extra_args)


def check_guidance_values(world: World) -> dict:
    """The guider's prediction equals the formula on three direct forwards (which cond is which)."""
    import comfy.samplers
    from comfyui_steadydancer.nodes.guider import make_guider
    from comfyui_steadydancer.steadydancer.model import load_model

    torch = world.torch
    model = load(world, "tiny.safetensors")
    dit = load_model(str(world.unet / "tiny.safetensors"), dtype=torch.float32, attention="math")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 10)
    guider = make_guider(
        model, world.conditioning(world.text, world.pose), world.conditioning(world.text_negative, world.pose),
        world.conditioning(world.text, world.pose_negative), 5.0, 1.5, 0.1, 0.4,
    )
    fmt = model.model.latent_format
    out = {}
    for step in (2, 5):  # inside and outside the pose window
        sigma = float(sigmas[step])
        got = guider.sample(world.noise.clone(), torch.zeros_like(world.noise), ProbeSampler(step), sigmas.clone())
        cond = direct(world, dit, world.model_inputs(), sigma)
        uncond_text = direct(world, dit, world.model_inputs(text=world.text_negative), sigma)
        uncond_pose = direct(world, dit, world.model_inputs(pose=world.pose_negative), sigma)
        expected = uncond_text + 5.0 * (cond - uncond_text) + (1.5 * (cond - uncond_pose) if step == 2 else 0.0)
        out[str(step)] = max_diff(fmt.process_in(got), expected)  # the guider's result leaves via process_latent_out
    return out


def check_sampler_node(world: World) -> dict:
    from comfyui_steadydancer.nodes.guider import SteadyDancerSampler

    torch = world.torch
    model = load(world, "tiny_q8.gguf")
    latent = {"samples": torch.zeros_like(world.noise)}
    result = SteadyDancerSampler.execute(
        model, world.conditioning(world.text, world.pose), world.conditioning(world.text_negative, world.pose),
        world.conditioning(world.text, world.pose_negative), 5.0, 1.5, 0.1, 0.4, latent, 0, 3, 3.0, "uni_pc_bh2", "simple",
    ).result[0]
    shifted = model.get_model_object("model_sampling")
    return {
        "shape": list(result["samples"].shape),
        "finite": bool(torch.isfinite(result["samples"]).all()),
        "base_shift_unchanged": float(shifted.shift),
    }


def check_errors(world: World) -> dict:
    from comfyui_steadydancer.steadydancer.errors import (
        AttentionBackendError,
        ConditioningError,
        ModelFileError,
    )

    out = {}
    try:
        load(world, "plain_wan.safetensors")
        out["plain_wan"] = None
    except ModelFileError as exc:
        out["plain_wan"] = str(exc)
    try:
        load(world, "tiny.safetensors", attention="flash_attn_2")  # not installed here (CPU)
        out["attention_missing"] = None
    except AttentionBackendError as exc:
        out["attention_missing"] = str(exc)
    try:
        load(world, "gone.gguf")
        out["missing_file"] = None
    except ModelFileError as exc:
        out["missing_file"] = str(exc)
    from comfyui_steadydancer.nodes.guider import SteadyDancerSampler
    from comfyui_steadydancer.nodes.model_loader import SteadyDancerModelLoader

    validate = SteadyDancerModelLoader.validate_inputs
    out["validate_ok"] = validate(model_name="tiny_q8.gguf", compute_dtype="bf16", attention="sdpa")
    out["validate_linked"] = validate(model_name=None, compute_dtype=None, attention=None)
    out["validate_model"] = validate(model_name="nope.gguf", compute_dtype="default", attention="auto")
    out["validate_attention"] = validate(model_name="tiny.safetensors", compute_dtype="default", attention="fast")
    out["validate_fp8_matmul"] = validate(model_name="tiny.safetensors", compute_dtype="default", attention="auto",
                                          fp8_matmul="false")  # fmt: skip
    out["validate_sampler"] = SteadyDancerSampler.validate_inputs(sampler_name="uni_pc_bh3", scheduler="simple")
    patcher = load(world, "tiny.safetensors")
    kwargs = {**world.values, "cross_attn": world.text}  # no steadydancer_pose
    try:
        patcher.model.extra_conds(**kwargs, noise=world.noise, device=world.torch.device("cpu"))
        out["missing_pose"] = None
    except ConditioningError as exc:
        out["missing_pose"] = str(exc)
    return out


CHECKS: dict[str, Callable[[World], dict]] = {
    "folders": check_folders,
    "formats": check_formats,
    "parity": check_parity,
    "gguf_quantised": check_gguf_quantised,
    "fp8_compact": check_fp8_compact,
    "fp8_matmul": check_fp8_matmul,
    "lora": check_lora,
    "lora_hooks": check_lora_hooks,
    "gguf_patcher": check_gguf_patcher,
    "context_windows": check_context_windows,
    "caches": check_caches,
    "block_patches": check_block_patches,
    "long_without_windows": check_long_without_windows,
    "attention": check_attention,
    "guider": check_guider,
    "guidance_values": check_guidance_values,
    "sampler_node": check_sampler_node,
    "errors": check_errors,
}


def main() -> None:
    out_path = Path(sys.argv[1])
    dynamic_vram = "--dynamic-vram" in sys.argv[2:]
    selected = [a for a in sys.argv[2:] if not a.startswith("--")] or list(CHECKS)
    unsupported = import_comfyui(dynamic_vram)
    if unsupported:
        out_path.write_text(json.dumps({"unsupported": unsupported}))
        return
    load_package()  # everything below imports `comfyui_steadydancer.*`: one copy of each class
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp))
        for name in selected:
            try:
                results[name] = {"ok": True, **CHECKS[name](world)}
            except Exception as exc:  # reported to pytest, which shows the traceback
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out_path.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
