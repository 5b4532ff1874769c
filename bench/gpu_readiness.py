"""GPU readiness: the GPU recipe (jobs/qwen2vl_2b.yaml) end to end on one machine, in minutes.

    python bench/gpu_readiness.py                          # one or more CUDA GPUs, no network
    python bench/gpu_readiness.py --json readiness.json    # also every figure as JSON
    python bench/gpu_readiness.py --size tiny --device cpu # the same code on CPU (tests/test_gpu_readiness.py)

A random Qwen2-VL with the sizes of Qwen2-VL-2B-Instruct (bench/qwen2vl_2b.py; the tiny
model's tokenizer and processor) is built and saved, synthetic scenes are rendered, and then
for each rollout engine, the HF engine and vLLM when it is installed, the real command runs:
`python -m alphadrive_ray.train jobs/qwen2vl_2b.yaml` with the recipe's settings (bfloat16,
DeepSpeed ZeRO-2 over NCCL, gradient checkpointing, flash attention where installed, the
release prompt and image bounds, G = 2) and only the scale cut down: a few SFT steps and GRPO
steps on the synthetic scenes, one learner, one rollout worker, one reward worker, no
checkpoints (`checkpoint.keep: 0`; a 2B ZeRO checkpoint is 2.2B x 14 bytes, about 31 GB).

On one GPU the learner and the engine share it (half a GPU each in Ray's accounting; vLLM
gets --vllm-memory of its memory) and weights go through the object store; with two or more
GPUs each has its own, and vLLM receives them over NCCL (`sync.backend: nccl`).

Checks (any failure exits 1):
- each run exits 0 and every SFT and GRPO loss (and the KL) is finite;
- the HF engine holds the learner's synced tensors bit for bit after every sync
  (`sync.verify`: a SHA-256 per tensor on both sides). vLLM fuses and repacks what it loads,
  so there the check is the engine's log-probs against the learner's on the sampled tokens
  (`rollout/logp_diff`, mean absolute nats per token), finite and below --max-logp-diff.
Figures: completion tokens/s of the rollout, GRPO step time, weight-sync GB/s, peak GPU
memory per role (torch's allocator in each actor) and of each device (nvidia-smi, polled),
the wall time of each part. Target: the whole script within 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

RECIPE = REPO / "jobs" / "qwen2vl_2b.yaml"
# the run's own progress lines ("[   12.3s] stage 1: ...") and its errors; not the actors' output
PROGRESS = re.compile(r"^(\[\s*[\d.]+s\] |error|Error|Traceback)")
TARGET_S = 8 * 60


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class GpuMemoryPoller:
    """Peak used memory of each GPU (MiB) while the block runs, from `nvidia-smi` every `every_s`;
    empty where there is no nvidia-smi (CPU machines)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        for line in out.splitlines():
            index, _, used = line.partition(",")
            try:
                gpu, mib = int(index), float(used)
            except ValueError:
                continue
            self.peak[gpu] = max(self.peak.get(gpu, 0.0), mib)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> "GpuMemoryPoller":
        if shutil.which("nvidia-smi"):
            self._sample()
            self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()


def sync_backend(engine: str, gpus: int) -> str:
    """vLLM on its own GPU receives the weights over NCCL; on a shared GPU (and the HF engine)
    they go through the object store."""
    return "nccl" if engine == "vllm" and gpus >= 2 else "object_store"


