"""GRPO and SFT math as small pure functions on tensors.

GRPO: Shao et al., "DeepSeekMath", arXiv 2402.03300 (group-normalised advantages, k3 KL
in the loss); Dr.GRPO: Liu et al., arXiv 2503.20783 (no std normalisation); DAPO: Yu et
al., arXiv 2503.14476 (decoupled clip eps_low / eps_high, dynamic sampling).

Top-p (`rollout.top_p < 1`): tokens outside the nucleus have log-prob -inf under the
sampling distribution. The clipped ratio is computed under that truncated distribution
(it is what the engine sampled from and reports log-probs of, so on-policy the ratio is
exactly 1 and off-policy it is the true importance weight); the KL penalty compares policy
and reference under the temperature-scaled distribution without truncation, as TRL does (a
sampled token outside the *reference's* nucleus would make a truncated KL infinite). Only
response tokens enter either term, so padding positions, whatever token id and log-prob
they hold, can never turn the loss or its gradient into NaN.

Normalisation across a distributed batch: every loss here is a *sum* over its tokens (or
sequences) divided by the count over the whole global batch (`total_tokens` /
`total_sequences`), so summing the micro-batch losses of all ranks gives exactly the
loss of the global batch. The learner undoes DeepSpeed's own averaging (see
`LearnerWorker`), so gradients are those of the global loss.
"""

from __future__ import annotations

import torch


def compute_group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of each completion relative to its group.

    rewards: [N * G], groups contiguous. mode "std": (r - mean) / (std + eps) (GRPO; the
    release uses the unbiased std and eps 1e-4); "mean": r - mean (Dr.GRPO).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [N, G]
    # NOTE: shifted by each group's first reward before the mean: equal rewards then centre to
    # exactly 0. A float32 mean of 8 x 0.7 is off by ~6e-8, which / (0 + eps) became an
    # advantage of ~6e-4 for every completion of a group that has nothing to teach.
    shifted = grouped - grouped[:, :1]
    centred = shifted - shifted.mean(dim=1, keepdim=True)
    if mode == "mean":
        return centred.view(-1)
    if mode != "std":
        raise ValueError(f"unknown advantage mode {mode!r}")
    std = shifted.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(centred)
    return (centred / (std + eps)).view(-1)


def apply_sampling_transform(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    banned_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution the engine samples from, as logits: banned tokens, temperature, top-p.

    `banned_ids` can never be sampled (the vision placeholders: a completion holding an
    image pad token would break the model's image/feature alignment). Tokens outside the
    nucleus get -inf. The rollout engine samples from exactly these
    logits and the learner computes log-probs from them, so the two agree (a mismatch
    here is the trainer/engine log-prob gap users of other systems report).
    Same semantics as transformers' TopPLogitsWarper: keep the smallest set of most likely
    tokens whose probability reaches top_p, and always the most likely one.
    """
    logits = logits.float()
    if banned_ids is not None and banned_ids.numel():
        logits = logits.index_fill(-1, banned_ids.to(logits.device), float("-inf"))
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def compute_token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    banned_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(token) under the sampling distribution. logits [B, T, V], tokens [B, T] -> [B, T].

    Padding positions may hold any token id; callers mask them.
    """
    logp = torch.log_softmax(apply_sampling_transform(logits, temperature, top_p, banned_ids), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def compute_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

    k1 = log r, k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r' = pi_ref / pi (unbiased, >= 0).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        neg = (-log_ratio).clamp(max=20.0)  # exp overflow guard; far beyond any useful ratio
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def aggregate_loss(
    per_token: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token_mean",
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar, normalised by global counts.

    token_mean: sum over all tokens / total_tokens (every token of the global batch weighs
    the same). seq_mean: each sequence's mean over its tokens, summed / total_sequences.
    Counts default to this micro-batch's own (single-process use).
    """
    mask = response_mask.to(per_token.dtype)
    if mode == "token_mean":
        denom = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=per_token.dtype)
        return (per_token * mask).sum() / denom.clamp(min=1.0)
    if mode == "seq_mean":
        per_seq = (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # [B]
        n_seqs = per_token.shape[0] if total_sequences is None else total_sequences
        return per_seq.sum() / max(float(n_seqs), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def compute_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio GRPO loss with an optional KL penalty in the loss.

    logp, old_logp, ref_logp, kl_logp, response_mask: [B, T]; advantages: [B] (one per
    sequence). `logp` / `old_logp` are under the sampling distribution (may be -inf outside
    a top-p nucleus); `kl_logp` (default `logp`) and `ref_logp` are the policy's and the
    reference's log-probs for the KL term, finite on response tokens (no truncation).
    Positions outside `response_mask` are ignored whatever they hold. A response token that
    is outside the policy's nucleus (logp -inf) has ratio 0; one whose behaviour log-prob is
    not finite (the behaviour policy could not have sampled it) has ratio 1 and no gradient.
    Returns the scalar loss and detached statistics over this micro-batch's tokens.
    """
    mask = response_mask.bool()
    adv = advantages.to(logp.dtype).unsqueeze(-1)  # [B, 1]
    # NOTE: -inf - (-inf) is NaN and NaN x 0 stays NaN: select before exp, never multiply by the mask
    in_ratio = mask & torch.isfinite(old_logp)
    ratio = torch.exp(torch.where(in_ratio, logp - old_logp, torch.zeros_like(logp)))  # [B, T]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    kl = None
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        policy = logp if kl_logp is None else kl_logp
        zero = torch.zeros_like(policy)
        kl = compute_kl(torch.where(mask, policy, zero), torch.where(mask, ref_logp, zero), kl_estimator)
        per_token = per_token + beta * kl
    loss = aggregate_loss(per_token, response_mask, loss_agg, total_tokens, total_sequences)

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_frac": float(((clipped > unclipped) & mask).sum() / n),
            "ratio_mean": float((ratio * mask).sum() / n),
            "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
            "tokens": float(mask.sum()),
        }
    return loss, stats


def compute_sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    total_tokens: float | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy on the masked tokens (the completion; prompt and image masked).

    logits [B, T, V] predict labels [B, T] (already shifted); loss_mask [B, T].
    """
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # [B, T]
    return aggregate_loss(nll, loss_mask, "token_mean", total_tokens)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
