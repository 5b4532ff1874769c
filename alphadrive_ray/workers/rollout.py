"""A rollout worker: owns one engine, generates whole groups, receives weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Group, SamplingParams
from alphadrive_ray.inputs import IMAGE_CACHE_MB
from alphadrive_ray.workers.process import ProcessInfo, policy_fields

if TYPE_CHECKING:
    from alphadrive_ray.config import Config


@dataclass(frozen=True)
class RolloutSpec:
    model_path: str
    engine: str = "hf"  # "hf" | "vllm"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    prompt_template: str = ""
    image_cache_mb: float = IMAGE_CACHE_MB  # 0: no image cache
    batch_size: int = 64
    hf_loop: str = "lean"  # HFEngine decoding loop: "lean" | "generate"
    zero_copy_weights: bool = True  # HF engine on CPU: parameters become views of the synced buffers
    cpus: float = 1.0
    device: str = "cpu"
    vllm_gpu_memory_utilization: float = 0.6
    vllm_enforce_eager: bool = False
    max_model_len: int = 4096
    min_pixels: int = 0  # image-size bounds (data.min_pixels / data.max_pixels; 0: the model's own)
    max_pixels: int = 0
    tensor_parallel_size: int = 1  # vLLM: GPUs per engine

    @classmethod
    def from_config(cls, c: Config) -> RolloutSpec:
        """The spec of every rollout worker of a run (the one place config keys reach it)."""
        return cls(
            **policy_fields(c),
            engine=c.rollout.engine,
            batch_size=c.rollout.batch_size,
            hf_loop=c.rollout.hf_loop,
            zero_copy_weights=c.sync.zero_copy,
            cpus=c.rollout.cpus_per_worker,
            device="cuda" if c.rollout.gpus_per_worker > 0 else "cpu",
            vllm_gpu_memory_utilization=c.rollout.vllm_gpu_memory_utilization,
            vllm_enforce_eager=c.rollout.vllm_enforce_eager,
            tensor_parallel_size=c.rollout.tensor_parallel_size,
        )


def make_engine(spec: RolloutSpec):
    """The engine named by the spec; vLLM is imported only when asked for."""
    if spec.engine == "hf":
        from alphadrive_ray.engines.hf import HFEngine

        return HFEngine(
            spec.model_path,
            prompt_template=spec.prompt_template,
            dtype=spec.dtype,
            device=spec.device,
            batch_size=spec.batch_size,
            image_cache_mb=spec.image_cache_mb,
            attn_implementation=spec.attn_implementation,
            loop=spec.hf_loop,
            zero_copy_weights=spec.zero_copy_weights,
            min_pixels=spec.min_pixels,
            max_pixels=spec.max_pixels,
        )
    if spec.engine == "vllm":
        from alphadrive_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            spec.model_path,
            prompt_template=spec.prompt_template,
            dtype=spec.dtype,
            gpu_memory_utilization=spec.vllm_gpu_memory_utilization,
            enforce_eager=spec.vllm_enforce_eager,
            max_model_len=spec.max_model_len,
            min_pixels=spec.min_pixels,
            max_pixels=spec.max_pixels,
            tensor_parallel_size=spec.tensor_parallel_size,
        )
    raise ValueError(f"unknown rollout engine {spec.engine!r}")


class RolloutWorker(ProcessInfo):
    def __init__(self, spec: RolloutSpec, index: int = 0):
        import torch

        torch.set_num_threads(max(1, math.ceil(spec.cpus)))
        self.index = index
        self.spec = spec
        self.engine = make_engine(spec)

    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        return self.engine.generate(records, params)

    def load_weights(self, bucket_refs: list, version: int) -> int:
        """Receive published buckets (see alphadrive_ray.weight_sync) and load them."""
        from alphadrive_ray import weight_sync

        return self.engine.load_weights(weight_sync.receive(bucket_refs), version)

    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join learner rank 0's broadcast group (vLLM: NCCL on GPUs; HF engine: gloo), replacing any
        group joined before."""
        self.engine.init_weight_sync_group(master_address, master_port, rank_offset, world_size)

    def receive_weights_broadcast(self, metas: list, version: int) -> int:
        """Receive the weights learner rank 0 broadcasts, described by `metas` [(name, dtype, shape)]."""
        return self.engine.receive_weights_broadcast(metas, version)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def get_weights(self, names: Sequence[str] | None = None) -> dict:
        """Copies of the engine's parameters (tests compare them with the learner's)."""
        params = dict(self.engine.model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in (names or params)}

    def weight_digests(self) -> dict[str, str]:
        """`weight_sync.tensor_digest` of each of the engine's parameters, by name (`sync.verify`)."""
        return self.engine.weight_digests()

    def ping(self) -> int:
        return self.index

    def node_id(self) -> str:
        """The Ray node this worker runs on (placement tests and operators)."""
        import ray

        return ray.get_runtime_context().get_node_id()
