"""Parsing speed on adversarial text: ~1 MB completions and reasoning built to make
backtracking regexes run for minutes, scored as the trainer and `distill` do.

The tests check that these inputs are scored correctly (tests/test_rewards.py,
tests/test_distill_filters.py); this script measures how fast. Target: well under a second
per input (linear scans), 5 s at most on a loaded 2-core machine.

    python bench/adversarial_inputs.py
    python bench/adversarial_inputs.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' inputs, from the repo

from alphadrive_ray.distill.filters import check_reasoning
from alphadrive_ray.rewards import find_reasoning, parse_plan, score_group
from tests.test_distill_filters import ADVERSARIAL_REASONING
from tests.test_rewards import HUGE_CASES


def time_reward_case(text: str) -> float:
    start = time.perf_counter()
    for variant in ("paper", "release"):
        score_group([text, text + "x", "<think> a </think><answer> STOP, STRAIGHT </answer>"], text, variant)
    parse_plan(text)
    find_reasoning(text)
    return time.perf_counter() - start


def time_reasoning_check(text: str) -> float:
    start = time.perf_counter()
    check_reasoning(text, "ACCELERATE", "STRAIGHT")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per input; the median is shown (default 3)")
    args = parser.parse_args(argv)
    cases = [(f"rewards: {name}", time_reward_case, text) for name, text in HUGE_CASES]
    cases.append(("distill filters: stop x 200k + <answer x 10k", time_reasoning_check, ADVERSARIAL_REASONING))
    print(f"{'input':<60}{'MB':>6}{'median s':>10}{'max s':>8}")
    for name, measure, text in cases:
        times = [measure(text) for _ in range(args.repeats)]
        print(f"{name:<60}{len(text.encode()) / 1e6:>6.2f}{statistics.median(times):>10.3f}{max(times):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
