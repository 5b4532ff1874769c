"""The driver's own logic as units: DAPO dynamic sampling with fake groups, and what the ledger
records of it. (The loop with real actors is tested end to end in test_train_e2e.py.)"""

from __future__ import annotations

import json

import pytest

from alphadrive_ray.config import load_config
from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Completion, Group
from alphadrive_ray.train.trainer import Trainer, uniform_group


def totals(*values):
    return [{"total": v} for v in values]


# (scores of a group, uniform?): a group teaches nothing when every total is the same
UNIFORM_CASES = [
    (totals(1.0, 1.0, 1.0), True),  # all equal
    (totals(0.1 + 0.2, 0.3), True),  # equal up to float noise (0.30000000000000004)
    (totals(0.7, 0.7 + 1e-12), True),  # below the 1e-9 rounding
    (totals(0.7, 0.700001), False),  # a real difference
    (totals(0.0, 2.0), False),
    (totals(5.0), True),  # a group of one
]


@pytest.mark.parametrize("scores, expected", UNIFORM_CASES)
def test_uniform_group(scores, expected):
    assert uniform_group(scores) is expected


RECORDS = [Record(f"r{i:02d}", "img.png", 5.0, "go straight", "KEEP", "STRAIGHT") for i in range(12)]


class FakeRollout:
    """Generates groups whose rewards are set per record id; counts the records asked for."""

    def __init__(self, uniform_ids, group_size):
        self.uniform_ids = set(uniform_ids)
        self.group_size = group_size
        self.asked = []

    def generate(self, records, params):
        self.asked.append([r.id for r in records])
        return [Group(r, [Completion(str(k), [k], [0.0], "stop", 0) for k in range(self.group_size)]) for r in records]


class FakeRewards:
    def __init__(self, rollout):
        self.rollout = rollout

    def score(self, groups):
        return [totals(*([1.0] * len(g.completions) if g.record.id in self.rollout.uniform_ids else range(len(g.completions)))) for g in groups]


def make_trainer(tmp_path, uniform_ids, prompts=4, group_size=2, rounds=3, rollout_workers=1, learners=1):
    trainer = Trainer.__new__(Trainer)  # the parts _dynamic_sampling and _ledger use; no actors
    trainer.config = load_config(
        None,
        [
            f"grpo.prompts_per_step={prompts}",
            f"grpo.group_size={group_size}",
            f"grpo.max_resample_rounds={rounds}",
            f"rollout.num_workers={rollout_workers}",
            f"learner.num_workers={learners}",
            "rollout.batch_size=64",
            "sft.batch_size=32",
            "sft.micro_batch_size=4",
        ],
    )
    trainer.train_records = RECORDS
    trainer.run_dir = tmp_path
    trainer.rollout = FakeRollout(uniform_ids, group_size)
    trainer.rewards = FakeRewards(trainer.rollout)
    return trainer


def drawn(trainer, ids):
    groups = trainer.rollout.generate([r for r in RECORDS if r.id in ids], None)
    trainer.rollout.asked.clear()
    return groups, trainer.rewards.score(groups)


def ids(groups):
    return [g.record.id for g in groups]


def test_nothing_to_drop(tmp_path):
    trainer = make_trainer(tmp_path, uniform_ids=())
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    kept, kept_scores, dropped, rounds = trainer._dynamic_sampling(groups, scores, step=0)
    assert ids(kept) == ["r00", "r01", "r02", "r03"] and kept_scores == scores
    assert dropped == [] and rounds == 0 and trainer.rollout.asked == []


def test_uniform_groups_are_replaced_by_refills(tmp_path):
    trainer = make_trainer(tmp_path, uniform_ids={"r01", "r03"})
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    kept, kept_scores, dropped, rounds = trainer._dynamic_sampling(groups, scores, step=0)
    assert len(kept) == 4 and ids(kept)[:2] == ["r00", "r02"] and ids(dropped)[:2] == ["r01", "r03"]
    assert all(not uniform_group(s) for s in kept_scores)
    assert rounds >= 1 and trainer.rollout.asked[0] and len(trainer.rollout.asked[0]) == 2  # asked for the 2 missing
    # every refill group is either kept or dropped; none vanishes
    refills = [rid for asked in trainer.rollout.asked for rid in asked]
    assert sorted(ids(kept)[2:] + ids(dropped)[2:]) == sorted(refills)


def test_refills_stop_at_the_round_limit_and_train_the_drawn_groups(tmp_path):
    everything = {r.id for r in RECORDS}
    trainer = make_trainer(tmp_path, uniform_ids=everything, rounds=2)
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    kept, _, dropped, rounds = trainer._dynamic_sampling(groups, scores, step=0)
    assert rounds == 2 and len(trainer.rollout.asked) == 2
    # nothing teaches: the drawn groups are trained (zero advantage); the refills are dropped
    assert kept == groups and ids(dropped) == [rid for asked in trainer.rollout.asked for rid in asked]


def test_no_refill_rounds(tmp_path):
    trainer = make_trainer(tmp_path, uniform_ids={"r00"}, rounds=0)
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    kept, _, dropped, rounds = trainer._dynamic_sampling(groups, scores, step=0)
    assert ids(kept) == ["r01", "r02", "r03"] and ids(dropped) == ["r00"] and rounds == 0


