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
    "alphadrive_ray.train.cli",
    "alphadrive_ray.distill.cli",
    "alphadrive_ray.serve.cli",
)


class Parser(argparse.ArgumentParser):
    """Every parser of the CLI (sub-commands inherit the class).

    No abbreviated options: argparse would otherwise take `--api-key VALUE` for
    `--api-key-env VALUE` and print the key back as a variable name. Unrecognised
    arguments are named without their values, which may be secrets.
    """

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message[len(prefix) :].split()
            options = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            values = len(words) - len(options) + sum("=" in w for w in words if w.startswith("-"))
            hidden = f" (and {values} value(s), not shown)" if values else ""
            message = prefix + (" ".join(options) or "positional values") + hidden
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="alphadrive-ray",
        description="Train and evaluate AlphaDrive-style VLM driving planners on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"alphadrive-ray {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
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
