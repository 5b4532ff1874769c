"""From dataset records to model inputs: prompt encoding (cached) and batch collation.

Layout of a batch, shared by the rollout engines and the learners:

    [pad pad | prompt tokens (with image pads) | completion tokens | pad pad]
     <---- left-padded to P columns ---------> <-- right-padded to C ---->

All completions start at column P, so the logits that predict them are the last C + 1
positions (`logits_to_keep`), and Qwen2-VL's M-RoPE positions are computed from the
attention mask, so padding never shifts them.

GRPO batches hold G completions of each prompt. With `collate(..., share_prompts=True)`
`completion_logits` runs each distinct prompt (and its image) once and the completions on
copies of its KV cache: the same logits and gradients as G full rows, without computing the
prompt G times (the prompt is most of a row: ~130 of ~195 tokens in the quickstart).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence, cast

import torch

from alphadrive_ray.data.records import Record
from alphadrive_ray.prompts import PLANNING_PROMPT, chat_messages, planning_prompt


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: tuple[int, ...]
    pixel_values: torch.Tensor | None  # [patches, C * T * p * p]
    image_grid_thw: torch.Tensor | None  # [1, 3]

    @property
    def nbytes(self) -> int:
        pixels = 0 if self.pixel_values is None else self.pixel_values.numel() * self.pixel_values.element_size()
        return pixels + 8 * len(self.input_ids)


IMAGE_CACHE_MB = 1024  # default bound of a PromptEncoder's cache (data.image_cache_mb)

VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def vision_placeholder_ids(tokenizer) -> torch.Tensor:
    """Ids of the vision placeholder tokens: a completion must never contain them (the model
    would take a generated image pad for an image slot), so sampling bans them."""
    vocab = tokenizer.get_vocab()
    return torch.tensor(sorted(vocab[t] for t in VISION_PLACEHOLDERS if t in vocab), dtype=torch.long)


def load_image(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


class PromptEncoder:
    """Encodes records for one policy (vision or text-only), caching by record id.

    The processor expands each image into its pad tokens and preprocesses the pixels;
    both cost more than a small model's forward pass, so encoded records are kept per
    process, least recently used first out, up to `cache_mb` megabytes of pixels and ids
    (0: no cache). A dataset's preprocessed pixels can be many times its JPEGs (a 224 px
    image is 1.2 MB of float32 patches), so the cache is bounded.
    """

    def __init__(self, processor, prompt_template: str = "", cache_mb: float = IMAGE_CACHE_MB):
        self.processor = processor
        self.template = prompt_template or PLANNING_PROMPT
        self.vision = hasattr(processor, "image_processor")
        self.tokenizer = processor.tokenizer if self.vision else processor
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[str, EncodedPrompt] = OrderedDict()
        self._cached_bytes = 0
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.eos_id is None or self.eos_id == self.tokenizer.unk_token_id:
            self.eos_id = self.tokenizer.eos_token_id
        self.image_token_id: int | None = self.tokenizer.convert_tokens_to_ids("<|image_pad|>") if self.vision else None
        self.banned_token_ids = vision_placeholder_ids(self.tokenizer)

    def prompt_text(self, record: Record) -> str:
        """The chat-formatted prompt, ending with the assistant turn's opening."""
        text = planning_prompt(record.speed, record.navigation, self.template)
        messages = chat_messages(text, image={} if self.vision else None)
        owner = self.processor if self.vision else self.tokenizer
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, record: Record) -> EncodedPrompt:
        hit = self._cache.get(record.id)
        if hit is not None:
            self._cache.move_to_end(record.id)
            return hit
        text = self.prompt_text(record)
        if self.vision:
            out = self.processor(text=[text], images=[load_image(record.image)], return_tensors="pt")
            encoded = EncodedPrompt(tuple(out["input_ids"][0].tolist()), out["pixel_values"], out["image_grid_thw"])
        else:
            encoded = EncodedPrompt(tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None, None)
        self._remember(record.id, encoded)
        return encoded

    def _remember(self, key: str, encoded: EncodedPrompt) -> None:
        size = encoded.nbytes
        if size > self.cache_bytes:
            return
        self._cache[key] = encoded
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes

    @property
    def cached_mb(self) -> float:
        """Megabytes held by the cache now."""
        return self._cached_bytes / 2**20

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of a target completion for SFT, ending with the end-of-turn token."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def collate(
        self,
        prompts: Sequence[EncodedPrompt],
        completions: Sequence[Sequence[int]] | None = None,
        share_prompts: bool = False,
    ) -> dict:
        """Batch prompts (left-padded) and optional completions (right-padded).

        Returns model inputs plus `completion_ids` [B, C] and `response_mask` [B, C] when
        completions are given; `logits_to_keep` = C + 1 selects the predicting logits.
        With `share_prompts` (and completions), rows with the same prompt are marked for
        `completion_logits` to compute that prompt once: `prompt_index` [B] maps each row
        to a distinct prompt, `prompt_rows` [U] names one row of each, and the pixels are
        those of the U distinct prompts only (this batch is for `completion_logits`).
        """
        P = max(len(p.input_ids) for p in prompts)
        C = max((len(c) for c in completions), default=0) if completions is not None else 0
        B = len(prompts)
        input_ids = torch.full((B, P + C), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P + C), dtype=torch.long)
        completion_ids = torch.full((B, C), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((B, C), dtype=torch.float32)
        for b, prompt in enumerate(prompts):
            n = len(prompt.input_ids)
            input_ids[b, P - n : P] = torch.tensor(prompt.input_ids)
            attention_mask[b, P - n : P] = 1
            if completions is not None:
                m = len(completions[b])
                if m:
                    completion_ids[b, :m] = torch.tensor(list(completions[b]))
                    response_mask[b, :m] = 1.0
        if completions is not None and C:
            input_ids[:, P:] = completion_ids
            attention_mask[:, P:] = response_mask.long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        distinct = list(prompts)
        if share_prompts and completions is not None:
            index, rows = distinct_prompts(prompts)
            distinct = [prompts[r] for r in rows]
            batch["prompt_index"] = torch.tensor(index, dtype=torch.long)
            batch["prompt_rows"] = torch.tensor(rows, dtype=torch.long)
        if self.vision:
            # a vision encoder's prompts carry pixels, and it has the image token's id
            batch["pixel_values"] = torch.cat([cast(torch.Tensor, p.pixel_values) for p in distinct], dim=0)
            batch["image_grid_thw"] = torch.cat([cast(torch.Tensor, p.image_grid_thw) for p in distinct], dim=0)
            batch["mm_token_type_ids"] = (input_ids == cast(int, self.image_token_id)).long()
        if completions is not None:
            batch["completion_ids"] = completion_ids
            batch["response_mask"] = response_mask
        return batch


def distinct_prompts(prompts: Sequence[EncodedPrompt]) -> tuple[list[int], list[int]]:
    """(index of each prompt's distinct prompt, first row of each distinct prompt).

    Prompts are the same when they are the same object (the encoder's cache) or have equal
    tokens and pixels (an encoder without a cache).
    """
    rows: list[int] = []
    index: list[int] = []
    for b, p in enumerate(prompts):
        for u, r in enumerate(rows):
            q = prompts[r]
            same = q is p or (
                q.input_ids == p.input_ids and _same_tensor(q.pixel_values, p.pixel_values) and _same_tensor(q.image_grid_thw, p.image_grid_thw)
            )
            if same:
                index.append(u)
                break
        else:
            index.append(len(rows))
            rows.append(b)
    return index, rows


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


def returned_cache(output):
    """The KV cache a forward returned: `cache` from transformers 5.20 on, `past_key_values`
    before (vLLM 0.32 caps transformers below 5.20, so GPU images run the older name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def core_model(model):
    """The transformers model under a DeepSpeed engine (`module`) and a peft wrapper (LoRA)."""
    core = getattr(model, "module", model)
    return core.get_base_model() if hasattr(core, "get_base_model") else core


def cache_argument(model) -> str:
    """The name under which `model`'s forward takes a KV cache (see `returned_cache`)."""
    core = core_model(model)
    return "cache" if "cache" in inspect.signature(core.forward).parameters else "past_key_values"


def prompt_positions(model, prompt: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Position ids of a left-padded prompt batch, and where each row's first completion token sits.

    Qwen2-VL (the prompt has `mm_token_type_ids`): M-RoPE positions from `get_rope_index`
    [3, B, P], and `n + rope_delta` [B, 1] (n = the row's unpadded length), where the full-row
    forward puts completion token 0. A text-only model numbers all columns: (None, P).
    """
    mask = prompt["attention_mask"]  # [B, P]
    if "mm_token_type_ids" not in prompt:
        return None, torch.full((mask.shape[0], 1), mask.shape[1], dtype=torch.long, device=mask.device)
    core = core_model(model).model  # the Qwen2-VL model (also under a DeepSpeed engine or peft)
    positions, rope_delta = core.get_rope_index(
        prompt["input_ids"],
        mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"],
        attention_mask=mask,
    )  # [3, B, P], [B, 1]
    return positions, mask.sum(dim=1, keepdim=True) + rope_delta


def completion_logits(model, batch: dict) -> torch.Tensor:
    """Logits that predict each completion token: [B, C, V]."""
    if "prompt_index" in batch:
        return _shared_prompt_logits(model, batch)
    C = batch["completion_ids"].shape[1]
    inputs = {k: v for k, v in batch.items() if k not in ("completion_ids", "response_mask")}
    out = model(**inputs, use_cache=False, logits_to_keep=C + 1)
    return out.logits[:, :-1, :]  # position P-1+j predicts completion token j


def _shared_prompt_logits(model, batch: dict) -> torch.Tensor:
    """`completion_logits` of a `share_prompts` batch: each distinct prompt once, then all
    completions on copies of their prompt's KV cache (gradients flow into the prompt once).

    Positions are those of the full-row forward (`prompt_positions`): completion token j of
    a row sits at its prompt's start + j.
    """
    completion_ids = batch["completion_ids"]  # [B, C]
    index, rows = batch["prompt_index"], batch["prompt_rows"]  # [B], [U]
    B, C = completion_ids.shape
    mask = batch["attention_mask"]  # [B, P + C]
    P = mask.shape[1] - C
    prompt = {"input_ids": batch["input_ids"][rows, :P], "attention_mask": mask[rows, :P]}
    if "pixel_values" in batch:
        prompt.update(
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"][rows, :P],
        )
    positions, start = prompt_positions(model, prompt)  # start: [U, 1]
    completion_positions = start[index] + torch.arange(C, device=mask.device)  # [B, C]
    if positions is not None:
        completion_positions = completion_positions.unsqueeze(0).expand(3, -1, -1)  # M-RoPE: [3, B, C]
    head = model(**prompt, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = returned_cache(head)
    for layer in cache.layers:
        layer.batch_select_indices(index)  # [U, ...] -> [B, ...], differentiable
    tail = model(
        input_ids=completion_ids,
        attention_mask=mask,
        position_ids=completion_positions,
        use_cache=True,
        logits_to_keep=C,
        **{cache_argument(model): cache},
    )
    # the prompt's last position predicts completion token 0; completion position j predicts token j + 1
    return torch.cat([head.logits[index], tail.logits[:, :-1, :]], dim=1)  # [B, C, V]
