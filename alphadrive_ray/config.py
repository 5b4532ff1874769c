"""The one typed configuration of a training run.

Loaded from a YAML file under jobs/, with `--set section.key=value` overrides, and
validated once at load time; every actor receives only its own section, and nothing
mutates it afterwards. Each field is documented by the string right under it; that
text also builds docs/config.md (`alphadrive-ray config-docs`).

    alphadrive-ray train jobs/quickstart_cpu.yaml --set grpo.steps=10
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alphadrive_ray.actions import PATH_ACTIONS, SPEED_ACTIONS
from alphadrive_ray.errors import UserError
from alphadrive_ray.rewards import ABLATION_COMPONENTS

MIN_IMAGE_PIXELS = 28 * 28
"""Qwen2-VL's smallest image: one merged 2x2 group of 14-pixel patches."""


def pixel_bound_problems(min_pixels: int, max_pixels: int, names: tuple[str, str] = ("data.min_pixels", "data.max_pixels")) -> list[str]:
    """What is wrong with image-size bounds (0: the model's own), each message naming the key
    or flag of `names`; the config check and `serve --min-pixels/--max-pixels` share it."""
    problems = [
        f"{name} must be 0 (the model's own) or at least {MIN_IMAGE_PIXELS} (one 28x28 image token); got {value}"
        for name, value in zip(names, (min_pixels, max_pixels))
        if value != 0 and value < MIN_IMAGE_PIXELS
    ]
    if min_pixels and max_pixels and min_pixels > max_pixels:
        problems.append(f"{names[0]} ({min_pixels}) must not exceed {names[1]} ({max_pixels})")
    return problems


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# `scheme://user:password@host` or `scheme://token@host`
_URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@]+@")
# a W&B API key: 40 hex digits (86 for local servers, `local-` + 40), alone or in a longer text
_API_KEY = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{40}(?:[0-9a-f]{46})?(?![0-9a-fA-F])")


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class RunConfig:
    name: str = "alphadrive"
    """Name of the run; the run directory is `output_dir/name`."""
    output_dir: str = "runs"
    """Folder that holds run directories (resolved config, metrics, checkpoints, report)."""
    seed: int = 0
    """Seed of the run's random choices: data order, sampling. The tiny base model (model.init_tiny) is
    built once with seed 0, as a pretrained base is the same for every run."""
    overwrite: bool = True
    """Reuse an existing run directory (files of the earlier run are replaced)."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = "artifacts/tiny-qwen2vl"
    """Local folder of a Hugging Face Qwen2-VL (or text-only Qwen2) checkpoint. Nothing is downloaded."""
    init_tiny: bool = False
    """Build the tiny Qwen2-VL base at `path` first when the folder has no model (the embedded default:
    vision and language pretrained on synthetic scenes, never on driving decisions;
    alphadrive_ray/models/grounding.py)."""
    dtype: str = "float32"
    """Parameter dtype of learners and engines: float32 or bfloat16 (GPU)."""
    freeze_vision: bool = False
    """Keep the vision tower fixed: it is neither trained nor synced to the engines."""
    attn_implementation: str = "sdpa"
    """Attention kernel for transformers models: sdpa, eager or flash_attention_2 (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (large models)."""


@dataclass(frozen=True)
class SynthSplitConfig:
    n: int = 0
    """Number of scenes; 0 means this split is not generated (use the file as it is)."""
    seed: int = 0
    """Seed of the scene generator for this split."""
    speed_mix: dict[str, float] = field(default_factory=dict)
    """Relative weights of SPEED classes (empty: the generator's default, all classes equal)."""
    path_mix: dict[str, float] = field(default_factory=dict)
    """Relative weights of PATH classes (empty: the generator's default)."""
    size: int = 224
    """Rendered image side in pixels."""
    labels: str = "driver"
    """`driver`: what one driver of the stochastic driver model did, read off its 3 s trajectory (the
    same scene can carry different labels; alphadrive_ray/data/driver.py); `rule`: the deterministic
    rule-based planner (alphadrive_ray/data/synth.py)."""
    driver_noise: float = 1.0
    """Spread of the drivers around the typical one (1: the documented priors; 0: the typical driver every time)."""
    label_draws: int = 64
    """Drivers drawn per scene to estimate its label distribution and most likely pair (the split's ceiling)."""
    reasoning_share: float = 0.25
    """Share of the scenes that carry reasoning (MetaAD: about 30k of 110k); the others have labels
    only. The held-out split's default is 1 (its reasoning is the reference for BLEU/CIDEr/METEOR)."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "artifacts/scenes-train/data.jsonl"
    """Training dataset: a .jsonl, .json or .parquet file, a `datasets.save_to_disk` folder or
    `hub:ORG/NAME[:SPLIT]`; images as paths or `datasets.Image` columns (see `alphadrive-ray data
    validate`)."""
    eval: str = "artifacts/scenes-eval/data.jsonl"
    """Held-out dataset for periodic and final evaluation (the same sources as `train`)."""
    synth_train: SynthSplitConfig = field(default_factory=SynthSplitConfig)
    """Generate `train` with the synthetic scene generator when the file does not exist."""
    synth_eval: SynthSplitConfig = field(default_factory=lambda: SynthSplitConfig(reasoning_share=1.0))
    """Generate `eval` with the synthetic scene generator when the file does not exist."""
    prompt_template: str = ""
    """Planning prompt with {speed} and {navigation} slots; empty means the AlphaDrive release prompt."""
    skip_bad: bool = False
    """Skip (and count) bad records instead of stopping at load time."""
    image_cache: bool = True
    """Preprocess each image once per worker and reuse the pixel tensors."""
    image_cache_mb: int = 1024  # inputs.IMAGE_CACHE_MB (not imported: config stays free of torch)
    """Memory bound of that cache per worker (least recently used images are dropped first)."""
    min_pixels: int = 0
    """Smallest image area, in pixels, the Qwen2-VL processor resizes to (0: the model's own; the
    release: 3136). The same in the learners, both rollout engines (evaluation included) and an HF
    export's processor."""
    max_pixels: int = 0
    """Largest image area, in pixels (0: the model's own; the release: 401408, i.e. 512 image tokens):
    caps the visual tokens, and so the memory, of large camera frames (a 1600x900 frame is 1.44 MP)."""


@dataclass(frozen=True)
class SFTConfig:
    enabled: bool = True
    """Run stage 1, the SFT warm-up on samples that carry reasoning."""
    target: str = "reasoning"
    """`reasoning`: train on the samples that carry reasoning, target = reasoning + answer (the paper's
    warm-up); `answer`: train on every labelled sample, target = an empty <think> and the answer
    (the paper's "without reasoning" rows)."""
    samples: int = 2000
    """How many training samples the warm-up uses at most (the paper: ~30k of 110k with reasoning)."""
    epochs: int = 1
    """Passes over the warm-up samples."""
    lr: float = 2e-5
    """Peak learning rate (the release: 2e-5)."""
    warmup_ratio: float = 0.1
    """Fraction of SFT steps with linear warm-up before the cosine decay."""
    batch_size: int = 16
    """Samples per optimizer step, over all learners."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one learner; accumulation fills the batch."""
    weight_decay: float = 0.0
    """AdamW weight decay."""


@dataclass(frozen=True)
class GRPOConfig:
    enabled: bool = True
    """Run stage 2, GRPO with the planning rewards."""
    steps: int = 100
    """Optimizer steps of stage 2 (each on `prompts_per_step` x `group_size` completions)."""
    prompts_per_step: int = 8
    """Prompts per step (the release: 32)."""
    group_size: int = 8
    """Completions per prompt, G (the release: 2)."""
    lr: float = 1e-6
    """Learning rate (the release: 1e-6); constant after `warmup_steps`."""
    warmup_steps: int = 0
    """Linear warm-up steps of the GRPO learning rate."""
    beta: float = 0.04
    """Weight of the KL penalty to the frozen reference model; 0 removes the reference model."""
    kl_estimator: str = "k3"
    """KL estimator in the loss: k1, k2 or k3 (the release: k3)."""
    eps_low: float = 0.2
    """Lower clip of the policy ratio, 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip of the policy ratio, 1 + eps_high (DAPO raises it, e.g. 0.28)."""
    advantage: str = "std"
    """Group advantage: `std` (r - mean) / (std + eps) as in GRPO, or `mean` (r - mean) as in Dr.GRPO."""
    advantage_eps: float = 1e-4
    """Added to the group std (the release: 1e-4)."""
    loss_agg: str = "token_mean"
    """Loss aggregation: token_mean over all tokens of the global batch, or seq_mean (mean per sequence, then over sequences)."""
    micro_batch_size: int = 16
    """Completions per forward/backward on one learner."""
    updates_per_batch: int = 1
    """Optimizer steps per generated batch (the release: 1). Above 1, the ratio's old log-probs are the
    engine's from generation time, so later updates are importance-weighted against the policy that
    sampled (docs/architecture.md)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards all agree (zero advantage) and generate more, as in DAPO."""
    max_resample_rounds: int = 3
    """With dynamic sampling, how many extra generation rounds may refill one batch."""
    off_policy_steps: int = 0
    """0: on-policy. 1: generate step t+1 while the learners update on step t (one-step off-policy; the
    ratio uses the engine's log-probs). A resume regenerates the prefetched step on the checkpoint's
    weights."""
    weight_decay: float = 0.0
    """AdamW weight decay."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine: `hf` (transformers, any device) or `vllm` (GPU, needs the [gpu] extra)."""
    num_workers: int = 2
    """Rollout worker actors, each owning one engine."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per rollout worker (also its torch thread count, rounded up)."""
    gpus_per_worker: float = 0.0
    """GPUs per rollout worker (1 for vLLM on GPU)."""
    placement: str = "PACK"
    """Placement-group strategy of the rollout workers: PACK (fill nodes in turn), SPREAD (one per node
    where possible), STRICT_PACK or STRICT_SPREAD (docs/cluster.md)."""
    temperature: float = 1.0
    """Sampling temperature; the learner scales logits the same way for log-probs."""
    top_p: float = 1.0
    """Nucleus sampling. The learner computes the policy ratio under the same truncated distribution
    (the engine's log-probs are of it; on-policy the ratio is exactly 1); the KL penalty compares
    policy and reference without truncation, as TRL does, so it stays finite when a sampled token is
    outside the reference's nucleus."""
    max_new_tokens: int = 256
    """Longest completion (the release: 256)."""
    batch_size: int = 64
    """Sequences generated together by one engine (prompts x G)."""
    hf_loop: str = "lean"
    """HF engine decoding loop: `lean` (prefill each prompt once, copy its KV cache G times, decode
    with a preallocated cache) or `generate` (transformers' generate, the reference)."""
    vllm_gpu_memory_utilization: float = 0.6
    """vLLM: fraction of GPU memory for weights and KV cache."""
    vllm_enforce_eager: bool = False
    """vLLM: disable CUDA graphs (faster start, slower decode)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs each rollout engine shards the model over (its worker holds them all:
    rollout.gpus_per_worker must equal it); the NCCL weight-sync group then has 1 + num_workers x
    this many ranks."""


@dataclass(frozen=True)
class RewardConfig:
    num_workers: int = 2
    """Reward worker actors scoring whole groups."""
    variant: str = "paper"
    """Reward semantics: `paper` (F1 x weight x diversity) or `release` (the authors' code: additive +-0.4 diversity)."""
    components: tuple[str, ...] = ABLATION_COMPONENTS
    """Reward components in use (ablations): any of accuracy, weight, diversity, format."""
    speed_weight: float = 1.0
    """Weight of the SPEED planning reward in the total."""
    path_weight: float = 1.0
    """Weight of the PATH planning reward in the total."""
    format_weight: float = 1.0
    """Weight of the format reward in the total."""
    diversity_cap: float = 0.2
    """Largest diversity penalty of the paper variant (20%)."""
    timeout_s: float = 60.0
    """Seconds a reward batch may take before the step fails with a clear error."""
    cpus_per_worker: float = 0.25
    """CPUs reserved per reward worker."""
    placement: str = "PACK"
    """Placement-group strategy of the reward workers: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = 2
    """Learner actors (DeepSpeed data-parallel ranks)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with GPUs, else gloo), gloo or nccl."""
    cpus_per_worker: float = 1.0
    """CPUs per learner (also its torch thread count, rounded up)."""
    gpus_per_worker: float = 0.0
    """GPUs per learner."""
    placement: str = "PACK"
    """Placement-group strategy of the learner ranks: PACK keeps their all-reduce on one node where
    they fit, STRICT_PACK requires it; SPREAD, STRICT_SPREAD."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    share_prompts: bool = True
    """GRPO: run each prompt (and its image) once per micro-batch and its completions on copies of its
    KV cache, instead of G full rows (same loss and gradients; ignored with
    model.gradient_checkpointing)."""


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0
    """LoRA rank of the learner's adapters (peft); 0 trains every weight instead. With LoRA the
    learners train and checkpoint only the adapters (and the vision tower unless
    model.freeze_vision); engines receive merged weights, and the export is merged."""
    alpha: int = 32
    """LoRA scaling numerator: the update is (alpha / rank) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input in training (0 keeps learner and engine log-probs equal)."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    """Names of the linear layers that get adapters (the language model's attention and MLP)."""


@dataclass(frozen=True)
class SyncConfig:
    backend: str = "object_store"
    """Weight sync: object_store (CPU, cross-node), nccl (learner rank 0 broadcasts to the vLLM engines
    on GPUs) or gloo (the same broadcast protocol for HF engines, over TCP; CPU clusters and tests).
    A rollout worker that Ray restarts re-joins the broadcast group and gets the current weights
    before it generates again."""
    bucket_mb: int = 256
    """Tensors are packed into buckets of about this size for the transfer."""
    zero_copy: bool = True
    """object_store, HF engines on CPU: use the received shared-memory buffers as the engine's
    parameters instead of copying them (read-only; engines on a node share one copy)."""
    verify: bool = False
    """After every sync, check that each engine holds the learner's synced tensors bit for bit
    (a SHA-256 per tensor, taken in the engine's dtype) and stop the run naming the tensors that
    differ. Costs a hash of the whole model on both sides per sync: for bring-up and debugging
    (bench/gpu_readiness.py turns it on). hf engine only: vLLM fuses and repacks the tensors it
    loads; there, `rollout/logp_diff` (engine against learner log-probs) checks the weights."""


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate on the held-out split every this many GRPO steps (0: only before and after training)."""
    samples: int = 200
    """Held-out samples per evaluation (0: all)."""
    reasoning_metrics: bool = True
    """Compute BLEU-4 / CIDEr / METEOR of the reasoning (needs Java for METEOR)."""
    baseline: bool = True
    """Also evaluate the untrained model and the SFT-only checkpoint, and print all three."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resumable checkpoint every this many GRPO steps (0: only the final one)."""
    keep: int = 2
    """Resumable checkpoints kept (older ones are deleted); 0: none is written, and the run cannot
    be resumed (quick checks such as bench/gpu_readiness.py: a 2B model's ZeRO checkpoint, bf16
    weights plus fp32 master weights and two Adam moments, is 2.2B x 14 bytes, about 31 GB)."""
    export_hf: bool = True
    """Export the final policy in Hugging Face format (`from_pretrained` loads it) to run_dir/export."""
    export_sft: bool = False
    """Also export the SFT-only policy (end of stage 1) to run_dir/export-sft."""


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "disabled"
    """Weights & Biases: `disabled` (default), `offline` (writes the run under run_dir/wandb; `wandb
    sync` uploads it later) or `online` (needs the `wandb` extra and a key from `wandb login` or
    WANDB_API_KEY, never from a config)."""
    project: str = "alphadrive-ray"
    """W&B project of the run."""
    name: str = ""
    """W&B run name; empty: run.name."""


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases beside metrics.jsonl, TensorBoard and the Ray dashboard (all of them always on)."""


@dataclass(frozen=True)
class RayConfig:
    address: str = ""
    """Cluster to join; empty: RAY_ADDRESS when set, else start a local cluster."""
    num_cpus: int = 0
    """Logical CPUs of a local cluster (0: what the actors ask for, at least the machine's cores)."""
    dashboard_host: str = "127.0.0.1"
    """Dashboard bind address of a local cluster; 127.0.0.1 keeps it private."""
    omp_wait_policy: str = "PASSIVE"
    """OMP_WAIT_POLICY of the actors of a local cluster: PASSIVE keeps idle torch threads from spinning
    on cores other workers need (docs/performance.md); empty: the OpenMP default."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# --- loading -------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _string_fields(value: Any, prefix: str = ""):
    """(dotted key, text) for every text field of a config."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _string_fields(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(value, str):
        yield prefix, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a YAML value to the annotated type, or say how to fix it."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(typing.cast(type, tp), value, where)  # a dataclass type here (annotations are types, never instances)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(tp)
        return {_coerce(k, key_t, where): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `1e-6` (no dot) as text, per YAML 1.1; accept what float() accepts.
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean `{where + '.' if where else ''}{close[0]}`?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key `{path}`{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: `{key}` is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'grpo.steps=10' -> ('grpo.steps', 10); the value is read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. grpo.steps=10), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: value is not valid YAML ({exc})") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    import yaml

    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            started = f" ({context} that starts on line {context_mark.line + 1})" if context and context_mark else ""
            raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}{started}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, ...)")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    try:
        config = _build(Config, tree)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    validate(config, source=str(path or "config"))
    return config


def validate(c: Config, source: str = "config") -> None:
    """Check values and their combinations; each message says how to fix the value."""
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def choice(value: str, key: str, options: tuple[str, ...]) -> None:
        check(value in options, f"{key} must be one of {', '.join(options)}; got {value!r}")

    choice(c.model.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
    choice(c.model.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
    choice(c.grpo.kl_estimator, "grpo.kl_estimator", ("k1", "k2", "k3"))
    choice(c.grpo.advantage, "grpo.advantage", ("std", "mean"))
    choice(c.grpo.loss_agg, "grpo.loss_agg", ("token_mean", "seq_mean"))
    choice(c.rollout.engine, "rollout.engine", ("hf", "vllm"))
    choice(c.sft.target, "sft.target", ("reasoning", "answer"))
    choice(c.rollout.hf_loop, "rollout.hf_loop", ("lean", "generate"))
    choice(c.reward.variant, "reward.variant", ("paper", "release"))
    choice(c.learner.backend, "learner.backend", ("auto", "gloo", "nccl"))
    choice(c.sync.backend, "sync.backend", ("object_store", "nccl", "gloo"))
    choice(c.ray.omp_wait_policy, "ray.omp_wait_policy", ("PASSIVE", "ACTIVE", ""))
    for role in ("rollout", "reward", "learner"):
        choice(getattr(c, role).placement, f"{role}.placement", PLACEMENT_STRATEGIES)
    for key, value in _string_fields(c):
        # the resolved config is written to the run directory: it must never hold a secret
        check(
            not _URL_CREDENTIALS.search(value),
            f"{key} holds credentials in a URL (scheme://USER:PASSWORD@host); pass secrets through the environment, never in a config",
        )
    choice(c.tracking.wandb.mode, "tracking.wandb.mode", ("disabled", "offline", "online"))
    for key, value in _string_fields(c.tracking, "tracking"):
        # an API key pasted here would be written to config.yaml and to the trackers' config dumps
        # (not checked elsewhere: model paths into a Hugging Face cache hold 40-hex commit ids)
        check(
            not _API_KEY.search(value),
            f"{key} looks like an API key; keys belong in the environment (e.g. WANDB_API_KEY) or `wandb login`, never in a config",
        )
    for comp in c.reward.components:
        choice(comp, "reward.components[]", ABLATION_COMPONENTS)
    check(len(set(c.reward.components)) == len(c.reward.components), "reward.components lists a component twice")
    check(c.learner.zero_stage in (0, 1, 2, 3), f"learner.zero_stage must be 0, 1, 2 or 3; got {c.learner.zero_stage}")
    check(c.lora.rank >= 0, f"lora.rank must be 0 (off) or positive; got {c.lora.rank}")
    check(c.lora.rank == 0 or c.lora.alpha > 0, f"lora.alpha must be positive; got {c.lora.alpha}")
    check(0.0 <= c.lora.dropout < 1.0, f"lora.dropout must be in [0, 1); got {c.lora.dropout}")
    check(c.lora.rank == 0 or len(c.lora.target_modules) > 0, "lora.target_modules must name at least one layer")
    check(
        c.lora.rank == 0 or c.learner.zero_stage < 3,
        "lora.rank > 0 works with learner.zero_stage 0-2 (adapters and their optimizer state are small); ZeRO-3 is not supported with LoRA",
    )
    for key, value in (
        ("rollout.num_workers", c.rollout.num_workers),
        ("reward.num_workers", c.reward.num_workers),
        ("learner.num_workers", c.learner.num_workers),
        ("grpo.prompts_per_step", c.grpo.prompts_per_step),
        ("grpo.micro_batch_size", c.grpo.micro_batch_size),
        ("grpo.updates_per_batch", c.grpo.updates_per_batch),
        ("sft.batch_size", c.sft.batch_size),
        ("sft.micro_batch_size", c.sft.micro_batch_size),
        ("sft.epochs", c.sft.epochs),
        ("rollout.max_new_tokens", c.rollout.max_new_tokens),
        ("rollout.batch_size", c.rollout.batch_size),
        ("sync.bucket_mb", c.sync.bucket_mb),
        ("data.image_cache_mb", c.data.image_cache_mb),
    ):
        check(value >= 1, f"{key} must be at least 1; got {value}")
    check(c.grpo.group_size >= 2, f"grpo.group_size must be at least 2 (GRPO compares completions of a prompt); got {c.grpo.group_size}")
    check(c.grpo.steps >= 0 and c.sft.samples >= 0, "grpo.steps and sft.samples must be >= 0")
    check(0 < c.rollout.temperature <= 10, f"rollout.temperature must be in (0, 10]; got {c.rollout.temperature}")
    check(0 < c.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1]; got {c.rollout.top_p}")
    check(c.grpo.beta >= 0, f"grpo.beta must be >= 0; got {c.grpo.beta}")
    check(0 <= c.grpo.eps_low < 1 and c.grpo.eps_high >= 0, "grpo.eps_low must be in [0, 1) and grpo.eps_high >= 0")
    check(c.grpo.lr > 0 and c.sft.lr > 0, "learning rates (sft.lr, grpo.lr) must be > 0")
    check(0 <= c.sft.warmup_ratio < 1, f"sft.warmup_ratio must be in [0, 1); got {c.sft.warmup_ratio}")
    check(c.grpo.off_policy_steps in (0, 1), f"grpo.off_policy_steps must be 0 (on-policy) or 1; got {c.grpo.off_policy_steps}")
    check(c.reward.timeout_s > 0, "reward.timeout_s must be > 0")
    check(c.eval.samples >= 0 and c.eval.every_steps >= 0, "eval.samples and eval.every_steps must be >= 0")
    check(c.checkpoint.keep >= 0, f"checkpoint.keep must be 0 (no checkpoints) or more; got {c.checkpoint.keep}")
    check(
        c.checkpoint.keep > 0 or c.checkpoint.every_steps == 0,
        f"checkpoint.every_steps {c.checkpoint.every_steps} needs checkpoint.keep >= 1 (0 writes no checkpoint)",
    )
    errors.extend(pixel_bound_problems(c.data.min_pixels, c.data.max_pixels))
    for split in ("synth_train", "synth_eval"):
        synth: SynthSplitConfig = getattr(c.data, split)
        key = f"data.{split}"
        check(synth.n >= 0, f"{key}.n must be >= 0 (0: do not generate); got {synth.n}")
        check(56 <= synth.size <= 4096, f"{key}.size must be between 56 and 4096 pixels; got {synth.size}")
        choice(synth.labels, f"{key}.labels", ("driver", "rule"))
        check(synth.driver_noise >= 0, f"{key}.driver_noise must be >= 0 (0: the typical driver); got {synth.driver_noise}")
        check(synth.label_draws >= 1, f"{key}.label_draws must be at least 1; got {synth.label_draws}")
        check(0 <= synth.reasoning_share <= 1, f"{key}.reasoning_share must be in [0, 1]; got {synth.reasoning_share}")
        for mix_name, vocab in (("speed_mix", SPEED_ACTIONS), ("path_mix", PATH_ACTIONS)):
            mix: dict[str, float] = getattr(synth, mix_name)
            unknown = [name for name in mix if name not in vocab]
            check(not unknown, f"{key}.{mix_name} names unknown classes {unknown}; use some of {', '.join(vocab)} (upper case)")
            check(
                not mix or (all(w >= 0 for w in mix.values()) and sum(mix.values()) > 0),
                f"{key}.{mix_name} weights must be >= 0 with at least one > 0 (or leave the mix empty); got {mix}",
            )

    n = c.learner.num_workers
    if n >= 1 and c.sft.micro_batch_size >= 1:
        per_rank, rem = divmod(c.sft.batch_size, n)
        check(
            rem == 0 and per_rank % c.sft.micro_batch_size == 0,
            f"sft.batch_size ({c.sft.batch_size}) must split evenly over learner.num_workers ({n}) "
            f"into micro-batches of sft.micro_batch_size ({c.sft.micro_batch_size}); "
            f"e.g. set sft.batch_size to {n * c.sft.micro_batch_size * max(1, round(c.sft.batch_size / (n * c.sft.micro_batch_size)))}",
        )
    samples = c.grpo.prompts_per_step * c.grpo.group_size
    if n >= 1:
        check(
            samples % n == 0,
            f"grpo.prompts_per_step x grpo.group_size = {samples} completions must split evenly over learner.num_workers ({n})",
        )
    if c.rollout.num_workers >= 1:
        check(
            c.grpo.prompts_per_step % c.rollout.num_workers == 0,
            f"grpo.prompts_per_step ({c.grpo.prompts_per_step}) must be a multiple of rollout.num_workers "
            f"({c.rollout.num_workers}) so that every worker gets whole groups",
        )
    check(
        c.rollout.batch_size >= c.grpo.group_size,
        f"rollout.batch_size ({c.rollout.batch_size}) must hold at least one group (grpo.group_size = {c.grpo.group_size})",
    )
    if c.data.prompt_template:
        check(
            "{speed}" in c.data.prompt_template and "{navigation}" in c.data.prompt_template,
            "data.prompt_template must contain the {speed} and {navigation} slots",
        )
    check(c.sync.backend != "nccl" or c.rollout.engine == "vllm", "sync.backend=nccl needs rollout.engine=vllm on GPUs")
    check(c.sync.backend != "gloo" or c.rollout.engine == "hf", "sync.backend=gloo needs rollout.engine=hf (vLLM: nccl or object_store)")
    check(
        c.rollout.engine != "vllm" or c.rollout.temperature <= 2.0,
        f"rollout.temperature {c.rollout.temperature} is above 2.0, the largest vLLM accepts",
    )
    check(
        c.rollout.engine != "vllm" or c.rollout.gpus_per_worker > 0,
        "rollout.engine=vllm needs GPUs: set rollout.gpus_per_worker (e.g. 1)",
    )
    check(
        not (c.sync.verify and c.rollout.engine == "vllm"),
        "sync.verify needs rollout.engine=hf: vLLM fuses and repacks the synced tensors (watch rollout/logp_diff instead)",
    )
    check(c.learner.backend != "nccl" or c.learner.gpus_per_worker > 0, "learner.backend=nccl needs learner.gpus_per_worker > 0")
    tp = c.rollout.tensor_parallel_size
    check(tp >= 1, f"rollout.tensor_parallel_size must be at least 1; got {tp}")
    if tp > 1:
        check(c.rollout.engine == "vllm", f"rollout.tensor_parallel_size {tp} needs rollout.engine=vllm (the hf engine runs on one device)")
        check(
            c.rollout.gpus_per_worker == tp,
            f"rollout.tensor_parallel_size {tp} needs rollout.gpus_per_worker {tp} (each engine holds its {tp} GPUs); "
            f"got {c.rollout.gpus_per_worker:g}",
        )
    if errors:
        listing = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n{listing}")


# --- documentation -------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The string under each field of a config dataclass (its documentation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = typing.cast(ast.ClassDef, tree.body[0]).body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_markdown() -> str:
    """docs/config.md: every section and field with its type, default and documentation."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `alphadrive_ray/config.py` by `alphadrive-ray config-docs`; do not edit by hand.",
        "A run is configured by one YAML file (see jobs/) plus `--set section.key=value` overrides.",
        "",
    ]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines += [f"## `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        docs = field_docs(cls)
        sub_hints = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            value = _to_plain(getattr(default, f.name))
            shown = "(section)" if dataclasses.is_dataclass(getattr(default, f.name)) else f"`{value!r}`"
            tname = str(sub_hints[f.name]).replace("typing.", "") if not isinstance(sub_hints[f.name], type) else sub_hints[f.name].__name__
            lines.append(f"| `{section.name}.{f.name}` | {tname} | {shown} | {docs.get(f.name, '')} |")
            if dataclasses.is_dataclass(getattr(default, f.name)):
                sub = type(getattr(default, f.name))
                sdocs = field_docs(sub)
                for g in dataclasses.fields(sub):
                    lines.append(f"| `{section.name}.{f.name}.{g.name}` | | `{_to_plain(getattr(sub(), g.name))!r}` | {sdocs.get(g.name, '')} |")
        lines.append("")
    return "\n".join(lines)
