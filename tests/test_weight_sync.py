"""The weight-sync protocol: buckets of (name, dtype, shape) round-trip bit-exactly."""

from __future__ import annotations

import pytest
import torch

from alphadrive_ray import weight_sync


def named(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.int64)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, dtype in enumerate(dtypes):
        t = torch.randn(3 + i, 5, generator=g) * 10
        out.append((f"layer{i}.weight", t.to(dtype)))
    out.append(("scalar", torch.tensor(1.5)))
    return out


@pytest.mark.parametrize("bucket_bytes", [1, 100, 10**9])
def test_round_trip_is_bit_exact(bucket_bytes):
    tensors = named()
    buckets = list(weight_sync.pack_buckets(tensors, bucket_bytes))
    # bucket size 1 puts every tensor in its own bucket; a huge one puts all in one
    assert len(buckets) == (len(tensors) if bucket_bytes == 1 else 1 if bucket_bytes == 10**9 else len(buckets))
    received = [pair for metas, array in buckets for pair in weight_sync.unpack_bucket(metas, array)]
    assert [n for n, _ in received] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, received):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_metadata_describes_each_tensor():
    metas, array = next(weight_sync.pack_buckets([("w", torch.zeros(2, 3, dtype=torch.bfloat16))], 1 << 20))
    assert metas[0].name == "w" and metas[0].dtype == "bfloat16" and metas[0].shape == (2, 3)
    assert metas[0].offset == 0 and metas[0].nbytes == 12 and array.nbytes == 12


def test_buckets_respect_the_size_limit():
    tensors = [(f"t{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    buckets = list(weight_sync.pack_buckets(tensors, 3 * 1024))
    assert [len(m) for m, _ in buckets] == [3, 3, 3, 1]  # 1 KiB tensors are already aligned
    assert all(a.nbytes <= 3 * 1024 for _, a in buckets)


def test_unknown_dtype_is_reported():
    with pytest.raises(ValueError, match="unknown dtype"):
        weight_sync.to_dtype("float7")


def test_through_the_object_store(ray_cluster):
    """Published buckets are read back by another process through Ray."""
    import ray

    tensors = named()
    refs = weight_sync.publish(weight_sync.pack_buckets(tensors, 64))

    @ray.remote
    def read(bucket_refs):
        return {n: t.clone() for n, t in weight_sync.receive(bucket_refs)}

    got = ray.get(read.remote(refs))
    for name, t in tensors:
        assert torch.equal(got[name], t)
