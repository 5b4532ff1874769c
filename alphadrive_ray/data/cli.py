"""`alphadrive-ray data ...`: generate, validate and convert datasets.

alphadrive-ray data synth artifacts/scenes --n 2000 --seed 0
alphadrive-ray data validate artifacts/scenes/data.jsonl
alphadrive-ray data import-release release/train.json data/train.jsonl     # see release.py
alphadrive-ray data from-trajectories samples.json data/train.jsonl       # see trajectory.py
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from alphadrive_ray.data.convert import check_paths, convert_items, finish
from alphadrive_ray.data.release import convert_release_item
from alphadrive_ray.data.trajectory import (
    ACCEL_DELTA,
    ANGLE_THRESHOLD_DEG,
    DT,
    LATERAL_THRESHOLD,
    MIN_POINTS,
    NUM_POINTS,
    STOP_SPEED,
    convert_trajectory_item,
)
from alphadrive_ray.errors import UserError


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

    register_import_release(sub)
    register_from_trajectories(sub)


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


# --- converters: release records, trajectories ------------------------------------


def add_io_arguments(parser, what: str) -> None:
    """The arguments every converter shares: input, output, --image-root, --skip-bad, --no-images."""
    parser.add_argument("input", help=f"{what} file: a JSON array, JSONL, or JSON objects (e.g. one pretty-printed)")
    parser.add_argument("output", help="canonical JSONL to write (image paths relative to it)")
    parser.add_argument("--image-root", default=None, help="folder the input's image paths are relative to (default: the input file's folder)")
    parser.add_argument("--skip-bad", action="store_true", help="convert the good records and report how many bad ones were skipped")
    parser.add_argument("--no-images", action="store_true", help="do not open the images (faster; `data validate` can check them later)")


def register_import_release(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-release",
        help="convert the AlphaDrive release format (image, problem, solution, thinking) to canonical JSONL",
        description="Convert AlphaDrive release records {image, problem, solution, thinking} to the canonical "
        "format. Exit 1 listing every bad record (file:line or file[index], field) unless --skip-bad.",
    )
    add_io_arguments(parser, "release")
    parser.set_defaults(func=run_import_release)


def run_import_release(args: argparse.Namespace) -> int:
    image_root = check_paths(args.input, args.output, args.image_root)

    def convert_one(obj: Any, line: int, index: int | None):
        return convert_release_item(obj, file=args.input, line=line, index=index, image_root=image_root, check_images=not args.no_images)

    return finish(convert_items(args.input, convert_one), args.output, args.skip_bad)


def register_from_trajectories(subparsers) -> None:
    parser = subparsers.add_parser(
        "from-trajectories",
        help="label samples with SPEED/PATH from their future trajectory and write canonical JSONL",
        description="Convert samples {id, image, speed, navigation, trajectory: [[x, y], ...], reasoning?} to "
        "canonical records, labelling SPEED/PATH from the trajectory (ego frame: x right, y forward, metres; "
        "one waypoint every --dt seconds; the rules are in alphadrive_ray/data/trajectory.py).",
    )
    add_io_arguments(parser, "samples")
    add = parser.add_argument
    add("--num-points", type=int, default=NUM_POINTS, help=f"waypoints per trajectory (default {NUM_POINTS})")
    add("--dt", type=float, default=DT, help=f"seconds between waypoints (default {DT})")
    add("--stop-speed", type=float, default=STOP_SPEED, help=f"STOP when every interval speed is below this, m/s (default {STOP_SPEED})")
    add(
        "--accel-delta",
        type=float,
        default=ACCEL_DELTA,
        help=f"ACCELERATE / DECELERATE when v_last - v_first reaches +/- this, m/s (default {ACCEL_DELTA})",
    )
    add(
        "--lateral-threshold",
        type=float,
        default=LATERAL_THRESHOLD,
        help=f"end-point lateral offset that leaves the lane, m (default {LATERAL_THRESHOLD})",
    )
    add(
        "--angle-threshold",
        type=float,
        default=ANGLE_THRESHOLD_DEG,
        help=f"end-point bearing that makes a lateral move a turn, degrees (default {ANGLE_THRESHOLD_DEG})",
    )
    parser.set_defaults(func=run_from_trajectories)


def run_from_trajectories(args: argparse.Namespace) -> int:
    thresholds = dict(
        dt=args.dt,
        stop_speed=args.stop_speed,
        accel_delta=args.accel_delta,
        lateral_threshold=args.lateral_threshold,
        angle_threshold_deg=args.angle_threshold,
    )
    flags = ("--dt", "--stop-speed", "--accel-delta", "--lateral-threshold", "--angle-threshold")
    for flag, value in zip(flags, thresholds.values()):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive number, got {value}")
    if args.num_points < MIN_POINTS:
        raise UserError(f"--num-points must be at least {MIN_POINTS}, got {args.num_points}")
    image_root = check_paths(args.input, args.output, args.image_root)

    def convert_one(obj: Any, line: int, index: int | None):
        return convert_trajectory_item(
            obj,
            file=args.input,
            line=line,
            index=index,
            image_root=image_root,
            num_points=args.num_points,
            check_images=not args.no_images,
            **thresholds,
        )

    return finish(convert_items(args.input, convert_one), args.output, args.skip_bad)
