"""Random-weight models at their real sizes, in the file formats users load, for benchmarks.

    $COMFYUI_PYTHON -m benchmarks.random_models --comfyui DIR --out MODELS [--scale 14b|tiny]

writes under MODELS (ComfyUI's folder layout) what the example graph needs:
- diffusion_models/: the SteadyDancer DiT as GGUF Q4_K (`steadydancer_<scale>_Q4_K.gguf`) and
  as Kijai's scaled fp8 safetensors (`steadydancer_<scale>_fp8_e4m3fn_scaled.safetensors`);
  at `14b`, SteadyDancer-14B's shapes (9.25 GB and 16.4 GB);
- text_encoders/: at `14b` umT5-XXL in the scaled fp8 layout of `umt5_xxl_fp8_e4m3fn_scaled`
  (5.7 B parameters, 4096-wide states) with a small SentencePiece vocabulary trained here
  (ComfyUI reads the tokenizer from the file; token ids only index the embedding); at
  `tiny` the demo's SD1 CLIP-L;
- clip_vision/: CLIP ViT-H/14 at `14b` (1280-wide states), the demo's ViT-L at `tiny`;
- loras/: a random LoRA of a distilled-step LoRA's layout (`write_lora`), for the fast preset;
- vae/, dwpose/ and the inputs: as the demo (scripts/make_tiny_models.py): the Wan 2.1 VAE at
  its real size, the ONNX pose stand-ins.

Quantised GGUF tensors are random blocks with scales chosen so that weights come out
~ N(0, 1/fan_in) in spread (as initialised weights), so activations stay finite over 40
blocks; this is much faster than quantising random floats. Random weights make noise, not a
dance: these files measure time and memory, nothing else.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts import make_tiny_models as tiny  # noqa: E402
from steadydancer.gguf.convert import TensorPlan, choose_storage, write_plans  # noqa: E402
from steadydancer.gguf.dequant import as_qtype  # noqa: E402
from steadydancer.keys import TinyConfig  # noqa: E402
from steadydancer.model import SteadyDancerConfig, parameter_layout  # noqa: E402

SCALES = ("14b", "tiny")
LORA_RANK = {"14b": 64, "tiny": 4}  # the distilled-step LoRA's rank (lightx2v I2V 480p: 64)
FP8_MAX = 448.0  # largest float8_e4m3fn value


def dit_config(scale: str) -> SteadyDancerConfig:
    """SteadyDancer-14B's sizes, or the demo's tiny DiT (text and CLIP widths of its encoders)."""
    if scale == "14b":
        return SteadyDancerConfig()
    tc = TinyConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=2, text_dim=tiny.TEXT_DIM, clip_dim=tiny.CLIP_DIM)
    return SteadyDancerConfig(dim=tc.dim, ffn_dim=tc.ffn_dim, num_heads=tc.num_heads, num_layers=tc.num_layers,
                              text_dim=tc.text_dim, clip_dim=tc.clip_dim)  # fmt: skip


def file_names(scale: str) -> dict[str, str]:
    """Model file names per ComfyUI folder role, as the benchmark graph refers to them."""
    big = scale == "14b"
    return {
        "gguf": f"steadydancer_{scale}_Q4_K.gguf",
        "fp8": f"steadydancer_{scale}_fp8_e4m3fn_scaled.safetensors",
        "text_encoder": "umt5_xxl_random_fp8_e4m3fn_scaled.safetensors" if big else tiny.TEXT_ENCODER,
        "text_encoder_type": "wan" if big else "stable_diffusion",
        "clip_vision": "clip_vision_h_random.safetensors" if big else tiny.CLIP_VISION,
        "vae": tiny.VAE,
        "lora": f"steadydancer_{scale}_random_lora_rank{LORA_RANK[scale]}.safetensors",
    }


# ------------------------------------------------------------------------------ the DiT
def _fan_in(shape: tuple[int, ...]) -> int:
    return max(int(math.prod(shape[1:])), 1)


def random_blocks(plan: TensorPlan, rng: np.random.Generator) -> np.ndarray:
    """Random packed bytes of a Q8_0 or Q4_K tensor whose values spread like N(0, 1/fan_in)."""
    import gguf

    q = gguf.GGMLQuantizationType
    block_size, type_size = gguf.GGML_QUANT_SIZES[plan.qtype]
    n_blocks = math.prod(plan.stored_shape) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    std = 1.0 / math.sqrt(_fan_in(plan.shape))
    if plan.qtype == q.Q8_0:  # d (fp16), 32 int8: w = d * q, q spread ~74
        blocks[:, 0:2] = np.frombuffer(np.float16(std / 74.0).tobytes(), np.uint8)
    elif plan.qtype == q.Q4_K:  # d, dmin (fp16), 6-bit scales and mins, 4-bit q: spread ~258 d
        blocks[:, 0:2] = np.frombuffer(np.float16(std / 258.0).tobytes(), np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(7.5 * std / 258.0).tobytes(), np.uint8)  # centres q
    else:
        raise ValueError(f"random {plan.qtype.name} blocks are not implemented; use Q8_0 or Q4_K")
    return blocks.reshape(-1)


def write_dit_gguf(path: Path, config: SteadyDancerConfig, qtype: str = "Q4_K", seed: int = 7) -> None:
    """The DiT as GGUF, tensor by tensor (ComfyUI-GGUF's storage rules: steadydancer.gguf.convert)."""
    target = as_qtype(qtype)
    layout = parameter_layout(config, torch.float32)
    plans = []
    for name, (shape, _) in layout.items():
        qtype_of_tensor, stored = choose_storage(name, shape, "BF16", target)
        plans.append(TensorPlan(name, name, shape, stored, qtype_of_tensor))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def data(plan: TensorPlan) -> np.ndarray:
        if plan.qtype.name == "F32":
            return tiny.init_tensor(plan.name, plan.shape, gen).numpy()
        return random_blocks(plan, rng)

    write_plans(str(path), plans, data, target)


def _scaled_fp8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = values.abs().amax().clamp_min(1e-12) / FP8_MAX
    return (values / scale).to(torch.float8_e4m3fn).cpu(), scale.reshape(1).float().cpu()


# e4m3fn codes that are numbers (0x7F and 0xFF are NaN), and the spread of their values
_FP8_CODES = torch.arange(256, dtype=torch.uint8)
_FP8_CODES = _FP8_CODES[(_FP8_CODES & 0x7F) != 0x7F]
_FP8_CODE_STD = float(_FP8_CODES.view(torch.float8_e4m3fn).float().pow(2).mean().sqrt())


def random_fp8(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp8 codes and the scale that gives them a spread of 1/sqrt(fan_in) (an
    initialised weight's); drawing codes directly is ~10x faster than converting floats."""
    index = torch.randint(0, len(_FP8_CODES), shape, generator=gen, dtype=torch.int64, device=gen.device)
    codes = _FP8_CODES.to(gen.device)[index].view(torch.float8_e4m3fn)
    scale = 1.0 / (math.sqrt(_fan_in(shape)) * _FP8_CODE_STD)
    return codes, torch.tensor([scale], dtype=torch.float32)


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]


def write_safetensors_streamed(path: Path, items: list[tuple[str, tuple[int, ...], torch.dtype]],
                               make: Callable[[str], torch.Tensor]) -> None:
    """A .safetensors file written one tensor at a time: `items` declares names, shapes and
    dtypes (the header comes first), `make(name)` gives each tensor when its turn comes, so
    the host holds one tensor, not the model (safetensors' own writer holds all of it twice)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in items:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _safetensors_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in items:
            tensor = make(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def write_dit_fp8(path: Path, config: SteadyDancerConfig, device: str = "cpu", seed: int = 8) -> None:
    """The DiT as Kijai's `*_fp8_e4m3fn_scaled` safetensors: matrices fp8 with one scale each.

    Written tensor by tensor (`write_safetensors_streamed`): a 16 GB file needs a few hundred
    MB of host memory. fp8 codes are drawn on `device` (a GPU draws the 14B model's in
    seconds, two CPU cores in about two minutes).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    init_gen = torch.Generator().manual_seed(seed)
    items: list[tuple[str, tuple[int, ...], torch.dtype]] = [("scaled_fp8", (0,), torch.float8_e4m3fn)]
    scales: dict[str, torch.Tensor] = {}
    for name, (shape, _) in parameter_layout(config, torch.float32).items():
        key = f"model.diffusion_model.{name}"
        if name.endswith(".weight") and len(shape) >= 2 and "condition_embedding" not in name:
            items += [(key, shape, torch.float8_e4m3fn), (key[: -len("weight")] + "scale_weight", (1,), torch.float32)]
        else:
            items.append((key, shape, torch.bfloat16))

    shapes = {key: shape for key, shape, _ in items}

    def make(key: str) -> torch.Tensor:
        if key == "scaled_fp8":
            return torch.zeros(0, dtype=torch.float8_e4m3fn)
        if key.endswith(".scale_weight"):
            return scales.pop(key)
        shape = shapes[key]
        if key.endswith(".weight") and len(shape) >= 2 and "condition_embedding" not in key:
            codes, scales[key[: -len("weight")] + "scale_weight"] = random_fp8(shape, gen)
            return codes.cpu()
        return tiny.init_tensor(key, shape, init_gen).to(torch.bfloat16)

    write_safetensors_streamed(path, items, make)


# ------------------------------------------------------------------------------ encoders
LORA_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
               "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2")


def write_lora(path: Path, config: SteadyDancerConfig, rank: int = 64, seed: int = 11) -> int:
    """A distilled-step LoRA's layout (lightx2v I2V: rank `rank` on every attention and FFN
    linear of every block, PEFT's `lora_A`/`lora_B` under `diffusion_model.`, bf16), random
    values of a small update; returns the number of patched layers."""
    gen = torch.Generator().manual_seed(seed)
    layout = parameter_layout(config, torch.float32)
    items: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for block in range(config.num_layers):
        for layer in LORA_LAYERS:
            out_dim, in_dim = layout[f"blocks.{block}.{layer}.weight"][0]
            key = f"diffusion_model.blocks.{block}.{layer}"
            items += [(f"{key}.lora_A.weight", (rank, in_dim), torch.bfloat16),
                      (f"{key}.lora_B.weight", (out_dim, rank), torch.bfloat16)]  # fmt: skip
    shapes = {key: shape for key, shape, _ in items}

    def make(key: str) -> torch.Tensor:
        shape = shapes[key]
        spread = 1.0 / math.sqrt(shape[1]) if key.endswith("lora_A.weight") else 0.01
        return (torch.randn(shape, generator=gen) * spread).to(torch.bfloat16)

    write_safetensors_streamed(path, items, make)
    return len(items) // 2


def spiece_model_bytes(vocab_size: int = 256) -> bytes:
    """A small SentencePiece model trained here on a few sentences (no download possible)."""
    import sentencepiece

    sentence = "a person dances to the music full body in view smooth natural motion static camera high quality"
    words = sentence.split(" ")
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def write_umt5_xxl(path: Path, device: str = "cpu", seed: int = 9) -> None:
    """umT5-XXL (ComfyUI's `wan` text encoder) in the scaled-fp8 layout, with a tokenizer."""
    import comfy.ops
    import comfy.text_encoders.t5
    from safetensors.torch import save_file

    config_path = Path(comfy.text_encoders.t5.__file__).with_name("umt5_config_xxl.json")
    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = comfy.text_encoders.t5.T5(config, torch.float32, "meta", comfy.ops.manual_cast)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in model.state_dict().items():
        values = tiny.init_tensor(name, tuple(tensor.shape), gen)
        if name.endswith(".weight") and tensor.ndim == 2 and "shared" not in name and "relative_attention_bias" not in name:
            out[name], out[name[: -len("weight")] + "scale_weight"] = _scaled_fp8(values)
        else:
            out[name] = values.to(torch.bfloat16).cpu()
    out["spiece_model"] = torch.frombuffer(bytearray(spiece_model_bytes()), dtype=torch.uint8)
    save_file(out, str(path))


def write_clip_vision_h(path: Path) -> None:
    """CLIP ViT-H/14 vision model (HF layout, what CLIPVisionLoader detects), random fp16."""
    import comfy.clip_vision
    from safetensors.torch import save_file

    config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json"
    with torch.device("meta"):
        model = comfy.clip_vision.ClipVisionModel(str(config))
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    save_file(tiny.random_weights(shapes, 2, "float16"), str(path))


# ------------------------------------------------------------------------------ all of it
def build(comfyui: Path, out: Path, scale: str, device: str = "cpu", force: bool = False) -> dict[str, str]:
    """Write every model of `scale` under `out` (skipping files that exist); returns file_names."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    tiny.use_comfyui(comfyui)
    names = file_names(scale)
    config = dit_config(scale)
    steps = [
        (out / "diffusion_models" / names["gguf"], lambda p: write_dit_gguf(p, config)),
        (out / "diffusion_models" / names["fp8"], lambda p: write_dit_fp8(p, config, device)),
        (out / "vae" / names["vae"], tiny.write_wan_vae),
        (out / "dwpose" / "dw-ll_ucoco_384.onnx", lambda p: tiny.write_pose_standins(p.parent)),
        (out / "loras" / names["lora"], lambda p: write_lora(p, config, LORA_RANK[scale])),
    ]
    if scale == "14b":
        steps += [
            (out / "text_encoders" / names["text_encoder"], lambda p: write_umt5_xxl(p, device)),
            (out / "clip_vision" / names["clip_vision"], write_clip_vision_h),
        ]
    else:
        steps += [
            (out / "text_encoders" / names["text_encoder"], tiny.write_text_encoder),
            (out / "clip_vision" / names["clip_vision"], tiny.write_clip_vision),
        ]
    for path, make in steps:
        if path.is_file() and not force:
            continue
        if path.suffix == ".onnx":  # the pose stand-ins: two small files at once
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"writing {path}", file=sys.stderr, flush=True)
            make(path)
            continue
        write_file(path, make)
    return names


def write_file(path: Path, make: Callable[[Path], object]) -> None:
    """`make(part)` then rename it to `path`: a killed run leaves no file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing {path}", file=sys.stderr, flush=True)
    part = path.with_name(path.name + ".part")
    make(part)
    part.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (its model classes give the key layouts)")
    parser.add_argument("--out", type=Path, required=True, help="models folder to fill")
    parser.add_argument("--scale", choices=SCALES, default="14b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where random values are drawn (a GPU is much faster at 14b)")
    parser.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    build(args.comfyui, args.out, args.scale, args.device, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
