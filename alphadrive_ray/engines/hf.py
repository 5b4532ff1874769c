"""The transformers rollout engine (CPU, or one GPU): batched sampling with a KV cache.

Sampling goes through `apply_sampling_transform`, the same function the learner uses to
compute log-probs, so temperature and top-p are applied identically on both sides.

Two decoding loops (`loop`):

- `lean` (default): each prompt is prefilled once (image through the vision tower once),
  its KV cache is copied G times into a preallocated buffer with room for the completion,
  and a small loop decodes all B x G rows: one forward per token with a precomputed
  attention mask and explicit positions, no per-token Python of `generate`. Positions
  follow the learner's batch layout (`inputs.collate`): Qwen2-VL's M-RoPE positions of the
  prompt come from `get_rope_index`, and completion token j sits at `n + j + rope_delta`
  (n = the prompt's unpadded length), exactly where the learner's full forward puts it.
- `generate`: transformers' `model.generate(num_return_sequences=G)`, which repeats the
  prompt (and the vision tower) G times; kept as the reference the lean loop is tested
  and benchmarked against (bench/grpo_vs_trl.py, docs/performance.md).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from alphadrive_ray.algo import apply_sampling_transform
from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Completion, Group, SamplingParams
from alphadrive_ray.inputs import IMAGE_CACHE_MB, PromptEncoder, cache_argument, prompt_positions, returned_cache
from alphadrive_ray.models.loading import load_model, load_processor
from alphadrive_ray.weight_sync import HostStaging, load_into_parameters


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
        image_cache_mb: float = IMAGE_CACHE_MB,
        attn_implementation: str = "sdpa",
        loop: str = "lean",
        zero_copy_weights: bool = False,
        min_pixels: int = 0,
        max_pixels: int = 0,
    ):
        if loop not in ("lean", "generate"):
            raise ValueError(f"unknown HF decoding loop {loop!r}; expected 'lean' or 'generate'")
        self.loop = loop
        self.device = torch.device(device)
        # CPU only: synced tensors in shared memory can be the parameters themselves
        self.zero_copy_weights = zero_copy_weights and self.device.type == "cpu"
        self.model = load_model(model_path, dtype, attn_implementation).to(self.device)
        self.model.requires_grad_(False)
        self.encoder = PromptEncoder(load_processor(model_path, min_pixels, max_pixels), prompt_template, cache_mb=image_cache_mb)
        self.batch_size = batch_size
        self.weight_version = 0
        self._params = dict(self.model.named_parameters())
        self._borrowed: set[str] = set()  # parameters that are views of received buffers (zero-copy sync)
        # GPU: received tensors (pageable object-store memory) go to the GPU through a pinned
        # buffer as large as the largest tensor
        self._staging = HostStaging() if self.device.type == "cuda" else None

    def parameter_names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        if params.greedy and params.n > 1:
            # arg-max decoding has one answer per prompt: repeat it (transformers refuses n > 1)
            single = self.generate(records, SamplingParams(**{**params.__dict__, "n": 1}))
            for group in single:
                group.completions = [group.completions[0]] * params.n
            return single
        per_call = max(1, self.batch_size // params.n)
        groups: list[Group] = []
        for start in range(0, len(records), per_call):
            chunk = records[start : start + per_call]
            if self.loop == "lean":
                groups += self._lean_chunk(chunk, params, seed=params.seed + start)
            else:
                groups += self._generate_chunk(chunk, params, seed=params.seed + start)
        return groups

    def _groups(self, records: Sequence[Record], n: int, new_tokens: torch.Tensor, logprobs: torch.Tensor) -> list[Group]:
        """Completions (cut after the end-of-turn token) from [B * n, T] tokens and log-probs."""
        groups = [Group(record=r) for r in records]
        token_rows = new_tokens.tolist()
        logprob_rows = logprobs.tolist()
        for row, ids in enumerate(token_rows):
            finish = "length"
            if self.encoder.eos_id in ids:
                ids = ids[: ids.index(self.encoder.eos_id) + 1]
                finish = "stop"
            groups[row // n].completions.append(
                Completion(
                    text=self.encoder.decode(ids),
                    token_ids=ids,
                    logprobs=logprob_rows[row][: len(ids)],
                    finish_reason=finish,
                    weight_version=self.weight_version,
                )
            )
        return groups

    def _lean_chunk(self, records: Sequence[Record], params: SamplingParams, seed: int) -> list[Group]:
        """Prefill each prompt once, copy its KV cache n times, decode all rows together."""
        G, T = params.n, params.max_new_tokens
        batch = self.encoder.collate([self.encoder.encode(r) for r in records])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        prompt_mask = batch["attention_mask"]  # [B, P]
        B, P = prompt_mask.shape
        N = B * G
        # M-RoPE positions of the prompts (a text-only model: None), and where each row's
        # completion starts (the learner's layout)
        positions, next_position = prompt_positions(self.model, batch)  # [3, B, P] | None, [B, 1]
        prefill = self.model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = _RepeatedKVCache(returned_cache(prefill), G, T)
        cache_name = cache_argument(self.model)
        logits = prefill.logits[:, -1].repeat_interleave(G, dim=0)  # [N, V]
        next_position = next_position.repeat_interleave(G, dim=0)  # [N, 1]
        # key mask over prompt + completion columns; column P + t opens when token t is fed
        key_mask = torch.zeros((N, 1, 1, P + T), dtype=torch.bool, device=self.device)
        key_mask[:, 0, 0, :P] = prompt_mask.bool().repeat_interleave(G, dim=0)

        banned = self.encoder.banned_token_ids.to(self.device)
        temperature, top_p = (1.0, 1.0) if params.greedy else (params.temperature, params.top_p)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = torch.full((N, T), self.encoder.pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((N, T), dtype=torch.float32, device=self.device)
        finished = torch.zeros(N, dtype=torch.bool, device=self.device)
        for t in range(T):
            # the distribution of token t, as the learner computes it (algo.compute_token_logprobs)
            dist = torch.log_softmax(apply_sampling_transform(logits, temperature, top_p, banned), dim=-1)  # [N, V]
            if params.greedy:
                token = dist.argmax(dim=-1)
            else:
                token = torch.multinomial(dist.exp(), 1, generator=generator).squeeze(1)
            token = token.masked_fill(finished, self.encoder.pad_id)  # finished rows idle on padding
            tokens[:, t] = token
            logprobs[:, t] = dist.gather(-1, token.unsqueeze(1)).squeeze(1)
            finished |= token == self.encoder.eos_id
            if t + 1 == T or bool(finished.all()):
                break
            key_mask[:, 0, 0, P + t] = True
            position = next_position + t  # [N, 1]
            out = self.model(
                input_ids=token.unsqueeze(1),
                attention_mask={"full_attention": key_mask[..., : P + t + 1]},
                position_ids=position.unsqueeze(0).expand(3, -1, -1) if self.encoder.vision else position,
                use_cache=True,
                **{cache_name: cache},
            )
            cache.advance(1)
            logits = out.logits[:, -1]
        return self._groups(records, G, tokens[:, : t + 1], logprobs[:, : t + 1])

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
        return self._groups(records, params.n, new_tokens, logprobs)

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *, zero_copy: bool | None = None) -> int:
        """Copy the tensors into the model; with zero copy (the engine's `zero_copy_weights`
        unless `zero_copy` says otherwise), use matching ones as the parameters themselves
        (read-only object-store buffers; see weight_sync.load_into_parameters)."""
        zero_copy = self.zero_copy_weights if zero_copy is None else zero_copy
        n = load_into_parameters(self._params, named_tensors, zero_copy=zero_copy, borrowed=self._borrowed, staging=self._staging)
        self.weight_version = version
        return n

    def weight_digests(self) -> dict[str, str]:
        """`weight_sync.tensor_digest` of every parameter, by its checkpoint name (`sync.verify`)."""
        from alphadrive_ray.weight_sync import tensor_digest

        return {name: tensor_digest(param) for name, param in self._params.items()}

    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """`sync.backend: gloo`: join learner rank 0's broadcast group (rank `rank_offset`),
        replacing any group joined before (see weight_sync, "broadcast groups")."""
        from alphadrive_ray.weight_sync import GlooBroadcastGroup

        self._sync_group = None  # the old group (its connections) goes first
        self._sync_group = GlooBroadcastGroup(master_address, master_port, rank_offset, world_size)

    def receive_weights_broadcast(self, metas: Sequence[tuple[str, str, Sequence[int]]], version: int) -> int:
        """Receive [(name, dtype, shape)] from learner rank 0's broadcast; each tensor is loaded as it arrives."""
        from alphadrive_ray.weight_sync import receive_broadcast

        group = getattr(self, "_sync_group", None)
        if group is None:
            raise RuntimeError("weight sync: receive_weights_broadcast before init_weight_sync_group")
        return self.load_weights(receive_broadcast(group, metas), version)


