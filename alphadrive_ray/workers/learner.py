"""A learner rank: one DeepSpeed data-parallel process training the policy.

A plain class (tests construct it directly); `alphadrive_ray.workers.group` wraps it in
Ray. All ranks of a group receive equal shards of each global batch and run the same
number of micro-batches, which ZeRO-3 requires (its forward passes are collectives).

Loss scaling, so that gradients equal those of the global-batch loss: each micro-batch
loss is a sum divided by the token (or sequence) count of the *global* batch
(all-reduced here), and DeepSpeed averages gradients over ranks, so the loss passed to
`backward` is multiplied by the world size and not divided by accumulation steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from alphadrive_ray import algo, weight_sync
from alphadrive_ray.data.records import Record
from alphadrive_ray.inputs import IMAGE_CACHE_MB, PromptEncoder, completion_logits
from alphadrive_ray.models.loading import load_model, load_processor
from alphadrive_ray.workers.process import ProcessInfo, policy_fields

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from alphadrive_ray.config import Config


@dataclass
class SFTExample:
    record: Record
    target: str  # the completion text to imitate: "<think> ... </think>\n<answer> ... </answer>"


@dataclass
class GRPOSample:
    record: Record
    token_ids: list[int]
    logprobs: list[float]  # the engine's, under the sampling distribution
    advantage: float


@dataclass(frozen=True)
class LearnerSpec:
    """What one learner rank needs: its part of the config plus the sampling transform."""

    model_path: str
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    share_prompts: bool = True  # GRPO: each prompt's forward once per micro-batch (inputs.completion_logits)
    freeze_vision: bool = False
    prompt_template: str = ""
    image_cache_mb: float = IMAGE_CACHE_MB  # 0: no image cache
    min_pixels: int = 0  # image-size bounds (data.min_pixels / data.max_pixels; 0: the model's own)
    max_pixels: int = 0
    zero_stage: int = 2
    lora_rank: int = 0  # 0: full fine-tuning (alphadrive_ray/lora.py)
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()
    backend: str = "gloo"
    grad_clip: float = 1.0
    cpus: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, c: Config) -> LearnerSpec:
        """The spec of every learner rank of a run (the one place config keys reach it)."""
        gpu = c.learner.gpus_per_worker > 0
        return cls(
            **policy_fields(c),
            gradient_checkpointing=c.model.gradient_checkpointing,
            share_prompts=c.learner.share_prompts,
            freeze_vision=c.model.freeze_vision,
            zero_stage=c.learner.zero_stage,
            lora_rank=c.lora.rank,
            lora_alpha=c.lora.alpha,
            lora_dropout=c.lora.dropout,
            lora_targets=tuple(c.lora.target_modules),
            backend=c.learner.backend if c.learner.backend != "auto" else ("nccl" if gpu else "gloo"),
            grad_clip=c.learner.grad_clip,
            cpus=c.learner.cpus_per_worker,
            temperature=c.rollout.temperature,
            top_p=c.rollout.top_p,
            seed=c.run.seed,
        )


def _safe_torch_load(path: str, map_location=None):
    """DeepSpeed's checkpoint reader, with `weights_only=True`: no arbitrary code from a file.

    DeepSpeed's optimizer files hold three plain classes besides tensors; only those are allowed.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _shards(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class LearnerWorker(ProcessInfo):
    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, master_addr: str, master_port: int):
        import deepspeed

        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        torch.set_num_threads(max(1, math.ceil(spec.cpus)))
        torch.manual_seed(spec.seed + rank)
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(world_size),
        )
        deepspeed.init_distributed(dist_backend=spec.backend, rank=rank, world_size=world_size, verbose=False)
        self.device = torch.device("cuda", 0) if spec.backend == "nccl" else torch.device("cpu")
        self.model = load_model(spec.model_path, spec.dtype, spec.attn_implementation)
        if spec.freeze_vision and hasattr(self.model, "model") and hasattr(self.model.model, "visual"):
            self.model.model.visual.requires_grad_(False)
        self.lora = spec.lora_rank > 0
        if self.lora:
            from alphadrive_ray.lora import apply_lora

            self.model = apply_lora(self.model, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, spec.lora_targets, not spec.freeze_vision)
        if spec.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if self.lora:  # frozen embeddings: the checkpointed blocks' inputs must carry gradients
                self.model.enable_input_require_grads()
        self.encoder = PromptEncoder(
            load_processor(spec.model_path, spec.min_pixels, spec.max_pixels), spec.prompt_template, cache_mb=spec.image_cache_mb
        )
        # NOTE: the shared-prompt forward passes a KV cache between two forwards, which
        # gradient checkpointing's recomputation does not support
        self.share_prompts = spec.share_prompts and not spec.gradient_checkpointing
        self.engine: DeepSpeedEngine | None = None  # set by setup (begin_stage)
        # GPU learners publish weights through one reused pinned buffer (a pageable .cpu() per
        # tensor was 12x slower on an H200); nothing is allocated before the first sync
        self._host_staging = weight_sync.HostStaging() if self.device.type == "cuda" else None
        self.ref_model = None
        self.stage: str | None = None
        self.global_step = 0

    # --- set-up ----------------------------------------------------------------------

    def ds_config(self, weight_decay: float) -> dict:
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.world_size,
            "gradient_clipping": self.spec.grad_clip,
            "zero_optimization": {"stage": self.spec.zero_stage},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": 1e-5, "weight_decay": weight_decay, "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True},
            },
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.spec.dtype == "bfloat16":
            config["bf16"] = {"enabled": True}
        return config

    def setup(self, weight_decay: float = 0.0) -> None:
        """Wrap the model in DeepSpeed (once; the optimizer is reset between stages)."""
        import deepspeed

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, model_parameters=params, config=self.ds_config(weight_decay))
        self.model = self.engine.module
        if self.engine.checkpoint_engine is not None:
            self.engine.checkpoint_engine.load = _safe_torch_load

    def begin_stage(self, stage: str, beta: float = 0.0, reference_path: str | None = None, weight_decay: float = 0.0) -> None:
        """Start SFT or GRPO: fresh optimizer moments and the stage's AdamW weight decay; for
        GRPO with beta > 0, a frozen reference.

        The reference is the policy as GRPO starts; with `reference_path` it is also saved
        there (safetensors, rank 0), or loaded from there when the file exists (resume).
        """
        if self.engine is None:
            self.setup(weight_decay)
        for state in self._inner_optimizer().state.values():
            state.clear()
        for group in self.optimizer.param_groups:
            group["weight_decay"] = weight_decay
        self.stage = stage
        self.ref_model = None
        if stage == "grpo" and beta > 0:
            self._make_reference(reference_path)

    def _make_reference(self, reference_path: str | None) -> None:
        from safetensors.torch import load_file, save_file

        ref = load_model(self.spec.model_path, self.spec.dtype, self.spec.attn_implementation)
        if reference_path and os.path.exists(reference_path):
            ref.load_state_dict(load_file(reference_path), strict=False)
        else:
            state = {name: t.detach().cpu().clone() for name, t in self.iter_full_parameters(everything=True)}
            ref.load_state_dict(state, strict=False)
            if reference_path and self.rank == 0:
                os.makedirs(os.path.dirname(reference_path) or ".", exist_ok=True)
                tmp = reference_path + ".tmp"
                save_file(state, tmp)
                os.replace(tmp, reference_path)
        ref.requires_grad_(False)
        self.ref_model = ref.to(self.device)

    def save_state(self, path: str, client_state: dict) -> None:
        """Model and optimizer states of this rank into `path` (every rank must call)."""
        state = {**client_state, "torch_rng": torch.get_rng_state(), "global_step": self.global_step}
        assert self.engine is not None  # a checkpoint is taken within a stage
        self.engine.save_checkpoint(path, tag="state", client_state=state, save_latest=False)

    def load_state(self, path: str) -> dict:
        """Restore model and optimizer states saved by `save_state`; returns the client state.

        A checkpoint of another world size or ZeRO stage (a resume with another
        `learner.num_workers`) is first re-sharded into this group's layout (`_resharded`).
        """
        assert self.engine is not None  # restored after begin_stage
        from alphadrive_ray.train import zero_checkpoint

        stage, world = zero_checkpoint.checkpoint_layout(os.path.join(path, "state"))
        if self.spec.zero_stage > 0 and (stage, world) != (self.spec.zero_stage, self.world_size):
            path = self._resharded(path, stage, world)
        load_path, client = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"no learner checkpoint in {path}")
        torch.set_rng_state(client.pop("torch_rng"))
        self.global_step = client.pop("global_step")
        return client

    def _resharded(self, path: str, stage: int, world: int) -> str:
        """`path`'s learner state laid out for this group (every rank must call); kept beside it
        (`learner-w<N>-z<stage>`) for later resumes of the same shape.

        The new layout is what this group's engines save (a template of their own, values
        replaced): `zero_checkpoint.reshard` writes each rank's files, rank 0 moves them in place.
        """
        import shutil

        import torch.distributed as dist

        from alphadrive_ray.train import zero_checkpoint

        assert self.engine is not None  # called from load_state, after begin_stage
        target = Path(path).with_name(f"learner-w{self.world_size}-z{self.spec.zero_stage}")
        if not (target / "state").is_dir():
            work = target.with_name(target.name + ".tmp")
            template = work / "template"
            if self.rank == 0:
                shutil.rmtree(work, ignore_errors=True)
            dist.barrier()
            self.engine.save_checkpoint(str(template), tag="state", client_state={}, save_latest=False)
            dist.barrier()
            zero_checkpoint.reshard(os.path.join(path, "state"), template / "state", work / "out" / "state", self.rank)
            dist.barrier()
            if self.rank == 0:
                os.replace(work / "out", target)
                shutil.rmtree(work, ignore_errors=True)
            dist.barrier()
        print(
            f"learner {self.rank}: re-sharded the ZeRO-{stage} state of {world} learner(s) "
            f"for {self.world_size} (ZeRO-{self.spec.zero_stage}) in {target}",
            flush=True,
        )
        return str(target)

    def _inner_optimizer(self):
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- training --------------------------------------------------------------------

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        assert self.engine is not None  # steps run within a stage
        self.engine.set_gradient_accumulation_boundary(last)
        # NOTE: DeepSpeed averages gradients over ranks; our losses are already divided
        # by the global count, so scale by world size to get the global-batch gradient.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def _step(self, lr: float) -> float:
        self.set_lr(lr)
        assert self.engine is not None  # steps run within a stage
        self.engine.step()
        self.global_step += 1
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def sft_step(self, examples: Sequence[SFTExample], micro_batch_size: int, lr: float) -> dict:
        """One optimizer step of next-token loss on the completions (prompt and image masked)."""
        assert self.engine is not None  # steps run within a stage
        self.engine.train()
        encoded = [(self.encoder.encode(ex.record), self.encoder.encode_completion(ex.target)) for ex in examples]
        (total_tokens,) = self._all_reduce([float(sum(len(c) for _, c in encoded))])
        micro = list(_shards(encoded, micro_batch_size))
        loss_sum = 0.0
        for i, chunk in enumerate(micro):
            batch = self._to_device(self.encoder.collate([p for p, _ in chunk], [c for _, c in chunk]))
            logits = completion_logits(self.engine, batch)  # [B, C, V]
            loss = algo.compute_sft_loss(logits, batch["completion_ids"], batch["response_mask"], total_tokens)
            self._backward(loss, last=i == len(micro) - 1)
            loss_sum += float(loss.detach())
        grad_norm = self._step(lr)
        (global_loss,) = self._all_reduce([loss_sum])
        return {"loss/sft": global_loss, "perf/grad_norm": grad_norm, "perf/lr": lr, "perf/tokens": total_tokens}

    def grpo_step(
        self,
        samples: Sequence[GRPOSample],
        micro_batch_size: int,
        lr: float,
        *,
        eps_low: float,
        eps_high: float,
        beta: float,
        kl_estimator: str,
        loss_agg: str,
        use_engine_logprobs: bool,
    ) -> dict:
        """One optimizer step of the clipped GRPO loss over this rank's shard.

        `use_engine_logprobs`: the behaviour policy's log-probs are the engine's (needed
        off-policy or with several updates per batch); otherwise old = current, detached.
        """
        assert self.engine is not None  # steps run within a stage
        self.engine.train()
        (total_tokens, total_seqs) = self._all_reduce([float(sum(len(s.token_ids) for s in samples)), float(len(samples))])
        micro = list(_shards(samples, micro_batch_size))
        stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "ratio_mean": 0.0, "logp_diff": 0.0, "tokens": 0.0}
        for i, chunk in enumerate(micro):
            batch = self._to_device(
                self.encoder.collate([self.encoder.encode(s.record) for s in chunk], [s.token_ids for s in chunk], self.share_prompts)
            )
            mask = batch["response_mask"]
            logits = completion_logits(self.engine, batch)
            ids, temperature, banned = batch["completion_ids"], self.spec.temperature, self.encoder.banned_token_ids
            # the ratio: under the truncated distribution the engine sampled from; the KL
            # term: policy and reference without top-p truncation (see algo's docstring)
            logp = algo.compute_token_logprobs(logits, ids, temperature, self.spec.top_p, banned)
            engine_logp = torch.zeros_like(logp)
            for b, s in enumerate(chunk):
                engine_logp[b, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=logp.dtype)
            old_logp = engine_logp if use_engine_logprobs else logp.detach()
            ref_logp = kl_logp = None
            if beta > 0 and self.ref_model is not None:
                if self.spec.top_p < 1.0:
                    kl_logp = algo.compute_token_logprobs(logits, ids, temperature, 1.0, banned)
                with torch.no_grad():
                    ref_logits = completion_logits(self.ref_model, batch)
                    ref_logp = algo.compute_token_logprobs(ref_logits, ids, temperature, 1.0, banned)
            advantages = torch.tensor([s.advantage for s in chunk], dtype=logp.dtype, device=logp.device)
            loss, mstats = algo.compute_policy_loss(
                logp,
                old_logp,
                advantages,
                mask,
                eps_low=eps_low,
                eps_high=eps_high,
                ref_logp=ref_logp,
                kl_logp=kl_logp,
                beta=beta,
                kl_estimator=kl_estimator,
                loss_agg=loss_agg,
                total_tokens=total_tokens,
                total_sequences=total_seqs,
            )
            self._backward(loss, last=i == len(micro) - 1)
            n = mstats["tokens"]
            stats["loss"] += float(loss.detach())
            for key in ("clip_frac", "kl", "ratio_mean"):
                stats[key] += mstats[key] * n
            # a token outside the learner's nucleus (-inf) has no finite gap; it shows in ratio_mean
            seen = mask.bool() & torch.isfinite(logp.detach())
            stats["logp_diff"] += float(torch.where(seen, logp.detach() - engine_logp, 0.0).abs().sum())
            stats["tokens"] += n
        grad_norm = self._step(lr)
        reduced = self._all_reduce([stats[k] for k in ("loss", "clip_frac", "kl", "ratio_mean", "logp_diff", "tokens")])
        policy_loss, clip, kl, ratio, diff, tokens = reduced
        tokens = max(tokens, 1.0)
        return {
            "loss/policy": policy_loss,
            "loss/clip_frac": clip / tokens,
            "loss/kl": kl / tokens,
            "loss/ratio_mean": ratio / tokens,
            "rollout/logp_diff": diff / tokens,
            "perf/grad_norm": grad_norm,
            "perf/lr": lr,
            "perf/tokens": tokens,
        }

    @torch.no_grad()
    def compute_logprobs(self, samples: Sequence[GRPOSample]) -> list[list[float]]:
        """Log-probs of the given completions under the current policy (for tests and diagnostics)."""
        self.engine.eval() if self.engine is not None else self.model.eval()
        model = self.engine if self.engine is not None else self.model
        batch = self._to_device(
            self.encoder.collate([self.encoder.encode(s.record) for s in samples], [s.token_ids for s in samples], self.share_prompts)
        )
        logp = algo.compute_token_logprobs(
            completion_logits(model, batch), batch["completion_ids"], self.spec.temperature, self.spec.top_p, self.encoder.banned_token_ids
        )
        return [logp[b, : len(s.token_ids)].tolist() for b, s in enumerate(samples)]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- weights ---------------------------------------------------------------------

    def iter_full_parameters(self, everything: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of every parameter that syncs, in a fixed order, on every rank.

        Under ZeRO-3 each parameter is gathered first, a collective: all ranks must iterate
        together. With `freeze_vision` the vision tower is skipped (engines keep theirs). With
        LoRA, adapted layers come merged, under the base model's names (alphadrive_ray/lora.py).
        """
        if self.lora:
            from alphadrive_ray.lora import merged_parameters

            yield from merged_parameters(self.model, everything)
            return
        for name, param in self.model.named_parameters():
            if not everything and not param.requires_grad:
                continue
            if hasattr(param, "ds_id"):  # ZeRO-3 partitioned
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.data.detach().clone()
            else:
                yield name, param.data.detach()

    def export_weights(self, bucket_mb: int) -> list:
        """Rank 0: the published buckets [(metadata, object ref)]; other ranks join the gather and return []."""
        tensors = self.iter_full_parameters()
        if self.rank != 0:
            for _ in tensors:  # drive the ZeRO-3 gathers in lockstep with rank 0
                pass
            return []
        if self._host_staging is not None:
            buckets = weight_sync.staged_buckets(tensors, bucket_mb * 2**20, self._host_staging)
        else:
            # per-tensor views, no concatenation: ray.put's copy into shared memory is the only one
            buckets = weight_sync.group_buckets(tensors, bucket_mb * 2**20)
        return weight_sync.publish(buckets)

    # --- broadcast weight sync (learner rank 0 -> every engine; see weight_sync) ---------

    def weight_metas(self) -> list[tuple[str, str, list[int]]]:
        """(name, dtype, shape) of each synced parameter, in the broadcast order."""
        if self.lora:
            from alphadrive_ray.lora import synced_metas

            return [(name, weight_sync.dtype_name(dtype), list(shape)) for name, dtype, shape in synced_metas(self.model)]
        out = []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                shape = list(param.ds_shape) if hasattr(param, "ds_shape") else list(param.shape)
                out.append((name, weight_sync.dtype_name(param.dtype), shape))
        return out

    def open_weight_sync_group(self, master_address: str, master_port: int, world_size: int, backend: str = "nccl") -> None:
        """Rank 0 joins a fresh broadcast group with every engine worker (they join concurrently);
        a group it held before is closed first."""
        if self.rank != 0:
            return
        self._sync_group = None  # the old group (its connections) goes first
        if backend == "gloo":
            self._sync_group = weight_sync.GlooBroadcastGroup(master_address, master_port, 0, world_size)
        else:
            from alphadrive_ray.engines.vllm_engine import open_weight_sync_group

            self._sync_group = open_weight_sync_group(master_address, master_port, world_size)

    def broadcast_weights(self) -> int:
        """Rank 0 broadcasts every synced parameter; other ranks join the ZeRO-3 gathers."""
        tensors = self.iter_full_parameters()
        if self.rank != 0:
            for _ in tensors:
                pass
            return 0
        if isinstance(self._sync_group, weight_sync.GlooBroadcastGroup):
            return weight_sync.broadcast_tensors(self._sync_group, tensors)
        from alphadrive_ray.engines.vllm_engine import broadcast_weights

        return broadcast_weights(self._sync_group, tensors)

    def weight_digests(self, dtypes: dict[str, str] | None = None) -> dict[str, str]:
        """Rank 0: `weight_sync.tensor_digest` of every synced parameter, each cast to the dtype
        `dtypes` names for it (the engine's), as a sync casts on load; other ranks join the
        ZeRO-3 gathers and return {}."""
        dtypes = dtypes or {}
        tensors = self.iter_full_parameters()
        if self.rank != 0:
            for _ in tensors:
                pass
            return {}
        return {name: weight_sync.tensor_digest(t, weight_sync.to_dtype(dtypes[name]) if name in dtypes else None) for name, t in tensors}

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """Every parameter, gathered, on CPU (tests compare these with the engines')."""
        return {name: t.cpu().clone() for name, t in self.iter_full_parameters(everything=True)}

    def save_hf(self, out_dir: str) -> str | None:
        """Export the policy in Hugging Face format (rank 0 writes; all ranks must call)."""
        state = {name: t.cpu().clone() for name, t in self.iter_full_parameters(everything=True)}
        if self.rank != 0:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = load_model(self.spec.model_path, self.spec.dtype, self.spec.attn_implementation)
        model.load_state_dict(state, strict=False)
        model.save_pretrained(out)
        self.encoder.processor.save_pretrained(out)
        return str(out)

    def ping(self) -> int:
        return self.rank
