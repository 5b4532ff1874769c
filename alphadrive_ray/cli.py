"""The `alphadrive-ray` command line.

Each command group lives in its own module, which exposes `register(subparsers)`; this
file only wires them together and turns user mistakes (`UserError`) into a one-line
message and a non-zero exit, never a traceback.

    alphadrive-ray --help
"""

from __future__ import annotations

import argparse
import importlib
import sys

from alphadrive_ray import __version__, interrupts
from alphadrive_ray.errors import UserError

# Command modules, imported when the parser is built; they keep heavy imports
# (torch, ray, deepspeed) inside their handlers so `--help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "alphadrive_ray.models.cli",
    "alphadrive_ray.data.cli",
    "alphadrive_ray.evaluation.cli",
    "alphadrive_ray.train",
    "alphadrive_ray.distill.cli",
    "alphadrive_ray.serve",
    "alphadrive_ray.run_report",
    "alphadrive_ray.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphadrive-ray",
        description="Train and evaluate AlphaDrive-style VLM driving planners on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"alphadrive-ray {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command not built yet in this checkout
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with interrupts.caught():
            result = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
