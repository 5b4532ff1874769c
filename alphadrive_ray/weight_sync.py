"""Weight sync, learner -> rollout engines: a small explicit protocol.

The sender walks the trainable parameters in a fixed order (gathering ZeRO-3 shards
first, see `LearnerWorker.iter_full_parameters`) and packs them into byte buckets of
about `bucket_bytes`; each bucket travels with its metadata, one `TensorMeta` (name,
dtype, shape, offset, nbytes) per tensor. The receiver rebuilds tensors as views of the
bucket and copies them into its model.

On CPU and across nodes the buckets go through the Ray object store as numpy uint8
arrays: Ray stores numpy buffers zero-copy, so a receiver on the same node reads them
straight from shared memory (pickled torch tensors would be copied twice; see
bench/weight_sync.py). On GPUs the same metadata drives an NCCL broadcast
(alphadrive_ray/engines/vllm_engine.py).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from alphadrive_ray.engines.base import TensorMeta

# Tensors start at multiples of this many bytes, so each can be viewed in its own dtype.
ALIGN = 16

# torch dtypes without a numpy twin travel as same-width integers.
_CARRIER = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight sync: unknown dtype {name!r}")
    return dtype


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array (no copy for contiguous CPU tensors)."""
    t = t.detach().contiguous().cpu()
    carrier = _CARRIER.get(t.dtype)
    if carrier is not None:
        t = t.view(carrier)
    return t.numpy().reshape(-1).view(np.uint8)


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[tuple[list[TensorMeta], np.ndarray]]:
    """Group tensors into contiguous byte buckets of about `bucket_bytes` (a bigger tensor gets its own)."""
    metas: list[TensorMeta] = []
    parts: list[np.ndarray] = []
    size = 0
    for name, tensor in named_tensors:
        raw = tensor_bytes(tensor)
        if metas and size + raw.nbytes > bucket_bytes:
            yield metas, np.concatenate(parts)
            metas, parts, size = [], [], 0
        pad = -size % ALIGN
        if pad:
            parts.append(np.zeros(pad, dtype=np.uint8))
            size += pad
        metas.append(TensorMeta(name, dtype_name(tensor.dtype), tuple(tensor.shape), size, raw.nbytes))
        parts.append(raw)
        size += raw.nbytes
    if metas:
        yield metas, np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def unpack_bucket(metas: list[TensorMeta], bucket: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a bucket, as views of its bytes (read-only: copy them into parameters)."""
    import warnings

    with warnings.catch_warnings():
        # buckets from the object store are read-only; the views are only read from
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(bucket)
    for meta in metas:
        dtype = to_dtype(meta.dtype)
        raw = flat[meta.offset : meta.offset + meta.nbytes]
        carrier = _CARRIER.get(dtype)
        tensor = raw.view(carrier).view(dtype) if carrier is not None else raw.view(dtype)
        yield meta.name, tensor.view(meta.shape)


def publish(buckets: Iterable[tuple[list[TensorMeta], np.ndarray]]) -> list[tuple[list[TensorMeta], "object"]]:
    """Put each bucket into the Ray object store; returns (metadata, object ref) pairs."""
    import ray

    return [(metas, ray.put(array)) for metas, array in buckets]


def receive(bucket_refs: list[tuple[list[TensorMeta], "object"]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Fetch published buckets one at a time and yield their tensors."""
    import ray

    for metas, ref in bucket_refs:
        yield from unpack_bucket(metas, ray.get(ref))
