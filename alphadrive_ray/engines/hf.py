"""The transformers rollout engine (CPU, or one GPU): batched sampling with a KV cache.

Sampling goes through `apply_sampling_transform`, the same function the learner uses to
compute log-probs, so temperature and top-p are applied identically on both sides.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from alphadrive_ray.algo import apply_sampling_transform
from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Completion, Group, SamplingParams
from alphadrive_ray.inputs import PromptEncoder
from alphadrive_ray.models.loading import load_model, load_processor


class SamplingTransform:
    """A transformers logits processor applying `apply_sampling_transform` (bans, temperature, top-p)."""

    def __init__(self, temperature: float, top_p: float, banned_ids: torch.Tensor):
        self.temperature = temperature
        self.top_p = top_p
        self.banned_ids = banned_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return apply_sampling_transform(scores, self.temperature, self.top_p, self.banned_ids)


class HFEngine:
    def __init__(
        self,
        model_path: str,
        *,
        prompt_template: str = "",
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 64,
        image_cache: bool = True,
        attn_implementation: str = "sdpa",
    ):
        self.device = torch.device(device)
        self.model = load_model(model_path, dtype, attn_implementation).to(self.device)
        self.model.requires_grad_(False)
        self.encoder = PromptEncoder(load_processor(model_path), prompt_template, cache=image_cache)
        self.batch_size = batch_size
        self.weight_version = 0
        self._params = dict(self.model.named_parameters())

    def parameter_names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        per_call = max(1, self.batch_size // params.n)
        groups: list[Group] = []
        for start in range(0, len(records), per_call):
            groups += self._generate_chunk(records[start : start + per_call], params, seed=params.seed + start)
        return groups

    def _generate_chunk(self, records: Sequence[Record], params: SamplingParams, seed: int) -> list[Group]:
        from transformers import LogitsProcessorList

        batch = self.encoder.collate([self.encoder.encode(r) for r in records])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        prompt_len = batch["input_ids"].shape[1]
        torch.manual_seed(seed)
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            eos_token_id=self.encoder.eos_id,
            pad_token_id=self.encoder.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
            top_k=None,
            top_p=None,
            temperature=None,
        )
        banned = self.encoder.banned_token_ids.to(self.device)
        if params.greedy:
            kwargs["do_sample"] = False
            kwargs["logits_processor"] = LogitsProcessorList([SamplingTransform(1.0, 1.0, banned)])
        else:
            kwargs["do_sample"] = True
            kwargs["logits_processor"] = LogitsProcessorList([SamplingTransform(params.temperature, params.top_p, banned)])
        out = self.model.generate(**batch, **kwargs)
        new_tokens = out.sequences[:, prompt_len:]  # [B * n, T]
        # scores are the processed logits each token was sampled from
        scores = torch.stack(out.scores, dim=1).float()  # [B * n, T, V]
        logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        groups = [Group(record=r) for r in records]
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            finish = "length"
            if self.encoder.eos_id in ids:
                ids = ids[: ids.index(self.encoder.eos_id) + 1]
                finish = "stop"
            groups[row // params.n].completions.append(
                Completion(
                    text=self.encoder.decode(ids),
                    token_ids=ids,
                    logprobs=logprobs[row, : len(ids)].tolist(),
                    finish_reason=finish,
                    weight_version=self.weight_version,
                )
            )
        return groups

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        n = 0
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                raise KeyError(f"weight sync: the engine's model has no parameter {name!r}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, engine expects {tuple(param.shape)}")
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            n += 1
        self.weight_version = version
        return n
