"""GPU figures: rollout-engine tokens/s and the GPU legs of the weight sync on a Qwen2-VL-2B-sized model.

    python bench/gpu.py                             # one CUDA GPU: about 2 min on an H200
    python bench/gpu.py --json gpu.json             # also every figure as JSON
    python bench/gpu.py --size tiny --device cpu    # the same code on the tiny model (tests/test_bench_gpu.py)

A random model with the sizes of Qwen2-VL-2B-Instruct (2.2B parameters: 28 text layers of
width 1536, a 32-layer vision tower, the 151936-token vocabulary, tied embeddings) is built
on the device in bfloat16 and saved, with the tiny model's tokenizer and processor (224 x 224
scenes, 64 image tokens). Random weights never write the end-of-turn token, so every
completion runs to `--max-new-tokens` and each engine does the same work.

1. The machine: copy bandwidths (device to device, host to device and back, pinned and
   pageable host memory), the ceilings the sync figures are read against.
2. Generation, through the `RolloutEngine` interface: `HFEngine` with its lean loop and with
   transformers' `generate` (`rollout.hf_loop`), and `VLLMEngine` when vLLM is installed;
   `--prompts` synthetic scenes x G completions per call, fresh scenes every round; completion
   tokens per second, median over `--rounds` rounds after one warm-up call. For each HF loop,
   how far the engine's log-probs are from the learner's recomputation of them.
3. The weight sync's GPU legs (the object-store path, `sync.backend: object_store`): a
   learner-like copy of the parameters on the GPU is grouped into host-memory buckets as
   a GPU learner does (`weight_sync.staged_buckets`: one reused pinned buffer, asynchronous
   copies), and for comparison with a pageable `.cpu()` per tensor (`group_buckets`, what
   the learner did before); the HF engine loads each bucket (`HFEngine.load_weights`). Then
   the engine's load from pageable buckets, as `ray.get` returns them: its way (through a
   pinned buffer on a GPU) against a direct copy and against pinning the pages in place.
   Between the two, `ray.put` copies the buckets once more on the host; bench/weight_sync.py
   measures that part. Loaded bits are checked against the sender's.
4. NCCL broadcast of the same state dict from GPU 0 to GPU 1 (the `sync.backend: nccl`
   transport) when the machine has two GPUs; `--nccl-backend gloo` runs that code on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quickstart import prompt_template  # noqa: E402 (bench/, the script's folder, is on sys.path)
from qwen2vl_2b import SIZES as QWEN2VL_2B, VOCABULARY  # noqa: E402

SIZES = {"2b": QWEN2VL_2B, "tiny": {}}  # TinySpec's sizes

GB = 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidths(device: torch.device, nbytes: int) -> dict[str, float]:
    """GB/s of one copy of `nbytes`; device-to-device counts bytes read plus written."""
    out: dict[str, float] = {}
    host = torch.empty(nbytes, dtype=torch.uint8).random_()
    if device.type != "cuda":
        other = torch.empty_like(host)
        out["host to host (copy_)"] = nbytes / timed(lambda: other.copy_(host), device) / GB
        return out
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dev2 = torch.empty_like(dev)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out["device to device (read + write)"] = 2 * nbytes / timed(lambda: dev2.copy_(dev), device) / GB
    out["host to device, pinned"] = nbytes / timed(lambda: dev.copy_(pinned, non_blocking=True), device) / GB
    out["device to host, pinned"] = nbytes / timed(lambda: pinned.copy_(dev, non_blocking=True), device) / GB
    out["host to device, pageable"] = nbytes / timed(lambda: dev.copy_(host), device) / GB
    out["device to host, pageable"] = nbytes / timed(lambda: host.copy_(dev), device) / GB
    return out


def build_model(out: Path, size: str, device: torch.device, dtype: torch.dtype, log) -> int:
    """A random Qwen2-VL of `size` with the tiny model's tokenizer and processor; returns its parameter count."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from alphadrive_ray.models.tiny import TinySpec, build_config, build_processor, default_corpus, train_tokenizer

    spec = TinySpec(vision_pretrain_steps=0, **SIZES[size])
    tokenizer = train_tokenizer(default_corpus(), spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    config = build_config(tokenizer, spec)
    if size == "2b":
        # the release's vocabulary and tied embeddings: the lm_head is a sixth of the weights;
        # ids past the tokenizer's decode to nothing
        config.text_config.update(VOCABULARY)
        config.tie_word_embeddings = VOCABULARY["tie_word_embeddings"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log(f"built a random {size} Qwen2-VL ({n / 1e9:.2f}B parameters, {dtype}) in {time.perf_counter() - t0:.0f} s: {out}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


def throughput(engine, records, prompts: int, group: int, max_new_tokens: int, rounds: int, device: torch.device) -> dict:
    """Completion tokens/s of `engine.generate`, median over rounds of fresh prompts."""
    from alphadrive_ray.engines.base import SamplingParams

    params = SamplingParams(n=group, temperature=1.0, max_new_tokens=max_new_tokens, seed=1)
    engine.generate(records[:prompts], params)  # warm-up: allocation, first images, compilation
    rates, seconds, tokens = [], [], []
    for r in range(1, rounds + 1):
        chunk = records[r * prompts : (r + 1) * prompts]
        synchronize(device)
        t0 = time.perf_counter()
        groups = engine.generate(chunk, params)
        synchronize(device)
        s = time.perf_counter() - t0
        n = sum(len(c.token_ids) for g in groups for c in g.completions)
        if len(groups) != len(chunk) or any(len(g.completions) != group for g in groups):
            raise RuntimeError(f"{type(engine).__name__} returned {len(groups)} groups for {len(chunk)} prompts")
        rates.append(n / s)
        seconds.append(s)
        tokens.append(n)
    return {"tokens_per_s": statistics.median(rates), "seconds_per_call": statistics.median(seconds), "tokens_per_call": statistics.median(tokens)}


@torch.no_grad()
def logprob_agreement(engine, records, group: int, max_new_tokens: int, device: torch.device) -> dict:
    """|engine log-prob - learner log-prob| per completion token, the learner's recomputed with a
    full forward (`inputs.completion_logits`, `algo.compute_token_logprobs`) on the same
    weights, device and dtype: what GRPO's ratio sees before any update (`rollout/logp_diff`)."""
    from alphadrive_ray import algo
    from alphadrive_ray.engines.base import SamplingParams
    from alphadrive_ray.inputs import completion_logits

    enc = engine.encoder
    groups = engine.generate(records, SamplingParams(n=group, temperature=1.0, max_new_tokens=max_new_tokens, seed=7))
    diffs = []
    for g in groups:
        tokens = [c.token_ids for c in g.completions]
        batch = {k: v.to(device) for k, v in enc.collate([enc.encode(g.record)] * len(tokens), tokens).items()}
        logp = algo.compute_token_logprobs(completion_logits(engine.model, batch), batch["completion_ids"], 1.0, 1.0, enc.banned_token_ids)
        for row, c in enumerate(g.completions):
            diffs.append((logp[row, : len(c.token_ids)].cpu() - torch.tensor(c.logprobs)).abs())
    d = torch.cat(diffs)
    return {"mean_abs": d.mean().item(), "p99_abs": d.quantile(0.99).item(), "max_abs": d.max().item(), "tokens": d.numel()}


def learner_like(engine) -> dict[str, torch.Tensor]:
    """A learner's parameters on the engine's device: the same names, other values."""
    return {name: torch.randn_like(p) if p.is_floating_point() else p.clone() for name, p in engine.model.named_parameters()}


def sync_legs(engine, sender: dict[str, torch.Tensor], bucket_mb: int, device: torch.device, rounds: int) -> dict:
    """Seconds and GB/s of the learner's bucketing (device to host) and the engine's load
    (host to device), for each way of bucketing: `staged` (the learner's, one pinned
    buffer) and `views` (`group_buckets`: a pageable `.cpu()` per device tensor)."""
    from alphadrive_ray import weight_sync

    nbytes = sum(t.numel() * t.element_size() for t in sender.values())
    staging = weight_sync.HostStaging()
    ways = {
        "staged": lambda: weight_sync.staged_buckets(sender.items(), bucket_mb * 2**20, staging),
        "views": lambda: weight_sync.group_buckets(sender.items(), bucket_mb * 2**20),
    }
    out: dict = {"state_dict_gb": nbytes / GB, "bucket_mb": bucket_mb}
    params = dict(engine.model.named_parameters())
    for way, buckets in ways.items():
        times = []
        for _ in range(rounds + 1):  # the first round is a warm-up (the staging buffer is allocated)
            for p in params.values():
                p.zero_()
            bucket_s = load_s = 0.0
            loaded = 0
            synchronize(device)
            t0 = time.perf_counter()
            for metas, parts in buckets():  # each bucket is loaded before the next is made, as publish does
                t1 = time.perf_counter()
                loaded += engine.load_weights(weight_sync.unpack_bucket(metas, parts), version=1)
                synchronize(device)
                t2 = time.perf_counter()
                bucket_s += t1 - t0
                load_s += t2 - t1
                t0 = t2
            if loaded != len(sender):
                raise RuntimeError(f"the engine loaded {loaded} of {len(sender)} tensors")
            wrong = [name for name, t in sender.items() if not torch.equal(params[name], t)]
            if wrong:
                raise RuntimeError(f"{way}: {len(wrong)} tensors differ after the load, e.g. {wrong[0]}")
            times.append((bucket_s, load_s))
        times = times[1:]
        out[way] = {
            "bucket_s": statistics.median(b for b, _ in times),
            "load_s": statistics.median(l for _, l in times),
        }
        out[way]["bucket_gb_per_s"] = nbytes / out[way]["bucket_s"] / GB
        out[way]["load_gb_per_s"] = nbytes / out[way]["load_s"] / GB
    staging = None  # the pinned buffer is freed before the next configuration allocates its own
    return out


def engine_load_ways(engine, sender: dict[str, torch.Tensor], bucket_mb: int, device: torch.device, rounds: int) -> dict:
    """GB/s of the engine's load from pageable host buckets (as `ray.get` returns them): its own
    way (on a GPU through a pinned staging buffer) and, for comparison, a direct copy from
    the pageable buffer and a copy from the bucket's pages pinned in place (`cudaHostRegister`)."""
    import numpy as np

    from alphadrive_ray import weight_sync

    params = dict(engine.model.named_parameters())
    nbytes = sum(t.numel() * t.element_size() for t in sender.values())
    # pageable copies of the buckets, as a receiver holds them
    buckets = [
        (m, np.array(parts[0], copy=True)) for m, parts in weight_sync.staged_buckets(sender.items(), bucket_mb * 2**20, weight_sync.HostStaging())
    ]

    def engine_way():
        for metas, array in buckets:
            engine.load_weights(weight_sync.unpack_bucket(metas, array), version=1)

    def direct():
        for metas, array in buckets:
            weight_sync.load_into_parameters(params, weight_sync.unpack_bucket(metas, array))

    def registered():
        cudart = torch.cuda.cudart()
        for metas, array in buckets:
            ptr = array.ctypes.data
            if int(cudart.cudaHostRegister(ptr, array.nbytes, 0)) != 0:
                raise RuntimeError("cudaHostRegister failed")
            try:
                weight_sync.load_into_parameters(params, weight_sync.unpack_bucket(metas, array))
            finally:
                cudart.cudaHostUnregister(ptr)

    ways = {"the engine's": engine_way, "direct from pageable": direct}
    if device.type == "cuda":
        ways["pages pinned in place"] = registered
    out = {}
    for name, fn in ways.items():
        for p in params.values():
            p.zero_()
        out[name] = nbytes / timed(fn, device, repeats=rounds) / GB
        wrong = [n for n, t in sender.items() if not torch.equal(params[n], t)]
        if wrong:
            raise RuntimeError(f"engine load ({name}): {len(wrong)} tensors differ, e.g. {wrong[0]}")
    return out


def _broadcast_worker(rank: int, world: int, backend: str, port: int, shapes: list, dtype: str, queue) -> None:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensors = [torch.full(shape, rank, dtype=getattr(torch, dtype), device=device) for shape in shapes]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    times = []
    for _ in range(4):  # the first is a warm-up (communicator set-up)
        dist.barrier()
        synchronize(device)
        t0 = time.perf_counter()
        for t in tensors:  # one broadcast per tensor, as engines/vllm_engine.broadcast_weights does
            dist.broadcast(t, src=0)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    ok = all(bool((t == 0).all()) for t in tensors)
    dist.destroy_process_group()
    if rank == 1:
        queue.put({"gb_per_s": nbytes / statistics.median(times[1:]) / GB, "seconds": statistics.median(times[1:]), "received_right": ok})


def broadcast_bandwidth(shapes: list, dtype: str, backend: str) -> dict:
    """GB/s of broadcasting tensors of `shapes` from rank 0 to rank 1 (two processes)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_worker, args=(rank, 2, backend, port, shapes, dtype, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"broadcast workers exited with {[p.exitcode for p in procs]}")
    return queue.get(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="2b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 64], help="prompts per call, one run each (default: 16 64)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--generate-prompts",
        type=int,
        default=16,
        help="prompts per call for transformers' generate (0: skip it); its scores take B x G x T x V floats",
    )
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--copy-mb", type=int, default=1024)
    p.add_argument("--nccl-backend", default="nccl", help="backend of the two-process broadcast (gloo: on CPU)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.data.synth import generate_dataset
    from alphadrive_ray.engines.hf import HFEngine

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine, or pass --size tiny --device cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-gpu-"))).resolve()
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        report["device"] = f"CPU, {os.cpu_count()} cores"
    log(f"{report['device']}; torch {torch.__version__}, transformers {transformers.__version__}")

    report["copy_gb_per_s"] = copy_bandwidths(device, args.copy_mb * 2**20)
    for name, v in report["copy_gb_per_s"].items():
        log(f"copy {name}: {v:.1f} GB/s")

    model_dir = work / f"qwen2vl-{args.size}"
    report["parameters"] = build_model(model_dir, args.size, device, getattr(torch, dtype), log)
    need = max(args.prompts + [args.generate_prompts]) * (args.rounds + 1)
    data = work / "scenes" / "data.jsonl"
    generate_dataset(data.parent, need, seed=1, size=224, id_prefix="bench")
    records = load_records(data)
    template = prompt_template()  # the quickstart's, as in bench/hf_engine.py

    runs = [("hf lean", "lean", n) for n in args.prompts]
    if args.generate_prompts:
        runs.append(("hf generate", "generate", args.generate_prompts))
    report["generation"] = []
    engine = None
    for name, loop, prompts in runs:
        engine = HFEngine(str(model_dir), prompt_template=template, dtype=dtype, device=str(device), batch_size=prompts * args.group, loop=loop)
        r = throughput(engine, records, prompts, args.group, args.max_new_tokens, args.rounds, device)
        report["generation"].append({"engine": name, "prompts": prompts, "group": args.group, **r})
        log(f"{name:12s} {prompts:3d} prompts x G={args.group}: {r['tokens_per_s']:8.0f} tokens/s ({r['seconds_per_call']:.2f} s per call)")
        if prompts == min(args.prompts):
            a = logprob_agreement(engine, records[: min(4, prompts)], args.group, args.max_new_tokens, device)
            report.setdefault("logprob_agreement", {})[name] = a
            log(
                f"{name:12s} |engine - learner| log-prob over {a['tokens']} tokens: "
                f"mean {a['mean_abs']:.2e}, p99 {a['p99_abs']:.2e}, max {a['max_abs']:.2e}"
            )
        if loop == "lean" and prompts == args.prompts[0]:
            sender = learner_like(engine)
            report["sync"] = sync_legs(engine, sender, args.bucket_mb, device, args.rounds)
            for way in ("staged", "views"):
                w = report["sync"][way]
                log(
                    f"sync legs ({way}) of {report['sync']['state_dict_gb']:.2f} GB: bucketing {w['bucket_s']:.2f} s "
                    f"({w['bucket_gb_per_s']:.1f} GB/s), engine load {w['load_s']:.2f} s ({w['load_gb_per_s']:.1f} GB/s)"
                )
            report["engine_load_gb_per_s"] = engine_load_ways(engine, sender, args.bucket_mb, device, args.rounds)
            for way, v in report["engine_load_gb_per_s"].items():
                log(f"engine load from host buckets, {way}: {v:.1f} GB/s")
            del sender
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if importlib.util.find_spec("vllm") is not None:
        from alphadrive_ray.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(str(model_dir), prompt_template=template, dtype=dtype, max_model_len=1024)
        for prompts in args.prompts:
            r = throughput(engine, records, prompts, args.group, args.max_new_tokens, args.rounds, device)
            report["generation"].append({"engine": "vllm", "prompts": prompts, "group": args.group, **r})
            log(f"{'vllm':12s} {prompts:3d} prompts x G={args.group}: {r['tokens_per_s']:8.0f} tokens/s ({r['seconds_per_call']:.2f} s per call)")
        del engine
    else:
        report["vllm"] = "not installed here: skipped"
        log("vLLM is not installed here: the vLLM engine is skipped")

    gpus = torch.cuda.device_count() if args.nccl_backend == "nccl" else 2
    if gpus >= 2:
        from transformers import AutoConfig, Qwen2VLForConditionalGeneration

        with torch.device("meta"):
            meta = Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(model_dir))
        shapes = [tuple(t.shape) for t in meta.parameters()]
        report["broadcast"] = broadcast_bandwidth(shapes, dtype, args.nccl_backend)
        log(f"broadcast ({args.nccl_backend}, rank 0 -> 1, one call per tensor): {report['broadcast']['gb_per_s']:.1f} GB/s")
    else:
        report["broadcast"] = f"needs two GPUs; this machine has {gpus}"
        log(f"NCCL broadcast skipped: it needs two GPUs, this machine has {gpus}")

    print()
    print(f"GPU figures: {report['device']}, a random Qwen2-VL ({args.size}, {report['parameters'] / 1e9:.2f}B, {dtype})")
    print(f"  completions of up to {args.max_new_tokens} tokens, G={args.group}, temperature 1.0, median of {args.rounds} rounds")
    for g in report["generation"]:
        print(f"  {g['engine']:12s} {g['prompts']:3d} prompts: {g['tokens_per_s']:8.0f} tokens/s")
    for name, a in report.get("logprob_agreement", {}).items():
        print(
            f"  {name:12s} |engine - learner| log-prob: mean {a['mean_abs']:.2e}, "
            f"p99 {a['p99_abs']:.2e}, max {a['max_abs']:.2e} ({a['tokens']} tokens)"
        )
    if "sync" in report:
        s, c = report["sync"], report["copy_gb_per_s"]
        share = lambda v, key: f"  ({v / c[key]:.0%} of {key} memcpy)" if key in c else ""  # noqa: E731
        print(f"  sync legs, {s['state_dict_gb']:.2f} GB in {s['bucket_mb']} MB buckets, GB/s:")
        for way, what in (
            ("staged", "learner buckets, one pinned buffer (the learner's way)"),
            ("views", "learner buckets, .cpu() per tensor (before)"),
        ):
            print(f"    {what:55s} {s[way]['bucket_gb_per_s']:6.1f}{share(s[way]['bucket_gb_per_s'], 'device to host, pinned')}")
        for way, v in report["engine_load_gb_per_s"].items():
            print(f"    {'engine load from pageable buckets, ' + way:55s} {v:6.1f}{share(v, 'host to device, pageable')}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
