"""The driver: AlphaDrive's two stages as one readable loop over Ray actor groups.

    generate -> score -> advantages -> update -> sync

Stage 1 (SFT warm-up) trains the learners on distilled reasoning; stage 2 (GRPO) samples
groups of plans on the rollout workers, scores them on the reward pool, turns rewards
into group-relative advantages here, updates the learners, and syncs the new weights
back to the engines. The held-out split is evaluated before training (untrained), after
SFT, every `eval.every_steps` and at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from alphadrive_ray import interrupts
from alphadrive_ray.actions import format_completion
from alphadrive_ray.train.checkpoint import CheckpointManager, TrainerState
from alphadrive_ray.config import Config
from alphadrive_ray.dashboard import RayMetricsSink
from alphadrive_ray.data.records import Record, load_records
from alphadrive_ray.engines.base import Group, SamplingParams
from alphadrive_ray.errors import RunAborted, UserError
from alphadrive_ray.train.schedule import EpochSampler, constant_lr, cosine_lr
from alphadrive_ray.tracking import Tracker, progress_line


@dataclass
class RunSummary:
    run_dir: str
    accuracy: dict[str, float] = field(default_factory=dict)  # "untrained", "sft", "final"
    seconds: dict[str, float] = field(default_factory=dict)
    grpo_steps: int = 0
    sft_steps: int = 0
    export_dir: str | None = None
    peak_memory_mb: dict[str, float] = field(default_factory=dict)  # per role, largest process
    peak_gpu_mb: dict[str, float] = field(default_factory=dict)  # per role that used a GPU, largest process (torch's allocator)
    ceiling: float | None = None  # held-out accuracy of always answering the most likely plan (noisy labels)
    # per-scene comparisons of stages on the held-out split, e.g. "final_vs_sft": fixed, broken,
    # delta and the one-sided exact McNemar p-value (evaluation.metrics.compare_paired)
    comparisons: dict[str, dict] = field(default_factory=dict)


@dataclass
class PendingStep:
    """A GRPO step's generation and scoring, in flight: the rollout jobs, the prompts they were
    given (with the epoch each was drawn in) and the sampler's state before they were drawn
    (a checkpoint taken while the step is pending resumes from there)."""

    jobs: list
    tagged: list[tuple[int, Record]]
    sampler_before: dict


def grpo_samples(groups: Sequence[Group], scores: Sequence[Sequence[dict]], group_size: int, advantage: str = "std", eps: float = 1e-4) -> list:
    """The learner's samples of a step: every completion of every group, in order, with its
    group-relative advantage (`algo.compute_group_advantages` of the `total` rewards)."""
    import torch

    from alphadrive_ray import algo
    from alphadrive_ray.workers.learner import GRPOSample

    totals = torch.tensor([s["total"] for group in scores for s in group])
    advantages = algo.compute_group_advantages(totals, group_size, advantage, eps).tolist()
    completions = [(group.record, completion) for group in groups for completion in group.completions]
    if len(completions) != len(advantages):
        raise ValueError(f"{len(completions)} completions but {len(advantages)} scores")
    return [GRPOSample(record, c.token_ids, c.logprobs, adv) for (record, c), adv in zip(completions, advantages)]


def prepare_run_dir(config: Config, resume: bool = False) -> Path:
    run_dir = config.run_dir
    if resume:
        if not (run_dir / "checkpoints").is_dir():
            raise UserError(f"--resume: {run_dir} has no checkpoints/ folder; is run.name / run.output_dir the same as the run to continue?")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not config.run.overwrite:
            raise UserError(f"run directory {run_dir} exists; pick another run.name or set run.overwrite: true")
        for child in (
            "metrics.jsonl",
            "tensorboard",
            "eval",
            "report",
            "export",
            "export-sft",
            "summary.json",
            "ledger.jsonl",
            "checkpoints",
            "run_report.html",
            "wandb",
        ):
            target = run_dir / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def prepare_data(config: Config, say=print) -> tuple[list[Record], list[Record]]:
    """Generate the synthetic splits when configured and missing, then load both splits."""
    from alphadrive_ray.data.synth import DEFAULT_PATH_MIX, DEFAULT_SPEED_MIX, Labelling, generate_dataset, generation_key, is_current

    for path, synth, prefix in (
        (config.data.train, config.data.synth_train, "train"),
        (config.data.eval, config.data.synth_eval, "eval"),
    ):
        if synth.n <= 0:
            continue
        if Path(path).name != "data.jsonl":
            raise UserError(f"data.{prefix}: a generated split is written as <folder>/data.jsonl; got {path}")
        speed_mix, path_mix = synth.speed_mix or DEFAULT_SPEED_MIX, synth.path_mix or DEFAULT_PATH_MIX
        labelling = Labelling(synth.labels, synth.driver_noise, synth.label_draws, synth.reasoning_share)
        key = generation_key(synth.n, synth.seed, synth.size, speed_mix, path_mix, labelling)
        if is_current(Path(path).parent, key):
            continue
        if Path(path).exists() and not (Path(path).parent / "synth.json").exists():
            raise UserError(f"data.{prefix}: {path} exists but was not made by the scene generator; set data.synth_{prefix}.n: 0 to use it as it is")
        say(f"generating {synth.n} synthetic scenes for the {prefix} split (seed {synth.seed}, {synth.labels} labels) -> {path}")
        _, stats = generate_dataset(
            Path(path).parent,
            synth.n,
            synth.seed,
            size=synth.size,
            speed_mix=speed_mix,
            path_mix=path_mix,
            labelling=labelling,
            id_prefix=prefix,
        )
        say(f"  {stats.n} scenes in {stats.seconds:.0f}s, {stats.with_reasoning} with reasoning; ceiling (most likely plan) {stats.ceiling:.3f}")
    train = load_records(config.data.train, skip_bad=config.data.skip_bad, log=say)
    held_out = load_records(config.data.eval, skip_bad=config.data.skip_bad, log=say)
    overlap = {r.id for r in train} & {r.id for r in held_out}
    if overlap:
        raise UserError(
            f"{len(overlap)} id(s) are in both the train and eval splits (e.g. {sorted(overlap)[0]}); the held-out split must be disjoint"
        )
    return train, held_out


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops go: TORCH_EXTENSIONS_DIR, else a folder per Python environment.

    NOTE: DeepSpeed JIT-builds an op (deepspeed_shm_comm) into torch's extension cache, which is
    keyed by Python and CUDA version only: another virtual environment on the machine rewrites
    its build file with its own include paths, and every learner start then rebuilds it (about a
    CPU-minute each). A cache per environment builds once.
    """
    import hashlib
    import sys

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return str(Path.home() / ".cache" / f"torch_extensions-{venv}")


