"""Reward throughput: completions scored per second by `score_group`, one process, one core.

Groups of realistic completions (unique reasoning text, a mix of well-formed, wrong,
malformed and action-listing answers) are scored group by group, as the training loop does.
Target: >= 100k completions/s per core.

    python bench/rewards_throughput.py                # both variants, 20k groups of 8
    python bench/rewards_throughput.py --groups 5000 --group-size 2 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS, format_answer, format_completion
from alphadrive_ray.rewards import VARIANTS, score_group

WORDS = (
    "the ego vehicle approaches a red traffic light pedestrian crossing ahead lane is clear "
    "slow lead car merging from the right navigation says turn left so we prepare to"
).split()


def random_completion(rng: random.Random, speed: str, path: str) -> str:
    """One synthetic model output; most are well formed, some are the usual failure modes."""
    reasoning = " ".join(rng.choices(WORDS, k=rng.randint(15, 35)))
    if rng.random() < 0.3:  # a different plan
        speed, path = rng.choice(SPEED_ACTIONS), rng.choice(PATH_ACTIONS)
    kind = rng.random()
    if kind < 0.75:
        return format_completion(reasoning, speed, path)
    if kind < 0.85:  # no reasoning block
        return format_answer(speed, path)
    if kind < 0.92:  # truncated: unclosed answer
        return f"<think> {reasoning} </think>\n<answer> {speed}, "
    if kind < 0.97:  # lists every action
        return f"<think> {reasoning} </think>\n<answer> {', '.join(SPEED_ACTIONS + PATH_ACTIONS)} </answer>"
    return f"{reasoning} {speed.lower()} {path}"  # free text


def make_groups(n_groups: int, group_size: int, seed: int) -> list[tuple[list[str], str]]:
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        speed, path = rng.choice(SPEED_ACTIONS), rng.choice(PATH_ACTIONS)
        groups.append(([random_completion(rng, speed, path) for _ in range(group_size)], format_answer(speed, path)))
    return groups


def time_variant(groups: list[tuple[list[str], str]], variant: str, repeats: int) -> list[float]:
    n = sum(len(completions) for completions, _ in groups)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for completions, solution in groups:
            score_group(completions, solution, variant)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=20_000)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    groups = make_groups(args.groups, args.group_size, args.seed)
    n = args.groups * args.group_size
    mean_chars = statistics.mean(len(c) for completions, _ in groups for c in completions)
    print(f"{args.groups} groups x {args.group_size} completions = {n} completions, mean {mean_chars:.0f} chars")
    for variant in VARIANTS:
        rates = time_variant(groups, variant, args.repeats)
        print(f"{variant:>8}: best {max(rates):,.0f} completions/s, median {statistics.median(rates):,.0f} completions/s (single process)")


if __name__ == "__main__":
    main()
