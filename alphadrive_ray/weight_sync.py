"""Weight sync, learner -> rollout engines: a small explicit protocol.

The sender walks the trainable parameters in a fixed order (gathering ZeRO-3 shards
first, see `LearnerWorker.iter_full_parameters`) and groups them into buckets of about
`bucket_bytes`; each bucket travels with its metadata, one `TensorMeta` (name, dtype,
shape, offset, nbytes) per tensor. The receiver rebuilds tensors as views of the bucket
and loads them into its model.

On CPU and across nodes the buckets go through the Ray object store. A bucket is put as
a list of per-tensor numpy uint8 views of the parameters (`group_buckets`): Ray writes
each view's bytes straight into shared memory, the only copy on the sender (a
concatenated bucket, `pack_buckets`, would cost one more). Ray stores numpy buffers
zero-copy, so a receiver on the same node reads them straight from shared memory; the HF
engine on CPU can even use them as its parameters without copying (`zero_copy` in
`load_into_parameters`). Pickled torch tensors would be copied twice more; see
bench/weight_sync.py and docs/performance.md. A GPU learner's parameters are copied to
host memory first, bucket by bucket, into one reused staging buffer (`staged_buckets`),
pinned where CUDA is: asynchronous copies, one wait per bucket. On GPUs the same metadata
also drives an NCCL broadcast (alphadrive_ray/engines/vllm_engine.py).
"""

from __future__ import annotations

import bisect
import hashlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch

from alphadrive_ray.engines.base import TensorMeta

if TYPE_CHECKING:
    from ray import ObjectRef

# Tensors start at multiples of this many bytes, so each can be viewed in its own dtype.
ALIGN = 16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight sync: unknown dtype {name!r}")
    return dtype


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array (no copy for contiguous CPU tensors)."""
    return _flat_bytes(t).numpy()


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its own device (contiguous tensors: a view)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (contiguous CPU tensors: a view, no copy)."""
    return _raw_bytes(t).cpu()


