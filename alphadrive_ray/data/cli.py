"""`alphadrive-ray data ...`: generate, validate and convert datasets.

alphadrive-ray data synth artifacts/scenes --n 2000 --seed 0
alphadrive-ray data validate artifacts/scenes/data.jsonl
alphadrive-ray data import-release release/train.json data/train.jsonl     # see release.py
alphadrive-ray data from-trajectories samples.json data/train.jsonl       # see trajectory.py
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="generate, validate and convert datasets")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = sub.add_parser("synth", help="render synthetic driving scenes labelled by a stochastic driver model (or a rule-based planner)")
    synth.add_argument("out_dir", help="folder for data.jsonl and images/")
    synth.add_argument("--n", type=int, default=1000, help="number of scenes (default 1000)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    synth.add_argument("--speed-mix", default="", help="SPEED class weights, e.g. KEEP=1,ACCELERATE=1,DECELERATE=2,STOP=1")
    synth.add_argument("--path-mix", default="", help="PATH class weights, e.g. STRAIGHT=4,LEFT_TURN=1,...")
    synth.add_argument(
        "--labels",
        choices=("driver", "rule"),
        default="driver",
        help="driver: what one of many drivers did, read off its trajectory (default); rule: the rule-based planner",
    )
    synth.add_argument("--driver-noise", type=float, default=1.0, help="spread of the drivers around the typical one (default 1; 0: deterministic)")
    synth.add_argument("--label-draws", type=int, default=64, help="drivers per scene for its label distribution (default 64)")
    synth.add_argument("--reasoning-share", type=float, default=1.0, help="share of the scenes that carry reasoning (default 1)")
    synth.set_defaults(func=run_synth)

    validate = sub.add_parser("validate", help="check a dataset file; one line per bad record, exit 1 if any")
    validate.add_argument("path", help="dataset: .jsonl, .json or .parquet file, a datasets.save_to_disk folder, or hub:ORG/NAME[:SPLIT]")
    validate.add_argument("--no-images", action="store_true", help="skip opening the images (faster)")
    validate.set_defaults(func=run_validate)

    for module in ("alphadrive_ray.data.release", "alphadrive_ray.data.trajectory"):
        try:
            __import__(module, fromlist=["register"]).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def run_synth(args: argparse.Namespace) -> int:
    from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
    from alphadrive_ray.data.synth import DEFAULT_PATH_MIX, DEFAULT_SPEED_MIX, Labelling, generate_dataset, parse_mix
    from alphadrive_ray.errors import UserError

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if not 56 <= args.size <= 4096:
        raise UserError(f"--size must be between 56 and 4096 pixels, got {args.size}")
    try:
        speed_mix = parse_mix(args.speed_mix, SPEED_ACTIONS) if args.speed_mix else DEFAULT_SPEED_MIX
        path_mix = parse_mix(args.path_mix, PATH_ACTIONS) if args.path_mix else DEFAULT_PATH_MIX
    except ValueError as exc:
        raise UserError(f"bad class mix: {exc}") from None
    labelling = Labelling(args.labels, args.driver_noise, args.label_draws, args.reasoning_share)
    try:
        labelling.check()
    except ValueError as exc:
        raise UserError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    from tqdm import tqdm

    bar = tqdm(total=args.n, unit="scene", disable=not sys.stderr.isatty(), desc="rendering")
    path, stats = generate_dataset(
        args.out_dir,
        args.n,
        args.seed,
        size=args.size,
        speed_mix=speed_mix,
        path_mix=path_mix,
        labelling=labelling,
        progress=lambda done, total: bar.update(1),
    )
    bar.close()
    print(f"wrote {stats.n} scenes to {path} in {stats.seconds:.1f}s ({stats.n / max(stats.seconds, 1e-9) * 60:.0f} scenes/min)")
    print("SPEED: " + ", ".join(f"{k} {v}" for k, v in stats.speed_counts.items()))
    print("PATH:  " + ", ".join(f"{k} {v}" for k, v in stats.path_counts.items()))
    print(f"{stats.with_reasoning} with reasoning; ceiling (always the most likely plan) {stats.ceiling:.3f}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from alphadrive_ray.data.records import read_report

    report = read_report(args.path, check_images=not args.no_images)
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"{args.path}: {report.n_bad} bad record(s) of {report.n_lines}; {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.path}: {len(report.records)} record(s), all valid")
    return 0