def connect_ray(config: Config, say=print):
    """Join the cluster named by ray.address or RAY_ADDRESS, else start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # NOTE: a submitted job brings its own runtime env (jobs/runtime_env.yaml); adding one
        # here would conflict with it, so the job's env vars apply as they are.
        say(f"joining Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": torch_extensions_dir()}}
    if config.ray.omp_wait_policy:
        # NOTE: CPU workers share cores; spinning OpenMP threads of one starve the others
        env["env_vars"]["OMP_WAIT_POLICY"] = config.ray.omp_wait_policy
    r, l, w = config.rollout, config.learner, config.reward
    need = r.num_workers * r.cpus_per_worker + l.num_workers * l.cpus_per_worker + w.num_workers * w.cpus_per_worker
    num_cpus = config.ray.num_cpus or max(math.ceil(need), os.cpu_count() or 1)
    say(f"starting a local Ray cluster ({num_cpus} logical CPUs, dashboard on {config.ray.dashboard_host})")
    ray.init(
        address="local",  # a new cluster, even when `ray start` left one running on this machine
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host=config.ray.dashboard_host,
        runtime_env=env,
        log_to_driver=True,
    )


class Trainer:
    def __init__(self, config: Config, train_records: Sequence[Record], eval_records: Sequence[Record], run_dir: Path, tracker: Tracker):
        from alphadrive_ray.workers.group import LearnerGroup, Resources, RewardPool, RolloutGroup
        from alphadrive_ray.workers.learner import LearnerSpec
        from alphadrive_ray.workers.reward import RewardSpec
        from alphadrive_ray.workers.rollout import RolloutSpec

        c = self.config = config
        self.run_dir = run_dir
        self.tracker = tracker
        self.train_records = list(train_records)
        self.eval_records = list(eval_records)[: c.eval.samples or None]
        self.version = 0
        self.last_sync_bytes = 0
        self.last_verified = 0  # tensors each engine was checked on at the last sync (sync.verify)
        self.last_verify_s = 0.0
        self.accuracy: dict[str, float] = {}  # held-out planning accuracy by stage
        self.correct: dict[str, list[bool]] = {}  # per held-out scene, by stage: plan right
        self.ceiling: float | None = None
        self.ckpt = CheckpointManager(run_dir, c.checkpoint.keep)
        learner_spec, rollout_spec, reward_spec = LearnerSpec.from_config(c), RolloutSpec.from_config(c), RewardSpec.from_config(c)
        say = tracker.say
        self._groups: list = []  # started so far, stopped by `shutdown` (also when a later start fails)
        try:
            say(f"starting {c.learner.num_workers} learner(s) (DeepSpeed ZeRO-{c.learner.zero_stage}, {learner_spec.backend})")
            self.learners = LearnerGroup.start(
                learner_spec, c.learner.num_workers, Resources(c.learner.cpus_per_worker, c.learner.gpus_per_worker), placement=c.learner.placement
            )
            self._groups.append(self.learners)
            say(f"starting {c.rollout.num_workers} rollout worker(s) ({c.rollout.engine} engine)")
            self.rollout = RolloutGroup.start(
                rollout_spec, c.rollout.num_workers, Resources(c.rollout.cpus_per_worker, c.rollout.gpus_per_worker), placement=c.rollout.placement
            )
            self._groups.append(self.rollout)
            if c.sync.backend in ("nccl", "gloo"):
                self.rollout.use_broadcast(self.learners, c.sync.backend)
            say(f"starting {c.reward.num_workers} reward worker(s) ({c.reward.variant} rewards: {', '.join(c.reward.components)})")
            self.rewards = RewardPool.start(
                reward_spec, c.reward.num_workers, Resources(c.reward.cpus_per_worker, 0), c.reward.timeout_s, placement=c.reward.placement
            )
            self._groups.append(self.rewards)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop every actor group this trainer started and give their resources back, so that a
        process that trains twice on one Ray cluster (a notebook, the tests) does not keep the
        first run's actors and placement groups. Best effort: a dead actor is already stopped."""
        while self._groups:
            group = self._groups.pop()
            try:
                group.shutdown()
            except Exception as exc:  # noqa: BLE001 - the others still stop
                print(f"warning: stopping {type(group).__name__}: {type(exc).__name__}: {exc}", flush=True)

    # --- the pieces ---------------------------------------------------------------------

    def sync_weights(self) -> float:
        """Learners -> engines; returns seconds taken. Every sync bumps the weight version."""
        start = time.monotonic()
        self.version += 1
        if self.config.sync.backend in ("nccl", "gloo"):
            # learner rank 0 broadcasts to every engine (vLLM on GPUs: NCCL; HF engine: gloo)
            self.last_sync_bytes = self.rollout.broadcast_weights(self.version)
        else:
            bucket_refs = self.learners.export_weights(self.config.sync.bucket_mb)
            self.rollout.load_weights(bucket_refs, self.version)
            self.last_sync_bytes = sum(meta.nbytes for metas, _ in bucket_refs for meta in metas)
        seconds = time.monotonic() - start
        if self.config.sync.verify:
            start, first = time.monotonic(), not self.last_verified
            self.last_verified = self.rollout.verify_weights(self.learners, self.version)
            self.last_verify_s = time.monotonic() - start
            if first:
                self.tracker.say(f"sync.verify: {self.last_verified} synced tensors bit-equal on all {len(self.rollout.actors)} engine(s)")
        return seconds

    def peak_memory_mb(self, kind: str = "rss") -> dict[str, float]:
        """Each role's largest process: peak resident memory (MB), or with `kind="gpu"` peak GPU
        memory allocated through torch (roles that used no GPU are left out)."""
        import ray

        out = {}
        for role, actors in (("learner", self.learners.actors), ("rollout", self.rollout.actors), ("reward", self.rewards.actors)):
            peak = round(max(ray.get([getattr(a, f"peak_{kind}_mb").remote() for a in actors])), 1)
            if kind == "rss" or peak > 0:
                out[role] = peak
        return out

    def predict(self) -> dict[str, str]:
        """Greedy plans for the held-out split: record id -> model output."""
        params = SamplingParams(n=1, max_new_tokens=self.config.rollout.max_new_tokens, greedy=True)
        return {g.record.id: g.completions[0].text for g in self.rollout.generate(self.eval_records, params)}

    def planning_accuracy(self, predictions: dict[str, str]) -> float:
        return sum(self._correct(predictions)) / len(self.eval_records)

    def _correct(self, predictions: dict[str, str]) -> list[bool]:
        """Per held-out scene (in the split's order): is the plan in `predictions` the label?"""
        from alphadrive_ray.rewards import parse_plan

        return [parse_plan(predictions.get(r.id, "")) == (r.speed_action, r.path_action) for r in self.eval_records]

    def restore_correct(self) -> None:
        """Per-scene correctness of the stages a resumed run evaluated before it stopped, read back
        from their run_dir/eval/<stage>/predictions.jsonl, so its stage comparisons stay complete."""
        from alphadrive_ray.evaluation.predictions import PredictionsError, load_predictions

        for tag in self.accuracy:
            path = self.run_dir / "eval" / tag / "predictions.jsonl"
            if tag in self.correct or not path.is_file():
                continue
            try:
                self.correct[tag] = self._correct(load_predictions(path).outputs)
            except PredictionsError as exc:
                self.tracker.say(f"--resume: cannot compare with the {tag} stage: {exc}")

    def evaluate(self, tag: str, predictions: dict[str, str] | None = None, extra: dict | None = None) -> dict:
        """Score greedy plans on the held-out split with the `alphadrive-ray eval` logic."""
        from alphadrive_ray.evaluation import evaluate

        start = time.monotonic()
        predictions = self.predict() if predictions is None else predictions
        out_dir = self.run_dir / "eval" / tag
        metrics = evaluate(
            predictions,
            self.eval_records,
            out_dir,
            reasoning_metrics=self.config.eval.reasoning_metrics,
            progress=False,
            extra=extra,
            title=f"AlphaDrive run {self.config.run.name}: {tag}",
        )
        # evaluate wrote out_dir/predictions.jsonl: the outputs with their plans and per-sample scores
        self.correct[tag] = self._correct(predictions)
        self.ceiling = metrics["planning"].get("ceiling", self.ceiling)
        flat = {
            "eval/accuracy": metrics["planning"]["accuracy"],
            "eval/speed_macro_f1": metrics["planning"]["speed"]["macro_f1"],
            "eval/path_macro_f1": metrics["planning"]["path"]["macro_f1"],
            "eval/format_ok_rate": metrics["parse"]["format_ok_rate"],
            "perf/eval_s": time.monotonic() - start,
        }
        for key in ("ceiling", "ceiling_expected", "bayes_agreement"):
            if key in metrics["planning"]:
                flat[f"eval/{key}"] = metrics["planning"][key]
        for key in ("bleu4", "cider", "meteor"):
            value = metrics["reasoning"].get(key)
            if value is not None:
                flat[f"eval/{key}"] = value
        self.tracker.log("eval", self.version, {**flat, "eval/weight_version": self.version})
        ceiling = f" (ceiling {flat['eval/ceiling']:.3f})" if "eval/ceiling" in flat else ""
        self.tracker.say(
            f"eval [{tag}] accuracy {flat['eval/accuracy']:.3f}{ceiling}  speed F1 {flat['eval/speed_macro_f1']:.3f}  "
            f"path F1 {flat['eval/path_macro_f1']:.3f}  format {flat['eval/format_ok_rate']:.3f}  ({flat['perf/eval_s']:.1f}s)"
        )
        return metrics

    # --- checkpoints ----------------------------------------------------------------------

    def sft_subset(self) -> list[Record]:
        """The warm-up's samples: those with reasoning (sft.target reasoning), or every labelled one."""
        c = self.config.sft
        if c.target == "answer":
            return EpochSampler(self.train_records, self.config.run.seed).take(min(c.samples, len(self.train_records)))
        with_reasoning = [r for r in self.train_records if r.reasoning and r.reasoning.strip()]
        if not with_reasoning:
            raise UserError(
                f"sft.enabled is true but no record of {self.config.data.train} has a `reasoning`; "
                "run `alphadrive-ray distill`, set sft.target: answer, or disable SFT"
            )
        return EpochSampler(with_reasoning, self.config.run.seed).take(min(c.samples, len(with_reasoning)))

    def sft_target(self, record: Record) -> str:
        """What the warm-up teaches for a record: reasoning and answer, or the answer alone."""
        reasoning = record.reasoning if self.config.sft.target == "reasoning" else ""
        return format_completion(reasoning or "", record.speed_action, record.path_action)

    def save_checkpoint(self, stage: str, step: int, sampler_state: dict) -> None:
        if self.config.checkpoint.keep == 0:
            return  # checkpoint.keep 0: no resumable checkpoints
        t0 = time.monotonic()
        tmp = self.ckpt.begin(stage, step)
        self.learners.save_state(str(tmp / "learner"), {"stage": stage, "step": step})
        state = TrainerState(
            stage=stage,
            step=step,
            version=self.version,
            samplers={stage: sampler_state},
            accuracy=dict(self.accuracy),
        )
        final = self.ckpt.commit(tmp, state)
        self.tracker.say(f"checkpoint {final.name} ({time.monotonic() - t0:.1f}s)")

    def restore(self) -> TrainerState | None:
        """Load the latest checkpoint into the learners and engines; None when there is none."""
        path = self.ckpt.latest()
        if path is None:
            self.tracker.say("--resume: no checkpoint yet in this run directory; starting from the beginning")
            return None
        self.ckpt.check_resumable(self.config.grpo.beta)
        state = self.ckpt.load_state(path)
        c = self.config
        from alphadrive_ray.train.zero_checkpoint import checkpoint_layout

        stage, world = checkpoint_layout(path / "learner" / "state")
        if c.learner.zero_stage > 0 and (stage, world) != (c.learner.zero_stage, c.learner.num_workers):
            self.tracker.say(
                f"--resume: {path.name} was written by {world} learner(s) with ZeRO-{stage}; re-sharding it for "
                f"{c.learner.num_workers} with ZeRO-{c.learner.zero_stage}"
            )
        grpo = state.stage == "grpo"
        weight_decay = c.grpo.weight_decay if grpo else c.sft.weight_decay
        self.learners.begin_stage(state.stage, c.grpo.beta if grpo else 0.0, str(self.ckpt.reference_path), weight_decay)
        self.learners.load_state(str(path / "learner"))
        self.accuracy.update(state.accuracy)
        self.restore_correct()
        self.version = state.version - 1
        self.sync_weights()
        self.tracker.say(f"resumed from {path.name}: {state.stage} step {state.step}, weight version {state.version}")
        return state

    def _ledger(self, stage: str, step: int, tagged: Sequence[tuple[int | None, Record]], dropped: list | None = None) -> None:
        """Which prompts each step trained on (`items`), with the epoch they were drawn in; GRPO
        also lists the groups generated but not trained (`dropped`). Refill prompts of dynamic
        sampling have epoch null (a separate sampler). Every prompt of the data order is drawn
        exactly once per epoch: it is in `items` or in `dropped` with that epoch."""
        row = {"stage": stage, "step": step, "items": [[e, r.id] for e, r in tagged]}
        if dropped is not None:
            row["dropped"] = [[e, r.id] for e, r in dropped]
        with open(self.run_dir / "ledger.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    # --- stage 1 -------------------------------------------------------------------------

    def sft(self, first_step: int = 0, sampler_state: dict | None = None) -> int:
        """Stage 1: next-token loss on (prompt, reasoning + plan) pairs."""
        c = self.config.sft
        subset = self.sft_subset()
        sampler = EpochSampler(subset, self.config.run.seed + 1)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
        steps = (len(subset) * c.epochs) // c.batch_size
        if steps == 0:
            raise UserError(f"sft.samples x sft.epochs ({len(subset)} x {c.epochs}) is smaller than one batch (sft.batch_size = {c.batch_size})")
        from alphadrive_ray.workers.learner import SFTExample

        if first_step == 0:
            self.tracker.say(
                f"stage 1: SFT warm-up, {steps} steps on {len(subset)} samples ({'with reasoning' if c.target == 'reasoning' else 'answers only'})"
            )
            self.learners.begin_stage("sft", weight_decay=c.weight_decay)
        started = time.monotonic()
        every = self.config.checkpoint.every_steps
        for step in range(first_step, steps):
            interrupts.check()
            tagged = sampler.take_tagged(c.batch_size)
            examples = [SFTExample(r, self.sft_target(r)) for _, r in tagged]
            lr = cosine_lr(step, steps, c.lr, c.warmup_ratio)
            t0 = time.monotonic()
            metrics = self.learners.sft_step(examples, c.micro_batch_size, lr)
            self._ledger("sft", step + 1, tagged)
            metrics["perf/step_s"] = time.monotonic() - t0
            metrics["perf/samples_per_s"] = c.batch_size / metrics["perf/step_s"]
            self.tracker.log("sft", step + 1, metrics)
            if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
                self.tracker.say(
                    progress_line("sft", step + 1, steps, metrics, ("loss/sft", "perf/lr", "perf/samples_per_s"), started, step + 1 - first_step)
                )
            if every and (step + 1) % every == 0 and step + 1 < steps:
                self.save_checkpoint("sft", step + 1, sampler.state_dict())
        self._sft_end_sampler = sampler.state_dict()
        return steps

    # --- stage 2 -------------------------------------------------------------------------

    def grpo(self, first_step: int = 0, sampler_state: dict | None = None) -> int:
        """Stage 2: GRPO over the training set."""
        c = self.config.grpo
        sampler = EpochSampler(self.train_records, self.config.run.seed + 2)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
        if first_step == 0:
            self.tracker.say(
                f"stage 2: GRPO, {c.steps} steps of {c.prompts_per_step} prompts x {c.group_size} completions "
                f"({'one-step off-policy' if c.off_policy_steps else 'on-policy'})"
            )
            # the reference is saved for a resume; without checkpoints (keep 0) there is none
            reference = str(self.ckpt.reference_path) if self.config.checkpoint.keep else None
            self.learners.begin_stage("grpo", c.beta, reference, c.weight_decay)
        use_engine_logprobs = c.off_policy_steps > 0 or c.updates_per_batch > 1
        started = time.monotonic()
        every = self.config.checkpoint.every_steps

        def launch(step: int) -> PendingStep:
            """Start generation + scoring of a step's prompts; remembers where the data stood."""
            before = sampler.state_dict()
            tagged = sampler.take_tagged(c.prompts_per_step)
            params = self._sampling_params(seed=self.config.run.seed * 100_003 + step)
            return PendingStep(self.rollout.submit([r for _, r in tagged], params, self.rewards), tagged, before)

        pending = launch(first_step)
        for step in range(first_step, c.steps):
            interrupts.check()
            t0 = time.monotonic()
            current = pending
            groups, scores = self.rollout.collect(current.jobs, self.rewards)
            t_gen, t_reward = self.rollout.last_wait["rollout"], self.rollout.last_wait["reward"]
            t_refill = time.monotonic()
            drawn = current.tagged
            epochs = {id(g): epoch for g, (epoch, _) in zip(groups, drawn, strict=True)}  # collect keeps the draw order
            groups, scores, dropped, rounds = self._dynamic_sampling(groups, scores, step) if c.dynamic_sampling else (groups, scores, [], 0)
            # the refill rounds generate (and score) too: their time counts as rollout
            t_refill = time.monotonic() - t_refill
            t_gen += t_refill
            next_sampler_state: dict[str, int] | None = sampler.state_dict()
            if c.off_policy_steps and step + 1 < c.steps:
                next_sampler_state = None  # taken by the prefetch below
                pending = launch(step + 1)  # overlaps with the update below, on the current weights

            samples = grpo_samples(groups, scores, c.group_size, c.advantage, c.advantage_eps)
            t1 = time.monotonic()
            metrics = self._learn(samples, constant_lr(step, c.lr, c.warmup_steps), use_engine_logprobs)
            t_learn = time.monotonic() - t1
            self._ledger("grpo", step + 1, [(epochs.get(id(g)), g.record) for g in groups], [(epochs.get(id(g)), g.record) for g in dropped])
            t_sync = self.sync_weights()
            if every and (step + 1) % every == 0 and step + 1 < c.steps:
                # the data position before the next step's prompts were taken
                self.save_checkpoint("grpo", step + 1, next_sampler_state or pending.sampler_before)
            if not c.off_policy_steps and step + 1 < c.steps:
                pending = launch(step + 1)

            seconds = {"step": time.monotonic() - t0, "rollout": t_gen, "reward": t_reward, "learner": t_learn, "sync": t_sync, "resample": t_refill}
            metrics.update(self._step_metrics(groups, scores, len(samples), metrics.get("perf/tokens", 0.0), seconds))
            metrics.update({"rollout/dropped_groups": len(dropped), "rollout/resample_rounds": rounds})
            self.tracker.log("grpo", step + 1, metrics)
            if (step + 1) % max(1, c.steps // 25) == 0 or step + 1 == c.steps:
                self.tracker.say(
                    progress_line(
                        "grpo",
                        step + 1,
                        c.steps,
                        metrics,
                        ("reward/total", "rollout/accuracy", "loss/kl", "perf/step_s"),
                        started,
                        step + 1 - first_step,
                    )
                )
            every_eval = self.config.eval.every_steps
            if every_eval and (step + 1) % every_eval == 0 and step + 1 < c.steps:
                self.evaluate(f"step-{step + 1:06d}")
        # the final state is resumable too: a later run may continue with more steps
        self.save_checkpoint("grpo", c.steps, sampler.state_dict())
        return c.steps

    def _learn(self, samples: list, lr: float, use_engine_logprobs: bool) -> dict:
        """`grpo.updates_per_batch` optimizer steps on one batch; the last one's metrics."""
        c = self.config.grpo
        metrics: dict = {}
        for _ in range(c.updates_per_batch):
            metrics = self.learners.grpo_step(
                samples,
                c.micro_batch_size,
                lr,
                eps_low=c.eps_low,
                eps_high=c.eps_high,
                beta=c.beta,
                kl_estimator=c.kl_estimator,
                loss_agg=c.loss_agg,
                use_engine_logprobs=use_engine_logprobs,
            )
        return metrics

    def _step_metrics(
        self, groups: Sequence[Group], scores: Sequence[Sequence[dict]], n_samples: int, tokens: float, seconds: dict[str, float]
    ) -> dict:
        """A GRPO step's rollout, reward and timing metrics (`seconds`: the step's parts, `step` the whole)."""
        step_s = seconds["step"]
        out = self._rollout_metrics(groups, scores)
        out.update({f"perf/{part}_s": s for part, s in seconds.items()})
        out.update(
            {
                "perf/sync_mb": self.last_sync_bytes / 2**20,
                "perf/sync_mb_per_s": self.last_sync_bytes / 2**20 / max(seconds["sync"], 1e-9),
                "perf/samples_per_s": n_samples / step_s,
                "perf/tokens_per_s": tokens / step_s,
                "rollout/worker_restarts": self.rollout.restarts,
                "reward/rescored": self.rewards.restarts,
                "rollout/weight_version_lag": self.version - 1 - min(c.weight_version for g in groups for c in g.completions),
            }
        )
        if self.config.sync.verify:
            out.update({"perf/sync_verified_tensors": self.last_verified, "perf/sync_verify_s": self.last_verify_s})
        return out

    def _rollout_metrics(self, groups: Sequence[Group], scores: Sequence[Sequence[dict]]) -> dict:
        from alphadrive_ray.rewards import parse_plan

        flat = [s for group in scores for s in group]
        out = {f"reward/{k}": sum(s[k] for s in flat) / len(flat) for k in flat[0]}
        # the spread over the step's completions (population standard deviation), for the run report
        out.update({f"reward/{k}_std": math.sqrt(sum((s[k] - out[f"reward/{k}"]) ** 2 for s in flat) / len(flat)) for k in flat[0]})
        right = lengths = 0
        stops = 0
        for group in groups:
            for completion in group.completions:
                speed, path = parse_plan(completion.text)
                right += speed == group.record.speed_action and path == group.record.path_action
                lengths += len(completion.token_ids)
                stops += completion.finish_reason == "stop"
        n = sum(len(g.completions) for g in groups)
        # groups whose rewards all agree teach nothing (zero advantage); DAPO drops them
        out["rollout/uniform_groups"] = sum(map(uniform_group, scores)) / len(scores)
        out["rollout/accuracy"] = right / n
        out["rollout/response_len"] = lengths / n
        out["rollout/stop_rate"] = stops / n
        return out

    def _sampling_params(self, seed: int) -> SamplingParams:
        """How GRPO samples a group: G completions per prompt at the rollout's settings."""
        r = self.config.rollout
        return SamplingParams(n=self.config.grpo.group_size, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=seed)

    def _dynamic_sampling(self, groups, scores, step):
        """DAPO: keep groups whose rewards differ; top up with fresh groups; whole groups only.

        Returns the groups kept, their scores, the groups generated but not kept (uniform,
        beyond `prompts_per_step`, or left over so that the learners get equal shares) and
        the refill rounds. When no group is kept, the drawn ones are (zero advantage).
        """
        c = self.config.grpo
        keep, dropped = [], []
        for g, s in zip(groups, scores):
            (dropped if uniform_group(s) else keep).append((g, s))
        rounds = 0
        sampler = EpochSampler(self.train_records, self.config.run.seed * 7 + step)
        while len(keep) < c.prompts_per_step and rounds < c.max_resample_rounds:
            rounds += 1
            params = self._sampling_params(seed=self.config.run.seed * 100_003 + step + 1_000_000 * rounds)
            more = self.rollout.generate(sampler.take(c.prompts_per_step - len(keep) + self.config.rollout.num_workers - 1), params)
            more_scores = self.rewards.score(more)
            for g, s in zip(more, more_scores):
                (dropped if uniform_group(s) else keep).append((g, s))
        dropped += keep[c.prompts_per_step :]
        keep = keep[: c.prompts_per_step]
        # the learners need whole groups that split evenly over the ranks
        k = self.config.learner.num_workers
        while keep and (len(keep) * c.group_size) % k:
            dropped.append(keep.pop())
        if not keep:
            keep = list(zip(groups, scores))
            dropped = [(g, s) for g, s in dropped if all(g is not drawn for drawn in groups)]
        return [g for g, _ in keep], [s for _, s in keep], [g for g, _ in dropped], rounds


def compare_stages(correct: dict[str, list[bool]]) -> dict[str, dict]:
    """Paired comparisons of consecutive stages on the held-out scenes (untrained -> sft -> final):
    `later_vs_earlier` -> fixed, broken, delta and the one-sided exact McNemar p-value."""
    from alphadrive_ray.evaluation.metrics import compare_paired

    order = [tag for tag in ("untrained", "sft", "final") if tag in correct]
    return {f"{b}_vs_{a}": compare_paired(correct[a], correct[b]) for a, b in zip(order, order[1:])}


def write_run_report(run_dir: Path, say=print) -> None:
    """The run's one-page HTML report (`alphadrive-ray report`); a failure to write it is said, not raised:
    the run's results are on disk already and `alphadrive-ray report RUN_DIR` can try again."""
    from alphadrive_ray.run_report import write_run_report as write

    try:
        say(f"run report: {write(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded
        say(f"could not write the run report ({type(exc).__name__}: {exc}); retry with `alphadrive-ray report {run_dir}`")


def uniform_group(scores: Sequence[dict]) -> bool:
    """Every completion of the group has the same total reward: zero advantage, nothing to learn."""
    return len({round(s["total"], 9) for s in scores}) == 1


def stage_labels(config: Config) -> dict[str, str]:
    """How the summary names the accuracies it reports, given which stages the run had."""
    sft = config.sft.enabled and config.sft.samples > 0
    grpo = config.grpo.enabled and config.grpo.steps > 0
    final = {(True, True): "after SFT + GRPO", (True, False): "final (SFT only)", (False, True): "after GRPO"}.get((sft, grpo), "final (no training)")
    return {"untrained": "base model (zero-shot)" if config.model.init_tiny else "starting model", "sft": "after SFT warm-up", "final": final}


def train(config: Config, resume: bool = False) -> RunSummary:
    """Run both stages end to end (or continue from the latest checkpoint with `resume`);
    returns the summary written to run_dir/summary.json."""
    run_dir = prepare_run_dir(config, resume)
    if resume:
        CheckpointManager(run_dir).check_resumable(config.grpo.beta)  # before any actor starts
    tracker = Tracker(run_dir)
    trainer: Trainer | None = None  # its actors are stopped when the run ends, however it ends
    summary = RunSummary(run_dir=str(run_dir))
    t_start = time.monotonic()
    try:
        if config.tracking.wandb.mode != "disabled":
            from alphadrive_ray.tracking import WandbSink

            sink = WandbSink(run_dir, config.tracking.wandb, config.run.name, config.to_dict(), resume=resume)
            tracker.add_sink(sink)
            tracker.say(f"W&B run {sink.run.id} ({config.tracking.wandb.mode}) in {sink.folder}")
        from alphadrive_ray.models.loading import ensure_model

        ensure_model(config.model.path, config.model.init_tiny)
        train_records, eval_records = prepare_data(config, tracker.say)
        tracker.say(f"data: {len(train_records)} train / {len(eval_records)} held-out records; run directory {run_dir}")
        connect_ray(config, tracker.say)
        tracker.add_sink(RayMetricsSink(config.run.name))
        trainer = Trainer(config, train_records, eval_records, run_dir, tracker)
        summary.seconds["startup"] = round(time.monotonic() - t_start, 1)
        state = trainer.restore() if resume else None
        stage, step, sampler_state = ("sft", 0, None) if state is None else (state.stage, state.step, state.samplers.get(state.stage))

        if config.eval.baseline and "untrained" not in trainer.accuracy:
            trainer.accuracy["untrained"] = trainer.evaluate("untrained")["planning"]["accuracy"]
        if config.sft.enabled and stage == "sft":
            t0 = time.monotonic()
            summary.sft_steps = trainer.sft(step, sampler_state)
            trainer.sync_weights()
            summary.seconds["sft"] = round(time.monotonic() - t0, 1)
            if config.checkpoint.export_sft:
                tracker.say(f"exported the SFT-only policy to {trainer.learners.save_hf(str(run_dir / 'export-sft'))}")
            if config.eval.baseline and "sft" not in trainer.accuracy:
                trainer.accuracy["sft"] = trainer.evaluate("sft")["planning"]["accuracy"]
            stage, step, sampler_state = "grpo", 0, None
            if config.grpo.enabled and config.grpo.steps > 0:
                trainer.save_checkpoint("sft", summary.sft_steps, trainer._sft_end_sampler)
        if config.grpo.enabled and config.grpo.steps > 0:
            t0 = time.monotonic()
            summary.grpo_steps = trainer.grpo(step, sampler_state)
            summary.seconds["grpo"] = round(time.monotonic() - t0, 1)

        predictions = trainer.predict()
        trainer.accuracy["final"] = trainer.planning_accuracy(predictions)
        summary.accuracy = dict(trainer.accuracy)
        stages = stage_labels(config)
        extra = {"Planning accuracy by stage (held-out split)": [{"stage": stages[k], "accuracy": round(v, 4)} for k, v in summary.accuracy.items()]}
        trainer.evaluate("final", predictions, extra)
        summary.ceiling = trainer.ceiling
        summary.comparisons = compare_stages(trainer.correct)
        if summary.comparisons:
            (run_dir / "eval" / "comparisons.json").write_text(json.dumps(summary.comparisons, indent=2) + "\n")
        if config.checkpoint.export_hf:
            summary.export_dir = trainer.learners.save_hf(str(run_dir / "export"))
            tracker.say(f"exported the policy in Hugging Face format to {summary.export_dir}")
        summary.peak_memory_mb = trainer.peak_memory_mb()
        summary.peak_gpu_mb = trainer.peak_memory_mb("gpu")
        summary.seconds["total"] = round(time.monotonic() - t_start, 1)
        (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        write_run_report(run_dir, say=tracker.say)
        return summary
    except RunAborted as exc:
        latest = CheckpointManager(run_dir).latest()
        where = f"resume from checkpoint {latest.name} with --resume" if latest else "no checkpoint was written yet; rerun from the start"
        raise RunAborted(f"{exc}\nThe run stopped. {where}.") from None
    finally:
        if trainer is not None:
            trainer.shutdown()
        tracker.close()
