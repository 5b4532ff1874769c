"""The transformers rollout engine: groups, log-probs that match the learner's, weight loading."""

from __future__ import annotations

import pytest
import torch

from alphadrive_ray import algo
from alphadrive_ray.engines.base import SamplingParams
from alphadrive_ray.inputs import completion_logits
from tests.conftest import TEST_PROMPT


@pytest.fixture(scope="module")
def engine(tiny_vl_dir):
    from alphadrive_ray.engines.hf import HFEngine

    torch.set_num_threads(1)
    return HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=16)


def learner_logprobs(engine, record, token_lists, temperature=1.0, top_p=1.0):
    enc = engine.encoder
    batch = enc.collate([enc.encode(record)] * len(token_lists), token_lists)
    logits = completion_logits(engine.model, batch)
    return algo.compute_token_logprobs(logits, batch["completion_ids"], temperature, top_p, enc.banned_token_ids)


def test_generates_whole_groups_in_order(engine, scenes):
    records = scenes[:5]
    groups = engine.generate(records, SamplingParams(n=4, max_new_tokens=12, seed=1))
    assert [g.record.id for g in groups] == [r.id for r in records]
    for group in groups:
        assert len(group.completions) == 4
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in ("stop", "length") and c.weight_version == 0
            assert all(lp <= 0.0 for lp in c.logprobs)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_engine_logprobs_equal_learner_logprobs(engine, scenes, temperature, top_p):
    """The learner's recomputed log-probs match the engine's (same sampling transform)."""
    record = scenes[0]
    (group,) = engine.generate([record], SamplingParams(n=4, temperature=temperature, top_p=top_p, max_new_tokens=16, seed=7))
    tokens = [c.token_ids for c in group.completions]
    recomputed = learner_logprobs(engine, record, tokens, temperature, top_p)
    for i, c in enumerate(group.completions):
        torch.testing.assert_close(recomputed[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=2e-4, rtol=0)


def test_same_seed_same_samples_and_greedy_is_deterministic(engine, scenes):
    params = SamplingParams(n=3, max_new_tokens=10, seed=11)
    a = engine.generate(scenes[:2], params)
    b = engine.generate(scenes[:2], params)
    assert [[c.token_ids for c in g.completions] for g in a] == [[c.token_ids for c in g.completions] for g in b]
    greedy = SamplingParams(n=1, max_new_tokens=10, greedy=True)
    assert engine.generate(scenes[:1], greedy)[0].completions[0].token_ids == engine.generate(scenes[:1], greedy)[0].completions[0].token_ids


def test_completions_never_contain_vision_placeholders(engine, scenes):
    banned = set(engine.encoder.banned_token_ids.tolist())
    assert banned, "the tiny model has vision placeholder tokens"
    groups = engine.generate(scenes[:4], SamplingParams(n=8, temperature=2.0, max_new_tokens=24, seed=3))
    assert not banned & {t for g in groups for c in g.completions for t in c.token_ids}


def test_load_weights_changes_outputs_and_version(tiny_vl_dir, scenes):
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT)
    greedy = SamplingParams(n=1, max_new_tokens=8, greedy=True)
    before = engine.generate(scenes[:2], greedy)
    new = {name: torch.randn_like(p) * 0.05 for name, p in engine.model.named_parameters()}
    assert engine.load_weights(new.items(), version=3) == len(new)
    assert engine.weight_version == 3
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, new[name])
    after = engine.generate(scenes[:2], greedy)
    assert [g.completions[0].token_ids for g in after] != [g.completions[0].token_ids for g in before]
    assert after[0].completions[0].weight_version == 3


def test_load_weights_rejects_unknown_names_and_shapes(engine):
    with pytest.raises(KeyError, match="no parameter"):
        engine.load_weights([("nope.weight", torch.zeros(1))], version=1)
    name, p = next(iter(engine.model.named_parameters()))
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([(name, torch.zeros(*p.shape, 2))], version=1)


def test_text_only_policy(tiny_text_dir, scenes):
    """The same engine and learner math serve a text-only Qwen2 (the image simply absent)."""
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_text_dir, prompt_template=TEST_PROMPT)
    assert not engine.encoder.vision
    (group,) = engine.generate(scenes[:1], SamplingParams(n=3, max_new_tokens=10, seed=2))
    recomputed = learner_logprobs(engine, scenes[0], [c.token_ids for c in group.completions])
    for i, c in enumerate(group.completions):
        torch.testing.assert_close(recomputed[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=2e-4, rtol=0)
