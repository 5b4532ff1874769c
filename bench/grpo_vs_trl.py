"""GRPO throughput: our pipeline against TRL's GRPOTrainer, same model, data, rewards and settings.

    pip install -e '.[bench]'                       # TRL (see pyproject.toml for the pinned version)
    python bench/grpo_vs_trl.py                     # TRL, then ours; samples/s of both and the ratio
    python bench/grpo_vs_trl.py --repeat 3          # alternate TRL / ours three times, report medians
    python bench/grpo_vs_trl.py --only ours --variant grpo.off_policy_steps=1   # ours with and without an option

Both sides train the same randomly initialised tiny Qwen2-VL (alphadrive_ray.models.tiny, seed 0)
on the same synthetic scenes (alphadrive_ray.data.synth, seed 1, one pass: no prompt is seen
twice, as in the first epoch of a real run), with the quickstart prompt template
(jobs/quickstart_cpu.yaml) and the same rewards (alphadrive_ray.rewards.score_group, wrapped as a
TRL reward function that scores each contiguous block of `num_generations` completions as one
group, so the diversity reward sees its group). Same group size, prompts per step, completion
length, sampling temperature / top-p, learning rate, micro-batch, no KL term (beta 0), one
optimizer step per generated batch, vision placeholder tokens banned from sampling on both sides.

Throughput = completions trained per second of wall clock between the end of the warm-up steps
and the end of the last step (TRL: a callback at each optimizer step; ours: the `time_s` stamps
of metrics.jsonl). Each side runs in its own subprocess, one after the other, on the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quickstart import PATH as QUICKSTART, prompt_template, settings as quickstart  # bench/, the script's folder, is on sys.path


def parse_args(argv=None):
    q = quickstart()
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run (default 14)")
    p.add_argument("--warmup", type=int, default=4, help="steps not timed at the start (default 4)")
    p.add_argument("--prompts", type=int, default=q["grpo"]["prompts_per_step"], help="prompts per step (default: the quickstart's)")
    p.add_argument("--group", type=int, default=q["grpo"]["group_size"], help="completions per prompt, G (default: the quickstart's)")
    p.add_argument("--max-new-tokens", type=int, default=q["rollout"]["max_new_tokens"], help="longest completion (default: the quickstart's)")
    # 1.0, not the demo's 0.7: the figures in docs/performance.md were measured at 1.0
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, as measured)")
    p.add_argument("--top-p", type=float, default=q["rollout"].get("top_p", 1.0))
    p.add_argument(
        "--micro-batch", type=int, default=q["grpo"]["micro_batch_size"], help="completions per forward/backward (default: the quickstart's)"
    )
    p.add_argument("--lr", type=float, default=float(q["grpo"]["lr"]))
    p.add_argument("--image-size", type=int, default=224, help="rendered scene side in pixels (the quickstart's 224)")
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of both sides (TRL's process, our actors via ray.omp_wait_policy); '' for the OpenMP default",
    )
    p.add_argument("--only", choices=("both", "ours", "trl"), default="both")
    p.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating; medians are reported")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override of our config (repeatable)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also run ours with these overrides on top (repeatable; runs alternate with the others)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="model, data and run folders (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: run one side
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(workdir: Path, args) -> tuple[Path, Path, Path]:
    """The tiny model and the train / eval scenes (built once per work folder)."""
    from alphadrive_ray.data.synth import generate_dataset
    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

    model = workdir / "tiny-qwen2vl"
    if not (model / "config.json").exists():
        build_tiny_qwen2vl(model, TinySpec(seed=0))
    n = args.prompts * args.steps
    train = workdir / f"scenes-{n}-{args.image_size}" / "data.jsonl"
    if not train.exists():
        generate_dataset(train.parent, n, seed=1, size=args.image_size, id_prefix="train")
    held_out = workdir / f"scenes-eval-{args.image_size}" / "data.jsonl"
    if not held_out.exists():
        generate_dataset(held_out.parent, 8, seed=2, size=args.image_size, id_prefix="eval")
    return model, train, held_out


# --- TRL ---------------------------------------------------------------------------------------


def run_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from alphadrive_ray.actions import format_answer
    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.inputs import load_image, vision_placeholder_ids
    from alphadrive_ray.models.loading import load_model
    from alphadrive_ray.prompts import planning_prompt
    from alphadrive_ray.rewards import score_group

    model_dir, train_path, _ = prepare(workdir, args)
    set_seed(0)
    template = prompt_template()
    records = load_records(train_path)
    dataset = Dataset.from_list(
        [
            {
                # TRL puts the image block before the text, as our chat messages do
                "prompt": [{"role": "user", "content": planning_prompt(r.speed, r.navigation, template)}],
                "image": load_image(r.image),
                "solution": format_answer(r.speed_action, r.path_action),
            }
            for r in records
        ]
    )
    processor = AutoProcessor.from_pretrained(str(model_dir))
    G = args.group
    group_sizes = []

    def prompt_text(messages) -> str:
        parts = [m["content"] if isinstance(m["content"], str) else [c.get("text") for c in m["content"]] for m in messages]
        return json.dumps(parts)

    def alphadrive_reward(prompts, completions, solution, **_):
        """Our rewards: each contiguous block of G completions is one prompt's group (TRL's RepeatSampler)."""
        if len(completions) % G:
            raise ValueError(f"{len(completions)} completions do not form groups of {G}")
        totals = []
        for start in range(0, len(completions), G):
            block = slice(start, start + G)
            if len(set(solution[block])) != 1 or len({prompt_text(p) for p in prompts[block]}) != 1:
                raise ValueError("a block of num_generations completions mixes prompts: groups are not contiguous")
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions[block]]
            totals += [s["total"] for s in score_group(texts, solution[start])]
        group_sizes.append(len(completions))
        return totals

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    micro = min(args.micro_batch, args.prompts * G)
    batch = args.prompts * G
    if batch % micro:
        raise SystemExit(f"--micro-batch {micro} must divide prompts x group = {batch}")
    banned = vision_placeholder_ids(processor.tokenizer).tolist()
    config = GRPOConfig(
        output_dir=str(workdir / "trl-out"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,  # one optimizer step per generated batch, as ours
        num_generations=G,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        generation_kwargs={"suppress_tokens": banned},  # as our engines ban the vision placeholders
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        num_iterations=1,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        log_completions=False,
        disable_tqdm=True,
    )
    model = load_model(model_dir, "float32", "sdpa")
    model.train()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[alphadrive_reward],
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[Stamp()],
    )
    logged: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs:
                logged.append(dict(logs))

    trainer.add_callback(Keep())
    started = time.perf_counter()
    trainer.train()
    lengths = [l["completions/mean_length"] for l in logged if "completions/mean_length" in l][args.warmup :]
    timed = stamps[args.warmup :]
    per_step = [b - a for a, b in zip(stamps[args.warmup - 1 :], timed)] if args.warmup else []
    seconds = stamps[-1] - stamps[args.warmup - 1] if args.warmup else stamps[-1] - started
    return {
        "side": "trl",
        "steps": len(stamps),
        "timed_steps": len(timed),
        "samples_per_step": batch,
        "samples_per_s": batch * len(timed) / seconds,
        "step_s_median": statistics.median(per_step) if per_step else seconds / len(timed),
        "mean_completion_tokens": statistics.fmean(lengths) if lengths else float("nan"),
        "reward_calls": len(group_sizes),
        "torch_threads": torch.get_num_threads(),
    }


# --- ours --------------------------------------------------------------------------------------


def run_ours(args, workdir: Path) -> dict:
    from alphadrive_ray.config import load_config
    from alphadrive_ray.train.trainer import train

    model_dir, train_path, held_out = prepare(workdir, args)
    run_root = workdir / "runs"
    overrides = [
        "run.name=ours",
        f"run.output_dir={run_root}",
        f"model.path={model_dir}",
        "model.init_tiny=false",
        f"data.train={train_path}",
        f"data.eval={held_out}",
        "data.synth_train.n=0",
        "data.synth_eval.n=0",
        "sft.enabled=false",
        f"grpo.steps={args.steps}",
        f"grpo.prompts_per_step={args.prompts}",
        f"grpo.group_size={args.group}",
        f"grpo.micro_batch_size={args.micro_batch}",
        f"grpo.lr={args.lr}",
        "grpo.beta=0.0",
        "grpo.dynamic_sampling=false",  # TRL has no such filter: every generated completion is trained on
        "grpo.warmup_steps=0",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.temperature={args.temperature}",
        f"rollout.top_p={args.top_p}",
        "eval.baseline=false",
        "eval.samples=8",
        "eval.reasoning_metrics=false",
        "checkpoint.export_hf=false",
        *args.set,
    ]
    config = load_config(QUICKSTART, overrides)
    train(config)
    lines = [json.loads(l) for l in (run_root / "ours" / "metrics.jsonl").read_text().splitlines()]
    grpo = [l for l in lines if l["stage"] == "grpo"]
    timed = grpo[args.warmup :]
    samples = [round(l["perf/samples_per_s"] * l["perf/step_s"]) for l in timed]
    seconds = timed[-1]["time_s"] - grpo[args.warmup - 1]["time_s"] if args.warmup else sum(l["perf/step_s"] for l in timed)
    parts = {k: statistics.median(l[f"perf/{k}_s"] for l in timed) for k in ("step", "rollout", "reward", "learner", "sync")}
    return {
        "side": "ours",
        "steps": len(grpo),
        "timed_steps": len(timed),
        "samples_per_step": statistics.fmean(samples),
        "samples_per_s": sum(samples) / seconds,
        "step_s_median": parts["step"],
        "median_s": parts,
        "mean_completion_tokens": statistics.fmean(l["rollout/response_len"] for l in timed),
        "overrides": args.set,
    }


# --- driver ------------------------------------------------------------------------------------


def run_side(side: str, args, workdir: Path, overrides: list[str]) -> dict:
    """One side in a fresh Python process (its own threads, Ray cluster and memory)."""
    out = workdir / f"result-{side}-{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--workdir", str(workdir)]
    for key in ("steps", "warmup", "prompts", "group", "max_new_tokens", "temperature", "top_p", "micro_batch", "lr", "image_size"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for item in [f"ray.omp_wait_policy={args.omp_wait_policy}", *overrides]:
        cmd += ["--set", item]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if side == "trl" and args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy  # ours: set for its actors by the config
    log = workdir / f"{side}.log"
    with open(log, "a") as fh:
        fh.write(f"\n=== {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} run failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-4000:])
    return json.loads(out.read_text())


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.warmup >= args.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    if args.side:
        result = run_trl(args, args.workdir) if args.side == "trl" else run_ours(args, args.workdir)
        args.out.write_text(json.dumps(result))
        return

    import torch
    import transformers

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir, args)
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        if args.only != "ours":
            raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or --only ours)")
    # what runs: TRL, ours (with --set), and ours with each --variant on top
    runs: list[tuple[str, str, list[str]]] = []
    if args.only in ("both", "trl"):
        runs.append(("TRL GRPOTrainer", "trl", []))
    if args.only in ("both", "ours"):
        runs.append(("alphadrive-ray", "ours", list(args.set)))
        for variant in args.variant:
            runs.append((f"alphadrive-ray + {variant}", "ours", [*args.set, *variant.split(",")]))
    print("GRPO throughput, ours vs TRL GRPOTrainer")
    print(
        f"  model: tiny Qwen2-VL (alphadrive_ray.models.tiny, seed 0), float32, sdpa, CPU; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}"
    )
    print(f"  data: {args.prompts * args.steps} synthetic scenes ({args.image_size}px, seed 1), each prompt once; quickstart prompt template")
    print(
        f"  per step: {args.prompts} prompts x G={args.group} = {args.prompts * args.group} completions, "
        f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, top_p {args.top_p}, "
        f"micro-batch {args.micro_batch}, lr {args.lr}, beta 0, 1 update per batch"
    )
    print(f"  steps: {args.steps} ({args.warmup} warm-up, not timed); repeats: {args.repeat} (runs alternate); our overrides: {args.set or 'none'}")
    print(f"  threads: torch defaults per process; OMP_WAIT_POLICY {args.omp_wait_policy or 'unset (OpenMP default)'} on both sides")
    print(f"  machine: {os.cpu_count()} CPUs; load average before: {load_average()}; work folder {workdir}", flush=True)

    results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
    for i in range(args.repeat):
        for label, side, overrides in runs:
            r = run_side(side, args, workdir, overrides)
            r["load_after"] = load_average()
            results[label].append(r)
            extra = ""
            if side == "ours":
                m = r["median_s"]
                extra = f"; median s: rollout {m['rollout']:.2f}, reward {m['reward']:.2f}, learner {m['learner']:.2f}, sync {m['sync']:.3f}"
            print(
                f"  run {i + 1} {label}: {r['samples_per_s']:.1f} samples/s, {r['step_s_median']:.2f} s/step, "
                f"{r['samples_per_step']:.0f} samples/step, {r['mean_completion_tokens']:.1f} tokens/completion{extra}; load {r['load_after']}",
                flush=True,
            )
    med = {label: statistics.median(r["samples_per_s"] for r in rs) for label, rs in results.items()}
    print()
    width = max(len(label) for label in med)
    trl_med = med.get("TRL GRPOTrainer")
    for label, value in med.items():
        spread = ", ".join(f"{r['samples_per_s']:.1f}" for r in results[label])
        ratio = f"  {value / trl_med:.2f}x TRL" if trl_med and label != "TRL GRPOTrainer" else ""
        print(f"{label:{width}s}  {value:6.1f} samples/s (median of {len(results[label])}: {spread}){ratio}")
    if trl_med and "alphadrive-ray" in med:
        print(f"ratio ours / TRL: {med['alphadrive-ray'] / trl_med:.2f}x")
    print(f"load average after: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "median": med}, indent=2))


if __name__ == "__main__":
    main()
