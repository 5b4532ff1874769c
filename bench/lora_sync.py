"""What one weight sync sends with LoRA (lora.rank > 0) next to a full sync, for the tiny
Qwen2-VL and for Qwen2-VL-2B-Instruct's shapes.

A full sync sends every trainable parameter. A LoRA sync sends each adapted layer's merged
weight (alphadrive_ray/lora.py), plus the vision tower when it trains (model.freeze_vision:
false); frozen tensors (embeddings, norms, lm_head) stay where the engines have them. For
reference, the adapters alone (what an engine that applies LoRA itself would need) are printed
too. The tiny model's figures come from a real peft-wrapped model through the sync's own
iterator; Qwen2-VL-2B's from its shapes (meta device) and the same target pattern.

    python bench/lora_sync.py               # rank 64, the default targets
    python bench/lora_sync.py --rank 16
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from alphadrive_ray.config import LORA_TARGETS  # noqa: E402
from alphadrive_ray.lora import target_pattern  # noqa: E402

MB = 2**20


def shape_counts(model: torch.nn.Module, rank: int, targets, train_vision: bool) -> dict[str, int]:
    """Elements of: the full sync, the LoRA sync, and the adapters, from the module shapes."""
    pattern = re.compile(target_pattern(targets))
    adapted, adapters = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            adapted += module.weight.numel()
            adapters += rank * (module.in_features + module.out_features)
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    full = sum(p.numel() for p in model.parameters())
    return {"full": full, "lora": adapted + (vision if train_vision else 0), "adapters": adapters}


def tiny_measured(model_dir: str, rank: int, train_vision: bool) -> dict[str, int]:
    """The tiny model through the real path: peft wrapping, then the sync's iterator."""
    from alphadrive_ray.lora import apply_lora, merged_parameters
    from alphadrive_ray.models.loading import load_model

    base = load_model(model_dir)
    full = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, rank, 2.0 * rank, 0.0, LORA_TARGETS, train_vision)
    sent = sum(t.numel() for _, t in merged_parameters(model))
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    return {"full": full, "lora": sent, "adapters": adapters}


def report(title: str, counts: dict[str, int], bytes_per: int) -> None:
    full = counts["full"] * bytes_per / MB
    print(f"{title}")
    print(f"  full sync          {full:10.1f} MB")
    print(f"  LoRA sync (merged) {counts['lora'] * bytes_per / MB:10.1f} MB  {counts['lora'] / counts['full']:.2f}x a full sync")
    print(f"  adapters alone     {counts['adapters'] * bytes_per / MB:10.1f} MB  {counts['adapters'] / counts['full']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tiny", default="artifacts/tiny-qwen2vl", help="the tiny model's folder (built by the demo); skipped when missing")
    args = parser.parse_args()
    if Path(args.tiny, "config.json").is_file():
        for vision in (False, True):
            report(
                f"tiny Qwen2-VL ({args.tiny}), rank {args.rank}, vision tower {'trained' if vision else 'frozen'}, fp32",
                tiny_measured(args.tiny, args.rank, vision),
                4,
            )
    else:
        print(f"(no tiny model at {args.tiny}: run the demo once, or pass --tiny)")
    from qwen2vl_2b import meta_model

    model = meta_model()
    for vision in (False, True):
        report(
            f"Qwen2-VL-2B shapes, rank {args.rank}, vision tower {'trained' if vision else 'frozen'}, bf16",
            shape_counts(model, args.rank, LORA_TARGETS, vision),
            2,
        )


if __name__ == "__main__":
    main()