class _RepeatedKVCache:
    """A preallocated KV cache for the lean loop: the prefill of B prompts repeated G times.

    Per layer, keys and values live in one [B * G, kv_heads, P + T, head_dim] buffer; the
    prompt columns are filled once, and each decoded token is written in place (no growing
    `torch.cat` per token). `update` returns views of the filled columns. Implements the part
    of transformers' `Cache` interface the decoder layers use (`update`, `get_seq_length`).
    """

    is_compileable = False

    def __init__(self, prefill_cache, repeats: int, extra: int):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in prefill_cache.layers:
            k, v = layer.keys, layer.values  # [B, h, P, d]
            B, h, P, _ = k.shape
            K = k.new_empty((B * repeats, h, P + extra, k.shape[-1]))
            V = v.new_empty((B * repeats, h, P + extra, v.shape[-1]))
            K[:, :, :P] = k.repeat_interleave(repeats, dim=0)
            V[:, :, :P] = v.repeat_interleave(repeats, dim=0)
            self.keys.append(K)
            self.values.append(V)
        self.length = prefill_cache.get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.keys[layer_idx][:, :, self.length : end] = key_states
        self.values[layer_idx][:, :, self.length : end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        """Every layer has written `n` more columns (called once per forward)."""
        self.length += n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length
