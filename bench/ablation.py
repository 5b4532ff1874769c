"""The paper's reward and strategy ablations (AlphaDrive, Tables 3 and 4) on the synthetic benchmark.

    python bench/ablation.py                                  # both ablations, the quickstart's budget
    python bench/ablation.py --smoke                          # tiny settings: checks the plumbing only
    python bench/ablation.py --only reward --grpo-steps 30 --docs docs/results.md
    python bench/ablation.py --reuse --docs docs/results.md   # redraw tables / docs from finished runs

What it measures: held-out planning accuracy (SPEED and PATH both right) and the F1 of every
SPEED and PATH class, after training variants that differ only in what is ablated:

- reward ablation: GRPO from one shared SFT warm-up with the reward components of each row of
  the paper's table (`reward.components`; `alphadrive_ray.rewards.score_group` says what leaving
  a component out means): base accuracy only; + format; planning F1 + format; + action weight;
  + diversity (no weight); all four;
- strategy ablation: SFT only, SFT without reasoning on every label, RL only (GRPO from the
  untrained tiny model), SFT + RL (the "all four" run of the reward ablation; it runs once),
  with the untrained model for reference; and, not in the paper, GRPO from the SFT without
  reasoning (does RL still add to a warm-up that already saw every label?).

Every GRPO run has the same budget (steps, prompts per step, group size, learning rate) and
starts either from the SFT export of an SFT run (`checkpoint.export_sft`; then
`model.path=<export>`, `model.init_tiny=false`, `sft.enabled=false`) or, for RL only, from the
untrained model. Wall seconds of each run and the seconds of its training stages are recorded.

Evaluation uses the base config's held-out split (`data.synth_eval`: the scene distribution
of the training split, another seed), generated again under --out so that no run touches the
base config's files; with the default job file it is the demo's own 600 scenes, so the rows
compare with the demo's figures, ceiling included. A policy that only learned the training
prior is exposed by the targets instead: RL only must beat the split's best constant plan by
20 points.

Budget: every GRPO run takes --grpo-steps (default 40, not the demo's 120: the nine runs of
the paper's rows must fit 90 minutes on 2 cores; the GRPO learning rate is constant after warm-up,
so a 40-step run is the first 40 steps of the demo's); SFT without reasoning sees every labelled
scene once (`sft.epochs: 1`; two epochs over all 8000 would take longer than the reasoning SFT
and RL together).

Each run is the real pipeline, `alphadrive-ray train <base> --set ...` in a subprocess (its own
local Ray cluster); figures are read from the run directories (eval/final/metrics.json,
summary.json, metrics.jsonl). Outputs under --out (default bench/out/ablation):

    runs/<run>/           the run directories; logs/<run>.log their console output
    data/eval-shifted/    the held-out split
    results.json          every figure, the budget, the commands
    results.md            the tables (also printed), with notes
    reward_curves.png     reward and rollout accuracy per GRPO step, held-out accuracy at the
                          start and end (and every N steps with --set eval.every_steps=N)
    strategy_curves.png   the same for RL only and SFT + RL

--docs PATH rewrites the part of PATH between `<!-- ABLATION_TABLE -->` and
`<!-- /ABLATION_TABLE -->` (appended when the markers are missing) with the tables of this
invocation (one with --only) and keeps everything else. --reuse skips the runs already
finished in --out with the same resolved config, so an interrupted ablation continues and
`--reuse --docs` only redraws.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python bench/ablation.py` from a checkout without an install

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS  # noqa: E402
from alphadrive_ray.config import Config, load_config, parse_override  # noqa: E402
from alphadrive_ray.data.synth import DEFAULT_PATH_MIX, DEFAULT_SPEED_MIX  # noqa: E402
from alphadrive_ray.errors import UserError  # noqa: E402
from alphadrive_ray.rewards import ABLATION_COMPONENTS  # noqa: E402
from alphadrive_ray.train.trainer import torch_extensions_dir  # noqa: E402

DEFAULT_BASE = REPO / "jobs" / "quickstart_cpu.yaml"
DEFAULT_OUT = REPO / "bench" / "out" / "ablation"
DOCS_START, DOCS_END = "<!-- ABLATION_TABLE -->", "<!-- /ABLATION_TABLE -->"

# GRPO steps of every RL run unless --grpo-steps says otherwise: what lets the nine runs fit
# 90 minutes on 2 cores (about 11 s a step there); see the module docstring.
DEFAULT_GRPO_STEPS = 40

# --smoke: every run of the plan, on tiny settings (minutes, not hours); the figures mean nothing.
SMOKE = {"grpo_steps": 2, "sft_samples": 160, "eval_samples": 20}
SMOKE_OVERRIDES = (
    "sft.epochs=1",
    "sft.batch_size=16",
    "sft.micro_batch_size=8",
    "grpo.prompts_per_step=2",
    "grpo.group_size=4",
    "grpo.micro_batch_size=8",
    "rollout.num_workers=1",
    "reward.num_workers=1",
    "learner.num_workers=1",
    "learner.cpus_per_worker=1",
)

# Keys this script sets per run; a --set on them would make the variants meaningless.
MANAGED_KEYS = (
    "run.name",
    "run.output_dir",
    "model.path",
    "model.init_tiny",
    "sft.enabled",
    "grpo.enabled",
    "reward.components",
    "checkpoint.export_sft",
    "data.eval",
    "eval.baseline",
    "sft.target",
)


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training run: which stages, from which weights, with which reward components."""

    key: str  # the run's name (its folder under OUT/runs)
    stage: str  # "sft" (stage 1 only, exports the SFT policy) or "grpo" (stage 2 only)
    start: str  # "untrained" (the base config's model) or the key of an SFT run (its export)
    components: tuple[str, ...] = ABLATION_COMPONENTS
    baseline: bool = False  # also evaluate the model before training (eval/untrained)
    sft_target: str = "reasoning"  # stage "sft": `sft.target` (answer: every labelled scene, no reasoning)