def overrides(args, engine: str, work: Path, model_dir: Path, gpus: int) -> list[str]:
    """The recipe's settings that change for this check: scale, paths and the machine's shape."""
    cuda = args.device == "cuda"
    shared = cuda and gpus < 2  # learner and engine on one GPU
    gpu_share = 0.5 if shared else (1 if cuda else 0)
    cores = os.cpu_count() or 2
    if not cuda:
        attn = "sdpa"
    elif importlib.util.find_spec("flash_attn") is not None:
        attn = "flash_attention_2"  # the recipe's
    else:
        attn = "sdpa"
    items = [
        f"run.name=readiness-{engine}",
        f"run.output_dir={work / 'runs'}",
        f"model.path={model_dir}",
        f"model.dtype={'bfloat16' if cuda else 'float32'}",
        f"model.attn_implementation={attn}",
        f"data.train={work / 'scenes-train' / 'data.jsonl'}",
        f"data.eval={work / 'scenes-eval' / 'data.jsonl'}",
        f"data.synth_train.n={args.sft_steps * args.sft_batch}",
        "data.synth_train.reasoning_share=1.0",
        f"data.synth_train.size={args.scene_size}",
        "data.synth_train.seed=1",
        f"data.synth_eval.n={args.eval_samples}",
        f"data.synth_eval.size={args.scene_size}",
        "data.synth_eval.seed=2",
        f"sft.samples={args.sft_steps * args.sft_batch}",
        "sft.epochs=1",
        f"sft.batch_size={args.sft_batch}",
        f"sft.micro_batch_size={min(4, args.sft_batch)}",
        f"grpo.steps={args.grpo_steps}",
        f"grpo.prompts_per_step={args.prompts}",
        f"grpo.micro_batch_size={min(8, args.prompts * 2)}",
        f"rollout.engine={engine}",
        "rollout.num_workers=1",
        f"rollout.gpus_per_worker={gpu_share}",
        f"rollout.cpus_per_worker={max(1, min(4, cores // 4))}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.vllm_gpu_memory_utilization={args.vllm_memory if shared else 0.85}",
        "reward.num_workers=1",
        "learner.num_workers=1",
        f"learner.gpus_per_worker={gpu_share}",
        f"learner.cpus_per_worker={max(1, min(8, cores // 2))}",
        f"learner.backend={'nccl' if cuda else 'gloo'}",
        f"sync.backend={sync_backend(engine, gpus)}",
        f"sync.verify={'true' if engine == 'hf' else 'false'}",
        f"eval.samples={args.eval_samples}",
        "eval.every_steps=0",
        "eval.reasoning_metrics=false",
        "eval.baseline=false",
        "checkpoint.every_steps=0",
        "checkpoint.keep=0",
        "checkpoint.export_hf=false",
        "checkpoint.export_sft=false",
    ]
    if not cuda:
        items.append("model.gradient_checkpointing=false")
    return items


