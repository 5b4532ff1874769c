"""Weight-sync bandwidth through the Ray object store, against the machine's memcpy bandwidth.

    python bench/weight_sync.py                    # a Qwen2-VL-2B-sized bf16 state dict (2.2B params, 4.4 GB)
    python bench/weight_sync.py --scale 0.25       # a quarter of it (when memory is short)
    python bench/weight_sync.py --naive            # also pickled torch tensors (slow)

A learner-like sender actor holds a state dict with the parameter names and shapes of
Qwen2-VL-2B (bf16, random bits; the tied lm_head once) as views of one flat buffer, the way
DeepSpeed ZeRO-1/2 keeps a learner's parameters (`--separate`: one allocation per tensor);
a receiver actor on the same node
holds the same parameters, as a rollout engine does. One sync is the project's protocol end
to end (alphadrive_ray.weight_sync): the sender groups its tensors into buckets of
`--bucket-mb` and publishes them (`ray.put`), the driver hands the (metadata, ref) list to
the receiver, which fetches each bucket (`receive`) and loads it into its parameters with
the engine's load path (`load_into_parameters`, what `HFEngine.load_weights` calls).
Bandwidth = state-dict bytes / wall time from the publish call to the receiver's return.

Modes, each timed `--rounds` times after `--warmup-rounds` untimed syncs (medians reported):
  - concat + copy:  buckets concatenated into one array (`pack_buckets`), put, copied into
                    the receiver's parameters: three copies of the weights;
  - views + copy:   views put as a list (`group_buckets`; tensors adjacent in memory share one
                    view, so a flat buffer goes out as one view per bucket): two copies;
  - views + zero-copy: the receiver's parameters become views of the shared-memory buffers
                    (`zero_copy=True`, the default for HF engines on CPU): one copy, the put.
The object store is preallocated (RAY_preallocate_plasma_memory=1) and filled once before
timing. The baseline of each round is a memcpy of the same bytes, right before the sync, in the sender
(its tensors copied into a warm 256 MB buffer, numpy, one thread, as the put's copy): on a
shared machine both then see the same load; the ratio is the median over rounds of
sync speed / memcpy speed. A machine figure (two buffers, torch `copy_` with all threads and
numpy with one) is printed first. Received bytes are checked against the sender's (crc32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import zlib

import numpy as np
import torch

GB = 1e9


def qwen2vl_2b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of Qwen2-VL-2B-Instruct (config values of the release)."""
    from qwen2vl_2b import meta_model

    return [(name, tuple(p.shape)) for name, p in meta_model().named_parameters()]


def scaled(shapes, scale: float):
    """The first parameters, in order, whose sizes add up to `scale` of the whole."""
    if scale >= 1.0:
        return shapes
    total = sum(int(np.prod(s)) for _, s in shapes)
    out, n = [], 0
    for name, shape in shapes:
        if n >= scale * total:
            break
        out.append((name, shape))
        n += int(np.prod(shape))
    return out


def crc(t: torch.Tensor) -> int:
    from alphadrive_ray.weight_sync import tensor_bytes

    return zlib.crc32(memoryview(tensor_bytes(t)))


class Sender:
    """Learner-like: holds the state dict and publishes it with the weight-sync protocol."""

    def __init__(self, shapes, seed: int = 0, flat: bool = True):
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(seed)
        sizes = [int(np.prod(shape)) for _, shape in shapes]
        # DeepSpeed (ZeRO 1/2) keeps a learner's parameters as views of one flat buffer, in order
        buffer = torch.empty(sum(sizes), dtype=torch.bfloat16) if flat else None
        self.tensors, at = [], 0
        for (name, shape), n in zip(shapes, sizes):
            t = buffer[at : at + n].view(shape) if flat else torch.empty(shape, dtype=torch.bfloat16)
            t.view(torch.int16).random_(generator=g)  # random bit patterns; every page touched
            self.tensors.append((name, t))
            at += n

    def checksums(self) -> dict[str, int]:
        return {name: crc(t) for name, t in self.tensors}

    def touch_store(self, nbytes: int, chunk: int = 2**28) -> None:
        """Fill the object store once, so no timed sync pays the first touch of its pages."""
        import ray

        refs = [ray.put(np.ones(min(chunk, nbytes - i), dtype=np.uint8)) for i in range(0, nbytes, chunk)]
        del refs

    def memcpy(self, chunk_mb: int = 256) -> float:
        """Seconds to copy every tensor's bytes into a warm buffer (reused, `chunk_mb`): the
        copy a put makes, without the object store; the baseline of each round."""
        from alphadrive_ray.weight_sync import tensor_bytes

        if getattr(self, "_dst", None) is None:
            self._dst = np.ones(chunk_mb * 2**20, dtype=np.uint8)
        dst, at = self._dst, 0
        t0 = time.perf_counter()
        for _, t in self.tensors:
            raw = tensor_bytes(t)
            for start in range(0, raw.nbytes, dst.nbytes):
                part = raw[start : start + dst.nbytes]
                if at + part.nbytes > dst.nbytes:
                    at = 0
                np.copyto(dst[at : at + part.nbytes], part)
                at += part.nbytes
        return time.perf_counter() - t0

    def publish(self, bucket_mb: int, concat: bool) -> tuple[list, float]:
        from alphadrive_ray import weight_sync

        t0 = time.perf_counter()
        group = weight_sync.pack_buckets if concat else weight_sync.group_buckets
        refs = weight_sync.publish(group(iter(self.tensors), bucket_mb * 2**20))
        return refs, time.perf_counter() - t0

    def publish_pickled(self, bucket_mb: int) -> tuple[list, float]:
        """The naive way: dicts of torch tensors, pickled by Ray."""
        import ray

        t0 = time.perf_counter()
        refs, chunk, size = [], {}, 0
        for name, t in self.tensors:
            if chunk and size + t.nbytes > bucket_mb * 2**20:
                refs.append(ray.put(chunk))
                chunk, size = {}, 0
            chunk[name] = t
            size += t.nbytes
        refs.append(ray.put(chunk))
        return refs, time.perf_counter() - t0


