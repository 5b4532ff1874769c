"""The sizes of Qwen2-VL-2B-Instruct (its release config.json), for the benchmarks that need a
model of that size (bench/weight_sync.py, bench/gpu.py).

The sizes are in TinySpec's names: `alphadrive_ray.models.tiny.size_configs` turns them into the
config's, as for the tiny model. The vocabulary is the release's, with tied input and output
embeddings.
"""

SIZES = dict(
    text_hidden=1536, text_layers=28, text_heads=12, text_kv_heads=2, text_intermediate=8960, vision_dim=1280, vision_depth=32, vision_heads=16
)
VOCABULARY = dict(vocab_size=151936, tie_word_embeddings=True)


def meta_model():
    """Qwen2-VL-2B-Instruct's module tree on the meta device: shapes, no memory."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from alphadrive_ray.models.tiny import TinySpec, size_configs

    text, vision = size_configs(TinySpec(**SIZES))
    config = Qwen2VLConfig(text_config={**text, **VOCABULARY}, vision_config=vision, tie_word_embeddings=VOCABULARY["tie_word_embeddings"])
    with torch.device("meta"):
        return Qwen2VLForConditionalGeneration(config)
