"""Build the embedded default model: a tiny, randomly initialised Qwen2-VL.

Everything runs offline: the byte-level BPE tokenizer is trained in-process on the
planning vocabulary (prompts, answers, reasoning), with the Qwen2-VL special tokens and
chat template, so that `from_pretrained(out_dir)` works for model and processor exactly
as for a real Qwen2-VL checkpoint.

    alphadrive-ray model init-tiny artifacts/tiny-qwen2vl --seed 0
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, cast

from alphadrive_ray.actions import NAVIGATION_COMMANDS, PATH_ACTIONS, SPEED_ACTIONS, format_answer
from alphadrive_ray.prompts import planning_prompt

# The Qwen2-VL special tokens, in the order of the real tokenizer's added tokens.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's pre-tokenisation regex (digits split one by one).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of Qwen2-VL-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model. The defaults (~4M parameters) learn the synthetic task on CPU.

    head_dim = text_hidden / text_heads must be 64 or 128 so that vLLM's CPU attention
    accepts the text-only variant; mrope_section must sum to head_dim / 2.
    """

    vocab_size: int = 2048
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 768
    vision_dim: int = 96
    vision_depth: int = 2
    vision_heads: int = 2
    patch_size: int = 14
    # Images are resized to this many pixels (224 x 224 -> 16 x 16 patches -> 64 tokens).
    # At 112 x 112 (16 tokens) a car 30 m ahead and one 50 m ahead differ by a pixel or two,
    # and the planner's distance bands were the tiny model's main error (docs/results-rule-labels.md).
    image_pixels: int = 224 * 224
    # Steps of vision pretraining on synthetic scenes (0: a random vision tower too).
    vision_pretrain_steps: int = 1000
    # Steps of language pretraining on image-grounded text without driving decisions, after
    # the vision pretraining (models/grounding.py; 0: a random language half).
    language_pretrain_steps: int = 300
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.text_heads


