"""Figures of a training run, from its run directory: step time, throughput, where the time goes.

    alphadrive-ray train jobs/quickstart_cpu.yaml          # writes runs/quickstart
    python bench/pipeline_report.py runs/quickstart

Prints seconds per GRPO step, samples/s and tokens/s, the share of step time spent in
rollout (generation), reward scoring, the learner update and weight sync, the weight-sync
throughput, peak memory per role, SFT throughput and the held-out accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip", type=int, default=3, help="GRPO steps to skip as warm-up (default 3)")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"][args.skip :]
    sft = [r for r in rows if r["stage"] == "sft"][args.skip :]
    summary = json.loads((args.run_dir / "summary.json").read_text()) if (args.run_dir / "summary.json").exists() else {}

    def mean(key: str, data=grpo) -> float:
        values = [r[key] for r in data if key in r]
        return statistics.fmean(values) if values else float("nan")

    print(f"run: {args.run_dir}")
    if sft:
        print(f"SFT:  {mean('perf/step_s', sft):.3f} s/step, {mean('perf/samples_per_s', sft):.1f} samples/s ({len(sft)} steps)")
    if grpo:
        step = mean("perf/step_s")
        print(
            f"GRPO: {step:.3f} s/step, {mean('perf/samples_per_s'):.1f} samples/s, "
            f"{mean('perf/tokens_per_s'):.0f} tokens/s ({len(grpo)} steps after {args.skip} warm-up)"
        )
        parts = {k: mean(f"perf/{k}_s") for k in ("rollout", "reward", "learner", "sync")}
        other = step - sum(parts.values())
        print("share of GRPO step time: " + ", ".join(f"{k} {v / step:.0%}" for k, v in parts.items()) + f", driver/other {other / step:.0%}")
        print(f"weight sync: {mean('perf/sync_mb'):.1f} MB in {mean('perf/sync_s') * 1000:.0f} ms = {mean('perf/sync_mb_per_s'):.0f} MB/s")
    if summary.get("peak_memory_mb"):
        print("peak memory (MB, largest process per role): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["peak_memory_mb"].items()))
    if summary.get("accuracy"):
        print("held-out planning accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["accuracy"].items()))
    if summary.get("seconds"):
        print("wall clock (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))


if __name__ == "__main__":
    main()