@dataclass(frozen=True)
class Row:
    """One row of a table: a run's evaluation under the paper's label."""

    label: str
    run: str  # RunSpec.key
    paper: float | None  # the paper's planning accuracy (MetaAD, %), for orientation
    tag: str = "final"  # which evaluation of the run: "final" or "untrained"
    components: str = ""  # shown in the reward table
    sft_run: str = ""  # its seconds include this SFT run's (the strategy table's SFT + RL rows)


RUNS: dict[str, RunSpec] = {
    spec.key: spec
    for spec in (
        RunSpec("sft", "sft", "untrained"),
        RunSpec("sft-answers", "sft", "untrained", sft_target="answer"),
        RunSpec("rl-only", "grpo", "untrained", baseline=True),
        RunSpec("reward-base-acc", "grpo", "sft", ()),
        RunSpec("reward-base-acc-format", "grpo", "sft", ("format",)),
        RunSpec("reward-f1-format", "grpo", "sft", ("accuracy", "format")),
        RunSpec("reward-f1-weight-format", "grpo", "sft", ("accuracy", "weight", "format")),
        RunSpec("reward-f1-diversity-format", "grpo", "sft", ("accuracy", "diversity", "format")),
        RunSpec("reward-all", "grpo", "sft", ABLATION_COMPONENTS),
        RunSpec("sft-answers-rl", "grpo", "sft-answers", ABLATION_COMPONENTS),
    )
}

# Paper numbers: ../shared/reference/alphadrive.md (reward ablation; strategy ablation with reasoning).
TABLES: dict[str, tuple[str, tuple[Row, ...]]] = {
    "reward": (
        "Reward ablation (SFT warm-up, then GRPO with the listed reward components)",
        (
            Row("base accuracy only", "reward-base-acc", 42.36, components="(none): exact match"),
            Row("+ format", "reward-base-acc-format", 55.71, components="format"),
            Row("planning F1 + format", "reward-f1-format", 67.91, components="accuracy, format"),
            Row("+ action weight", "reward-f1-weight-format", 72.20, components="accuracy, weight, format"),
            Row("+ diversity (no weight)", "reward-f1-diversity-format", 69.38, components="accuracy, diversity, format"),
            Row("all four", "reward-all", 77.12, components="accuracy, weight, diversity, format"),
        ),
    ),
    "strategy": (
        "Strategy ablation (SFT on the reasoning share; RL on every scene, labels only)",
        (
            Row("base model, zero-shot", "rl-only", 13.69, tag="untrained"),
            Row("SFT on the reasoning share", "sft", 65.40),
            Row("SFT without reasoning, every label", "sft-answers", 56.97),
            Row("RL only, from the base", "rl-only", 72.41),
            Row("SFT + RL", "reward-all", 77.12, sft_run="sft"),
            Row("SFT without reasoning + RL (not in the paper)", "sft-answers-rl", None, sft_run="sft-answers"),
        ),
    ),
}

SPEED_HEADERS = {"KEEP": "keep", "ACCELERATE": "accel.", "DECELERATE": "decel.", "STOP": "stop"}
PATH_HEADERS = {
    "STRAIGHT": "straight",
    "LEFT_TURN": "left turn",
    "RIGHT_TURN": "right turn",
    "LEFT_CHANGE": "left change",
    "RIGHT_CHANGE": "right change",
}


def runs_for(tables: Sequence[str]) -> list[RunSpec]:
    """The runs the chosen tables need, the SFT runs first (the others may start from their exports)."""
    keys = {row.run for name in tables for row in TABLES[name][1]} | {"sft"}
    keys |= {RUNS[key].start for key in keys if RUNS[key].start != "untrained"}
    return [spec for key, spec in RUNS.items() if key in keys]


