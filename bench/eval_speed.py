"""Evaluation speed: the whole `alphadrive-ray eval` on 10k synthetic samples.

Builds a references file (records with reasoning; 64 tiny PNGs shared by the records) and a
predictions file of realistic outputs (mostly well formed, some wrong, some malformed),
then times the CLI end to end in a fresh process (start-up, loading, parsing, metrics,
BLEU-4 / CIDEr / METEOR with their JVMs, figures and report) and prints the stage timings.
Target: <= 30 s on 2 cores.

    python bench/eval_speed.py                  # 10k samples, reasoning metrics on
    python bench/eval_speed.py --n 2000 --keep runs/bench-eval
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alphadrive_ray.actions import (
    NAVIGATION_COMMANDS,
    PATH_ACTIONS,
    SPEED_ACTIONS,
    format_answer,
    format_completion,
)
from alphadrive_ray.data.records import Record, write_records

SUBJECTS = (
    "the traffic light ahead",
    "a pedestrian",
    "the lead vehicle",
    "the lane",
    "the intersection",
    "a cyclist",
    "the road",
)
STATES = (
    "is red",
    "is green",
    "is crossing",
    "is slowing down",
    "is clear",
    "is congested",
    "merges from the right",
    "turns left",
)
DECISIONS = (
    "so I slow down",
    "so I keep my speed",
    "so I stop",
    "so I speed up",
    "and I follow the navigation",
    "so I change lanes",
)


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(STATES)}, {rng.choice(DECISIONS)}."


def build(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    from PIL import Image

    rng = random.Random(seed)
    images = []
    for k in range(64):
        path = root / "images" / f"img-{k:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 36), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(path)
        images.append(str(path))
    records, predictions = [], []
    for i in range(n):
        speed, path = rng.choice(SPEED_ACTIONS), rng.choice(PATH_ACTIONS)
        reasoning = " ".join(sentence(rng) for _ in range(rng.randint(1, 2)))
        records.append(
            Record(
                f"scene-{i:06d}",
                images[i % len(images)],
                round(rng.uniform(0, 20), 1),
                rng.choice(NAVIGATION_COMMANDS),
                speed,
                path,
                reasoning,
            )
        )
        if rng.random() < 0.3:
            speed, path = rng.choice(SPEED_ACTIONS), rng.choice(PATH_ACTIONS)
        predicted_reasoning = " ".join(sentence(rng) for _ in range(rng.randint(1, 2)))
        kind = rng.random()
        if kind < 0.85:
            output = format_completion(predicted_reasoning, speed, path)
        elif kind < 0.92:
            output = f"<think> {predicted_reasoning}\nSecond line. </think>\n<answer> {speed}, "  # truncated
        elif kind < 0.97:
            output = format_answer(speed, path)  # no reasoning
        else:
            output = f"I would {speed.lower()} and go {path.lower()}."  # free text: two misses
        predictions.append({"id": f"scene-{i:06d}", "output": output})
    references = root / "references.jsonl"
    write_records(references, records)
    predictions_path = root / "predictions.jsonl"
    predictions_path.write_text("".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8")
    return references, predictions_path


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reasoning-metrics", action="store_true")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the data and report here instead of a temporary folder"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        references, predictions = build(root, args.n, args.seed)
        print(f"built {args.n} references + predictions in {time.perf_counter() - start:.1f} s under {root}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        command = [
            sys.executable,
            "-m",
            "alphadrive_ray",
            "eval",
            "--predictions",
            str(predictions),
            "--references",
            str(references),
            "--out",
            str(root / "eval"),
        ]
        if args.no_reasoning_metrics:
            command.append("--no-reasoning-metrics")
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n")
            raise SystemExit(f"eval failed with exit code {done.returncode}")
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        print(done.stdout.rstrip())
        print("stage timings (s):", json.dumps(metrics["timing_s"]))
        print(
            f"whole eval of {args.n} samples: {elapsed:.1f} s wall (fresh process, {cores} cores available; target <= 30 s on 2 cores)"
        )


if __name__ == "__main__":
    main()
