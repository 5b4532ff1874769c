"""`alphadrive-ray export CHECKPOINT_DIR OUT_DIR`: a resumable checkpoint as a Hugging Face model folder.

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

import argparse
import json
from pathlib import Path

from alphadrive_ray.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="turn a resumable checkpoint (any ZeRO stage, any learner count) into a Hugging Face model folder",
        description=(
            "Write OUT_DIR with save_pretrained: the weights of a checkpoint of a run "
            "(runs/<name>/checkpoints/<stage>-<step>, the checkpoints folder or the run folder: its latest "
            "checkpoint), in the run's base model, with its processor."
        ),
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint folder, a run's checkpoints/ folder or a run folder")
    parser.add_argument("out", metavar="OUT_DIR", help="the Hugging Face folder to write (must not exist, or be empty)")
    parser.add_argument("--model", default=None, metavar="BASE", help="base model folder (default: model.path of the run's config.yaml)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="weights dtype (default: model.dtype of the run, else float32)"
    )
    parser.set_defaults(func=run_export)


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


def run_export(args: argparse.Namespace) -> int:
    learner_dir, run_dir = resolve_checkpoint(args.checkpoint)
    config: dict = {}
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    model_cfg = config.get("model") or {}
    base = args.model or model_cfg.get("path")
    if not base:
        raise UserError(f"{args.checkpoint}: no run config names the base model; pass --model BASE (the model.path the run trained)")
    if not Path(base).is_dir() and run_dir is not None and (run_dir.parent.parent / base).is_dir():
        base = str(run_dir.parent.parent / base)  # a relative model.path, from where the run was started
    data_cfg = config.get("data") or {}
    out = export_checkpoint(
        learner_dir,
        args.out,
        base,
        args.dtype or model_cfg.get("dtype") or "float32",
        min_pixels=int(data_cfg.get("min_pixels") or 0),
        max_pixels=int(data_cfg.get("max_pixels") or 0),
    )
    print(f"exported {learner_dir} -> {out}")
    return 0


def export_checkpoint(
    learner_dir: str | Path, out_dir: str | Path, base_model: str | Path, dtype: str = "float32", *, min_pixels: int = 0, max_pixels: int = 0
) -> Path:
    """Write `out_dir`: `base_model` with the weights of the ZeRO checkpoint in `learner_dir`,
    and its processor with the image-size bounds the run trained with (data.min_pixels /
    data.max_pixels; 0: the base model's own)."""
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
