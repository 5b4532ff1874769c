"""The transformers rollout engine: groups, log-probs that match the learner's, weight loading."""

from __future__ import annotations

import pytest
import torch

from alphadrive_ray import algo
from alphadrive_ray.engines.base import SamplingParams
from alphadrive_ray.inputs import completion_logits
from tests.conftest import TEST_PROMPT


LOOPS = ("lean", "generate")  # the engine's own decoding loop, and transformers' generate


@pytest.fixture(scope="module", params=LOOPS)
def engine(request, tiny_vl_dir):
    from alphadrive_ray.engines.hf import HFEngine

    torch.set_num_threads(1)
    return HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=16, loop=request.param)


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


@pytest.mark.parametrize("loop", LOOPS)
def test_load_weights_changes_outputs_and_version(tiny_vl_dir, scenes, loop):
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, loop=loop)
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


@pytest.mark.parametrize("loop", LOOPS)
def test_text_only_policy(tiny_text_dir, scenes, loop):
    """The same engine and learner math serve a text-only Qwen2 (the image simply absent)."""
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_text_dir, prompt_template=TEST_PROMPT, loop=loop)
    assert not engine.encoder.vision
    (group,) = engine.generate(scenes[:1], SamplingParams(n=3, max_new_tokens=10, seed=2))
    recomputed = learner_logprobs(engine, scenes[0], [c.token_ids for c in group.completions])
    for i, c in enumerate(group.completions):
        torch.testing.assert_close(recomputed[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=2e-4, rtol=0)


def test_greedy_with_several_completions_repeats_the_answer(engine, scenes):
    (group,) = engine.generate(scenes[:1], SamplingParams(n=3, max_new_tokens=8, greedy=True))
    assert len(group.completions) == 3
    assert len({tuple(c.token_ids) for c in group.completions}) == 1


def prompts_of_different_lengths(engine, records, k):
    """k records whose encoded prompts differ in length (so a batch of them is left-padded)."""
    by_length = {}
    for r in records:
        by_length.setdefault(len(engine.encoder.encode(r).input_ids), r)
    assert len(by_length) >= 2, "the test scenes should give prompts of several lengths"
    return [by_length[n] for n in sorted(by_length)][:k]


def batch_logprobs(engine, groups, temperature=1.0, top_p=1.0, share_prompts=False):
    """The learner's log-probs of every completion, computed as one padded batch over all prompts."""
    enc = engine.encoder
    pairs = [(g.record, c.token_ids) for g in groups for c in g.completions]
    batch = enc.collate([enc.encode(r) for r, _ in pairs], [t for _, t in pairs], share_prompts)
    logits = completion_logits(engine.model, batch)
    logp = algo.compute_token_logprobs(logits, batch["completion_ids"], temperature, top_p, enc.banned_token_ids)
    return [logp[i, : len(t)] for i, (_, t) in enumerate(pairs)]


@pytest.mark.parametrize("text_only", [False, True])
def test_left_padded_prompts_keep_their_positions(tiny_vl_dir, tiny_text_dir, scenes, text_only):
    """Prompts of different lengths share one generation chunk (left padding): each completion's
    log-probs still equal the learner's, whose batch pads prompts and completions differently."""
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_text_dir if text_only else tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=64)
    records = prompts_of_different_lengths(engine, scenes, 3)
    groups = engine.generate(records, SamplingParams(n=3, temperature=1.3, top_p=0.9, max_new_tokens=14, seed=4))
    engine_logp = [torch.tensor(c.logprobs) for g in groups for c in g.completions]
    for share_prompts in (False, True):  # the learner's full rows, and its shared-prompt forward
        recomputed = batch_logprobs(engine, groups, 1.3, 0.9, share_prompts)
        for ours, theirs in zip(engine_logp, recomputed):
            torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=0)


def test_lean_loop_decodes_like_generate(tiny_vl_dir, scenes):
    """Arg-max decoding is deterministic: the lean loop and transformers' generate agree token for token."""
    from alphadrive_ray.engines.hf import HFEngine

    lean = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=64, loop="lean")
    reference = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=64, loop="generate")
    records = prompts_of_different_lengths(lean, scenes, 3) + list(scenes[:3])
    greedy = SamplingParams(n=1, max_new_tokens=20, greedy=True)
    a = [g.completions[0] for g in lean.generate(records, greedy)]
    b = [g.completions[0] for g in reference.generate(records, greedy)]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=2e-4, rtol=0)