def test_a_refill_beyond_the_batch_is_dropped(tmp_path):
    # 2 rollout workers: a refill asks for the missing prompts + 1, so one group may be extra
    trainer = make_trainer(tmp_path, uniform_ids={"r01"}, rollout_workers=2)
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    kept, _, dropped, rounds = trainer._dynamic_sampling(groups, scores, step=0)
    asked = [rid for a in trainer.rollout.asked for rid in a]
    assert rounds == 1 and len(asked) == 2 and len(kept) == 4
    assert sorted(ids(dropped)) == sorted(["r01", *[rid for rid in asked if rid not in ids(kept)[3:]]])


def test_kept_groups_split_evenly_over_the_learners(tmp_path):
    # 4 learners, groups of 2: 3 kept groups (6 completions) would not split; one more is dropped
    trainer = make_trainer(tmp_path, uniform_ids={"r00"}, rounds=0, learners=4)
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    kept, _, dropped, _ = trainer._dynamic_sampling(groups, scores, step=0)
    assert ids(kept) == ["r01", "r02"] and ids(dropped) == ["r00", "r03"]


def test_the_ledger_records_what_was_trained_and_what_was_dropped(tmp_path):
    trainer = make_trainer(tmp_path, uniform_ids={"r01"})
    groups, scores = drawn(trainer, {"r00", "r01", "r02", "r03"})
    epochs = {id(g): 0 for g in groups}  # as the GRPO loop tags the drawn groups
    kept, _, dropped, _ = trainer._dynamic_sampling(groups, scores, step=0)
    trainer._ledger(
        "grpo",
        1,
        [(epochs.get(id(g)), g.record) for g in kept],
        [(epochs.get(id(g)), g.record) for g in dropped],
    )
    (row,) = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    refill = ids(kept)[3]
    assert row["items"] == [[0, "r00"], [0, "r02"], [0, "r03"], [None, refill]]  # refills: no epoch
    assert row["dropped"][0] == [0, "r01"] and all(epoch is None for epoch, _ in row["dropped"][1:])  # uniform refills


def test_grpo_samples_carry_each_completion_with_its_group_relative_advantage():
    from alphadrive_ray.train.trainer import grpo_samples

    groups = [Group(r, [Completion(f"{r.id}-{k}", [k, k + 1], [-0.5, -0.25], "stop", 3) for k in range(3)]) for r in RECORDS[:2]]
    scores = [totals(0.0, 1.0, 2.0), totals(4.0, 4.0, 4.0)]  # a spread group, then a uniform one
    samples = grpo_samples(groups, scores, group_size=3)
    assert [(s.record.id, s.token_ids, s.logprobs) for s in samples] == [
        (g.record.id, c.token_ids, c.logprobs) for g in groups for c in g.completions
    ]  # every completion, in order, with the engine's log-probs
    # (r - mean) / (std + 1e-4), the unbiased std as in the release: 1 for 0, 1, 2
    assert [s.advantage for s in samples[:3]] == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4)])
    assert [s.advantage for s in samples[3:]] == [0.0, 0.0, 0.0]  # a uniform group teaches nothing
    assert [s.advantage for s in grpo_samples(groups, scores, 3, advantage="mean")] == pytest.approx([-1, 0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="6 completions but 3 scores"):
        grpo_samples(groups, [totals(0.0, 1.0, 2.0)], group_size=3)


def test_a_resumed_run_reads_back_the_per_scene_correctness_of_stages_evaluated_before_it_stopped(tmp_path):
    from alphadrive_ray.train.trainer import compare_stages

    trainer = Trainer.__new__(Trainer)  # the parts restore_correct uses; no actors
    trainer.run_dir = tmp_path
    trainer.eval_records = RECORDS[:4]
    trainer.correct = {}
    trainer.accuracy = {"untrained": 0.25, "sft": 0.5, "lost": 0.0}  # "lost": its predictions are gone
    said = []
    trainer.tracker = type("Say", (), {"say": staticmethod(said.append)})()
    right, wrong = "<answer> KEEP, STRAIGHT </answer>", "<answer> STOP, STRAIGHT </answer>"
    for tag, outputs in {"untrained": [right, wrong, wrong, wrong], "sft": [right, right, wrong]}.items():
        (tmp_path / "eval" / tag).mkdir(parents=True)
        rows = [{"id": r.id, "output": o, "correct": o == right} for r, o in zip(RECORDS, outputs)]
        (tmp_path / "eval" / tag / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer.restore_correct()
    # a scene missing from a predictions file counts as wrong, as the evaluation counts it
    assert trainer.correct == {"untrained": [True, False, False, False], "sft": [True, True, False, False]}
    trainer.correct["final"] = [True, True, True, False]
    assert set(compare_stages(trainer.correct)) == {"sft_vs_untrained", "final_vs_sft"}
    (tmp_path / "eval" / "lost").mkdir()
    (tmp_path / "eval" / "lost" / "predictions.jsonl").write_text("not json\n")
    trainer.correct = {}
    trainer.restore_correct()
    assert "lost" not in trainer.correct and "cannot compare with the lost stage" in said[0]
