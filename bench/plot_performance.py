"""The plots of docs/performance.md, from the JSON files the benchmarks write.

    python bench/grpo_vs_trl.py --repeat 3 --variant ... --json grpo.json
    python bench/hf_engine.py --json engine.json
    python bench/weight_sync.py --json sync.json
    python bench/plot_performance.py --grpo grpo.json --engine engine.json --sync sync.json --out docs/img

Writes grpo_throughput.png (samples/s of TRL and of our configurations, with the step-time
split of ours), hf_engine.png (tokens/s of the two decoding loops) and weight_sync.png
(GB/s of each sync mode against memcpy). Any input may be left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot_grpo(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    results = data["results"]
    labels = list(results)
    med = [data["median"][k] for k in labels]
    lo = [m - min(r["samples_per_s"] for r in results[k]) for k, m in zip(labels, med)]
    hi = [max(r["samples_per_s"] for r in results[k]) - m for k, m in zip(labels, med)]
    short = [k.replace("alphadrive-ray + ", "ours + ").replace("alphadrive-ray", "ours").replace("TRL GRPOTrainer", "TRL") for k in labels]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = ["#999999" if k.startswith("TRL") else "#1f77b4" for k in labels]
    ax.barh(range(len(labels)), med, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(range(len(labels)), short, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("completions trained per second (median, min-max)")
    ax.set_title("GRPO throughput, tiny Qwen2-VL, 2-core CPU", fontsize=10)
    for i, m in enumerate(med):
        ax.text(m, i, f" {m:.1f}", va="center", fontsize=8)
    ours = [k for k in labels if not k.startswith("TRL")]
    parts = ("rollout", "reward", "learner", "sync")
    left = [0.0] * len(ours)
    for part in parts:
        values = [sorted(r["median_s"][part] for r in results[k])[len(results[k]) // 2] for k in ours]
        bx.barh(range(len(ours)), values, left=left, label=part)
        left = [a + b for a, b in zip(left, values)]
    steps = [sorted(r["median_s"]["step"] for r in results[k])[len(results[k]) // 2] for k in ours]
    other = [max(0.0, s - l) for s, l in zip(steps, left)]
    bx.barh(range(len(ours)), other, left=left, label="driver / waiting", color="#dddddd")
    bx.set_yticks(range(len(ours)), [s for s, k in zip(short, labels) if not k.startswith("TRL")], fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("seconds per step (median), by where the driver waited")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "grpo_throughput.png", dpi=90)
    plt.close(fig)


def plot_engine(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    rate = data["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(5, 2.2))
    ax.barh(list(rate), list(rate.values()), color=["#999999", "#1f77b4"])
    for i, v in enumerate(rate.values()):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("completion tokens per second (median)")
    ax.set_title("HF engine decoding loops (1 thread)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "hf_engine.png", dpi=90)
    plt.close(fig)


def plot_sync(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    modes = data["modes"]
    memcpy = max(data["memcpy_gbps"].values())
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh([m["mode"] for m in modes], [m["gbps"] for m in modes], color="#1f77b4")
    ax.axvline(memcpy, color="k", linestyle="--", linewidth=1)
    ax.axvline(memcpy / 2, color="k", linestyle=":", linewidth=1)
    ax.text(memcpy, len(modes) - 0.5, " memcpy", fontsize=8, va="top")
    ax.text(memcpy / 2, len(modes) - 0.5, " 50%", fontsize=8, va="top")
    for i, m in enumerate(modes):
        ax.text(m["gbps"], i, f" {m['gbps']:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s, sender publish to receiver loaded")
    ax.set_title(f"object-store weight sync, {data['bytes'] / 1e9:.1f} GB bf16 state dict", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "weight_sync.png", dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--grpo", type=Path)
    p.add_argument("--engine", type=Path)
    p.add_argument("--sync", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    args.out.mkdir(parents=True, exist_ok=True)
    for path, plot in ((args.grpo, plot_grpo), (args.engine, plot_engine), (args.sync, plot_sync)):
        if path:
            plot(json.loads(path.read_text()), args.out)
            print(f"plotted {path}")


if __name__ == "__main__":
    main()
