"""Living with long runs: exact resume from checkpoints, and dead workers that come back.

- a run interrupted (Ctrl-C) after a checkpoint and resumed with --resume produces losses
  and final weights bit-identical to an uninterrupted run;
- a crash while a checkpoint is written never breaks the latest good one;
- SIGKILLed rollout and reward workers are restarted by Ray, their work is redone, and the
  ledger shows every prompt of an epoch trained exactly once;
- a dead learner stops the run cleanly, naming the checkpoint to resume from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from alphadrive_ray.data.records import load_records

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(work: Path, model_dir: str, name: str, grpo_steps: int) -> list[str]:
    return [
        f"run.name={name}",
        f"run.output_dir={work / 'runs'}",
        f"model.path={model_dir}",
        "model.init_tiny=false",  # the tests' tiny model as it is (the demo's base takes minutes to build)
        f"data.train={work / 'train' / 'data.jsonl'}",
        f"data.eval={work / 'eval' / 'data.jsonl'}",
        "data.synth_train.n=16",
        "data.synth_train.reasoning_share=1.0",  # SFT's 16 samples need 16 scenes with reasoning
        "data.synth_train.size=96",
        "data.synth_eval.n=4",
        "data.synth_eval.size=96",
        "sft.samples=16",
        "sft.batch_size=8",
        "sft.micro_batch_size=4",
        "sft.epochs=1",
        f"grpo.steps={grpo_steps}",
        "grpo.prompts_per_step=4",
        "grpo.group_size=4",
        "grpo.micro_batch_size=8",
        "grpo.beta=0.04",
        "grpo.lr=1e-3",
        "rollout.num_workers=2",
        "rollout.max_new_tokens=12",
        "reward.num_workers=2",
        "learner.num_workers=2",
        "learner.cpus_per_worker=1",
        "eval.samples=4",
        "eval.baseline=false",
        "eval.reasoning_metrics=false",
        "checkpoint.every_steps=1",
        "checkpoint.keep=3",
    ]


def cli(work: Path, overrides: list[str], *extra: str) -> list[str]:
    args = [sys.executable, "-m", "alphadrive_ray.train", str(REPO / "jobs" / "quickstart_cpu.yaml"), *extra]
    for item in overrides:
        args += ["--set", item]
    return args


def env():
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop("RAY_ADDRESS", None)
    return e


def grpo_step_of(name: str) -> int:
    """'grpo-000002' -> 2; checkpoints of the SFT stage count as GRPO step 0."""
    return int(name.split("-")[1]) if name.startswith("grpo-") else 0


def grpo_losses(run_dir: Path) -> dict[int, float]:
    """Policy loss per GRPO step; a step logged twice (interrupted, then redone) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["stage"] == "grpo":
            out[row["step"]] = row["loss/policy"]
    return out