def tensor_digest(t: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """`dtype[shape]:sha256` of the tensor's bytes (cast to `dtype` first, as a load into a
    parameter of that dtype casts): equal digests mean bit-equal tensors."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return f"{dtype_name(t.dtype)}{list(t.shape)}:{hashlib.sha256(tensor_bytes(t).data).hexdigest()}"


def digest_dtype(digest: str) -> str:
    """The name of the dtype a `tensor_digest` was taken in (e.g. "bfloat16")."""
    return digest.split("[", 1)[0]


def digest_mismatches(sent: dict[str, str], held: dict[str, str]) -> list[str]:
    """Names of the sent tensors that the receiver lacks or holds with other bits (in `sent`'s order)."""
    return [name for name, digest in sent.items() if held.get(name) != digest]


def _part_starts(parts: list[np.ndarray]) -> list[int]:
    """Where each part sits in the bucket's byte layout: parts follow each other, each at an ALIGN boundary."""
    starts, at = [], 0
    for part in parts:
        at += -at % ALIGN
        starts.append(at)
        at += part.nbytes
    return starts


def group_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[tuple[list[TensorMeta], list[np.ndarray]]]:
    """Group tensors into buckets of about `bucket_bytes` (a bigger tensor gets its own), without copying.

    Each bucket is its metadata and a list of flat uint8 views ("parts"). Tensors that follow
    each other in one storage (a DeepSpeed learner keeps its parameters in one flat buffer)
    share one part, so a bucket is usually a single view; other tensors get a part each. A
    meta's offset is its place in the bucket's byte layout: parts one after the other, each
    starting at an ALIGN boundary (`concat_bucket` builds exactly that array). The views
    alias the tensors: publish (copy) them before the tensors change.
    """
    metas: list[TensorMeta] = []
    parts: list[np.ndarray] = []
    size = 0
    run: list | None = None  # the part being extended: [storage, first byte, nbytes, dtype]

    def close() -> None:
        assert run is not None  # called only after a tensor started a part
        storage, first, nbytes, _ = run
        # torch's stubs list set_(source, offset, size) only with a stride; the stride defaults to contiguous at run time
        parts.append(torch.empty(0, dtype=torch.uint8).set_(storage, first, (nbytes,)).numpy())  # type: ignore[call-overload]

    for name, tensor in named_tensors:
        raw = _flat_bytes(tensor)
        nbytes = raw.numel()
        if metas and size + nbytes > bucket_bytes:
            close()
            yield metas, parts
            metas, parts, size, run = [], [], 0, None
        storage = raw.untyped_storage()
        first = raw.storage_offset()
        if run is not None and run[0].data_ptr() == storage.data_ptr() and run[3] == tensor.dtype and run[1] + run[2] == first:
            run[2] += nbytes  # right after the previous tensor: the same part grows
        else:
            if run is not None:
                close()
            size += -size % ALIGN
            run = [storage, first, nbytes, tensor.dtype]
        metas.append(TensorMeta(name, dtype_name(tensor.dtype), tuple(tensor.shape), size, nbytes))
        size += nbytes
    if metas:
        close()
        yield metas, parts


class HostStaging:
    """A host buffer that device tensors are copied into, one bucket at a time, reused across
    buckets and syncs (it grows to the largest size asked for). Pinned when CUDA is available: on an
    H200 the copies then ran at 52 GB/s, where a pageable `.cpu()` per tensor ran at 4.4
    (bench/gpu.py, docs/performance.md)."""

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def reserve(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return self.buffer


def staged_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, staging: HostStaging
) -> Iterator[tuple[list[TensorMeta], list[np.ndarray]]]:
    """Buckets of device tensors (a GPU learner's parameters), copied into `staging`.

    Each bucket is laid out as `concat_bucket` would lay it out (every tensor at an ALIGN
    boundary) and yielded as a single part, a view of the staging buffer: it is valid until
    the next bucket is asked for, so publish (copy) each bucket before going on, as
    `publish` does. The copies of a bucket are queued asynchronously and waited for once.
    """
    pending: list[tuple[TensorMeta, torch.Tensor]] = []
    size = 0

    def flush() -> tuple[list[TensorMeta], list[np.ndarray]]:
        buffer = staging.reserve(size)
        end = 0
        for meta, tensor in pending:
            buffer[end : meta.offset].zero_()  # alignment padding, zero as in concat_bucket
            buffer[meta.offset : meta.offset + meta.nbytes].copy_(_raw_bytes(tensor), non_blocking=True)
            end = meta.offset + meta.nbytes
        for device in {t.device for _, t in pending if t.is_cuda}:
            torch.cuda.current_stream(device).synchronize()
        return [meta for meta, _ in pending], [buffer[:size].numpy()]

    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > bucket_bytes:
            yield flush()
            pending, size = [], 0
        size += -size % ALIGN
        pending.append((TensorMeta(name, dtype_name(tensor.dtype), tuple(tensor.shape), size, nbytes), tensor))
        size += nbytes
    if pending:
        yield flush()


def concat_bucket(metas: list[TensorMeta], parts: list[np.ndarray]) -> np.ndarray:
    """One contiguous byte array of the bucket's layout (parts at their offsets, zero padding)."""
    out = np.zeros(metas[-1].offset + metas[-1].nbytes, dtype=np.uint8)
    for start, part in zip(_part_starts(parts), parts):
        out[start : start + part.nbytes] = part
    return out


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[tuple[list[TensorMeta], np.ndarray]]:
    """The buckets of `group_buckets` as contiguous byte arrays (one copy of the weights)."""
    for metas, parts in group_buckets(named_tensors, bucket_bytes):
        yield metas, concat_bucket(metas, parts)


def unpack_bucket(metas: list[TensorMeta], bucket: np.ndarray | list[np.ndarray]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a bucket (a contiguous array, or the list of parts of `group_buckets`), as views of its bytes.

    Views of object-store buffers are read-only memory: copy them into parameters, or use
    them only for reading (see `load_into_parameters`).
    """
    import warnings

    with warnings.catch_warnings():
        # buckets from the object store are read-only; the views are only read from
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(bucket, (list, tuple)):
            starts = _part_starts(list(bucket))
            flats = [torch.from_numpy(part) for part in bucket]
        else:
            starts, flats = [0], [torch.from_numpy(bucket)]
    for meta in metas:
        k = max(0, bisect.bisect_right(starts, meta.offset) - 1)
        local = meta.offset - starts[k]
        if local + meta.nbytes > flats[k].numel():
            raise ValueError(f"weight sync: {meta.name} ({meta.nbytes} bytes at {meta.offset}) is outside the bucket's bytes")
        raw = flats[k][local : local + meta.nbytes]
        yield meta.name, raw.view(to_dtype(meta.dtype)).view(meta.shape)


def publish(buckets: Iterable[tuple[list[TensorMeta], np.ndarray | list[np.ndarray]]]) -> list[tuple[list[TensorMeta], ObjectRef]]:
    """Put each bucket (an array, or a list of per-tensor views) into the Ray object store;
    returns (metadata, object ref) pairs. `ray.put` copies the bytes once, into shared memory."""
    import ray

    return [(metas, ray.put(bucket)) for metas, bucket in buckets]


def receive(bucket_refs: list[tuple[list[TensorMeta], ObjectRef]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Fetch published buckets one at a time and yield their tensors."""
    import ray

    for metas, ref in bucket_refs:
        yield from unpack_bucket(metas, ray.get(ref))


@torch.no_grad()
def load_into_parameters(
    params: dict[str, torch.nn.Parameter],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    zero_copy: bool = False,
    borrowed: set[str] | None = None,
    staging: HostStaging | None = None,
) -> int:
    """Load received tensors into a model's parameters (by name); returns how many were loaded.

    By default each tensor is copied into its parameter. With `zero_copy`, a parameter whose
    device, dtype and shape already match is pointed at the received tensor instead: on CPU
    that is the object-store buffer itself, so loading costs no copy and engines on one node
    share one copy of the weights. Such parameters are read-only memory (fine for inference:
    nothing writes parameters there) and stay valid while they are in use (the tensor keeps
    its buffer alive). `borrowed` records their names; a later copying load gives a borrowed
    parameter fresh memory of its own instead of writing into the shared buffer.

    With `staging`, a host tensor bound for a GPU parameter is first copied into the staging
    buffer (pinned), then to the GPU: object-store buffers are pageable, and on an H200 the
    two copies ran at 16.9 GB/s where the direct one ran at 8.0 (bench/gpu.py).
    """
    borrowed = borrowed if borrowed is not None else set()
    n = 0
    for name, tensor in named_tensors:
        param = params.get(name)
        if param is None:
            raise KeyError(f"weight sync: the engine's model has no parameter {name!r}")
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, engine expects {tuple(param.shape)}")
        if zero_copy and tensor.device == param.device and tensor.dtype == param.dtype and tensor.is_contiguous():
            param.data = tensor
            borrowed.add(name)
        elif name in borrowed:
            param.data = tensor.to(device=param.device, dtype=param.dtype, copy=True)
            borrowed.discard(name)
        elif staging is not None and param.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            nbytes = tensor.numel() * tensor.element_size()
            pinned = staging.reserve(nbytes)[:nbytes]
            pinned.copy_(_raw_bytes(tensor))
            # a blocking copy: the buffer is free again for the next tensor
            param.copy_(pinned.view(tensor.dtype).view(tensor.shape).to(device=param.device, dtype=param.dtype))
        else:
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
        n += 1
    return n


# --- broadcast groups (learner rank 0 -> every engine) --------------------------------------
#
# `sync.backend: nccl` (GPU, vLLM; alphadrive_ray/engines/vllm_engine.py) and `sync.backend:
# gloo` (CPU, HF engine; below) share one protocol, driven by `LearnerGroup.open_broadcast_sync`
# and `LearnerGroup.broadcast_weights`:
# 1. open: learner rank 0 (rank 0) and every engine worker (ranks 1..) join a fresh group at a
#    fresh address; a member that held a group before closes it first. The group lives beside
#    the learners' own torch.distributed world (it is not the default group).
# 2. broadcast: rank 0 sends each synced parameter in the order of the metadata [(name, dtype,
#    shape)] that every engine received with the call; the engines load them as they arrive.
# A rollout worker that Ray restarts lost its group and its weights: the rollout group re-opens
# the broadcast group for every member and broadcasts the current weights again before the
# restarted worker generates (`RolloutGroup.rejoin`). On CPU this runs in the tests with gloo.


class GlooBroadcastGroup:
    """A process group of its own (a TCP store at rank 0's address, gloo), for broadcasts only."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float = 600.0):
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        self.store: Any = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        # Any: torch's stubs do not list the backend's own collectives (`broadcast` with options)
        self.group: Any = dist.ProcessGroupGloo(dist.PrefixStore("weight-sync", self.store), rank, world_size, timeout)
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()


def broadcast_tensors(group: GlooBroadcastGroup, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Rank 0 of a gloo broadcast group: send each tensor in metadata order (via host memory)."""
    n = 0
    for _, tensor in named_tensors:
        group.broadcast(tensor.detach().cpu().contiguous(), src=0)
        n += 1
    return n


def receive_broadcast(group: GlooBroadcastGroup, metas: Iterable[tuple[str, str, Iterable[int]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """An engine in a gloo broadcast group: receive each tensor [(name, dtype, shape)] in order."""
    for name, dtype, shape in metas:
        tensor = torch.empty(tuple(shape), dtype=to_dtype(dtype))
        group.broadcast(tensor, src=0)
        yield name, tensor
