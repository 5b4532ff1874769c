"""Distributed invariants on CPU with real Ray actors and real DeepSpeed learners.

- data parallelism does not change the update: 2 ranks (ZeRO-2, ZeRO-3) == 1 rank;
- gradient accumulation does not change it: micro-batch 1 x 4 == micro-batch 4 x 1;
- ZeRO-2 ranks hold bit-identical weights;
- after a sync the engines hold exactly the learner's weights and their outputs change, and
  `sync.verify` says so (and names a tensor an engine holds with other bits);
- groups are never split across rollout workers; the reward pool equals serial scoring.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from alphadrive_ray import weight_sync
from alphadrive_ray.engines.base import SamplingParams
from alphadrive_ray.errors import RunAborted
from tests.conftest import TEST_PROMPT

LR = 1e-4


def learner_spec(model_dir, zero_stage):
    from alphadrive_ray.workers.learner import LearnerSpec

    return LearnerSpec(model_path=model_dir, prompt_template=TEST_PROMPT, zero_stage=zero_stage, backend="gloo", cpus=1, seed=0)


def sft_batches(records):
    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.workers.learner import SFTExample

    examples = [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in records[:8]]
    return [examples[:4], examples[4:8]]


def grpo_samples(records, vocab_size):
    from alphadrive_ray.workers.learner import GRPOSample

    rng = random.Random(0)
    return [
        GRPOSample(records[i // 2], [rng.randrange(100, vocab_size) for _ in range(rng.randrange(3, 9))], [], rng.uniform(-1, 1)) for i in range(8)
    ]


def run_steps(group, records, micro):
    """Two SFT steps and one GRPO step; returns the per-step metrics."""
    out = []
    group.begin_stage("sft")
    for batch in sft_batches(records):
        out.append(group.sft_step(batch, micro, LR))
    group.begin_stage("grpo", 0.0)
    out.append(
        group.grpo_step(
            grpo_samples(records, 600),
            micro,
            LR,
            eps_low=0.2,
            eps_high=0.2,
            beta=0.0,
            kl_estimator="k3",
            loss_agg="token_mean",
            use_engine_logprobs=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_vl_dir, scenes):
    """The same steps under four layouts, run concurrently: {name: (metrics, state dicts per rank)}."""

    from alphadrive_ray.workers.group import LearnerGroup, Resources

    layouts = {
        "1 rank, micro 4": (1, 2, 4),
        "1 rank, micro 1": (1, 2, 1),
        "2 ranks ZeRO-2": (2, 2, 2),
        "2 ranks ZeRO-3": (2, 3, 2),
    }
    groups = {name: LearnerGroup.start(learner_spec(tiny_vl_dir, z), n, Resources(cpus=1)) for name, (n, z, _) in layouts.items()}
    results = {}
    for name, group in groups.items():
        metrics = run_steps(group, scenes, layouts[name][2])
        states = [s for s in group._all("state_dict_cpu")]
        results[name] = (metrics, states)
    for group in groups.values():
        group.shutdown()
    return results


def assert_same_update(a, b):
    """Adam turns the first steps into ~lr * sign(g): entries whose gradient is ~0 may differ by 2 lr."""
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max().item() <= 2 * 3 * LR + 1e-6
    assert diffs.median().item() <= 1e-6


@pytest.mark.parametrize("name", ["1 rank, micro 1", "2 ranks ZeRO-2", "2 ranks ZeRO-3"])
def test_layouts_give_the_same_losses_gradients_and_weights(trained, name):
    ref_metrics, ref_states = trained["1 rank, micro 4"]
    metrics, states = trained[name]
    for ref, got in zip(ref_metrics, metrics):
        loss_key = "loss/sft" if "loss/sft" in ref else "loss/policy"
        # per-rank micro-batch losses add up to the global-batch loss
        assert got[loss_key] == pytest.approx(ref[loss_key], rel=1e-5, abs=1e-7)
        # the global gradient is the same (its norm, over every parameter)
        assert got["perf/grad_norm"] == pytest.approx(ref["perf/grad_norm"], rel=1e-4)
        assert got["perf/tokens"] == ref["perf/tokens"]
    assert_same_update(ref_states[0], states[0])


def test_zero2_ranks_stay_bit_identical(trained):
    _, (rank0, rank1) = trained["2 ranks ZeRO-2"]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_training_moved_the_weights(trained, tiny_vl_dir):
    from alphadrive_ray.models.loading import load_model

    initial = dict(load_model(tiny_vl_dir).named_parameters())
    _, (state,) = trained["1 rank, micro 4"]
    moved = sum(not torch.equal(initial[n].detach(), state[n]) for n in state)
    assert moved > len(state) * 0.9


def test_sync_puts_the_learner_weights_into_every_engine(ray_cluster, tiny_vl_dir, scenes):
    import ray

    from alphadrive_ray.workers.group import LearnerGroup, Resources, RolloutGroup
    from alphadrive_ray.workers.rollout import RolloutSpec

    learners = LearnerGroup.start(learner_spec(tiny_vl_dir, 3), 2, Resources(cpus=1))
    rollout = RolloutGroup.start(RolloutSpec(model_path=tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=16), 2, Resources(cpus=1))
    try:
        greedy = SamplingParams(n=1, max_new_tokens=8, greedy=True)
        before = rollout.generate(scenes[:4], greedy)
        learners.begin_stage("sft")
        for batch in sft_batches(scenes):
            learners.sft_step(batch, 4, 1e-2)  # a large step, so that greedy outputs must change
        bucket_refs = learners.export_weights(bucket_mb=1)  # small buckets: several of them
        assert len(bucket_refs) > 1
        assert rollout.load_weights(bucket_refs, version=1) == [len(ray.get(rollout.actors[0].get_weights.remote()))] * 2
        learner_state = learners.state_dict_cpu()
        for actor in rollout.actors:
            engine_state = ray.get(actor.get_weights.remote())
            for name, tensor in learner_state.items():
                assert torch.equal(engine_state[name], tensor), name
            assert ray.get(actor.weight_version.remote()) == 1
        after = rollout.generate(scenes[:4], greedy)
        assert [g.completions[0].token_ids for g in after] != [g.completions[0].token_ids for g in before]
        assert {c.weight_version for g in after for c in g.completions} == {1}

        # sync.verify's check agrees, and names the one tensor an engine holds with other bits
        assert rollout.verify_weights(learners, 1) == len(learner_state)
        name = next(iter(learner_state))
        bent = learner_state[name].clone()
        bent.view(-1)[0] = torch.nextafter(bent.view(-1)[0], torch.tensor(float("inf")))  # one bit of one element
        ray.get(rollout.actors[1].load_weights.remote(weight_sync.publish(weight_sync.group_buckets([(name, bent)], 2**20)), 1))
        wrong = rf"rollout worker 1 differs from learner rank 0 in 1 of {len(learner_state)} synced tensors \(first: {re.escape(name)}\)"
        with pytest.raises(RunAborted, match=wrong):
            rollout.verify_weights(learners, 1)
        # a learner in float32 checked against a bfloat16 engine compares in the engine's dtype
        digests = learners.weight_digests({name: "bfloat16"})
        assert digests[name] == weight_sync.tensor_digest(learner_state[name].to(torch.bfloat16))
        assert digests[name].startswith(f"bfloat16{list(learner_state[name].shape)}:")
    finally:
        learners.shutdown()
        rollout.shutdown()


def test_groups_are_never_split_across_workers(ray_cluster, tiny_vl_dir, scenes):
    import ray

    from alphadrive_ray.workers.group import RolloutGroup, Resources, split_evenly
    from alphadrive_ray.workers.rollout import RolloutSpec

    rollout = RolloutGroup.start(RolloutSpec(model_path=tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=6), 2, Resources(cpus=1))
    try:
        records = scenes[:5]  # odd: the workers get 3 and 2 prompts
        jobs = rollout.submit(records, SamplingParams(n=4, max_new_tokens=6, seed=5))
        parts = ray.get([job.gen_ref for job in jobs])
        assert [len(p) for p in parts] == [3, 2]
        assert [[g.record.id for g in p] for p in parts] == [[r.id for r in c] for c in split_evenly(records, 2)]
        for part in parts:
            for group in part:
                assert len(group.completions) == 4
    finally:
        rollout.shutdown()


def test_reward_pool_equals_serial_scoring(ray_cluster, scenes):
    from alphadrive_ray.engines.base import Completion, Group
    from alphadrive_ray.workers.group import Resources, RewardPool
    from alphadrive_ray.workers.reward import RewardSpec, score_groups

    rng = random.Random(1)
    words = ["KEEP", "STOP", "ACCELERATE", "LEFT_TURN", "STRAIGHT", "RIGHT_CHANGE", ","]
    groups = []
    for record in scenes[:9]:
        texts = [f"<think> x </think> <answer> {' '.join(rng.choice(words) for _ in range(rng.randrange(0, 4)))} </answer>" for _ in range(4)]
        texts[0] = f"<think> ok </think>\n<answer> {record.speed_action}, {record.path_action} </answer>"
        groups.append(Group(record, [Completion(t, [1], [0.0], "stop", 0) for t in texts]))
    for spec in (RewardSpec(), RewardSpec(variant="release"), RewardSpec(components=("accuracy", "format"))):
        pool = RewardPool.start(spec, 2, Resources(cpus=0.25), timeout_s=60)
        assert pool.score(groups) == score_groups(groups, spec)
        pool.shutdown()


class _SlowRewardWorker:
    def __init__(self, *args):
        pass

    def score(self, groups):
        import time

        time.sleep(30)
        return []


def test_reward_timeout_is_a_clear_error(ray_cluster):
    import ray

    from alphadrive_ray.workers.group import RewardPool

    actor = ray.remote(_SlowRewardWorker).options(num_cpus=0).remote()
    pool = RewardPool([actor], timeout_s=1.0)
    with pytest.raises(RuntimeError, match="reward.timeout_s"):
        pool.gather([actor.score.remote([])])
    ray.kill(actor)


def test_broadcast_sync_brings_a_restarted_rollout_worker_back_into_the_group(ray_cluster, tiny_vl_dir, scenes):
    """`sync.backend: gloo`, the CPU stand-in for NCCL's protocol: learner rank 0 broadcasts to
    every engine. A rollout worker killed while idle, and one killed while it generates, re-join
    the group and hold the current weights and version before their plans are used; the next
    broadcast reaches every engine (no member is missing, nothing hangs)."""
    import os
    import signal

    import ray

    from alphadrive_ray.workers.group import LearnerGroup, Resources, RolloutGroup, wait_alive
    from alphadrive_ray.workers.rollout import RolloutSpec

    learners = LearnerGroup.start(learner_spec(tiny_vl_dir, 3), 2, Resources(cpus=1))
    rollout = RolloutGroup.start(RolloutSpec(model_path=tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=16), 2, Resources(cpus=1))
    rollout.use_broadcast(learners, "gloo")

    def engines_hold_the_learner_weights(version):
        learner_state = learners.state_dict_cpu()
        for actor in rollout.actors:
            engine_state = ray.get(actor.get_weights.remote())
            assert all(torch.equal(engine_state[name], tensor) for name, tensor in learner_state.items())
            assert ray.get(actor.weight_version.remote()) == version

    def pid(actor):
        return ray.get(actor.pid.remote())

    def train_a_little():
        for batch in sft_batches(scenes):
            learners.sft_step(batch, 4, 1e-2)

    try:
        greedy = SamplingParams(n=1, max_new_tokens=8, greedy=True)
        learners.begin_stage("sft")
        train_a_little()
        sent = rollout.broadcast_weights(1)
        assert sent == sum(t.numel() * t.element_size() for t in learners.state_dict_cpu().values())
        engines_hold_the_learner_weights(1)
        reference = [g.completions[0].token_ids for g in rollout.generate(scenes[:4], greedy)]

        # killed while idle: Ray restarts it with the base weights before the next call reaches it
        old = pid(rollout.actors[0])
        os.kill(old, signal.SIGKILL)
        wait_alive(rollout.actors[0])
        assert pid(rollout.actors[0]) != old
        groups = rollout.generate(scenes[:4], greedy)
        assert {c.weight_version for g in groups for c in g.completions} == {1}
        assert [g.completions[0].token_ids for g in groups] == reference
        assert rollout.restarts == 1
        engines_hold_the_learner_weights(1)

        # killed while it generates: its share is generated again, after the group is re-formed
        old = pid(rollout.actors[1])  # asked first: the actor answers only after its generation
        jobs = rollout.submit(scenes[:8], SamplingParams(n=4, max_new_tokens=64, temperature=1.0, seed=3))
        os.kill(old, signal.SIGKILL)
        groups, _ = rollout.collect(jobs)
        assert [g.record.id for g in groups] == [r.id for r in scenes[:8]]
        assert {c.weight_version for g in groups for c in g.completions} == {1}
        assert rollout.restarts == 2
        engines_hold_the_learner_weights(1)

        # the re-formed group carries the next sync to every engine
        train_a_little()
        rollout.broadcast_weights(2)
        engines_hold_the_learner_weights(2)
        assert [g.completions[0].token_ids for g in rollout.generate(scenes[:4], greedy)] != reference
    finally:
        learners.shutdown()
        rollout.shutdown()
