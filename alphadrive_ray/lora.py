"""LoRA on the learner (peft): adapters on the language model's linear layers, merged weights out.

The learners train low-rank adapters (and the vision tower, unless `model.freeze_vision`);
everything that leaves a learner is in the base model's own layout, so nothing downstream
knows about peft:
- the weight sync sends each adapted layer's merged weight `W + (alpha / r) * B @ A` under the
  layer's own name (`merged_parameters`), plus the other trainable tensors; frozen tensors the
  engines already hold are not sent, so a LoRA sync is smaller than a full one;
- the KL reference and the Hugging Face export are built from the same merged tensors, so the
  export loads with `from_pretrained` and serves without peft;
- DeepSpeed checkpoints hold the peft-wrapped module (base weights, adapters) and the
  optimizer state of the adapters only.
The merge is computed, never applied in place: merging and unmerging a layer in floating point
would drift its base weight.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import torch

# peft wraps the model as `base_model.model.<name>` and an adapted layer's own weight as
# `<layer>.base_layer.weight`; the adapters are `<layer>.lora_A.<adapter>.weight` and `lora_B`
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def target_pattern(targets: Sequence[str]) -> str:
    """A peft `target_modules` regex: layers named like one of `targets`, outside the vision tower."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"^(?!.*\bvisual\b).*\.({names})$"


def apply_lora(model: Any, rank: int, alpha: int, dropout: float, targets: Sequence[str], train_vision: bool) -> Any:
    """Wrap `model` with LoRA adapters (peft); only the adapters, and the vision tower when
    `train_vision`, stay trainable. Raises ValueError when no layer matches `targets`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(targets), bias="none")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"lora.target_modules {list(targets)}: no layer of the language model matches ({exc})") from None
    if train_vision:
        visual = getattr(getattr(wrapped.base_model.model, "model", None), "visual", None)
        if visual is not None:
            visual.requires_grad_(True)
    return wrapped


def base_name(name: str) -> str:
    """A peft-wrapped parameter's name in the base model's layout."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def lora_layers(model: Any) -> dict[str, Any]:
    """Adapted layers by their name in the peft-wrapped model."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _synced(model: Any, everything: bool) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
    """(base-model name, parameter, its adapted layer or None) of each tensor that leaves the
    learner, in `named_parameters` order: every adapted layer's own weight, the other trainable
    parameters (all with `everything`); never the adapters themselves."""
    layers = lora_layers(model)
    for name, param in model.named_parameters():
        if ".lora_" in name:  # lora_A, lora_B (lora_embedding_*): their effect is in the merged weights
            continue
        layer = layers.get(name.removesuffix(".base_layer.weight")) if name.endswith(".base_layer.weight") else None
        if layer is not None or everything or param.requires_grad:
            yield base_name(name), param, layer


@torch.no_grad()
def merged_parameters(model: Any, everything: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(base-model name, tensor): adapted layers merged, `W + (alpha / r) * B @ A` (peft's delta)."""
    for name, param, layer in _synced(model, everything):
        if layer is None:
            yield name, param.data.detach()
        else:
            yield name, (param.data + layer.get_delta_weight(ADAPTER).to(param.dtype)).detach()


def synced_metas(model: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what `merged_parameters(model)` yields, without merging anything."""
    return [(name, param.dtype, tuple(param.shape)) for name, param, _ in _synced(model, False)]


def merge_adapters(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], alpha: int) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's tensors (peft names: adapters and whatever else it holds) as base-model
    tensors: each adapted layer `W + (alpha / r) * B @ A` with W from `base` (LoRA never changes
    it), the rest renamed. Raises ValueError for an adapter without its pair or base layer."""
    out = {}
    for name, tensor in weights.items():
        if ".lora_B." in name or ".base_layer." in name:
            continue  # B: merged with its A; an adapted layer's own weight: the base model's, unchanged
        if ".lora_A." in name:
            layer, adapter = name.split(".lora_A.")
            b = weights.get(f"{layer}.lora_B.{adapter}")
            target = base_name(f"{layer}.weight")
            if b is None or target not in base:
                raise ValueError(f"adapter {name} has no matching lora_B or base layer {target}")
            a = tensor.float()
            out[target] = base[target].detach().float() + (alpha / a.shape[0]) * (b.float() @ a)
        else:
            out[base_name(name)] = tensor
    return out
