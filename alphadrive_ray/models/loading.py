"""Load a policy (Qwen2-VL, or a text-only Qwen2) and its processor from a local folder.

The tiny embedded model and a real Qwen2-VL-2B checkpoint go through the same code; the
only difference between them is the folder. Nothing is downloaded: `path` must be a
local folder written by `save_pretrained` (or `alphadrive-ray model init-tiny`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from alphadrive_ray.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VISION_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
TEXT_MODEL_TYPES = ("qwen2", "qwen3", "llama")


def read_model_type(path: str | Path) -> str:
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise UserError(
            f"model folder not found: {folder}. Point model.path at a local Hugging Face checkpoint, or build "
            f"the tiny demo model with `alphadrive-ray model init-tiny {folder}` (or model.init_tiny: true)."
        )
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})") from None
    if model_type not in VISION_MODEL_TYPES + TEXT_MODEL_TYPES:
        raise UserError(
            f"{config_file}: model_type {model_type!r} is not supported; expected Qwen2-VL "
            f"({', '.join(VISION_MODEL_TYPES)}) or a text-only causal LM ({', '.join(TEXT_MODEL_TYPES)})"
        )
    return model_type


def is_vision_model(path: str | Path) -> bool:
    return read_model_type(path) in VISION_MODEL_TYPES


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pixel_bounds(min_pixels: int = 0, max_pixels: int = 0) -> dict[str, int]:
    """The image-size bounds that are set (data.min_pixels / data.max_pixels; 0: the model's
    own), as keyword arguments of the Qwen2-VL processor and of vLLM's `mm_processor_kwargs`."""
    return {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}


def load_processor(path: str | Path, min_pixels: int = 0, max_pixels: int = 0):
    """The Qwen2-VL processor of a vision model, or the tokenizer of a text-only model.

    `min_pixels` / `max_pixels` (0: the model's preprocessor setting) bound the area every
    image is resized to, so they fix its number of image tokens (area / 28^2); an export saves
    the processor, and with it the bounds it was trained with.
    """
    from transformers import AutoProcessor, AutoTokenizer

    if not is_vision_model(path):
        return AutoTokenizer.from_pretrained(str(path))  # no images: the bounds do not apply
    bounds = pixel_bounds(min_pixels, max_pixels)
    processor = AutoProcessor.from_pretrained(str(path), **bounds)
    size = processor.image_processor.size
    low, high = size.get("shortest_edge"), size.get("longest_edge")  # Qwen2-VL keeps the pixel bounds here
    if bounds and low is not None and high is not None and low > high:
        raise UserError(
            f"image size bounds of {path}: min_pixels {low} exceeds max_pixels {high}; "
            "set both data.min_pixels and data.max_pixels (serve: --min-pixels / --max-pixels)"
        )
    return processor


def load_model(path: str | Path, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """The policy model in eval mode on CPU; callers move it to their device."""
    from transformers import AutoModelForCausalLM, Qwen2VLForConditionalGeneration

    kwargs = dict(dtype=torch_dtype(dtype), attn_implementation=attn_implementation)
    model: PreTrainedModel
    if read_model_type(path) in VISION_MODEL_TYPES:
        model = Qwen2VLForConditionalGeneration.from_pretrained(str(path), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.eval()
    return model


def ensure_model(path: str | Path, init_tiny: bool, spec=None) -> Path:
    """With `init_tiny`, build the tiny model of `spec` (default: `TinySpec()`, the embedded
    base) at `path` when it is missing or was built from another spec (tiny_spec.json differs);
    then check the folder."""
    folder = Path(path)
    if init_tiny:
        from dataclasses import asdict

        from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

        spec = spec or TinySpec()
        seed = spec.seed
        try:
            current = json.loads((folder / "tiny_spec.json").read_text()) == asdict(spec)
        except (OSError, json.JSONDecodeError):
            current = False
        if not current:
            if (folder / "config.json").is_file() and not (folder / "tiny_spec.json").is_file():
                raise UserError(f"model.init_tiny is set but {folder} holds another model; point model.path elsewhere or set model.init_tiny: false")
            print(
                f"building the tiny Qwen2-VL base at {folder} (seed {seed}; pretraining its vision tower, then its language "
                "half on scene descriptions; once per machine, a few minutes on 2 cores)",
                flush=True,
            )
            # built aside and swapped in: a run reading the folder never sees a half-written model
            staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            build_tiny_qwen2vl(staging, spec, log=lambda line: print(f"  {line}", flush=True))
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                folder.rename(old)
                staging.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(folder)
    read_model_type(folder)
    return folder