def yaml_value(value: Any) -> str:
    """A value for `--set key=VALUE` (read as YAML; JSON is YAML)."""
    return json.dumps(value)


def run_overrides(spec: RunSpec, common: list[str], user: list[str], base: Config, out: Path) -> list[str]:
    """The --set list of one run: the shared settings, what the variant changes, then the user's."""
    own = [
        f"run.name={spec.key}",
        f"reward.components={yaml_value(list(spec.components))}",
        f"eval.baseline={yaml_value(spec.baseline)}",
        f"sft.target={spec.sft_target}",
    ]
    if spec.sft_target == "answer":
        # every labelled scene of the training split, once (the module docstring says why)
        own += [f"sft.samples={max(base.sft.samples, base.data.synth_train.n)}", "sft.epochs=1"]
    if spec.start != "untrained":
        own += [f"model.path={yaml_value(str(out / 'runs' / spec.start / 'export-sft'))}", "model.init_tiny=false"]
    else:
        own += [f"model.path={yaml_value(base.model.path)}", f"model.init_tiny={yaml_value(base.model.init_tiny)}"]
    if spec.stage == "sft":
        own += ["sft.enabled=true", "grpo.enabled=false", "checkpoint.export_sft=true"]
    else:
        own += ["sft.enabled=false", "grpo.enabled=true", "checkpoint.export_sft=false"]
    return [*common, *own, *user]


def common_overrides(args: argparse.Namespace, base: Config, out: Path) -> list[str]:
    """Settings shared by every run: the budget, the held-out split, the output folder."""
    sets = [
        f"run.output_dir={yaml_value(str(out / 'runs'))}",
        "run.overwrite=true",
        # the base config's held-out scenes (its data.synth_eval), generated under --out
        f"data.eval={yaml_value(str(out / 'data' / 'eval' / 'data.jsonl'))}",
        f"data.synth_eval.n={args.eval_samples}",
        "eval.samples=0",  # the whole generated split
        "eval.reasoning_metrics=false",  # planning figures only (needs Java otherwise); --set to turn on
        "checkpoint.export_hf=false",  # only the SFT export is needed
        f"grpo.steps={args.grpo_steps}",
        f"sft.samples={args.sft_samples}",
    ]
    return [*(SMOKE_OVERRIDES if args.smoke else ()), *sets]


def check_user_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        key, _ = parse_override(text)  # a malformed one is a UserError
        if key in MANAGED_KEYS or any(key.startswith(k + ".") for k in MANAGED_KEYS):
            raise UserError(f"--set {text}: {key} is set by the ablation for each run ({', '.join(MANAGED_KEYS)} are); leave it out")


# --- running --------------------------------------------------------------------------------

# The child's lines echoed as progress: stage progress, evaluations, data and model generation.
PROGRESS = re.compile(r"^(\[\s*[\d.]+s\] (sft |grpo |eval \[|generating )|building the tiny)")


@dataclass
class RunResult:
    key: str
    run_dir: Path
    overrides: list[str]
    wall_s: float = 0.0
    reused: bool = False
    summary: dict = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)  # tag -> metrics.json
    curve: list[dict] = field(default_factory=list)  # metrics.jsonl rows of stage grpo / eval


def split_counts(synth_json: Path) -> dict | None:
    """Scenes per class of a generated split (its synth.json), or None."""
    try:
        info = json.loads(synth_json.read_text())
        return {"speed": info["speed_counts"], "path": info["path_counts"]}
    except (OSError, ValueError, KeyError):
        return None


def elapsed(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def finished_run(run_dir: Path, resolved: dict) -> dict | None:
    """The record of a complete earlier run with exactly this resolved config, else None."""
    import yaml

    try:
        record = json.loads((run_dir / "ablation_run.json").read_text())
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return record if written == resolved and (run_dir / "summary.json").is_file() else None


def train(spec: RunSpec, overrides: list[str], base: Path, log_path: Path) -> float:
    """Run `alphadrive-ray train` for one variant; stream its progress lines; return wall seconds."""
    command = [sys.executable, "-m", "alphadrive_ray", "train", str(base)]
    for text in overrides:
        command += ["--set", text]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())  # one DeepSpeed op build per environment
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:  # line-buffered: `tail -f` works
        log.write(f"$ cd {shlex.quote(str(REPO))} && {shlex.join(command)}\n")
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                if PROGRESS.match(line):
                    print(f"    {line.rstrip()}", flush=True)
            code = proc.wait()
        except BaseException:
            proc.terminate()  # NOTE: Ctrl-C reached it too; give Ray a moment to shut down
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    wall = time.monotonic() - start
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        raise UserError(f"run {spec.key} failed (exit {code}) after {wall:.0f}s; last lines of {log_path}:\n{tail.rstrip()}")
    return wall