def finite(rows: list[dict], key: str) -> bool:
    """Every row has `key`, and it is finite (the tracker leaves non-finite values out)."""
    return bool(rows) and all(key in r and math.isfinite(r[key]) for r in rows)


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def run_engine(args, engine: str, work: Path, model_dir: Path, gpus: int) -> dict:
    """One `alphadrive-ray train` of the recipe with `engine`; its checks and figures."""
    from alphadrive_ray.errors import UserError
    from alphadrive_ray.run_report import load_run

    cmd = [sys.executable, "-m", "alphadrive_ray.train", str(RECIPE)]
    for item in overrides(args, engine, work, model_dir, gpus):
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    env["PYTHONUNBUFFERED"] = "1"
    log(f"{engine}: python -m alphadrive_ray.train jobs/qwen2vl_2b.yaml (+ {len(cmd) // 2 - 2} overrides)")
    t0 = time.monotonic()
    log_path = work / f"train-{engine}.log"
    with GpuMemoryPoller() as poller, open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if args.verbose or PROGRESS.match(line):
                print(f"    {line.rstrip()}", flush=True)
        rc = proc.wait()
    wall = time.monotonic() - t0
    run_dir = work / "runs" / f"readiness-{engine}"
    try:
        run = load_run(run_dir)  # the run report's reader: metrics.jsonl (a step logged twice: its last line) and summary.json
        sft, grpo, summary = run.stage_rows("sft"), run.stage_rows("grpo"), run.summary or {}
    except UserError:  # the run stopped before it wrote its directory
        sft, grpo, summary = [], [], {}
    checks: dict[str, bool] = {"exit 0": rc == 0}
    checks["SFT steps ran, losses finite"] = len(sft) == args.sft_steps and finite(sft, "loss/sft")
    checks["GRPO steps ran, losses and KL finite"] = len(grpo) == args.grpo_steps and finite(grpo, "loss/policy") and finite(grpo, "loss/kl")
    logp_diff = median(grpo, "rollout/logp_diff")
    if engine == "hf":
        verified = [r.get("perf/sync_verified_tensors", 0) for r in grpo]
        checks["synced weights bit-equal (sync.verify, every sync)"] = bool(verified) and min(verified) > 0
    else:
        checks[f"engine vs learner log-probs within {args.max_logp_diff} nats/token"] = (
            finite(grpo, "rollout/logp_diff") and max(r["rollout/logp_diff"] for r in grpo) <= args.max_logp_diff
        )
    rollout_s = sum(r.get("perf/rollout_s", 0.0) for r in grpo)
    tokens = sum(r.get("perf/tokens", 0.0) for r in grpo)
    sync_s = [r["perf/sync_s"] for r in grpo if r.get("perf/sync_s")]
    sync_mb = median(grpo, "perf/sync_mb")
    result = {
        "engine": engine,
        "returncode": rc,
        "log": str(log_path),
        "wall_s": round(wall, 1),
        "seconds": summary.get("seconds", {}),
        "checks": checks,
        "ok": all(checks.values()),
        "rollout_tokens_per_s": tokens / rollout_s if rollout_s else None,
        "grpo_step_s": median(grpo, "perf/step_s"),
        "sft_step_s": median(sft, "perf/step_s"),
        "sync_gb": sync_mb * 2**20 / 1e9 if sync_mb else None,
        "sync_gb_per_s": (sync_mb * 2**20 / 1e9) / statistics.median(sync_s) if sync_mb and sync_s else None,
        "sync_backend": sync_backend(engine, gpus),
        "verified_tensors": int(max((r.get("perf/sync_verified_tensors", 0) for r in grpo), default=0)) if engine == "hf" else None,
        "logp_diff": logp_diff,
        "sft_loss": [r.get("loss/sft") for r in sft],
        "grpo_loss": [r.get("loss/policy") for r in grpo],
        "peak_gpu_mb_per_role": summary.get("peak_gpu_mb", {}),
        "peak_rss_mb_per_role": summary.get("peak_memory_mb", {}),
        "peak_gpu_mb_per_device": poller.peak,
    }
    for name, ok in checks.items():
        log(f"{engine}: {'ok  ' if ok else 'FAIL'} {name}")
    if rc != 0:
        tail = log_path.read_text().splitlines()[-25:]
        log(f"{engine}: the run failed (exit {rc}); the end of {log_path}:\n" + "\n".join("    " + t for t in tail))
    return result


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("2b", "tiny"), default="2b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--engines", nargs="+", choices=("hf", "vllm"), default=None, help="default: hf, and vllm when installed (GPU only)")
    p.add_argument("--sft-steps", type=int, default=2)
    p.add_argument("--sft-batch", type=int, default=8)
    p.add_argument("--grpo-steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="GRPO prompts per step (x G = 2, the recipe's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--scene-size", type=int, default=None, help="rendered scene side in pixels (default: 448 on a GPU, 96 on CPU)")
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--vllm-memory", type=float, default=0.35, help="vLLM's share of a GPU it shares with the learner")
    p.add_argument("--max-logp-diff", type=float, default=0.1, help="vLLM: largest mean |engine - learner| log-prob per token")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--verbose", action="store_true", help="print every line of the runs")
    args = p.parse_args()
    for name in ("sft_steps", "sft_batch", "grpo_steps", "prompts", "max_new_tokens", "eval_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    started = time.monotonic()

    import torch

    from gpu import build_model  # bench/gpu.py (bench/ is on sys.path)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/gpu_readiness.py: no CUDA device here; run it on a GPU machine, or pass --size tiny --device cpu")
    gpus = torch.cuda.device_count() if cuda else 0
    args.scene_size = args.scene_size or (448 if cuda else 96)
    have_vllm = importlib.util.find_spec("vllm") is not None
    engines = args.engines or (["hf", "vllm"] if cuda and have_vllm else ["hf"])
    if "vllm" in engines and not cuda:
        p.error("--engines vllm needs --device cuda (the vLLM engine of this project runs on GPUs)")
    if "vllm" in engines and not have_vllm:
        p.error("--engines vllm: vLLM is not installed here (pip install -e '.[gpu]')")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="gpu-readiness-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)

    import transformers

    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "transformers": transformers.__version__}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["device"] = f"{gpus} x {props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        report["device"] = f"CPU, {os.cpu_count()} cores"
    report["vllm"] = importlib.import_module("vllm").__version__ if have_vllm else None
    log(
        f"{report['device']}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"vLLM {report['vllm'] or 'not installed: the vLLM engine is skipped'}; work in {work}"
    )

    t0 = time.monotonic()
    model_dir = work / f"qwen2vl-{args.size}"
    dtype = torch.bfloat16 if cuda else torch.float32
    report["parameters"] = build_model(model_dir, args.size, torch.device(args.device), dtype, log)
    report["build_s"] = round(time.monotonic() - t0, 1)
    if cuda:
        torch.cuda.empty_cache()

    report["runs"] = [run_engine(args, engine, work, model_dir, gpus) for engine in engines]
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["ok"] = all(r["ok"] for r in report["runs"])

    print()
    n = report["parameters"]
    print(f"GPU readiness: {report['device']}, a random Qwen2-VL ({args.size}, {f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.1f}M'} parameters)")
    print(
        f"  jobs/qwen2vl_2b.yaml at small scale: {args.sft_steps} SFT steps of {args.sft_batch}, {args.grpo_steps} GRPO steps of "
        f"{args.prompts} prompts x G=2, completions of up to {args.max_new_tokens} tokens, {args.scene_size}px scenes"
    )
    print(f"  model build {report['build_s']:.0f} s")
    for r in report["runs"]:
        print(f"  {r['engine']} engine: {'ready' if r['ok'] else 'NOT READY'} ({r['wall_s']:.0f} s, of which {r['seconds']})")
        for name, ok in r["checks"].items():
            print(f"    [{'x' if ok else ' '}] {name}")
        print(
            f"    rollout {fmt(r['rollout_tokens_per_s'], '.0f', ' tokens/s')}, GRPO step {fmt(r['grpo_step_s'], '.2f', ' s')}, "
            f"SFT step {fmt(r['sft_step_s'], '.2f', ' s')}"
        )
        print(f"    weight sync ({r['sync_backend']}): {fmt(r['sync_gb'], '.2f', ' GB')} at {fmt(r['sync_gb_per_s'], '.2f', ' GB/s')}")
        if r["verified_tensors"] is not None:
            print(f"    sync.verify: {r['verified_tensors']} tensors bit-equal after every sync")
        print(f"    |engine - learner| log-prob: {fmt(r['logp_diff'], '.2e', ' nats/token')} (median over steps)")
        roles = ", ".join(f"{k} {v / 1024:.1f}" for k, v in r["peak_gpu_mb_per_role"].items()) or "n/a (no GPU)"
        devices = ", ".join(f"GPU {k} {v / 1024:.1f}" for k, v in sorted(r["peak_gpu_mb_per_device"].items())) or "n/a"
        print(f"    peak GPU memory (GiB): per role (torch) {roles}; per device (nvidia-smi) {devices}")
    verdict = "within" if report["wall_s"] <= TARGET_S else "over"
    print(f"  total {report['wall_s']:.0f} s ({verdict} the {TARGET_S // 60} min target)")
    print("READY" if report["ok"] else "NOT READY: see the failed checks above and the run logs in " + str(work))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