def export_state(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "export" / "model.safetensors")


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, tiny_vl_dir):
    # the uninterrupted reference
    ref = subprocess.run(cli(tmp_path, tiny_overrides(tmp_path, tiny_vl_dir, "straight", 6)), env=env(), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    # the same run, interrupted with Ctrl-C once the checkpoint of GRPO step 2 exists
    overrides = tiny_overrides(tmp_path, tiny_vl_dir, "interrupted", 6)
    proc = subprocess.Popen(cli(tmp_path, overrides), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "runs" / "interrupted" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and grpo_step_of(latest.read_text().strip()) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the run was expected to be interrupted:\n" + out[-3000:]
    resumed_from = latest.read_text().strip()
    assert 2 <= grpo_step_of(resumed_from) <= 3, f"interrupted too late to check 3 steps after the resume ({resumed_from})"

    resumed = subprocess.run(cli(tmp_path, overrides, "--resume"), env=env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {resumed_from}" in resumed.stdout

    a, b = grpo_losses(tmp_path / "runs" / "straight"), grpo_losses(tmp_path / "runs" / "interrupted")
    first = grpo_step_of(resumed_from) + 1
    assert len(range(first, 7)) >= 3
    for step in range(first, 7):
        assert a[step] == b[step], f"GRPO step {step}: {a[step]!r} != {b[step]!r}"
    wa, wb = export_state(tmp_path / "runs" / "straight"), export_state(tmp_path / "runs" / "interrupted")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.slow
def test_resume_on_fewer_learners_agrees_with_an_unchanged_resume(tmp_path, tiny_vl_dir):
    # 2 learners (ZeRO-2) write a checkpoint after every GRPO step; from the one of step 1, the
    # run is resumed on 1 learner (the checkpoint is re-sharded). An unchanged resume is exact
    # (test_interrupted_and_resumed_run_is_bit_identical), so the first run's own steps 2 and 3
    # are what it would give.
    overrides = tiny_overrides(tmp_path, tiny_vl_dir, "two", 3) + ["grpo.dynamic_sampling=false", "eval.baseline=false"]
    first = subprocess.run(cli(tmp_path, overrides), env=env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = tmp_path / "runs"
    shutil.copytree(runs / "two", runs / "fewer", ignore=shutil.ignore_patterns("export"))  # the resumed run writes its own
    (runs / "fewer" / "checkpoints" / "latest").write_text("grpo-000001\n")
    run_overrides = [o for o in overrides if not o.startswith(("run.name=", "learner.num_workers="))]
    run_overrides += ["run.name=fewer", "learner.num_workers=1"]
    proc = subprocess.run(cli(tmp_path, run_overrides, "--resume"), env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "re-sharding it for 1 with ZeRO-2" in proc.stdout and "re-sharding" not in first.stdout
    two, fewer = grpo_losses(runs / "two"), grpo_losses(runs / "fewer")
    logged = [json.loads(line) for line in (runs / "fewer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["stage"] == "grpo"] == [1, 2, 3, 2, 3]  # the copy's three, then the resumed two
    for step in (2, 3):
        assert fewer[step] == pytest.approx(two[step], rel=1e-5, abs=1e-7), f"GRPO step {step}"
    wa, wb = export_state(runs / "two"), export_state(runs / "fewer")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)

    # `alphadrive-ray export` of the final checkpoint (2 learners) equals the run's own export
    out = tmp_path / "exported"
    done = subprocess.run(
        [sys.executable, "-m", "alphadrive_ray", "export", str(runs / "two"), str(out)], env=env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    exported, own = load_file(out / "model.safetensors"), export_state(runs / "two")
    assert exported.keys() == own.keys() and all(torch.equal(exported[k], own[k]) for k in own)


def test_crash_while_writing_keeps_the_latest_checkpoint(tmp_path):
    from alphadrive_ray.train.checkpoint import CheckpointManager, TrainerState

    manager = CheckpointManager(tmp_path, keep=2)
    state = TrainerState("grpo", 1, 2, {"grpo": {"epoch": 0, "position": 4}}, {})
    tmp = manager.begin("grpo", 1)
    (tmp / "learner").mkdir()
    good = manager.commit(tmp, state)
    assert manager.latest() == good
    # a crash mid-write: the temporary folder exists, half written; `latest` is untouched
    crashed = manager.begin("grpo", 2)
    (crashed / "learner").mkdir()
    (crashed / "learner" / "partial.pt").write_bytes(b"\x00" * 10)
    assert manager.latest() == good and manager.load_state(good).step == 1
    # the next save clears the debris; retention keeps the newest `keep`
    for step in (2, 3, 4):
        manager.commit(manager.begin("grpo", step), TrainerState("grpo", step, step + 1, {}, {}))
    names = sorted(p.name for p in manager.root.iterdir() if p.is_dir())
    assert names == ["grpo-000003", "grpo-000004"]
    assert manager.latest().name == "grpo-000004"


def test_trainer_state_holds_only_what_a_resume_restores(tmp_path):
    # The driver draws from no global RNG, so no RNG state is saved (it used to save 4 of
    # numpy's 624 state words and never restore them). Learner ranks keep their torch RNG.
    import dataclasses

    from alphadrive_ray.train.checkpoint import CheckpointManager, TrainerState

    assert {f.name for f in dataclasses.fields(TrainerState)} == {"stage", "step", "version", "samplers", "accuracy"}
    # a checkpoint written by an earlier version (with its `rng` entry) still loads
    manager = CheckpointManager(tmp_path)
    old = manager.root / "grpo-000003"
    old.mkdir(parents=True)
    (old / "trainer.json").write_text(
        json.dumps({"stage": "grpo", "step": 3, "version": 4, "samplers": {}, "accuracy": {}, "rng": {"python": "(3, ())"}})
    )
    assert manager.load_state(old) == TrainerState("grpo", 3, 4, {}, {})


def test_pruning_orders_by_stage_and_step_not_by_file_times(tmp_path):
    from alphadrive_ray.train.checkpoint import CheckpointManager, TrainerState

    manager = CheckpointManager(tmp_path, keep=2)
    # file times that say the opposite of the run order (a copied or restored run folder)
    for age, (stage, step) in enumerate([("sft", 375), ("grpo", 9), ("grpo", 10)]):
        folder = manager.begin(stage, step)
        final = manager.commit(folder, TrainerState(stage, step, 1, {}, {}))
        os.utime(final, (1e9 - age * 1000, 1e9 - age * 1000))
    names = sorted(p.name for p in manager.root.iterdir() if p.is_dir())
    assert names == ["grpo-000009", "grpo-000010"]
    manager.commit(manager.begin("grpo", 11), TrainerState("grpo", 11, 1, {}, {}))
    assert sorted(p.name for p in manager.root.iterdir() if p.is_dir()) == ["grpo-000010", "grpo-000011"]


@pytest.mark.parametrize(
    "stage, beta, reference, refused",
    [
        ("grpo", 0.04, False, True),  # the case of the bug: the reference would be rebuilt from model.path
        ("grpo", 0.04, True, False),
        ("grpo", 0.0, False, False),  # no KL term, no reference
        ("sft", 0.04, False, False),  # GRPO has not started: its reference is taken when it does
    ],
)
def test_resuming_grpo_without_its_kl_reference_is_refused(tmp_path, stage, beta, reference, refused):
    from alphadrive_ray.train.checkpoint import CheckpointManager, TrainerState
    from alphadrive_ray.errors import UserError

    manager = CheckpointManager(tmp_path)
    manager.commit(manager.begin(stage, 3), TrainerState(stage, 3, 4, {}, {}))
    if reference:
        manager.reference_path.write_bytes(b"")
    if refused:
        with pytest.raises(UserError, match="reference.safetensors is missing"):
            manager.check_resumable(beta)
    else:
        manager.check_resumable(beta)


def test_resume_without_the_kl_reference_stops_before_starting_anything(tmp_path):
    from alphadrive_ray.train.checkpoint import CheckpointManager, TrainerState

    # no model, data or learner state is needed: the run must stop before it looks for them
    overrides = tiny_overrides(tmp_path, str(tmp_path / "model"), "no-reference", 4)
    manager = CheckpointManager(tmp_path / "runs" / "no-reference")
    manager.commit(manager.begin("grpo", 2), TrainerState("grpo", 2, 3, {"grpo": {"epoch": 0, "position": 8}}, {}))
    proc = subprocess.run(cli(tmp_path, overrides, "--resume"), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "reference.safetensors is missing" in proc.stderr and "grpo-000002" in proc.stderr
    assert "Traceback" not in proc.stderr and "starting a local Ray cluster" not in proc.stdout


def test_resume_without_checkpoints_is_a_clear_error(tmp_path, tiny_vl_dir):
    proc = subprocess.run(
        cli(tmp_path, tiny_overrides(tmp_path, tiny_vl_dir, "never", 2), "--resume"), env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "no checkpoints" in proc.stderr and "Traceback" not in proc.stderr


def _kill_one(ray, role: str) -> tuple[str, int]:
    names = sorted(n for n in ray.util.list_named_actors() if n.startswith(f"alphadrive-{role}-"))
    assert names, f"no {role} actors found"
    pid = ray.get(ray.get_actor(names[0]).pid.remote())
    os.kill(pid, signal.SIGKILL)
    return names[0], pid


@pytest.mark.slow
def test_killed_rollout_and_reward_workers_are_replaced(ray_cluster, tmp_path, tiny_vl_dir):
    import ray

    from alphadrive_ray.config import load_config
    from alphadrive_ray.train.trainer import train

    overrides = tiny_overrides(tmp_path, tiny_vl_dir, "faults", 8)  # 8 steps x 4 prompts = 2 epochs of 16
    overrides = [o for o in overrides if not o.startswith("checkpoint.")] + ["checkpoint.export_hf=false"]
    config = load_config(REPO / "jobs" / "quickstart_cpu.yaml", overrides)

    def live_groups() -> set:
        return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}

    before = live_groups()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", train(config)), daemon=True)
    thread.start()
    metrics = config.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    killed = []
    while time.monotonic() < deadline and thread.is_alive():
        if metrics.exists() and any(json.loads(line)["stage"] == "grpo" for line in metrics.read_text().splitlines()):
            # step 2's generation and scoring are in flight now
            killed = [_kill_one(ray, "rollout"), _kill_one(ray, "reward")]
            # Ray restarts both in new processes (the calls below wait for the restarts)
            from alphadrive_ray.workers.group import wait_alive

            for name, old_pid in killed:
                actor = ray.get_actor(name)
                wait_alive(actor)
                assert ray.get(actor.pid.remote()) != old_pid
            break
        time.sleep(0.1)
    assert killed, "the run never reached GRPO"
    thread.join(timeout=900)
    assert "summary" in result, "training did not finish"
    # the run gave its actors' resources back: a second run in this process finds them free
    assert live_groups() == before
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == list(range(1, 9))
    # the lost generation was redone
    assert grpo[-1]["rollout/worker_restarts"] >= 1

    # the quickstart samples dynamically: the ledger lists the groups trained (refills with
    # epoch null) and those dropped; each prompt of the data order is drawn once per epoch
    assert config.grpo.dynamic_sampling
    ledger = [json.loads(line) for line in (config.run_dir / "ledger.jsonl").read_text().splitlines()]
    rows = [row for row in ledger if row["stage"] == "grpo"]
    drawn = [tuple(item) for row in rows for item in row["items"] + row["dropped"] if item[0] is not None]
    per_epoch = Counter(drawn)
    ids = {r.id for r in __import__("alphadrive_ray.data.records", fromlist=["x"]).load_records(config.data.train)}
    for epoch in (0, 1):
        assert {rid for (e, rid) in per_epoch if e == epoch} == ids, f"epoch {epoch} misses prompts"
    assert set(per_epoch.values()) == {1}, "a prompt was drawn twice in one epoch"
    for row, metric in zip(rows, grpo):
        assert len(row["dropped"]) == metric["rollout/dropped_groups"]
        refills = [rid for e, rid in row["items"] if e is None]
        assert not refills or metric["rollout/resample_rounds"] > 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


@pytest.mark.slow
def test_dead_learner_stops_cleanly_with_a_resumable_checkpoint(tmp_path, tiny_vl_dir):

    overrides = tiny_overrides(tmp_path, tiny_vl_dir, "learner-dies", 30)
    proc = subprocess.Popen(cli(tmp_path, overrides), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "runs" / "learner-dies" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not (latest.exists() and "grpo" in latest.read_text()):
        time.sleep(0.2)
    # the run's learners are descendants of its driver (through the raylet it started)
    pids = [pid for pid in _descendants(proc.pid) if "LearnerWorker" in _cmdline(pid)]
    assert pids, "no learner process found"
    os.kill(pids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert "a learner worker died" in err and "--resume" in err and "Traceback" not in err
    assert latest.exists()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def drawn_per_step(ledger: list[dict]) -> dict[int, list]:
    """GRPO step -> the prompts drawn from the data order for it (trained or dropped)."""
    return {
        row["step"]: sorted(tuple(item) for item in row["items"] + row["dropped"] if item[0] is not None) for row in ledger if row["stage"] == "grpo"
    }


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two training runs
def test_off_policy_run_with_several_updates_evaluates_and_resumes_in_the_middle(tmp_path, tiny_vl_dir):
    """grpo.off_policy_steps: 1 (step t+1 is generated while the learners update on step t),
    2 updates per batch, an evaluation every 2 steps, a checkpoint every step; then a resume
    from the checkpoint of step 2, written while step 3's generation was in flight."""
    overrides = [o for o in tiny_overrides(tmp_path, tiny_vl_dir, "off-policy", 4) if not o.startswith("checkpoint.keep")]
    overrides += ["sft.enabled=false", "grpo.off_policy_steps=1", "grpo.updates_per_batch=2", "eval.every_steps=2", "checkpoint.keep=4"]
    # without dynamic sampling: its refills are generated on the newest weights (lag 0)
    overrides += ["grpo.dynamic_sampling=false"]
    first = subprocess.run(cli(tmp_path, overrides), env=env(), capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "off-policy"
    grpo = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2, 3, 4]
    # step 1 was generated on the starting weights; each later one before the previous update
    assert [r["rollout/weight_version_lag"] for r in grpo] == [0, 1, 1, 1]
    # (that the second update of a batch sees the first one's change: tests/test_learner.py)
    assert all(math.isfinite(row[k]) for row in grpo for k in ("loss/policy", "loss/ratio_mean", "rollout/logp_diff"))
    # eval.every_steps: 2 -> after step 2 (not after 4: the final evaluation follows)
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "eval"]
    assert len(evals) == 2 and (run_dir / "eval" / "step-000002" / "metrics.json").is_file()
    assert not (run_dir / "eval" / "step-000004").exists() and (run_dir / "eval" / "final" / "metrics.json").is_file()
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    drawn = drawn_per_step(ledger)
    ids = {r.id for r in load_records(tmp_path / "train" / "data.jsonl")}
    assert sorted(rid for step in drawn.values() for _, rid in step) == sorted(ids)  # 4 x 4 prompts: one epoch

    # resume from step 2: the prompts of step 3 had been taken by the prefetch when it was written
    (run_dir / "checkpoints" / "latest").write_text("grpo-000002\n")
    resumed = subprocess.run(cli(tmp_path, overrides, "--resume"), env=env(), capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from grpo-000002" in resumed.stdout
    again = read_jsonl(run_dir / "ledger.jsonl")[len(ledger) :]
    assert drawn_per_step(again) == {3: drawn[3], 4: drawn[4]}  # the same data position: nothing skipped or repeated
    after = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "grpo"][len(grpo) :]
    # documented: the prefetched batch is generated again on the checkpoint's weights (lag 0)
    assert [r["step"] for r in after] == [3, 4] and [r["rollout/weight_version_lag"] for r in after] == [0, 1]