def load_result(result: RunResult, spec: RunSpec) -> None:
    """Read a finished run's figures from its directory."""
    d = result.run_dir
    result.summary = json.loads((d / "summary.json").read_text())
    result.metrics["final"] = json.loads((d / "eval" / "final" / "metrics.json").read_text())
    if spec.baseline and (d / "eval" / "untrained" / "metrics.json").is_file():
        result.metrics["untrained"] = json.loads((d / "eval" / "untrained" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result.curve = [r for r in rows if r["stage"] in ("grpo", "eval")]


def run_all(specs: list[RunSpec], planned: dict[str, tuple[list[str], dict]], base: Path, out: Path, reuse: bool) -> dict[str, RunResult]:
    """Train the runs in order (or reuse finished ones) and read their figures."""
    results: dict[str, RunResult] = {}
    started = time.monotonic()
    rerun: set[str] = set()  # runs done in this invocation: their dependants cannot be reused
    for i, spec in enumerate(specs, 1):
        overrides, resolved = planned[spec.key]
        run_dir = out / "runs" / spec.key
        result = RunResult(spec.key, run_dir, overrides)
        what = f"{spec.stage.upper()} from the {'untrained model' if spec.start == 'untrained' else f'export of {spec.start}'}"
        if spec.stage == "grpo":
            what += f", reward components: {', '.join(spec.components) or '(none: exact match)'}"
        record = finished_run(run_dir, resolved) if reuse and spec.start not in rerun else None
        if record is not None:
            result.wall_s, result.reused = record["wall_s"], True
            print(f"[{i}/{len(specs)}] {spec.key}: {what}: reusing the finished run in {run_dir}", flush=True)
        else:
            log = out / "logs" / f"{spec.key}.log"
            print(f"[{i}/{len(specs)}] {spec.key}: {what} (log: {log}; {elapsed(time.monotonic() - started)} elapsed)", flush=True)
            result.wall_s = train(spec, overrides, base, log)
            marker = {"wall_s": round(result.wall_s, 1), "overrides": overrides}
            (run_dir / "ablation_run.json").write_text(json.dumps(marker, indent=2) + "\n")
            rerun.add(spec.key)
        load_result(result, spec)
        acc = result.metrics["final"]["planning"]["accuracy"]
        print(f"[{i}/{len(specs)}] {spec.key}: held-out accuracy {acc:.3f}, {result.wall_s:.0f}s", flush=True)
        results[spec.key] = result
    return results


# --- figures --------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def class_f1(family: dict, name: str) -> float | None:
    """F1 of a class, None when it is neither in the truth nor predicted (undefined)."""
    return family[name]["f1"] if name in family.get("macro_f1_labels", ()) else None


def row_figures(row: Row, results: dict[str, RunResult]) -> dict:
    """The numbers of one table row (fractions; seconds)."""
    result = results[row.run]
    m = result.metrics.get(row.tag)
    if m is None:
        raise UserError(f"run {row.run} has no `{row.tag}` evaluation in {result.run_dir}")
    planning, n = m["planning"], m["n"]
    acc = planning["accuracy"]
    ceiling = planning.get("ceiling")
    seconds = result.summary.get("seconds", {})
    train_s = sum(seconds.get(k, 0.0) for k in ("sft", "grpo")) if row.tag == "final" else 0.0
    wall_s = result.wall_s
    if row.sft_run:
        sft = results[row.sft_run]
        train_s += sft.summary.get("seconds", {}).get("sft", 0.0)
        wall_s += sft.wall_s
    return {
        "label": row.label,
        "run": row.run,
        "evaluation": row.tag,
        "components": row.components,
        "n": n,
        "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / n) if n else None,
        "accuracy_ci95": wilson_interval(acc, n),
        "ceiling": ceiling,
        "share_of_ceiling": acc / ceiling if ceiling else None,
        "bayes_agreement": planning.get("bayes_agreement"),
        "speed_f1": {c: class_f1(planning["speed"], c) for c in SPEED_ACTIONS},
        "path_f1": {c: class_f1(planning["path"], c) for c in PATH_ACTIONS},
        "format_ok_rate": m["parse"]["format_ok_rate"],
        "reasoning": {k: m["reasoning"].get(k) for k in ("bleu4", "cider", "meteor") if m["reasoning"].get(k) is not None},
        "train_s": round(train_s, 1) if row.tag == "final" else None,
        "wall_s": round(wall_s, 1) if row.tag == "final" else None,
        "paper_accuracy": row.paper,
    }


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a binomial proportion p over n samples."""
    if not n:
        return None
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def per_scene_right(run_dir: Path, tag: str, records: dict) -> dict[str, bool]:
    """Scene id -> the plan of `tag`'s evaluation was right (from its predictions.jsonl)."""
    from alphadrive_ray.rewards import parse_plan

    out = {}
    for line in (run_dir / "eval" / tag / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        record = records[row["id"]]
        out[row["id"]] = parse_plan(row["output"]) == (record.speed_action, record.path_action)
    return out


def check_targets(figures: dict[str, list[dict]], results: dict[str, RunResult], eval_path: Path) -> dict:
    """The results run's targets (issue 15): SFT + RL >= SFT + 5 points (and McNemar's p), RL only
    >= the best constant plan + 20 points, SFT + RL >= 0.9 x ceiling."""
    from collections import Counter

    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.evaluation.metrics import compare_paired

    records = {r.id: r for r in load_records(eval_path, check_images=False)}
    pairs = Counter((r.speed_action, r.path_action) for r in records.values())
    ((constant_pair, constant_n),) = pairs.most_common(1)
    by_run = {f["run"]: f for rows in figures.values() for f in rows if f["evaluation"] == "final"}
    out: dict[str, Any] = {"best_constant_plan": ", ".join(constant_pair), "best_constant_accuracy": constant_n / len(records)}
    sft, both, rl = by_run.get("sft"), by_run.get("reward-all"), by_run.get("rl-only")
    if sft and both:
        a = per_scene_right(results["sft"].run_dir, "final", records)
        b = per_scene_right(results["reward-all"].run_dir, "final", records)
        ids = sorted(a)
        out["sft_rl_vs_sft"] = compare_paired([a[i] for i in ids], [b[i] for i in ids])
        out["sft_rl_vs_sft"]["met"] = both["accuracy"] - sft["accuracy"] >= 0.05
    if rl:
        out["rl_only_vs_constant"] = {
            "margin": rl["accuracy"] - out["best_constant_accuracy"],
            "met": rl["accuracy"] - out["best_constant_accuracy"] >= 0.20,
        }
    if both and both["ceiling"]:
        out["sft_rl_vs_ceiling"] = {"share": both["share_of_ceiling"], "met": both["share_of_ceiling"] >= 0.9}
    answers, answers_rl = by_run.get("sft-answers"), by_run.get("sft-answers-rl")
    if answers and answers_rl:  # not a target: whether GRPO still adds to a stronger warm-up
        a = per_scene_right(results["sft-answers"].run_dir, "final", records)
        b = per_scene_right(results["sft-answers-rl"].run_dir, "final", records)
        ids = sorted(a)
        out["answers_rl_vs_answers"] = compare_paired([a[i] for i in ids], [b[i] for i in ids])
        out["answers_rl_vs_answers"]["share_of_ceiling"] = answers_rl["share_of_ceiling"]
    return out


def targets_markdown(t: dict) -> str:
    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = ["**Targets**", ""]
    if "sft_rl_vs_sft" in t:
        c = t["sft_rl_vs_sft"]
        lines.append(
            f"- SFT + RL ≥ SFT + 5 points: {100 * c['delta']:+.2f} points ({c['fixed']} scenes fixed, {c['broken']} broken "
            f"of {c['n']}; one-sided exact McNemar p = {c['p_value']:.3g}): {mark(c['met'])}"
        )
    if "rl_only_vs_constant" in t:
        c = t["rl_only_vs_constant"]
        lines.append(
            f"- RL only ≥ the best constant plan ({t['best_constant_plan']}: {100 * t['best_constant_accuracy']:.2f}) + 20 points: "
            f"{100 * c['margin']:+.2f} points: {mark(c['met'])}"
        )
    if "sft_rl_vs_ceiling" in t:
        c = t["sft_rl_vs_ceiling"]
        lines.append(f"- SFT + RL ≥ 0.9 x ceiling: {100 * c['share']:.1f}% of the ceiling: {mark(c['met'])}")
    if "answers_rl_vs_answers" in t:
        c = t["answers_rl_vs_answers"]
        lines.append(
            f"- Also measured, not a target: RL after SFT without reasoning, {100 * c['delta']:+.2f} points ({c['fixed']} fixed, "
            f"{c['broken']} broken; p = {c['p_value']:.3g}), {100 * c['share_of_ceiling']:.1f}% of the ceiling"
        )
    return "\n".join(lines)


def markdown_table(name: str, figures: list[dict]) -> str:
    title = TABLES[name][0]
    reasoning = sorted({k for f in figures for k in f["reasoning"]}, key=("bleu4", "cider", "meteor").index)
    head = ["variant", *(["reward components"] if name == "reward" else []), "acc", "95% CI", "of ceiling", "= most likely"]
    head += [PATH_HEADERS[c] for c in PATH_ACTIONS] + [SPEED_HEADERS[c] for c in SPEED_ACTIONS]
    head += ["format", *[k.upper() if k != "bleu4" else "BLEU-4" for k in reasoning], "train s", "wall s", "paper acc"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figures:
        ci = f["accuracy_ci95"]
        cells = [f["label"], *([f["components"]] if name == "reward" else []), pct(f["accuracy"])]
        cells += ["–" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"]
        cells += ["–" if f["share_of_ceiling"] is None else f"{100 * f['share_of_ceiling']:.1f}%", pct(f["bayes_agreement"])]
        cells += [pct(f["path_f1"][c]) for c in PATH_ACTIONS] + [pct(f["speed_f1"][c]) for c in SPEED_ACTIONS]
        cells += [pct(f["format_ok_rate"]), *[f"{100 * f['reasoning'][k]:.2f}" if k in f["reasoning"] else "–" for k in reasoning]]
        cells += ["–" if f["train_s"] is None else f"{f['train_s']:.0f}", "–" if f["wall_s"] is None else f"{f['wall_s']:.0f}"]
        cells += ["–" if f["paper_accuracy"] is None else f"{f['paper_accuracy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(budget: dict, tables: Sequence[str], results: dict[str, RunResult]) -> str:
    """What the numbers are, how the rows map onto our rewards, and what the budget was."""
    e, t = budget["eval_split"], budget["train_split"]
    sft = results["sft"]
    counts = e.get("counts")
    held = f"- Held-out split: {e['n']} synthetic scenes, seed {e['seed']}, class mix SPEED {mix(e['speed_mix'])}, PATH {mix(e['path_mix'])}"
    held += f", scenes per class SPEED {mix(counts['speed'])}, PATH {mix(counts['path'])}" if counts else ""
    if t.get("seed") is not None:
        held += f"; training split: seed {t['seed']}, SPEED {mix(t['speed_mix'])}, PATH {mix(t['path_mix'])}."
    else:
        held += f"; training split: {t['path']} (not generated here)."
    lines = [
        "Notes:",
        held,
        "- acc = planning accuracy (SPEED and PATH both right) against the logged labels, with its 95% Wilson interval; "
        "of ceiling = acc / the split's ceiling (the accuracy of always answering each scene's most likely plan); "
        "= most likely = share of plans equal to the scene's most likely plan (free of label noise); the class columns are "
        "per-class F1; format = share of outputs in the `<think>…</think><answer>…</answer>` format; all in %, greedy decoding, one seed.",
        f"- Budget of every GRPO run: {budget['grpo_steps']} steps x {budget['prompts_per_step']} prompts x {budget['group_size']} completions, "
        f"lr {budget['grpo_lr']:g}, beta {budget['grpo_beta']:g}, "
        f"dynamic sampling {'on' if budget.get('dynamic_sampling') else 'off'}, `{budget['reward_variant']}` rewards. "
        f"SFT warm-up (one run, shared): {sft.summary.get('sft_steps', 0)} steps "
        f"on {budget['sft_samples']} samples x {budget['sft_epochs']} epoch(s), "
        f"{sft.summary.get('seconds', {}).get('sft', 0):.0f}s.",
        "- train s = seconds in the training stages (SFT + GRPO), wall s = whole runs with start-up and evaluation. "
        "Reward-ablation rows start from the shared SFT export and count their GRPO run only; the strategy table's SFT + RL counts the SFT run too.",
        "- paper acc: the paper's planning accuracy on MetaAD (strategy: the rows with reasoning), for orientation only; the data and model differ.",
    ]
    if "reward" in tables:
        lines += [
            '- Reward rows map onto `reward.components` (alphadrive_ray.rewards.score_group). "Base accuracy" is the paper\'s exact-match '
            "accuracy; our components express it per family: leaving out `accuracy` replaces each family's planning F1 by an exact match "
            "of its predicted action set with the true one (1 or 0), so that reward is 0-2 (SPEED + PATH), not a single 1/0 for both actions "
            "right. The joint form (`rewards.exact_accuracy_reward`) is not selectable through `reward.components`.",
            '- "+ action weight" and "+ diversity (no weight)" are both added to planning F1 + format, as in the paper; "all four" is the '
            "same run as the strategy table's SFT + RL.",
        ]
    if "strategy" in tables:
        lines.append(
            "- RL only is GRPO from the base model (the base config's model); its start is the zero-shot row. SFT without reasoning "
            "trains on every labelled scene of the training split once, with an empty <think> (`sft.target: answer`); "
            "paper acc of that row is the paper's SFT without reasoning."
        )
    return "\n".join(lines)


def mix(weights: dict) -> str:
    return "(" + ", ".join(f"{k} {v:g}" for k, v in weights.items()) + ")"


def moving_mean(ys: Sequence[float], window: int) -> list[float]:
    return [sum(ys[max(0, j - window + 1) : j + 1]) / (j + 1 - max(0, j - window + 1)) for j in range(len(ys))]


@dataclass
class Curve:
    """What one GRPO run's line shows: metrics.jsonl rows, and the held-out accuracy it started from."""

    label: str
    rows: list[dict]
    start_accuracy: float | None = None  # step 0 of the held-out panel (the SFT run's, for runs from its export)


def plot_curves(path: Path, title: str, curves: Sequence[Curve]) -> None:
    """Per GRPO step: total reward and rollout accuracy (raw faint, moving mean solid); held-out accuracy.

    The held-out panel joins the start (the untrained or SFT model), any `eval.every_steps`
    evaluations and the final one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = (
        ("reward/total", "GRPO reward (total; scales differ by variant)"),
        ("rollout/accuracy", "rollout accuracy (both actions right)"),
        ("eval/accuracy", "held-out accuracy (greedy)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for idx, curve in enumerate(curves):
        colour = f"C{idx}"
        grpo = [r for r in curve.rows if r["stage"] == "grpo"]
        for ax, (key, _) in zip(axes[0][:2], panels):
            points = [(r["step"], r[key]) for r in grpo if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                smooth = moving_mean(ys, max(1, len(ys) // 15))
                ax.plot(xs, smooth, color=colour, label=curve.label, linewidth=1.6, marker="o" if len(xs) < 6 else None)
        # eval rows are logged at the weight version, which is the GRPO step in runs without SFT
        held = {r["step"]: r["eval/accuracy"] for r in curve.rows if r["stage"] == "eval" and "eval/accuracy" in r}
        if curve.start_accuracy is not None:
            held.setdefault(0, curve.start_accuracy)
        if held:
            xs, ys = zip(*sorted(held.items()))
            axes[0][2].plot(xs, ys, color=colour, marker="o", label=curve.label)
    for ax, (_, name) in zip(axes[0], panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_docs(path: Path, section: str) -> None:
    """Replace the text between the ablation markers in `path`; append them when missing."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n"
    block = f"{DOCS_START}\n{section.strip()}\n{DOCS_END}"
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start == -1 and end == -1:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    elif start == -1 or end < start:
        raise UserError(f"{path}: the markers {DOCS_START} and {DOCS_END} must both be there, in this order")
    else:
        text = text[:start] + block + text[end + len(DOCS_END) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:6]),
    )
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="base config of every run (default jobs/quickstart_cpu.yaml)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench/out/ablation; bench/out/ablation-smoke with --smoke)")
    p.add_argument("--grpo-steps", type=int, default=None, help=f"GRPO steps of every RL run (default {DEFAULT_GRPO_STEPS})")
    p.add_argument("--sft-samples", type=int, default=None, help="samples of the SFT warm-up (default: the base config's)")
    p.add_argument(
        "--eval-samples", type=int, default=None, help="scenes in the held-out split (default: the base config's data.synth_eval.n, else 300)"
    )
    p.add_argument("--only", choices=tuple(TABLES), default=None, help="run one ablation (default both)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override passed to every run (repeatable)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings: 2 GRPO steps, 10 SFT steps, 20 held-out scenes, one worker each")
    p.add_argument("--reuse", action="store_true", help="keep the finished runs in --out whose resolved config is unchanged")
    p.add_argument("--docs", type=Path, default=None, help="write this invocation's tables into this markdown file, between the ablation markers")
    return p.parse_args(argv)


@dataclass
class Plan:
    """Everything decided before the first run starts."""

    base_path: Path
    out: Path
    tables: list[str]
    specs: list[RunSpec]
    planned: dict[str, tuple[list[str], dict]]  # run -> (its --set list, its resolved config)
    ref: Config  # the SFT run's resolved config: the budget and the splits


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve and validate the config of every run (a mistake is reported before hours of training)."""
    base_path = args.base.resolve()
    if not base_path.is_file():
        raise UserError(f"base config not found: {args.base} (pass --base, e.g. jobs/quickstart_cpu.yaml)")
    out = (args.out or (DEFAULT_OUT.with_name("ablation-smoke") if args.smoke else DEFAULT_OUT)).resolve()
    check_user_overrides(args.overrides)
    base = load_config(base_path, [*(SMOKE_OVERRIDES if args.smoke else ()), *args.overrides])
    defaults = (
        SMOKE
        if args.smoke
        else {
            "grpo_steps": DEFAULT_GRPO_STEPS,
            "sft_samples": base.sft.samples,
            "eval_samples": base.data.synth_eval.n or 300,
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")

    tables = [args.only] if args.only else list(TABLES)
    specs = runs_for(tables)
    common = common_overrides(args, base, out)
    planned, configs = {}, {}
    for spec in specs:
        overrides = run_overrides(spec, common, args.overrides, base, out)
        configs[spec.key] = load_config(base_path, overrides)
        planned[spec.key] = (overrides, configs[spec.key].to_dict())
    if configs["sft"].data.synth_eval.n <= 0:
        raise UserError(f"{args.base}: data.synth_eval.n is 0; the ablation generates its held-out split from data.synth_eval")
    budgets = {(c.grpo.steps, c.grpo.prompts_per_step, c.grpo.group_size, c.grpo.lr) for k, c in configs.items() if k != "sft"}
    assert len(budgets) == 1, f"GRPO budgets differ across variants: {budgets}"
    return Plan(base_path, out, tables, specs, planned, configs["sft"])


def describe_budget(plan: Plan, args: argparse.Namespace) -> dict:
    """The shared settings of the runs, for results.json and the notes."""
    ref, train = plan.ref, plan.ref.data.synth_train
    generated_train = {
        "seed": train.seed,
        "speed_mix": train.speed_mix or DEFAULT_SPEED_MIX,
        "path_mix": train.path_mix or DEFAULT_PATH_MIX,
    }
    return {
        "base": str(plan.base_path),
        "grpo_steps": ref.grpo.steps,
        "prompts_per_step": ref.grpo.prompts_per_step,
        "group_size": ref.grpo.group_size,
        "grpo_lr": ref.grpo.lr,
        "grpo_beta": ref.grpo.beta,
        "dynamic_sampling": ref.grpo.dynamic_sampling,
        "reward_variant": ref.reward.variant,
        "sft_samples": ref.sft.samples,
        "sft_epochs": ref.sft.epochs,
        "eval_split": {
            "path": ref.data.eval,
            "n": ref.data.synth_eval.n,
            "seed": ref.data.synth_eval.seed,
            "speed_mix": ref.data.synth_eval.speed_mix or DEFAULT_SPEED_MIX,
            "path_mix": ref.data.synth_eval.path_mix or DEFAULT_PATH_MIX,
            "counts": split_counts(Path(ref.data.eval).parent / "synth.json"),
        },
        "train_split": {"path": ref.data.train, **(generated_train if train.n > 0 else {})},
        "smoke": args.smoke,
        "user_overrides": args.overrides,
    }


def write_outputs(plan: Plan, args: argparse.Namespace, results: dict[str, RunResult]) -> tuple[str, list[Path]]:
    """results.md, results.json, the curves and (with --docs) the docs section; returns the markdown."""
    budget = describe_budget(plan, args)
    figures = {name: [row_figures(row, results) for row in TABLES[name][1]] for name in plan.tables}
    section = "\n\n".join(markdown_table(name, figures[name]) for name in plan.tables)
    targets = check_targets(figures, results, Path(plan.ref.data.eval))
    section += "\n\n" + targets_markdown(targets)
    section += "\n\n" + notes(budget, plan.tables, results)
    if args.smoke:
        section = "**Smoke run (--smoke): tiny settings, the figures mean nothing.**\n\n" + section

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(section + "\n", encoding="utf-8")
    runs = {
        k: {
            "run_dir": str(r.run_dir),
            "wall_s": round(r.wall_s, 1),
            "reused": r.reused,
            "seconds": r.summary.get("seconds", {}),
            "overrides": r.overrides,
        }
        for k, r in results.items()
    }
    (out / "results.json").write_text(
        json.dumps({"budget": budget, "tables": figures, "targets": targets, "runs": runs}, indent=2) + "\n", encoding="utf-8"
    )
    written = [out / "results.md", out / "results.json"]

    def start_accuracy(spec: RunSpec) -> float | None:
        return None if spec.start == "untrained" else results[spec.start].metrics["final"]["planning"]["accuracy"]

    for name in plan.tables:
        curves = [
            Curve(row.label, results[row.run].curve, start_accuracy(RUNS[row.run]))
            for row in TABLES[name][1]
            if RUNS[row.run].stage == "grpo" and row.tag == "final"
        ]
        plot_curves(out / f"{name}_curves.png", TABLES[name][0], curves)
        written.append(out / f"{name}_curves.png")
    if args.docs:
        update_docs(args.docs.resolve(), section)
        written.append(args.docs.resolve())
    return section, written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    plan = make_plan(args)
    ref = plan.ref
    shown_base = plan.base_path.relative_to(REPO) if plan.base_path.is_relative_to(REPO) else plan.base_path
    print(f"ablation: {', '.join(plan.tables)}; {len(plan.specs)} runs of {shown_base} -> {plan.out}")
    print(
        f"budget: SFT {ref.sft.samples} samples x {ref.sft.epochs} epoch(s); GRPO {ref.grpo.steps} steps x "
        f"{ref.grpo.prompts_per_step} prompts x {ref.grpo.group_size} completions; held-out {ref.data.synth_eval.n} scenes "
        f"(seed {ref.data.synth_eval.seed})",
        flush=True,
    )
    results = run_all(plan.specs, plan.planned, plan.base_path, plan.out, args.reuse)
    section, written = write_outputs(plan, args, results)
    print()
    print(section)
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"total {elapsed(time.monotonic() - t0)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
