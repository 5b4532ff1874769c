"""Entry point of a training run, for the CLI and for `ray job submit`.

    alphadrive-ray train jobs/quickstart_cpu.yaml --set grpo.steps=10
    python -m alphadrive_ray.train jobs/quickstart_cpu.yaml          # a ray job entrypoint

It joins the cluster named by `ray.address` or RAY_ADDRESS, else starts a local one.
"""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> int:
    from alphadrive_ray.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
