"""`alphadrive-ray distill ...`: reasoning distillation from an OpenAI-compatible teacher.

    OPENAI_API_KEY=... alphadrive-ray distill run artifacts/scenes/data.jsonl artifacts/reasoning.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o --concurrency 8
    alphadrive-ray distill run IN OUT --model gpt-4o --dry-run      # print one request, send nothing
    alphadrive-ray distill review artifacts/reasoning.jsonl         # accept / reject / edit

Without a teacher, the synthetic dataset's rule-based reasoning is the offline default.
See docs/distill.md.
"""

from __future__ import annotations

import argparse
import re

# an environment variable's name; anything else given to --api-key-env is likely a key
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class _EnvironmentOnly(argparse.Action):
    """`--api-key`: refused with a fixed message; the value is never shown."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string} is not accepted: API keys are read from the environment only. Put the key in "
            "OPENAI_API_KEY (or in the variable named by --api-key-env NAME) and rerun; the value given is not shown."
        )


def register(subparsers) -> None:
    distill = subparsers.add_parser(
        "distill",
        help="write SFT reasoning with an OpenAI-compatible teacher, then review it",
        description="Reasoning distillation (AlphaDrive Sec. 3.3): a teacher explains each sample's true plan.",
    )
    sub = distill.add_subparsers(dest="distill_command", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="ask the teacher for each sample's reasoning; filter; write the dataset",
        description="Ask the teacher for each sample's reasoning, filter it and write IN's records to OUT "
        "with `reasoning` and a `review` field. The API key is read from the environment only.",
    )
    run.add_argument("input", metavar="IN", help="input dataset (.jsonl or .parquet)")
    run.add_argument("out", metavar="OUT", help="output dataset (.jsonl)")
    run.add_argument("--base-url", default="https://api.openai.com/v1", help="OpenAI-compatible API root (default: OpenAI)")
    run.add_argument("--model", required=True, help="teacher model name, e.g. gpt-4o")
    run.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable holding the API key (default OPENAI_API_KEY); the key is never printed",
    )
    run.add_argument(
        "--api-key",
        action=_EnvironmentOnly,
        nargs="?",
        metavar="KEY",
        help="not accepted: keys are read from the environment only (see --api-key-env)",
    )
    run.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    run.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    run.add_argument("--max-retries", type=int, default=6, help="retries per sample on 429/5xx/timeouts/connection errors (default 6)")
    run.add_argument("--backoff-base", type=float, default=1.0, help="first retry delay in seconds, doubled each retry (default 1)")
    run.add_argument("--backoff-max", type=float, default=60.0, help="longest retry delay in seconds (default 60)")
    run.add_argument("--cache", default=None, metavar="DIR", help="response cache folder (default: OUT's folder/.distill-cache)")
    run.add_argument("--dry-run", action="store_true", help="print the exact request for one sample and exit; sends nothing")
    run.add_argument("--prompt-template", default=None, metavar="FILE", help="teacher prompt template (slots in docs/distill.md)")
    run.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N samples")
    run.add_argument("--temperature", type=float, default=0.2, help="teacher sampling temperature (default 0.2)")
    run.add_argument("--max-tokens", type=int, default=160, help="teacher token limit per answer (default 160)")
    run.add_argument("--seed", type=int, default=None, help="teacher sampling seed, where the server supports it")
    run.add_argument("--image-detail", choices=("auto", "low", "high"), default=None, help="OpenAI image detail (low is cheaper)")
    run.add_argument("--price-in", type=float, default=0.0, metavar="USD", help="price per 1M prompt tokens, for the cost estimate")
    run.add_argument("--price-out", type=float, default=0.0, metavar="USD", help="price per 1M completion tokens")
    run.add_argument("--max-words", type=int, default=60, help="longer reasoning is filtered as too_long (default 60)")
    run.add_argument("--max-sentences", type=int, default=3, help="more sentences are filtered as too_long (default 3)")
    run.add_argument("--skip-bad", action="store_true", help="skip (and count) invalid input records instead of failing")
    run.set_defaults(func=run_distill_command)

    review = sub.add_parser(
        "review",
        help="review the distilled reasoning in the terminal (accept / reject / edit; resumable)",
        description="One command per line on stdin: a(ccept), r(eject), e(dit) then the new text on the next line, "
        "s(kip), q(uit). Every decision is saved at once; rerun to continue.",
    )
    review.add_argument("out", metavar="OUT", help="the output of `distill run`")
    review.add_argument("--include-filtered", action="store_true", help="also review samples the automatic filters removed")
    review.add_argument("--all", action="store_true", help="also revisit samples already accepted, edited or rejected")
    review.set_defaults(func=run_review_command)


def _check_args(args: argparse.Namespace) -> None:
    from alphadrive_ray.errors import UserError

    checks = [
        (1 <= args.concurrency <= 256, f"--concurrency must be 1-256, got {args.concurrency}"),
        (args.timeout > 0, f"--timeout must be > 0 seconds, got {args.timeout}"),
        (0 <= args.max_retries <= 50, f"--max-retries must be 0-50, got {args.max_retries}"),
        (
            args.backoff_base >= 0 and args.backoff_max >= args.backoff_base,
            f"need 0 <= --backoff-base <= --backoff-max, got {args.backoff_base} and {args.backoff_max}",
        ),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
        (args.max_tokens >= 1, f"--max-tokens must be at least 1, got {args.max_tokens}"),
        (0 <= args.temperature <= 2, f"--temperature must be 0-2, got {args.temperature}"),
        (args.price_in >= 0 and args.price_out >= 0, "--price-in / --price-out must be >= 0"),
        (args.max_words >= 1 and args.max_sentences >= 1, "--max-words and --max-sentences must be at least 1"),
        (args.base_url.startswith(("http://", "https://")), f"--base-url must start with http:// or https://, got {args.base_url!r}"),
        (
            _ENV_NAME.fullmatch(args.api_key_env) is not None,
            (
                "--api-key-env takes the NAME of an environment variable (letters, digits and _, e.g. OPENAI_API_KEY), "
                "not the key itself; the value given is not shown"
            ),
        ),
        (args.out.endswith(".jsonl"), f"OUT must be a .jsonl file, got {args.out!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run_distill_command(args: argparse.Namespace) -> int:
    _check_args(args)
    from alphadrive_ray.distill.filters import FilterLimits
    from alphadrive_ray.distill.prompt import load_template
    from alphadrive_ray.distill.run import DistillOptions, run_distill
    from alphadrive_ray.distill.teacher import TeacherSettings

    opts = DistillOptions(
        in_path=args.input,
        out_path=args.out,
        teacher=TeacherSettings(
            base_url=args.base_url.rstrip("/"),
            model=args.model,
            concurrency=args.concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            backoff_base=args.backoff_base,
            backoff_max=args.backoff_max,
        ),
        template=load_template(args.prompt_template),
        api_key_env=args.api_key_env,
        cache_dir=args.cache,
        limit=args.limit,
        dry_run=args.dry_run,
        skip_bad=args.skip_bad,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        image_detail=args.image_detail,
        price_in=args.price_in,
        price_out=args.price_out,
        limits=FilterLimits(max_words=args.max_words, max_sentences=args.max_sentences),
    )
    return run_distill(opts)


def run_review_command(args: argparse.Namespace) -> int:
    from alphadrive_ray.distill.review import run_review

    return run_review(args)
