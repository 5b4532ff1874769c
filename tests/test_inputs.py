"""Batch layout: the shared-prompt forward equals the full-row forward (logits and gradients)."""

from __future__ import annotations

import pytest
import torch

from alphadrive_ray.inputs import EncodedPrompt, completion_logits, distinct_prompts
from tests.conftest import TEST_PROMPT


def prompt(ids, pixels=None):
    grid = None if pixels is None else torch.tensor([[1, 2, 2]])
    return EncodedPrompt(tuple(ids), pixels, grid)


def test_distinct_prompts():
    a, b = prompt([1, 2, 3]), prompt([1, 2])
    same_tokens_other_image = prompt([1, 2, 3], torch.ones(4, 2))
    cases = [
        ([a, a, b, b], ([0, 0, 1, 1], [0, 2])),  # the encoder's cached objects
        ([a, prompt([1, 2, 3]), b], ([0, 0, 1], [0, 2])),  # equal tokens, no image: the same prompt
        ([b, a, b, a], ([0, 1, 0, 1], [0, 1])),  # not contiguous: still found
        ([prompt([1, 2, 3], torch.zeros(4, 2)), same_tokens_other_image], ([0, 1], [0, 1])),  # other pixels: distinct
        ([same_tokens_other_image, prompt([1, 2, 3], torch.ones(4, 2))], ([0, 0], [0])),  # equal pixels
    ]
    for prompts, expected in cases:
        assert distinct_prompts(prompts) == expected


@pytest.fixture(scope="module", params=["vision", "text"])
def policy(request, tiny_vl_dir, tiny_text_dir):
    from alphadrive_ray.inputs import PromptEncoder
    from alphadrive_ray.models.loading import load_model, load_processor

    path = tiny_vl_dir if request.param == "vision" else tiny_text_dir
    torch.manual_seed(0)
    return load_model(path), PromptEncoder(load_processor(path), TEST_PROMPT)


def grpo_rows(encoder, scenes):
    """Three prompts, of at least two lengths (left padding), 3 completions each of different lengths."""
    by_length = {}
    for r in scenes:
        by_length.setdefault(len(encoder.encode(r).input_ids), r)
    assert len(by_length) >= 2
    records = [by_length[n] for n in sorted(by_length)][:2]
    records.append(next(r for r in scenes if r not in records))
    g = torch.Generator().manual_seed(1)
    rows = []
    for r in records:
        for k in range(3):
            n = 3 + 4 * k
            rows.append((encoder.encode(r), torch.randint(0, 600, (n,), generator=g).tolist()))
    return rows


def test_collate_marks_distinct_prompts(policy, scenes):
    _, encoder = policy
    rows = grpo_rows(encoder, scenes)
    batch = encoder.collate([p for p, _ in rows], [c for _, c in rows], share_prompts=True)
    assert batch["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch["prompt_rows"].tolist() == [0, 3, 6]
    if encoder.vision:
        assert batch["image_grid_thw"].shape[0] == 3  # one image per distinct prompt, not per row
    full = encoder.collate([p for p, _ in rows], [c for _, c in rows])
    assert "prompt_index" not in full and torch.equal(full["input_ids"], batch["input_ids"])


def test_shared_prompt_forward_equals_full_rows(policy, scenes):
    """Same logits, and the same gradient of a loss on them, as computing every row in full."""
    model, encoder = policy
    model.train()
    rows = grpo_rows(encoder, scenes)
    results = {}
    for share in (False, True):
        model.zero_grad()
        batch = encoder.collate([p for p, _ in rows], [c for _, c in rows], share_prompts=share)
        logits = completion_logits(model, batch)  # [B, C, V]
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        (logits * weights * batch["response_mask"][..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (logits.detach(), batch["response_mask"], grads)
    (full, mask, full_grads), (shared, _, shared_grads) = results[False], results[True]
    assert full.shape == shared.shape
    keep = mask.bool()
    torch.testing.assert_close(shared[keep], full[keep], atol=2e-5, rtol=1e-4)
    assert full_grads.keys() == shared_grads.keys() and len(full_grads) > 10
    for name, g in full_grads.items():
        # float sums in another order: equal up to rounding (a wrong gradient is off by O(1))
        assert (shared_grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-9, name
    model.eval()


def test_image_cache_keeps_recent_records_within_its_memory_bound(tiny_vl_dir, scenes):
    from alphadrive_ray.inputs import PromptEncoder
    from alphadrive_ray.models.loading import load_processor

    processor = load_processor(tiny_vl_dir)
    records = list(scenes)[:4]
    size_mb = PromptEncoder(processor, TEST_PROMPT, cache_mb=0).encode(records[0]).nbytes / 2**20
    encoder = PromptEncoder(processor, TEST_PROMPT, cache_mb=2.5 * size_mb)  # room for two records
    first = encoder.encode(records[0])
    assert encoder.encode(records[0]) is first  # a hit is the cached object
    second = encoder.encode(records[1])
    encoder.encode(records[0])  # now the most recently used
    third = encoder.encode(records[2])  # over the bound: records[1], the least recently used, goes
    assert 2 * size_mb <= encoder.cached_mb <= 2.5 * size_mb
    assert encoder.encode(records[0]) is first and encoder.encode(records[2]) is third  # kept
    again = encoder.encode(records[1])  # evicted: encoded anew, equal to before
    assert again is not second and again.input_ids == second.input_ids
    assert torch.equal(again.pixel_values, second.pixel_values)
    # no cache: every call encodes
    off = PromptEncoder(processor, TEST_PROMPT, cache_mb=0)
    assert off.encode(records[0]) is not off.encode(records[0]) and off.cached_mb == 0