def default_corpus() -> Iterable[str]:
    """Text the tokenizer is trained on: prompts, answers and the synthetic reasoning."""
    from alphadrive_ray.data.synth import reasoning_corpus
    from alphadrive_ray.models.grounding import corpus as grounding_corpus

    for nav in NAVIGATION_COMMANDS:
        for tenth in range(0, 301, 7):
            yield planning_prompt(tenth / 10, nav)
    for speed, path in itertools.product(SPEED_ACTIONS, PATH_ACTIONS):
        yield format_answer(speed, path)
        yield f"<think> </think>\n{format_answer(speed, path)}"
    yield from reasoning_corpus()
    yield from grounding_corpus()
    # the chat template's own text, so that the wrapper costs a few tokens, not dozens
    for _ in range(20):
        yield "system\nYou are a helpful assistant.\nuser\nassistant\n"


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with Qwen2's pre-tokeniser and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BpeTrainer is deterministic for a fixed corpus order.
    bpe.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # transformers annotates merges as list[str] and unk_token as str; the BPE model takes (a, b) pairs and no unk token
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,  # type: ignore[arg-type]
        unk_token=None,  # type: ignore[arg-type]
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, spec: TinySpec):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.image_pixels, "longest_edge": spec.image_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=spec.patch_size)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=spec.patch_size)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def size_configs(spec: TinySpec) -> tuple[dict, dict]:
    """The text and vision configs' sizes (Qwen2VLConfig's names) of a model of `spec`'s sizes."""
    half = spec.head_dim // 2
    # Qwen2-VL splits the rotary half-dimensions into (temporal, height, width) sections.
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
    )
    vision = dict(
        depth=spec.vision_depth,
        embed_dim=spec.vision_dim,
        hidden_size=spec.text_hidden,
        num_heads=spec.vision_heads,
        mlp_ratio=4,
        patch_size=spec.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    return text, vision


def build_config(tokenizer, spec: TinySpec):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_sizes, vision_config = size_configs(spec)
    text_config = dict(
        vocab_size=len(tokenizer),
        **text_sizes,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    # bos / eos / pad_token_id go through PreTrainedConfig's **kwargs, which the dataclass signature mypy sees lacks
    return Qwen2VLConfig(  # type: ignore[call-arg]
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def scene_attributes(scene) -> list[int]:
    """Classes of what a driver must see in a synthetic scene (targets of vision pretraining)."""
    from alphadrive_ray.data.synth import lead_band

    lead = 0 if scene.lead_distance is None else 1 + lead_band(scene.lead_distance)  # 0: no lead car
    return [
        (None, "red", "yellow", "green").index(scene.light),
        (None, "near", "far").index(scene.intersection),
        lead,
        int(scene.pedestrian_distance is not None),
        int(scene.cones_distance is not None),
        int(scene.lane_on_left),
        int(scene.lane_on_right),
    ]


ATTRIBUTE_CLASSES = (4, 3, 5, 2, 2, 2, 2)  # light, intersection, lead distance, pedestrian, cones, left lane, right lane


PRETRAIN_THREADS = 2  # torch threads of the vision pretraining, whatever the machine


def pretrain_vision(model, processor, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 1e-3, log=None) -> float:
    """Pretrain the vision tower to recognise scene attributes; returns the final training accuracy.

    A real Qwen2-VL starts from a pretrained vision encoder; a randomly initialised tiny one
    would spend most of a CPU budget learning to see. Before any planning data, the tower
    learns to classify what is in synthetic front views (lights and their colour, the lead
    car's distance band, pedestrians, cones, intersections, lanes) through linear heads on
    its max-pooled output tokens; the heads are then dropped. The language model stays random.
    """
    import torch

    threads = torch.get_num_threads()
    # NOTE: float reductions depend on the thread count; a fixed count makes the weights a
    # function of the seed on a given machine, whatever the caller's thread setting
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(10_000 + seed)  # the heads' initialisation: deterministic, global RNG untouched
            return _pretrain_vision(model, processor, steps, seed, batch_size, lr, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain_vision(model, processor, steps: int, seed: int, batch_size: int, lr: float, log) -> float:
    import random

    import torch

    from alphadrive_ray.data.synth import random_scene, render_scene

    rng = random.Random(10_000 + seed)  # scenes unlike any dataset split's
    visual = model.model.visual
    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(width, k) for k in ATTRIBUTE_CLASSES)
    params = [p for p in visual.parameters()] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    visual.train()
    accuracy = 0.0
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch_size)]
        images = [render_scene(s, size=224, seed=rng.randrange(2**31)) for s in scenes]
        inputs = processor.image_processor(images=images, return_tensors="pt")
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
        tokens = tokens.view(batch_size, -1, width)  # [B, N, D]
        targets = torch.tensor([scene_attributes(s) for s in scenes])  # [B, 7]
        pooled = tokens.max(dim=1).values  # [B, D]: small objects survive max-pooling
        logits = [head(pooled) for head in heads]
        loss = cast(torch.Tensor, sum(torch.nn.functional.cross_entropy(lg, targets[:, k]) for k, lg in enumerate(logits)))  # heads: never empty
        # NOTE: every image token is also asked for the whole scene's attributes: the language
        # model then finds them wherever it looks, and starts reading images within a hundred
        # steps instead of many hundreds (with the max-pooled readout alone they sit in a few tokens)
        loss = loss + sum(
            torch.nn.functional.cross_entropy(head(tokens).flatten(0, 1), targets[:, k].repeat_interleave(tokens.shape[1]))
            for k, head in enumerate(heads)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            right = torch.stack([lg.argmax(-1) == targets[:, k] for k, lg in enumerate(logits)]).float().mean().item()
        accuracy = 0.9 * accuracy + 0.1 * right if step else right
        if log is not None and (step + 1) % 100 == 0:
            log(f"vision pretraining {step + 1}/{steps}: loss {loss.item():.3f}, attribute accuracy {accuracy:.3f}")
    visual.eval()
    return accuracy


def build_tiny_qwen2vl(
    out_dir: str | Path, spec: TinySpec = TinySpec(), corpus: Iterable[str] | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Train the tokenizer, initialise the model from `spec.seed` and save both to `out_dir`.

    `log` receives the vision pretraining's progress (every 100 steps).
    """
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(default_corpus() if corpus is None else corpus, spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    config = build_config(tokenizer, spec)
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(config)
    if spec.vision_pretrain_steps:
        pretrain_vision(model, processor, spec.vision_pretrain_steps, seed=spec.seed, log=log)
    if spec.language_pretrain_steps:
        from alphadrive_ray.models.grounding import pretrain_language

        pretrain_language(model, processor, spec.language_pretrain_steps, seed=spec.seed, log=log)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_tiny_qwen2(out_dir: str | Path, spec: TinySpec = TinySpec(), corpus: Iterable[str] | None = None) -> Path:
    """A text-only tiny Qwen2 (same tokenizer and sizes, no vision tower).

    The policy sees the planning prompt without the image; vLLM's CPU build can serve it,
    which is how the vLLM engine is tested on machines without a GPU.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(default_corpus() if corpus is None else corpus, spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out
