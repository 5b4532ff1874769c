"""Evaluation speed: the whole `alphadrive-ray eval` on 10k synthetic samples, against
pycocoevalcap's scorers run one after the other.

Builds a references file (records with reasoning; 64 tiny PNGs shared by the records) and a
predictions file of realistic outputs (mostly well formed, some wrong, some malformed), then,
`--repeat` times in turn, each in a fresh process:
- the CLI end to end (start-up, loading, parsing, metrics, BLEU-4 / CIDEr / METEOR with their
  JVMs, nltk's BLEU, figures, report, scored predictions);
- the serial baseline: the same sanitised pairs through pycocoevalcap as its README runs it,
  PTBTokenizer on each side, Bleu(4), Cider(), Meteor() (JVM start included), one after the
  other; only these calls are timed, not reading the files.
It checks that the CLI's BLEU-4, CIDEr and METEOR equal the baseline's exactly, and prints
the stage timings, the medians and their ratio. Targets: <= 30 s, and <= 0.8x the baseline.

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


def serial_baseline(root: Path) -> dict:
    """pycocoevalcap's scorers one after the other on the pairs the CLI scores (timed: the calls)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.evaluation.captions import sanitize_caption
    from alphadrive_ray.evaluation.metrics import parse_output

    records = load_records(root / "references.jsonl", check_images=False)
    outputs = {}
    with open(root / "predictions.jsonl", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            outputs[row["id"]] = row["output"]
    pairs = [(parse_output(outputs[r.id]).reasoning or "", r.reasoning) for r in records if r.reasoning and r.reasoning.strip()]
    gts = {i: [{"caption": sanitize_caption(ref)}] for i, (_, ref) in enumerate(pairs)}
    res = {i: [{"caption": sanitize_caption(hyp)}] for i, (hyp, _) in enumerate(pairs)}
    timing = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        timing[name] = round(now - last, 3)
        last = now

    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    lap("tokenize")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    lap("bleu")
    cider, _ = Cider().compute_score(gts, res)
    lap("cider")
    meteor = Meteor()
    meteor_score, _ = meteor.compute_score(gts, res)
    lap("meteor")
    timing["total"] = round(time.perf_counter() - start, 3)
    meteor.meteor_p.kill()
    return {"timing_s": timing, "bleu4": bleu[3], "cider": cider, "meteor": meteor_score}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, in turn (default 3); medians are compared")
    parser.add_argument("--no-reasoning-metrics", action="store_true", help="time the CLI without BLEU / CIDEr / METEOR (no baseline)")
    parser.add_argument("--keep", type=Path, default=None, help="write the data and report here instead of a temporary folder")
    parser.add_argument("--serial-baseline", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.serial_baseline is not None:
        print(json.dumps(serial_baseline(args.serial_baseline)))
        return

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
        walls, baselines = [], []
        for run in range(args.repeat):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            walls.append(time.perf_counter() - start)
            if done.returncode != 0:
                print(done.stdout, done.stderr, sep="\n")
                raise SystemExit(f"eval failed with exit code {done.returncode}")
            metrics = json.loads((root / "eval" / "metrics.json").read_text())
            if run == 0:
                print(done.stdout.rstrip())
            print(f"run {run + 1}: whole eval {walls[-1]:.1f} s; stages (s): {json.dumps(metrics['timing_s'])}")
            if args.no_reasoning_metrics:
                continue
            child = subprocess.run([sys.executable, __file__, "--serial-baseline", str(root)], capture_output=True, text=True)
            if child.returncode != 0:
                print(child.stderr)
                raise SystemExit("the serial pycocoevalcap baseline failed")
            baseline = json.loads(child.stdout.strip().splitlines()[-1])
            baselines.append(baseline["timing_s"]["total"])
            print(f"run {run + 1}: serial pycocoevalcap {baselines[-1]:.1f} s; stages (s): {json.dumps(baseline['timing_s'])}")
            reasoning = metrics["reasoning"]
            same = {name: reasoning[name] == baseline[name] for name in ("bleu4", "cider", "meteor")}
            if not all(same.values()):
                raise SystemExit(
                    "scores differ from pycocoevalcap's: " + ", ".join(f"{k} {reasoning[k]!r} vs {baseline[k]!r}" for k, ok in same.items() if not ok)
                )
        print(
            f"whole eval of {args.n} samples: median {_median(walls):.1f} s wall over {args.repeat} run(s) "
            f"(fresh process, {cores} cores available; target <= 30 s on 2 cores)"
        )
        if baselines:
            ratio = _median(walls) / _median(baselines)
            print(
                f"serial pycocoevalcap scorers: median {_median(baselines):.1f} s; whole eval / serial = {ratio:.2f}x "
                f"(target <= 0.80x); BLEU-4, CIDEr and METEOR identical in every run"
            )


if __name__ == "__main__":
    main()
