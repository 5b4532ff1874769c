"""`alphadrive-ray train | config-docs | report | export`: the commands of a training run, and the
entry point for `ray job submit`.

    alphadrive-ray train jobs/quickstart_cpu.yaml --set grpo.steps=10
    python -m alphadrive_ray.train jobs/quickstart_cpu.yaml          # a ray job entrypoint

It joins the cluster named by `ray.address` or RAY_ADDRESS, else starts a local one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. jobs/quickstart_cpu.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set grpo.steps=10 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run_dir from its latest checkpoint (model, optimizer, data position, step)",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="run SFT warm-up + GRPO as configured (see jobs/)")
    add_arguments(parser)
    parser.set_defaults(func=run)
    docs = subparsers.add_parser("config-docs", help="print the configuration reference (docs/config.md)")
    docs.set_defaults(func=lambda args: print(__import__("alphadrive_ray.config", fromlist=["x"]).reference_markdown()))
    register_report(subparsers)
    register_export(subparsers)


def run(args: argparse.Namespace) -> int:
    from alphadrive_ray.config import load_config

    config = load_config(args.config, args.overrides)
    from alphadrive_ray.train.trainer import stage_labels, train

    summary = train(config, resume=args.resume)
    acc = summary.accuracy
    print()
    print(f"run directory: {summary.run_dir}")
    print("held-out planning accuracy:")
    width = max(len(label) for label in stage_labels(config).values())
    for stage, label in stage_labels(config).items():
        if stage in acc:
            print(f"  {label:{width}s} {acc[stage]:.3f}")
    if summary.ceiling is not None:
        print(f"  {'ceiling':{width}s} {summary.ceiling:.3f}  (always the most likely plan: the best any planner can expect on these noisy labels)")
    labels = stage_labels(config)
    for name, c in summary.comparisons.items():
        later, earlier = name.split("_vs_")
        print(
            f"  {labels[later]} vs {labels[earlier]}: {c['delta']:+.3f} ({c['fixed']} scenes fixed, {c['broken']} broken "
            f"of {c['n']}; one-sided exact McNemar p = {c['p_value']:.3g})"
        )
    print(f"report: {summary.run_dir}/run_report.html (the whole run; the final evaluation alone: {summary.run_dir}/eval/final/report.html)")
    if summary.export_dir:
        print(f"policy (Hugging Face format): {summary.export_dir}")
    return 0


def register_export(subparsers) -> None:
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
    parser.add_argument(
        "--lora-alpha", type=int, default=None, help="a LoRA run's lora.alpha, to merge its adapters (default: from the run's config.yaml)"
    )
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from alphadrive_ray.errors import UserError
    from alphadrive_ray.train.export import export_checkpoint, resolve_checkpoint

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
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else (config.get("lora") or {}).get("alpha"),
    )
    print(f"exported {learner_dir} -> {out}")
    return 0


def register_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page for a run (curves, stages side by side, scenes, timings, config)",
        description="Write RUN_DIR/run_report.html (or --out): every figure and image inside the one file.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/quickstart")
    parser.add_argument("--out", default=None, metavar="FILE", help="where to write the page (default RUN_DIR/run_report.html)")
    parser.set_defaults(func=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    from alphadrive_ray.run_report import write_run_report

    path = write_run_report(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from alphadrive_ray.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
