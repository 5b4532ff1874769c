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


def read_in_another_process(bucket_refs) -> dict:
    """What a Ray task receives from published buckets: {name: tensor}."""
    import ray

    @ray.remote
    def read(refs):
        return {n: t.clone() for n, t in weight_sync.receive(refs)}

    return ray.get(read.remote(bucket_refs))


def test_through_the_object_store(ray_cluster):
    """Published buckets are read back by another process through Ray."""
    tensors = named()
    got = read_in_another_process(weight_sync.publish(weight_sync.pack_buckets(tensors, 64)))
    for name, t in tensors:
        assert torch.equal(got[name], t)


@pytest.mark.parametrize("bucket_bytes", [1, 100, 10**9])
def test_grouped_buckets_have_the_packed_metadata_and_bytes(bucket_bytes):
    """group_buckets (per-tensor views, no copy) and pack_buckets (one array) describe the same bytes."""
    tensors = named()
    grouped = list(weight_sync.group_buckets(tensors, bucket_bytes))
    packed = list(weight_sync.pack_buckets(tensors, bucket_bytes))
    assert [m for m, _ in grouped] == [m for m, _ in packed]
    for (metas, parts), (_, array) in zip(grouped, packed):
        assert weight_sync.concat_bucket(metas, parts).tobytes() == array.tobytes()
        received = list(weight_sync.unpack_bucket(metas, parts))
        for (name, t), meta in zip(received, metas):
            assert name == meta.name
    received = [pair for metas, parts in grouped for pair in weight_sync.unpack_bucket(metas, parts)]
    for (_, a), (_, b) in zip(tensors, received):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_grouped_parts_are_views_of_the_tensors():
    t = torch.arange(8, dtype=torch.float32)
    ((_, parts),) = weight_sync.group_buckets([("t", t)], 1 << 20)
    t[0] = 42.0  # a view, not a copy: publish before the tensor changes
    assert parts[0].view("float32")[0] == 42.0


def test_a_part_of_the_wrong_size_is_refused():
    metas, parts = next(weight_sync.group_buckets([("a", torch.zeros(4)), ("b", torch.zeros(2))], 1 << 20))
    assert len(parts) == 2  # two allocations: two parts
    with pytest.raises(ValueError, match="outside"):
        list(weight_sync.unpack_bucket(metas, [parts[1], parts[0]]))
    with pytest.raises(ValueError, match="outside"):
        list(weight_sync.unpack_bucket(metas, parts[:1]))


