"""From dataset records to model inputs: prompt encoding (cached) and batch collation.

Layout of a batch, shared by the rollout engines and the learners:

    [pad pad | prompt tokens (with image pads) | completion tokens | pad pad]
     <---- left-padded to P columns ---------> <-- right-padded to C ---->

All completions start at column P, so the logits that predict them are the last C + 1
positions (`logits_to_keep`), and Qwen2-VL's M-RoPE positions are computed from the
attention mask, so padding never shifts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from alphadrive_ray.data.records import Record
from alphadrive_ray.prompts import PLANNING_PROMPT, chat_messages, planning_prompt


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: tuple[int, ...]
    pixel_values: torch.Tensor | None  # [patches, C * T * p * p]
    image_grid_thw: torch.Tensor | None  # [1, 3]


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
    both cost more than a small model's forward pass, so each record is encoded once per
    process (`cache=True`).
    """

    def __init__(self, processor, prompt_template: str = "", cache: bool = True):
        self.processor = processor
        self.template = prompt_template or PLANNING_PROMPT
        self.vision = hasattr(processor, "image_processor")
        self.tokenizer = processor.tokenizer if self.vision else processor
        self.cache_enabled = cache
        self._cache: dict[str, EncodedPrompt] = {}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.eos_id is None or self.eos_id == self.tokenizer.unk_token_id:
            self.eos_id = self.tokenizer.eos_token_id
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>") if self.vision else None
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
            return hit
        text = self.prompt_text(record)
        if self.vision:
            out = self.processor(text=[text], images=[load_image(record.image)], return_tensors="pt")
            encoded = EncodedPrompt(tuple(out["input_ids"][0].tolist()), out["pixel_values"], out["image_grid_thw"])
        else:
            encoded = EncodedPrompt(tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None, None)
        if self.cache_enabled:
            self._cache[record.id] = encoded
        return encoded

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of a target completion for SFT, ending with the end-of-turn token."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def collate(self, prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[int]] | None = None) -> dict:
        """Batch prompts (left-padded) and optional completions (right-padded).

        Returns model inputs plus `completion_ids` [B, C] and `response_mask` [B, C] when
        completions are given; `logits_to_keep` = C + 1 selects the predicting logits.
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
        if self.vision:
            batch["pixel_values"] = torch.cat([p.pixel_values for p in prompts], dim=0)
            batch["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts], dim=0)
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        if completions is not None:
            batch["completion_ids"] = completion_ids
            batch["response_mask"] = response_mask
        return batch


def completion_logits(model, batch: dict) -> torch.Tensor:
    """Logits that predict each completion token: [B, C, V]."""
    C = batch["completion_ids"].shape[1]
    inputs = {k: v for k, v in batch.items() if k not in ("completion_ids", "response_mask")}
    out = model(**inputs, use_cache=False, logits_to_keep=C + 1)
    return out.logits[:, :-1, :]  # position P-1+j predicts completion token j