class Receiver:
    """Engine-like: parameters of the same names and shapes, loaded with the engine's load path."""

    def __init__(self, shapes):
        torch.set_num_threads(1)
        self.params = {name: torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16), requires_grad=False) for name, shape in shapes}
        self.borrowed: set[str] = set()

    def load(self, bucket_refs, zero_copy: bool) -> float:
        from alphadrive_ray import weight_sync

        t0 = time.perf_counter()
        n = weight_sync.load_into_parameters(self.params, weight_sync.receive(bucket_refs), zero_copy=zero_copy, borrowed=self.borrowed)
        assert n == len(self.params)
        return time.perf_counter() - t0

    def load_pickled(self, refs) -> float:
        import ray

        from alphadrive_ray import weight_sync

        t0 = time.perf_counter()
        for ref in refs:
            weight_sync.load_into_parameters(self.params, ray.get(ref).items(), borrowed=self.borrowed)
        return time.perf_counter() - t0

    def checksums(self) -> dict[str, int]:
        return {name: crc(p.data) for name, p in self.params.items()}

    def borrowed_count(self) -> int:
        return len(self.borrowed)


def memcpy_gbps(nbytes: int, rounds: int, chunk: int = 2**30) -> dict[str, float]:
    """Copy `nbytes` between two preallocated buffers (in chunks of at most `chunk`); GB/s, median."""
    size = min(nbytes, chunk)
    src = torch.empty(size, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    out = {}
    for label, threads, copy in (
        (f"torch copy_ ({os.cpu_count()} threads)", os.cpu_count(), lambda d, s: d.copy_(s)),
        ("numpy copyto (1 thread)", 1, lambda d, s: np.copyto(d.numpy(), s.numpy())),
    ):
        torch.set_num_threads(threads)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            left = nbytes
            while left > 0:
                n = min(left, size)
                copy(dst[:n], src[:n])
                left -= n
            times.append(time.perf_counter() - t0)
        out[label] = nbytes / statistics.median(times) / GB
    return out


def mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the Qwen2-VL-2B state dict (default 1)")
    p.add_argument("--bucket-mb", type=int, default=256, help="bucket size (sync.bucket_mb; default 256)")
    p.add_argument("--rounds", type=int, default=5, help="timed syncs per mode (default 5)")
    p.add_argument("--warmup-rounds", type=int, default=2, help="untimed syncs first, as in training where every step syncs (default 2)")
    p.add_argument("--naive", action="store_true", help="also time pickled torch tensors (slow)")
    p.add_argument(
        "--separate",
        action="store_true",
        help="the sender's tensors are separate allocations (default: views of one flat buffer, as a DeepSpeed learner's)",
    )
    p.add_argument("--no-fit", action="store_true", help="do not shrink the state dict to fit the available memory")
    p.add_argument("--json", type=str, default=None, help="also write the figures here")
    args = p.parse_args()

    import ray

    shapes = scaled(qwen2vl_2b_shapes(), args.scale)
    nbytes = sum(int(np.prod(s)) * 2 for _, s in shapes)
    # sender + receiver + a preallocated store for two versions (zero-copy keeps the last one) + slack
    need = 4.0 * nbytes / GB + 3.0
    avail = mem_available_gb()
    if need > 0.8 * avail and not args.no_fit:
        scale = args.scale * max(0.05, (0.8 * avail - 3.0) / (4.0 * nbytes / GB))
        print(f"note: {nbytes / GB:.2f} GB needs ~{need:.1f} GB of memory, {avail:.1f} GB available: scaling to {scale:.2f} of Qwen2-VL-2B")
        shapes = scaled(qwen2vl_2b_shapes(), scale)
        nbytes = sum(int(np.prod(s)) * 2 for _, s in shapes)
    params = sum(int(np.prod(s)) for _, s in shapes)
    store = 2 * nbytes + 2**29
    print("weight sync through the Ray object store vs memcpy")
    layout = "separate allocations" if args.separate else "views of one flat buffer, as a DeepSpeed ZeRO-1/2 learner holds them"
    print(
        f"  state dict: {len(shapes)} bf16 tensors of Qwen2-VL-2B ({params / 1e9:.2f}B params, {nbytes / GB:.2f} GB), "
        f"{layout}; buckets of {args.bucket_mb} MB"
    )
    print(f"  machine: {os.cpu_count()} CPUs, {avail:.1f} GB available; load average {open('/proc/loadavg').read().split()[:3]}")
    print(
        f"  torch {torch.__version__}, ray {ray.__version__}; object store {store / GB:.1f} GB, preallocated; "
        f"rounds per mode: {args.warmup_rounds} warm-up + {args.rounds} timed",
        flush=True,
    )

    # the store's pages exist from the start, so no timed put pays for creating them
    os.environ.setdefault("RAY_preallocate_plasma_memory", "1")
    ray.init(num_cpus=4, object_store_memory=store, include_dashboard=False, log_to_driver=True)
    memcpy = memcpy_gbps(nbytes, args.rounds)
    for label, value in memcpy.items():
        print(f"  memcpy between two buffers, {label}: {value:.2f} GB/s (machine figure)")

    sender = ray.remote(num_cpus=1)(Sender).remote(shapes, flat=not args.separate)
    receiver = ray.remote(num_cpus=1)(Receiver).remote(shapes)
    expected = ray.get(sender.checksums.remote())
    ray.get(sender.touch_store.remote(int(0.75 * store)))
    time.sleep(1.0)  # let the store free those objects

    modes = [("concat + copy", True, False), ("views + copy", False, False), ("views + zero-copy", False, True)]
    if args.naive:
        modes.insert(0, ("pickled torch tensors + copy", None, False))
    rows = []
    for label, concat, zero_copy in modes:
        times, put_s, load_s, copy_s = [], [], [], []
        for i in range(args.warmup_rounds + args.rounds):
            # the baseline right before each sync, in the sender, so both see the same machine load
            copy = ray.get(sender.memcpy.remote())
            t0 = time.perf_counter()
            if concat is None:
                refs, put = ray.get(sender.publish_pickled.remote(args.bucket_mb))
                load = ray.get(receiver.load_pickled.remote(refs))
            else:
                refs, put = ray.get(sender.publish.remote(args.bucket_mb, concat))
                load = ray.get(receiver.load.remote(refs, zero_copy))
            elapsed = time.perf_counter() - t0
            del refs  # the receiver keeps what it borrowed (zero-copy) alive by itself
            if i >= args.warmup_rounds:
                times.append(elapsed)
                put_s.append(put)
                load_s.append(load)
                copy_s.append(copy)
        got = ray.get(receiver.checksums.remote())
        if got != expected:
            bad = [n for n in expected if got.get(n) != expected[n]]
            raise SystemExit(f"{label}: {len(bad)} tensor(s) differ after the sync, e.g. {bad[:3]}")
        borrowed = ray.get(receiver.borrowed_count.remote())
        gbps = nbytes / statistics.median(times) / GB
        copy_gbps = nbytes / statistics.median(copy_s) / GB
        ratio = statistics.median(c / t for c, t in zip(copy_s, times))  # per round: sync speed / memcpy speed
        rows.append((label, gbps, statistics.median(put_s), statistics.median(load_s), statistics.median(times), borrowed, copy_gbps, ratio))
        print(
            f"  {label:30s} {gbps:6.2f} GB/s vs memcpy {copy_gbps:5.2f} GB/s: {ratio:4.0%}  "
            f"(median {statistics.median(times):.2f} s: publish {statistics.median(put_s):.2f} s, load {statistics.median(load_s):.2f} s; "
            f"{borrowed} params zero-copy; bytes verified)",
            flush=True,
        )
    best = rows[-1]
    print()
    print(f"object-store sync ({best[0]}): {best[1]:.2f} GB/s; memcpy of the same bytes in the same rounds: {best[6]:.2f} GB/s; ratio {best[7]:.0%}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    ray.shutdown()
    if args.json:
        import json

        figures = {
            "params": params,
            "bytes": nbytes,
            "bucket_mb": args.bucket_mb,
            "layout": "separate" if args.separate else "flat",
            "memcpy_gbps": memcpy,
            "modes": [dict(zip(("mode", "gbps", "publish_s", "load_s", "sync_s", "zero_copy_params", "memcpy_gbps", "ratio"), row)) for row in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