def carved(sizes_and_dtypes):
    """Tensors that are consecutive views of one flat buffer per dtype, as a DeepSpeed learner keeps them."""
    out = []
    flats = {dtype: torch.randn(sum(n for n, d in sizes_and_dtypes if d == dtype)).to(dtype) for _, dtype in sizes_and_dtypes}
    at = {dtype: 0 for dtype in flats}
    for i, (n, dtype) in enumerate(sizes_and_dtypes):
        out.append((f"p{i}", flats[dtype][at[dtype] : at[dtype] + n].view(n // 2, 2)))
        at[dtype] += n
    return out


def test_tensors_adjacent_in_memory_share_one_part():
    """A flat parameter buffer goes out as one view per bucket (one copy into the store, no per-tensor overhead)."""
    tensors = carved([(6, torch.float32), (10, torch.float32), (4, torch.float32), (8, torch.bfloat16), (2, torch.bfloat16)])
    ((metas, parts),) = list(weight_sync.group_buckets(tensors, 1 << 20))
    assert [p.nbytes for p in parts] == [80, 20]  # the float32 run, then the bfloat16 run
    assert [m.offset for m in metas] == [0, 24, 64, 80, 96]  # runs share offsets; a new run starts aligned
    received = list(weight_sync.unpack_bucket(metas, parts))
    for (_, a), (_, b) in zip(tensors, received):
        assert a.dtype == b.dtype and torch.equal(a, b)
    packed = next(weight_sync.pack_buckets(tensors, 1 << 20))[1]
    assert weight_sync.concat_bucket(metas, parts).tobytes() == packed.tobytes()
    # a bucket boundary splits a run
    split = list(weight_sync.group_buckets(tensors[:3], 70))
    assert [[m.name for m in metas] for metas, _ in split] == [["p0", "p1"], ["p2"]]
    assert [[p.nbytes for p in parts] for _, parts in split] == [[64], [16]]


def test_a_gap_between_views_starts_a_new_part():
    flat = torch.arange(10, dtype=torch.float32)
    tensors = [("a", flat[0:3]), ("b", flat[4:6]), ("c", flat[6:10])]  # flat[3] is not sent
    ((metas, parts),) = list(weight_sync.group_buckets(tensors, 1 << 20))
    assert [p.nbytes for p in parts] == [12, 24]
    assert [n for n, _ in weight_sync.unpack_bucket(metas, parts)] == ["a", "b", "c"]
    assert [t.tolist() for _, t in weight_sync.unpack_bucket(metas, parts)] == [[0, 1, 2], [4, 5], [6, 7, 8, 9]]


def params_like(tensors):
    return {name: torch.nn.Parameter(torch.zeros_like(t), requires_grad=False) for name, t in tensors}


def test_copying_load_keeps_the_parameters_own_memory():
    tensors = [("w", torch.randn(3, 4)), ("b", torch.randn(4))]
    params = params_like(tensors)
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    assert weight_sync.load_into_parameters(params, tensors) == 2
    for name, t in tensors:
        assert torch.equal(params[name], t) and params[name].data_ptr() == ptrs[name] != t.data_ptr()


def test_zero_copy_load_uses_the_received_memory_and_a_later_copy_does_not_write_into_it():
    received = [("w", torch.randn(3, 4)), ("h", torch.randn(4, dtype=torch.float64))]
    params = params_like([("w", received[0][1]), ("h", torch.zeros(4))])  # h: float32 engine, float64 sent
    borrowed = set()
    weight_sync.load_into_parameters(params, received, zero_copy=True, borrowed=borrowed)
    assert params["w"].data_ptr() == received[0][1].data_ptr() and borrowed == {"w"}
    # a dtype mismatch cannot be shared: converted into the parameter's own memory
    assert params["h"].dtype == torch.float32 and torch.equal(params["h"], received[1][1].float())
    shared = received[0][1].clone()
    update = torch.randn(3, 4)
    weight_sync.load_into_parameters(params, [("w", update)], borrowed=borrowed)
    assert torch.equal(received[0][1], shared), "the copying load wrote into the shared buffer"
    assert torch.equal(params["w"], update) and params["w"].data_ptr() != received[0][1].data_ptr()
    assert borrowed == set()


def test_zero_copy_load_through_the_object_store_and_a_later_sync_replaces_it(ray_cluster):
    """A receiver points its parameters at two successive published versions; each is exact and
    the second replaces the first (whose buffers the receiver no longer holds)."""
    import ray

    @ray.remote
    class Receiver:
        def __init__(self, tensors):
            self.params = params_like(tensors)
            self.borrowed = set()

        def load(self, bucket_refs):
            return weight_sync.load_into_parameters(self.params, weight_sync.receive(bucket_refs), zero_copy=True, borrowed=self.borrowed)

        def state(self):
            return {n: (p.detach().clone(), p.data_ptr()) for n, p in self.params.items()}

    v1 = [(n, t) for n, t in named() if t.dtype != torch.int64]
    v2 = [(n, t + 1) for n, t in v1]
    receiver = Receiver.remote(v1)
    refs1 = weight_sync.publish(weight_sync.group_buckets(v1, 64))
    assert ray.get(receiver.load.remote(refs1)) == len(v1)
    state1 = ray.get(receiver.state.remote())
    refs2 = weight_sync.publish(weight_sync.group_buckets(v2, 64))
    ray.get(receiver.load.remote(refs2))
    state2 = ray.get(receiver.state.remote())
    for (name, t1), (_, t2) in zip(v1, v2):
        assert torch.equal(state1[name][0], t1) and torch.equal(state2[name][0], t2)
        assert state1[name][1] != state2[name][1]
    ray.kill(receiver)


# --- staged buckets (a GPU learner's way; the same code runs on CPU tensors here) -----------


@pytest.mark.parametrize("bucket_bytes", [1, 100, 10**9])
def test_staged_buckets_have_the_packed_layout_and_bytes(bucket_bytes):
    """Separate tensors: staged buckets describe the same bytes as packed ones, in one part each."""
    tensors = named()
    staging = weight_sync.HostStaging(pin=False)
    packed = list(weight_sync.pack_buckets(tensors, bucket_bytes))
    received = []
    staged = 0
    for (metas, parts), (packed_metas, array) in zip(weight_sync.staged_buckets(tensors, bucket_bytes, staging), packed):
        staged += 1
        assert metas == packed_metas and len(parts) == 1
        assert parts[0].tobytes() == array.tobytes()
        received += [(name, t.clone()) for name, t in weight_sync.unpack_bucket(metas, parts)]  # copy before the next bucket
    assert staged == len(packed)
    assert [n for n, _ in received] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, received):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_the_staging_buffer_is_reused_and_grows_to_the_largest_bucket():
    tensors = [("small", torch.ones(4)), ("big", torch.full((64,), 2.0)), ("small2", torch.full((4,), 3.0))]
    staging = weight_sync.HostStaging(pin=False)
    first = None
    seen = []
    for metas, (part,) in weight_sync.staged_buckets(tensors, 16, staging):
        seen.append(([m.name for m in metas], part.nbytes))
        if first is None:
            first = part
    assert seen == [(["small"], 16), (["big"], 256), (["small2"], 16)]  # the 256-byte tensor gets its own bucket
    assert staging.buffer.numel() == 256
    # the first bucket's view was of the first buffer; the buffer grew, so it was replaced once
    assert first.view("float32").tolist() == [1.0] * 4
    staging2 = weight_sync.HostStaging(pin=False)
    views = [part for _, (part,) in weight_sync.staged_buckets(tensors[::2], 16, staging2)]
    # same-size buckets share the buffer: a bucket is valid only until the next one is made
    assert views[0].ctypes.data == views[1].ctypes.data
    assert views[0].view("float32").tolist() == [3.0] * 4


def test_staged_buckets_through_the_object_store(ray_cluster):
    """publish copies each staged bucket before the next overwrites the buffer."""
    tensors = named()
    refs = weight_sync.publish(weight_sync.staged_buckets(tensors, 1, weight_sync.HostStaging(pin=False)))
    assert len(refs) == len(tensors)
    got = read_in_another_process(refs)
    for name, t in tensors:
        assert torch.equal(got[name], t)
