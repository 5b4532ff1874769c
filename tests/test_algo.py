"""GRPO / SFT math: table-driven cases computed by hand, and the invariants of aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from alphadrive_ray import algo


@pytest.mark.parametrize(
    "rewards, group, mode, expected",
    [
        # one group of two: mean 1, unbiased std sqrt(2); eps 0 -> -/+ 1/sqrt(2)
        ([0.0, 2.0], 2, "std", [-1 / math.sqrt(2), 1 / math.sqrt(2)]),
        # Dr.GRPO keeps the raw centred reward
        ([0.0, 2.0], 2, "mean", [-1.0, 1.0]),
        # all rewards equal: zero advantage, no division blow-up
        ([3.0, 3.0, 3.0], 3, "std", [0.0, 0.0, 0.0]),
        # two groups are normalised separately
        ([1.0, 3.0, 10.0, 10.0], 2, "mean", [-1.0, 1.0, 0.0, 0.0]),
        # four values 0,0,0,4: mean 1, std sqrt(4) = 2 -> (-0.5, -0.5, -0.5, 1.5)
        ([0.0, 0.0, 0.0, 4.0], 4, "std", [-0.5, -0.5, -0.5, 1.5]),
    ],
)
def test_group_advantages(rewards, group, mode, expected):
    out = algo.compute_group_advantages(torch.tensor(rewards), group, mode, eps=0.0 if mode == "std" and len(set(rewards)) > 1 else 1e-4)
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_group_advantages_release_eps():
    # the release adds 1e-4 to the std: 1 / (sqrt(2) + 1e-4)
    out = algo.compute_group_advantages(torch.tensor([0.0, 2.0]), 2, "std", eps=1e-4)
    assert out[1].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4), rel=1e-6)


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        algo.compute_group_advantages(torch.zeros(6), 4)


@pytest.mark.parametrize(
    "logp, ref_logp, estimator, expected",
    [
        # identical policies: every estimator is 0
        (0.0, 0.0, "k1", 0.0),
        (0.0, 0.0, "k3", 0.0),
        # log r = log pi - log pi_ref = 0.5
        (-1.0, -1.5, "k1", 0.5),
        (-1.0, -1.5, "k2", 0.125),
        # k3 = exp(-0.5) - (-0.5) - 1
        (-1.0, -1.5, "k3", math.exp(-0.5) + 0.5 - 1.0),
        # k3 is non-negative also when pi < pi_ref: exp(0.5) - 0.5 - 1
        (-1.5, -1.0, "k3", math.exp(0.5) - 0.5 - 1.0),
    ],
)
def test_kl_estimators(logp, ref_logp, estimator, expected):
    out = algo.compute_kl(torch.tensor([logp]), torch.tensor([ref_logp]), estimator)
    assert out.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "ratio, adv, expected_loss, clipped",
    [
        # inside the clip range the loss is -A * r
        (1.1, 1.0, -1.1, False),
        # positive advantage, ratio above 1 + eps: clipped at -A * 1.2, no gradient
        (1.5, 1.0, -1.2, True),
        # negative advantage, ratio below 1 - eps: clipped at -A * 0.8
        (0.5, -1.0, 0.8, True),
        # negative advantage, ratio above 1 + eps: the unclipped (larger) loss wins
        (1.5, -1.0, 1.5, False),
        # positive advantage, ratio below 1 - eps: unclipped wins (pessimistic bound)
        (0.5, 1.0, -0.5, False),
    ],
)
def test_clipped_policy_loss(ratio, adv, expected_loss, clipped):
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, stats = algo.compute_policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert stats["clip_frac"] == (1.0 if clipped else 0.0)
    loss.backward()
    assert (logp.grad.abs().item() == 0.0) == clipped


def test_asymmetric_clip_eps_high():
    # DAPO's clip-higher: with eps_high 0.28 a ratio of 1.25 is not clipped
    logp = torch.full((1, 1), math.log(1.25))
    loss, stats = algo.compute_policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats["clip_frac"] == 0.0


def test_kl_term_enters_the_loss():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    loss, stats = algo.compute_policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref, beta=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1.0
    assert loss.item() == pytest.approx(0.1 * k3) and stats["kl"] == pytest.approx(k3)


def test_beta_without_reference_is_an_error():
    with pytest.raises(ValueError, match="ref_logp"):
        algo.compute_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_aggregation_token_mean_vs_seq_mean():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # token mean: (4 + 4) / 5 tokens; sequence mean: (1 + 4) / 2 sequences
    assert algo.aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(8 / 5)
    assert algo.aggregate_loss(per_token, mask, "seq_mean").item() == pytest.approx(5 / 2)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_per_rank_losses_sum_to_the_global_loss(mode):
    """Split a batch over 2 ranks x 2 micro-batches: with global counts the parts add up exactly."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.rand(8, 6, generator=g)
    mask = (torch.rand(8, 6, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    whole = algo.aggregate_loss(per_token, mask, mode)
    tokens, seqs = float(mask.sum()), 8
    parts = sum(algo.aggregate_loss(per_token[i : i + 2], mask[i : i + 2], mode, total_tokens=tokens, total_sequences=seqs) for i in range(0, 8, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_microbatch_gradients_equal_full_batch_gradients():
    """micro-batch 1 x accumulation 4 gives the gradient of micro-batch 4 x accumulation 1."""
    torch.manual_seed(0)
    weight = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(4, 3, 5)
    tokens = torch.randint(0, 7, (4, 3))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([0.5, -1.0, 2.0, 0.1])
    old = torch.randn(4, 3) * 0.1 - 2.0

    def loss_of(rows, total):
        logp = algo.compute_token_logprobs(x[rows] @ weight, tokens[rows])
        return algo.compute_policy_loss(logp, old[rows], adv[rows], mask[rows], total_tokens=total)[0]

    total = float(mask.sum())
    full = torch.autograd.grad(loss_of(slice(0, 4), total), weight)[0]
    acc = sum(torch.autograd.grad(loss_of(slice(i, i + 1), total), weight)[0] for i in range(4))
    torch.testing.assert_close(acc, full, rtol=1e-5, atol=1e-7)


def test_sampling_transform_matches_transformers_top_p():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ours = algo.apply_sampling_transform(logits, temperature=0.7, top_p=0.8)
    theirs = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_banned_tokens_have_zero_probability():
    logits = torch.zeros(1, 5)
    out = algo.apply_sampling_transform(logits, banned_ids=torch.tensor([1, 3]))
    probs = out.softmax(-1)
    assert probs[0, 1] == 0 and probs[0, 3] == 0 and probs[0, 0].item() == pytest.approx(1 / 3)


def test_token_logprobs_with_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    out = algo.compute_token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert out.item() == pytest.approx(math.log(math.e / (math.e + 1)))


def test_sft_loss_masks_prompt_tokens():
    logits = torch.zeros(1, 3, 4)
    logits[0, 2, 1] = 2.0  # the last (unmasked) position prefers the label
    labels = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[0.0, 0.0, 1.0]])
    loss = algo.compute_sft_loss(logits, labels, mask)
    expected = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- top-p: the loss and its gradient stay finite ------------------------------------------


def _nucleus_batch(top_p=0.5, seed=0):
    """Logits, and tokens as an engine samples them under top-p: response tokens from the
    nucleus, padding holding each row's least likely token (surely outside the nucleus)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 4, 6, 40
    logits = torch.randn(B, T, V, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()
    probs = algo.apply_sampling_transform(logits, top_p=top_p).softmax(-1)  # [B, T, V]
    sampled = torch.multinomial(probs.view(-1, V), 1, generator=g).view(B, T)
    tokens = torch.where(mask, sampled, logits.argmin(-1))
    return logits.requires_grad_(), tokens, mask.float()


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("behaviour", ["on-policy", "engine log-probs"])
def test_top_p_batches_give_a_finite_loss_and_gradient(beta, loss_agg, behaviour):
    logits, tokens, mask = _nucleus_batch()
    logp = algo.compute_token_logprobs(logits, tokens, top_p=0.5)  # [B, T]
    # the two ways a batch used to turn the loss into NaN:
    assert torch.isinf(logp[mask == 0]).any()  # padding outside the nucleus: -inf - (-inf)
    ref_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) * 3  # another model
    assert torch.isinf(algo.compute_token_logprobs(ref_logits, tokens, top_p=0.5)[mask == 1]).any()  # k3 = +inf
    # the engine reports the sampled tokens' log-probs and 0 beyond them
    old = logp.detach() if behaviour == "on-policy" else torch.where(mask == 1, logp.detach() + 0.05, 0.0)
    ref = algo.compute_token_logprobs(ref_logits, tokens)  # the reference scores without truncation
    kl_logp = algo.compute_token_logprobs(logits, tokens)
    loss, stats = algo.compute_policy_loss(
        logp, old, torch.tensor([1.0, -0.5, 2.0, -1.5]), mask, ref_logp=ref, kl_logp=kl_logp, beta=beta, loss_agg=loss_agg
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert all(math.isfinite(v) for v in stats.values())
    if behaviour == "on-policy":
        assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    if beta:
        # the KL term is k3 of the untruncated log-probs over the response tokens
        k3 = (torch.exp(ref - kl_logp) - (ref - kl_logp) - 1).detach()
        assert stats["kl"] == pytest.approx(float((k3 * mask).sum() / mask.sum()), rel=1e-5)


def test_a_response_token_outside_the_policys_nucleus_has_ratio_zero():
    # after an update (or off-policy) a sampled token may have left the policy's nucleus
    logp = torch.tensor([[float("-inf"), -1.0]], requires_grad=True)
    old = torch.tensor([[-2.0, -1.0]])
    for adv, expected in ((1.0, (0.0 + -1.0) / 2), (-1.0, (0.8 + 1.0) / 2)):
        # adv > 0: min(0 x 1, 0.8 x 1) -> -0; adv < 0: the clipped 0.8 x 1 is the larger loss
        loss, _ = algo.compute_policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 2))
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == pytest.approx(expected) and torch.isfinite(grad).all()


# --- GRPO loss parity with TRL's formula ------------------------------------------------------


def trl_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """TRL GRPOTrainer's advantages (trl 1.16 `_generate_and_score_completions`), in float64.

    TRL requires num_generations >= 2; for a group of 1 its unbiased std is NaN, taken as 0 here.
    """
    grouped = rewards.double().view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = (grouped.std(dim=1) if group_size > 1 else torch.zeros(len(grouped), dtype=grouped.dtype)).repeat_interleave(group_size)
    advantages = rewards.double() - mean
    return advantages / (std + 1e-4) if scale else advantages


def trl_loss(logp, old_logp, ref_logp, advantages, mask, beta, eps_low, eps_high, loss_type):
    """TRL GRPOTrainer._compute_loss (trl 1.16), transcribed line by line, in float64."""
    logp, old_logp, ref_logp, advantages, mask = (t.double() for t in (logp, old_logp, ref_logp, advantages, mask))
    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":  # mean over all tokens of the batch
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    raise ValueError(loss_type)


PARITY_CASES = [
    # (rewards, group size): distinct rewards; groups of equal non-integer rewards (0.7 x 8
    # used to centre to ~6e-8, i.e. an advantage of ~6e-4 after / (0 + eps)); groups of 1
    ([0.0, 1.0, 0.5, 2.0, 1.3, 1.3, 0.2, 0.9], 4),
    ([0.7] * 8 + [2.675] * 4 + [0.1, 0.3, 0.3, 0.1], 8),
    ([0.3, 1.7, 0.3, 0.4], 1),
]


@pytest.mark.parametrize("rewards, group_size", PARITY_CASES)
@pytest.mark.parametrize("mode", ["std", "mean"])
def test_advantages_equal_trls(rewards, group_size, mode):
    rewards = torch.tensor(rewards)
    ours = algo.compute_group_advantages(rewards, group_size, mode)
    theirs = trl_advantages(rewards, group_size, scale=mode == "std")
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    for group in range(len(rewards) // group_size):  # a group whose rewards agree has exactly 0
        part = slice(group * group_size, (group + 1) * group_size)
        if len(set(rewards[part].tolist())) == 1:
            assert ours[part].abs().max() == 0.0


@pytest.mark.parametrize("rewards, group_size", PARITY_CASES)
@pytest.mark.parametrize("loss_agg, loss_type", [("token_mean", "bnpo"), ("seq_mean", "grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_and_gradient_equal_trls(rewards, group_size, loss_agg, loss_type, beta):
    g = torch.Generator().manual_seed(len(rewards) + group_size)
    B, T = len(rewards), 7
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # uneven masks: one full row, others shorter
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()  # [B, T]
    # log-probs near each other (ratios on both sides of the clip range); padding holds junk
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.3).requires_grad_()
    ref = old + torch.randn(B, T, generator=g) * 0.5
    junk = torch.randn(B, T, generator=g) * 4 - 2
    pad = mask == 0
    old, ref = torch.where(pad, junk, old), torch.where(pad, -junk, ref)
    with torch.no_grad():
        logp[pad] = junk[pad] * 0.5
    advantages = algo.compute_group_advantages(torch.tensor(rewards), group_size)
    ours, _ = algo.compute_policy_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.28, ref_logp=ref, beta=beta, loss_agg=loss_agg)
    logp64 = logp.detach().double().requires_grad_()
    theirs = trl_loss(logp64, old, ref, advantages, mask, beta, 0.2, 0.28, loss_type)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    (grad_theirs,) = torch.autograd.grad(theirs, logp64)
    torch.testing.assert_close(grad_ours.double(), grad_theirs, rtol=1e-5, atol=1e-7)
