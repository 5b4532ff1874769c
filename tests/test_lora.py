"""LoRA on the learner (lora.rank > 0): peft adapters in, merged weights out.

Unit tests of alphadrive_ray/lora.py on the tiny Qwen2-VL, then one DeepSpeed learner rank in a
Ray actor: the SFT loss falls, a sync carries merged weights (fewer bytes than a full sync) after
which the engine's log-probs equal the learner's, a GRPO step with its KL reference runs, a
checkpoint restores the adapters and their optimizer, and the export loads with
`from_pretrained` and holds the merged weights.
"""

from __future__ import annotations

import pytest
import torch

from alphadrive_ray.config import LORA_TARGETS
from alphadrive_ray.engines.base import SamplingParams
from tests.conftest import TEST_PROMPT

RANK, ALPHA = 4, 8


def wrapped(tiny_vl_dir, train_vision=True, targets=LORA_TARGETS):
    from alphadrive_ray.lora import apply_lora
    from alphadrive_ray.models.loading import load_model

    return apply_lora(load_model(tiny_vl_dir), RANK, ALPHA, 0.0, targets, train_vision)


def test_adapters_sit_on_the_language_model_only_and_train_alone(tiny_vl_dir):
    model = wrapped(tiny_vl_dir, train_vision=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all("language_model" in n and "visual" not in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable}
    assert adapted == set(LORA_TARGETS)
    # with the vision tower trained, its parameters (no adapters) train fully
    model = wrapped(tiny_vl_dir, train_vision=True)
    assert any(p.requires_grad and ".visual." in n and ".lora_" not in n for n, p in model.named_parameters())


def test_merged_weights_are_the_base_plus_the_scaled_low_rank_update(tiny_vl_dir):
    from alphadrive_ray.lora import base_name, merged_parameters
    from alphadrive_ray.models.loading import load_model

    base = dict(load_model(tiny_vl_dir).named_parameters())
    model = wrapped(tiny_vl_dir, train_vision=False)
    # peft starts B at zero: the merged model is the base model
    merged = dict(merged_parameters(model, everything=True))
    assert set(merged) == set(base)
    assert all(torch.equal(merged[n], base[n].detach()) for n in base)

    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.data.normal_()
    merged = dict(merged_parameters(model))  # what a sync sends: the adapted layers only
    params = dict(model.named_parameters())
    layer = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    a, b = params[f"{layer}.lora_A.default.weight"], params[f"{layer}.lora_B.default.weight"]
    name = base_name(f"{layer}.base_layer.weight")
    assert name == "model.language_model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], base[name].detach() + (ALPHA / RANK) * b.detach() @ a.detach())
    assert len(merged) == 7 * sum(1 for n in base if n.endswith("self_attn.q_proj.weight"))  # 7 targets per block
    assert all(".lora_" not in n for n in merged)
    # what a broadcast announces before it sends, computed without merging
    from alphadrive_ray.lora import synced_metas

    assert synced_metas(model) == [(n, t.dtype, tuple(t.shape)) for n, t in merged_parameters(model)]


def test_targets_that_match_nothing_are_a_clear_error(tiny_vl_dir):
    with pytest.raises(ValueError, match=r"lora.target_modules \['qkv_nope'\]: no layer of the language model matches"):
        wrapped(tiny_vl_dir, targets=("qkv_nope",))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.rank=-1"], "lora.rank must be 0 (off) or positive; got -1"),
        (["lora.rank=8", "lora.dropout=1.0"], "lora.dropout must be in [0, 1); got 1.0"),
        (["lora.rank=8", "learner.zero_stage=3"], "ZeRO-3 is not supported with LoRA"),
    ],
)
def test_bad_lora_settings_are_refused(overrides, message):
    from alphadrive_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_a_lora_learner_trains_syncs_checkpoints_and_exports_merged_weights(ray_cluster, tiny_vl_dir, scenes, tmp_path):
    import ray
    from transformers import Qwen2VLForConditionalGeneration

    from alphadrive_ray import algo, weight_sync
    from alphadrive_ray.actions import format_completion
    from alphadrive_ray.engines.hf import HFEngine
    from alphadrive_ray.models.loading import load_model
    from alphadrive_ray.workers.group import LearnerGroup, Resources
    from alphadrive_ray.workers.learner import GRPOSample, LearnerSpec, SFTExample

    spec = LearnerSpec(
        model_path=tiny_vl_dir,
        prompt_template=TEST_PROMPT,
        backend="gloo",
        cpus=1,
        seed=0,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets=LORA_TARGETS,
        freeze_vision=True,  # the adapters alone (the unit tests above cover a trained vision tower)
    )
    group = LearnerGroup.start(spec, 1, Resources(cpus=1))
    torch.set_num_threads(1)
    engine = HFEngine(tiny_vl_dir, prompt_template=TEST_PROMPT, batch_size=16, zero_copy_weights=False)
    base = {n: p.detach().clone() for n, p in load_model(tiny_vl_dir).named_parameters()}
    try:
        group.begin_stage("sft")
        batch = [SFTExample(r, format_completion(r.reasoning, r.speed_action, r.path_action)) for r in scenes[:4]]
        losses = [group.sft_step(batch, 4, 5e-3)["loss/sft"] for _ in range(8)]
        assert losses[-1] < losses[0] - 0.2, losses  # 4.45 -> 4.17 when written

        # the sync: the merged weights of the adapted layers, nothing frozen
        bucket_refs = group.export_weights(bucket_mb=1)
        sent = {m.name: m.nbytes for metas, _ in bucket_refs for m in metas}
        full = sum(t.numel() * t.element_size() for t in base.values())
        assert 0 < sum(sent.values()) < full
        adapted = tuple(f".{t}.weight" for t in LORA_TARGETS)
        assert all(n.endswith(adapted) for n in sent)  # no frozen tensor
        assert "lm_head.weight" not in sent and "model.language_model.embed_tokens.weight" not in sent
        engine.load_weights(weight_sync.receive(bucket_refs), version=1)
        learned = group.state_dict_cpu()
        engine_state = {n: p.detach() for n, p in engine.model.named_parameters()}
        assert set(learned) == set(base)
        for name, tensor in learned.items():
            assert torch.equal(engine_state[name], tensor), name
        moved = [n for n in sent if not torch.equal(learned[n], base[n])]
        assert len(moved) == len(sent)  # every merged layer trained

        # the engine samples under the synced weights; the learner scores the same tokens
        groups = engine.generate(scenes[:2], SamplingParams(n=4, max_new_tokens=12, seed=1))
        samples = [GRPOSample(g.record, c.token_ids, c.logprobs, 0.0) for g in groups for c in g.completions]
        learner_logprobs = ray.get(group.actors[0].compute_logprobs.remote(samples))
        diff = max(abs(a - b) for s, lp in zip(samples, learner_logprobs) for a, b in zip(s.logprobs, lp))
        assert diff < 1e-4

        # GRPO with its KL reference (built from the merged weights: KL 0 at the start)
        group.begin_stage("grpo", 0.04, str(tmp_path / "reference.safetensors"))
        rewards = torch.arange(len(samples), dtype=torch.float32)
        advantages = algo.compute_group_advantages(rewards, 4).tolist()
        samples = [GRPOSample(s.record, s.token_ids, s.logprobs, a) for s, a in zip(samples, advantages)]
        metrics = group.grpo_step(
            samples, 4, 1e-3, eps_low=0.2, eps_high=0.2, beta=0.04, kl_estimator="k3", loss_agg="token_mean", use_engine_logprobs=False
        )
        assert metrics["loss/kl"] == pytest.approx(0.0, abs=1e-6) and all(v == v for v in metrics.values())  # no NaN

        # a checkpoint restores the adapters (and their optimizer state)
        group.save_state(str(tmp_path / "ckpt"), {"stage": "grpo", "step": 1})
        saved = group.state_dict_cpu()
        group.grpo_step(samples, 4, 1e-2, eps_low=0.2, eps_high=0.2, beta=0.04, kl_estimator="k3", loss_agg="token_mean", use_engine_logprobs=False)
        assert any(not torch.equal(saved[n], t) for n, t in group.state_dict_cpu().items())
        group.load_state(str(tmp_path / "ckpt"))
        assert all(torch.equal(saved[n], t) for n, t in group.state_dict_cpu().items())

        # `alphadrive-ray export` of that checkpoint merges its adapters into the base weights
        from alphadrive_ray.errors import UserError
        from alphadrive_ray.train.export import export_checkpoint

        with pytest.raises(UserError, match="holds LoRA adapters but no run config gives lora.alpha"):
            export_checkpoint(tmp_path / "ckpt", tmp_path / "from-ckpt", tiny_vl_dir)
        exported = dict(
            Qwen2VLForConditionalGeneration.from_pretrained(
                export_checkpoint(tmp_path / "ckpt", tmp_path / "from-ckpt", tiny_vl_dir, lora_alpha=ALPHA)
            ).named_parameters()
        )
        for name, tensor in saved.items():
            torch.testing.assert_close(exported[name].detach(), tensor, rtol=0, atol=1e-6)

        # the export: a plain Qwen2-VL with the merged weights
        out = group.save_hf(str(tmp_path / "export"))
        exported = dict(Qwen2VLForConditionalGeneration.from_pretrained(out).named_parameters())
        assert set(exported) == set(saved)
        assert all(torch.equal(exported[n].detach(), t) for n, t in saved.items())
    finally:
        group.shutdown()
