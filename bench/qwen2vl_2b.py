"""The sizes of Qwen2-VL-2B-Instruct (its release config.json), for the benchmarks that need a
model of that size (bench/weight_sync.py, bench/gpu.py)."""

TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
