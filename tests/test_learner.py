"""One learner rank on real batches: top-p batches from the engine, several updates per batch,
weight decay, and the Hugging Face export against the learner's own weights.

Real parts throughout: DeepSpeed learners in Ray actors, the HF rollout engine in-process,
the tiny Qwen2-VL.
"""

from __future__ import annotations

import math

import pytest
import torch

from alphadrive_ray import algo
from alphadrive_ray.engines.base import SamplingParams
from alphadrive_ray.inputs import completion_logits
from tests.conftest import TEST_PROMPT

TOP_P = 0.3


def learner_spec(model_dir, **kw):
    from alphadrive_ray.workers.learner import LearnerSpec

    return LearnerSpec(model_path=model_dir, prompt_template=TEST_PROMPT, backend="gloo", cpus=1, seed=0, **kw)


@pytest.fixture(scope="module")
def learner(ray_cluster, tiny_vl_dir):
    """One rank that scores under top-p, as with `rollout.top_p: 0.3`."""
    from alphadrive_ray.workers.group import LearnerGroup, Resources

    group = LearnerGroup.start(learner_spec(tiny_vl_dir, top_p=TOP_P), 1, Resources(cpus=1))
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def engine(tiny_vl_dir):
    from alphadrive_ray.engines.hf import HFEngine

    torch.set_num_threads(1)
    return HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=16, zero_copy_weights=False)


def engine_samples(engine, learner, records, seed):
    """GRPO samples as the trainer builds them, generated on the learner's current weights.

    Two lengths of completion in one batch, so that it has padding (the pad token is
    outside the nucleus at most positions of this random model)."""
    from alphadrive_ray.workers.learner import GRPOSample

    engine.load_weights(learner.state_dict_cpu().items(), version=seed)
    groups = engine.generate(records[:2], SamplingParams(n=4, top_p=TOP_P, max_new_tokens=12, seed=seed))
    groups += engine.generate(records[2:4], SamplingParams(n=4, top_p=TOP_P, max_new_tokens=3, seed=seed + 1))
    rewards = torch.rand(len(groups) * 4, generator=torch.Generator().manual_seed(seed))
    advantages = algo.compute_group_advantages(rewards, 4).tolist()
    completions = [(g.record, c) for g in groups for c in g.completions]
    return [GRPOSample(record, c.token_ids, c.logprobs, a) for (record, c), a in zip(completions, advantages)]


def grpo_step(learner, samples, beta, use_engine_logprobs, lr=1e-3):
    return learner.grpo_step(
        samples,
        len(samples),
        lr,  # one micro-batch: every row padded to the longest
        eps_low=0.2,
        eps_high=0.2,
        beta=beta,
        kl_estimator="k3",
        loss_agg="token_mean",
        use_engine_logprobs=use_engine_logprobs,
    )


def test_top_p_batches_from_the_engine_give_a_finite_loss_gradient_and_weights(learner, engine, scenes, tiny_vl_dir, tmp_path):
    from safetensors.torch import save_file

    from alphadrive_ray.models.loading import load_model
    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

    # a reference that is another model, so that some sampled tokens are outside its nucleus
    other = load_model(str(build_tiny_qwen2vl(tmp_path / "other", TinySpec(seed=1, vision_pretrain_steps=0, language_pretrain_steps=0))))
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(reference))

    samples = engine_samples(engine, learner, scenes, seed=3)
    assert len({len(s.token_ids) for s in samples}) > 1, "the batch needs padding"
    enc = engine.encoder
    batch = enc.collate([enc.encode(s.record) for s in samples], [s.token_ids for s in samples])
    with torch.no_grad():
        ref_trunc = algo.compute_token_logprobs(completion_logits(other, batch), batch["completion_ids"], top_p=TOP_P)
    assert torch.isinf(ref_trunc[batch["response_mask"].bool()]).any(), "no sampled token outside the reference's nucleus"

    learner.begin_stage("grpo", 0.04, str(reference))
    for use_engine_logprobs in (False, True):
        metrics = grpo_step(learner, samples, beta=0.04, use_engine_logprobs=use_engine_logprobs)
        for key in ("loss/policy", "loss/kl", "loss/ratio_mean", "rollout/logp_diff", "perf/grad_norm"):
            assert math.isfinite(metrics[key]), (key, metrics)
        assert metrics["loss/kl"] > 0 and metrics["perf/grad_norm"] > 0
    assert all(torch.isfinite(t).all() for t in learner.state_dict_cpu().values())


