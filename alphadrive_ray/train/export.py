"""A resumable checkpoint as a Hugging Face model folder (`alphadrive-ray export CHECKPOINT_DIR OUT_DIR`, train/cli.py).

    alphadrive-ray export runs/quickstart/checkpoints/grpo-000020 exported/
    alphadrive-ray export runs/quickstart exported/            # the run's latest checkpoint
    python -c "from transformers import Qwen2VLForConditionalGeneration as M; M.from_pretrained('exported')"

Any checkpoint a run wrote (SFT or GRPO, any step), of any ZeRO stage and any number of
learners: the shards are put back together into whole fp32 weights (`zero_checkpoint`),
loaded into the run's base model (its config and the weights nothing trained, e.g. a frozen
vision tower) and saved with `save_pretrained` next to the processor. `serve`, `eval` (as
`model.path`) and `from_pretrained` load the folder like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

from alphadrive_ray.errors import UserError


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(the DeepSpeed learner folder, the run folder or None) for what a user may pass."""
    from alphadrive_ray.train.checkpoint import CheckpointManager

    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "checkpoints").is_dir():  # a run folder
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise UserError(f"{path}: the run has no complete checkpoint yet (checkpoints/latest is missing)")
        path = latest
    elif (path / "latest").is_file() and not (path / "trainer.json").exists():  # a checkpoints folder
        latest = CheckpointManager(path.parent).latest()
        if latest is None:
            raise UserError(f"{path}: no complete checkpoint")
        path = latest
    if (path / "learner").is_dir():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return path / "learner", run_dir
    return path, None  # a DeepSpeed folder given directly: --model says what it belongs to


def export_checkpoint(
    learner_dir: str | Path,
    out_dir: str | Path,
    base_model: str | Path,
    dtype: str = "float32",
    *,
    min_pixels: int = 0,
    max_pixels: int = 0,
    lora_alpha: int | None = None,
) -> Path:
    """Write `out_dir`: `base_model` with the weights of the ZeRO checkpoint in `learner_dir`,
    and its processor with the image-size bounds the run trained with (data.min_pixels /
    data.max_pixels; 0: the base model's own). A LoRA run's adapters are merged into the base
    weights (`lora_alpha`: the run's lora.alpha)."""
    import torch

    from alphadrive_ray.train import zero_checkpoint
    from alphadrive_ray.models.loading import load_model, load_processor, read_model_type, torch_dtype

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; pick another OUT_DIR")
    try:
        shards = zero_checkpoint.find_shards(learner_dir)
        weights = zero_checkpoint.full_state(shards.folder, "param")
    except zero_checkpoint.CheckpointFormatError as exc:
        raise UserError(str(exc)) from None
    read_model_type(base_model)  # a clear error for a missing or foreign base model
    model = load_model(base_model, "float32")
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    if any(".lora_A." in name for name in weights):
        from alphadrive_ray.lora import merge_adapters

        if lora_alpha is None:
            raise UserError(f"{learner_dir}: the checkpoint holds LoRA adapters but no run config gives lora.alpha; pass --lora-alpha")
        try:
            weights = merge_adapters(weights, own, lora_alpha)
        except ValueError as exc:
            raise UserError(f"{learner_dir}: {exc}") from None
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise UserError(
            f"{learner_dir}: {len(unknown)} tensor(s) of the checkpoint are not in the base model {base_model} "
            f"(e.g. {unknown[0]}); is --model the model this run trained?"
        )
    wrong = [name for name, t in weights.items() if tuple(t.shape) != tuple(own[name].shape)]
    if wrong:
        raise UserError(
            f"{learner_dir}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)} in the checkpoint, {tuple(own[wrong[0]].shape)} in {base_model}"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
    model.to(torch_dtype(dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    load_processor(base_model, min_pixels, max_pixels).save_pretrained(out)
    provenance = {
        "checkpoint": str(Path(learner_dir).resolve()),
        "zero_stage": shards.stage,
        "learners": shards.world_size,
        "base_model": str(base_model),
        "dtype": dtype,
        "tensors_from_checkpoint": len(weights),
    }
    (out / "alphadrive_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