@pytest.mark.parametrize("loop", LOOPS)
def test_rows_stop_at_their_own_end_of_turn(tiny_vl_dir, scenes, loop):
    """With the end-of-turn token made likely, rows finish at different steps: each completion
    ends with exactly one end-of-turn token, the others run on, and log-probs still match."""
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=64, loop=loop)
    eos = engine.encoder.eos_id
    bias = torch.zeros(engine.model.lm_head.out_features)
    engine.model.lm_head.register_forward_hook(lambda _module, _inputs, out: out + bias)
    # the bias that makes rows end at different steps depends on the model's own end-of-turn
    # odds: the largest of these that does (the premise of the checks below)
    for eos_bias in (6.5, 4.0, 2.0, 0.0, -2.0, -4.0):
        bias[eos] = eos_bias
        groups = engine.generate(scenes[:4], SamplingParams(n=6, max_new_tokens=24, seed=2))
        completions = [c for g in groups for c in g.completions]
        lengths = {len(c.token_ids) for c in completions}
        if len(lengths) > 2 and any(c.finish_reason == "stop" for c in completions):
            break
    assert len(lengths) > 2, "rows should finish at different steps"
    for c in completions:
        assert c.token_ids.count(eos) <= 1
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos
        else:
            assert len(c.token_ids) == 24 and eos not in c.token_ids
    assert any(c.finish_reason == "stop" for c in completions)
    for ours, theirs in zip([torch.tensor(c.logprobs) for c in completions], batch_logprobs(engine, groups)):
        torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=0)


def test_unknown_loop_is_refused(tiny_vl_dir):
    from alphadrive_ray.engines.hf import HFEngine

    with pytest.raises(ValueError, match="decoding loop"):
        HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, loop="beam")


READ_ONLY_GENERATION = r"""
import mmap, sys, tempfile
import numpy as np
from alphadrive_ray import weight_sync
from alphadrive_ray.data.records import load_records
from alphadrive_ray.engines.base import SamplingParams
from alphadrive_ray.engines.hf import HFEngine

model_dir, data, prompt, loop = sys.argv[1:5]
engine = HFEngine(model_dir, prompt_template=prompt, loop=loop)
tensors = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
metas, parts = next(weight_sync.group_buckets(tensors, 1 << 40))
with tempfile.TemporaryFile() as fh:
    fh.write(weight_sync.concat_bucket(metas, parts).tobytes())
    fh.flush()
    array = np.frombuffer(mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ), dtype=np.uint8)  # a write would fault
start = array.ctypes.data
assert engine.load_weights(weight_sync.unpack_bucket(metas, array), 1, zero_copy=True) == len(tensors)
assert all(start <= p.data_ptr() < start + array.nbytes for p in engine.model.parameters())
records = load_records(data)
engine.generate(records[:3], SamplingParams(n=4, temperature=1.2, top_p=0.9, max_new_tokens=10, seed=0))
engine.generate(records[:3], SamplingParams(n=1, max_new_tokens=10, greedy=True))
print("generated from read-only parameters")
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_generation_never_writes_parameters(tiny_vl_dir, scenes, loop, tmp_path):
    """Zero-copy weight sync makes the parameters views of shared, writable-by-nobody buffers:
    generating from parameters in read-only memory (PROT_READ: any write faults) must work."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO

    data = Path(scenes[0].image).parent.parent / "data.jsonl"
    script = tmp_path / "read_only_generation.py"
    script.write_text(READ_ONLY_GENERATION)
    proc = subprocess.run(
        [sys.executable, str(script), tiny_vl_dir, str(data), TEST_PROMPT, loop],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and "generated from read-only parameters" in proc.stdout, proc.stderr[-3000:]


def test_zero_copy_load_then_copying_load_leaves_the_source_untouched(tiny_vl_dir, scenes):
    from alphadrive_ray.engines.hf import HFEngine

    engine = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT)
    shared = {n: torch.randn_like(p) * 0.05 for n, p in engine.model.named_parameters()}
    kept = {n: t.clone() for n, t in shared.items()}
    engine.load_weights(shared.items(), version=1, zero_copy=True)
    assert all(p.data_ptr() == shared[n].data_ptr() for n, p in engine.model.named_parameters())
    engine.generate(scenes[:2], SamplingParams(n=2, max_new_tokens=6, seed=0))
    fresh = {n: torch.randn_like(p) for n, p in engine.model.named_parameters()}
    engine.load_weights(fresh.items(), version=2)
    for name, p in engine.model.named_parameters():
        assert torch.equal(shared[name], kept[name]) and torch.equal(p, fresh[name])