def test_several_updates_per_batch_take_the_ratio_to_the_engines_log_probs(learner, engine, scenes):
    """grpo.updates_per_batch > 1: old log-probs are the engine's, so the first update sees
    ratio 1 (same weights) and the second the change the first one made."""
    samples = engine_samples(engine, learner, scenes[4:], seed=5)
    learner.begin_stage("grpo", 0.0)
    first = grpo_step(learner, samples, beta=0.0, use_engine_logprobs=True, lr=1e-2)
    assert first["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and first["loss/clip_frac"] == 0.0
    assert first["rollout/logp_diff"] < 1e-4
    second = grpo_step(learner, samples, beta=0.0, use_engine_logprobs=True, lr=1e-2)
    assert abs(second["loss/ratio_mean"] - 1.0) > 1e-3 and second["rollout/logp_diff"] > 1e-3
    assert math.isfinite(second["loss/policy"])
    # recomputing the old log-probs instead (on-policy) would hide that change: ratio 1 again
    third = grpo_step(learner, samples, beta=0.0, use_engine_logprobs=False, lr=0.0)
    assert third["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6)


def test_weight_decay_reaches_adamw(learner, scenes, tmp_path):
    """The same SFT step from the same state, with and without decay: AdamW's decoupled decay
    moves every weight by exactly -lr x weight_decay x its value."""
    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.workers.learner import SFTExample

    batch = [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in scenes[:4]]
    lr, decay = 1e-2, 0.5
    learner.begin_stage("sft", weight_decay=0.0)
    learner.save_state(str(tmp_path / "start"), {})
    start = learner.state_dict_cpu()
    learner.sft_step(batch, 4, lr)
    plain = learner.state_dict_cpu()
    learner.load_state(str(tmp_path / "start"))
    learner.begin_stage("sft", weight_decay=decay)
    learner.sft_step(batch, 4, lr)
    decayed = learner.state_dict_cpu()
    for name, value in start.items():
        torch.testing.assert_close(decayed[name] - plain[name], -lr * decay * value, rtol=0, atol=2e-6, msg=name)
    assert max((decayed[n] - plain[n]).abs().max().item() for n in start) > 1e-4  # it did something


@pytest.mark.slow
def test_the_hf_export_holds_the_learners_weights(ray_cluster, tiny_vl_dir, scenes, tmp_path):
    """ZeRO-3 over 2 ranks (every parameter gathered for the export), after a training step."""
    from transformers import Qwen2VLForConditionalGeneration

    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.models.loading import load_model
    from alphadrive_ray.workers.group import LearnerGroup, Resources
    from alphadrive_ray.workers.learner import SFTExample

    group = LearnerGroup.start(learner_spec(tiny_vl_dir, zero_stage=3), 2, Resources(cpus=1))
    try:
        group.begin_stage("sft")
        batch = [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in scenes[:4]]
        group.sft_step(batch, 2, 1e-2)
        learned = group.state_dict_cpu()
        out = group.save_hf(str(tmp_path / "export"))
    finally:
        group.shutdown()
    initial = dict(load_model(tiny_vl_dir).named_parameters())
    assert sum(not torch.equal(initial[n].detach(), t) for n, t in learned.items()) > len(learned) * 0.9

    exported = Qwen2VLForConditionalGeneration.from_pretrained(out)
    loaded = dict(exported.named_parameters())
    assert set(loaded) == set(learned)
    for name, tensor in learned.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name].detach(), tensor), name
