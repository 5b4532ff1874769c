"""Generation throughput of the HF rollout engine: the lean decoding loop against transformers' generate.

    python bench/hf_engine.py                    # tiny Qwen2-VL, one rollout worker's share of a quickstart step
    python bench/hf_engine.py --prompts 8 --threads 2 --json out.json

Times `HFEngine.generate` on the tiny Qwen2-VL (alphadrive_ray.models.tiny, seed 0) with the
quickstart prompt template: `--prompts` prompts x G completions of up to `--max-new-tokens`,
sampled at `--temperature`, for each decoding loop (`rollout.hf_loop`: lean, generate), the
loops alternating, fresh prompts every round (first-epoch encoding, image cache on). Prints
completion tokens per second (median over rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from quickstart import prompt_template  # bench/, the script's folder, is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts per call (default 4: a quickstart step over 2 workers)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a rollout worker uses its CPU share; default 1)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import torch

    from alphadrive_ray.data.records import load_records
    from alphadrive_ray.data.synth import generate_dataset
    from alphadrive_ray.engines.base import SamplingParams
    from alphadrive_ray.engines.hf import HFEngine
    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

    torch.set_num_threads(args.threads)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="hf-engine-"))).resolve()
    model = work / "tiny-qwen2vl"
    if not (model / "config.json").exists():
        build_tiny_qwen2vl(model, TinySpec(seed=0))
    n = args.prompts * (args.rounds + 1)
    data = work / f"scenes-{n}" / "data.jsonl"
    if not data.exists():
        generate_dataset(data.parent, n, seed=1, size=224, id_prefix="train")
    records = load_records(data)
    template = prompt_template()
    loops = ("generate", "lean")
    engines = {loop: HFEngine(str(model), prompt_template=template, batch_size=args.prompts * args.group, loop=loop) for loop in loops}
    params = SamplingParams(n=args.group, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=1)
    for engine in engines.values():  # warm-up (first call allocates, first images are encoded)
        engine.generate(records[: args.prompts], params)
    seconds = {loop: [] for loop in loops}
    tokens = {loop: [] for loop in loops}
    for r in range(1, args.rounds + 1):
        chunk = records[r * args.prompts : (r + 1) * args.prompts]
        for loop, engine in engines.items():
            t0 = time.perf_counter()
            groups = engine.generate(chunk, params)
            seconds[loop].append(time.perf_counter() - t0)
            tokens[loop].append(sum(len(c.token_ids) for g in groups for c in g.completions))
    print("HF engine generation throughput (tiny Qwen2-VL, CPU)")
    print(
        f"  {args.prompts} prompts x G={args.group}, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, "
        f"{args.threads} torch thread(s), {args.rounds} rounds (median); load average {open('/proc/loadavg').read().split()[:3]}"
    )
    rate = {}
    for loop in loops:
        rate[loop] = statistics.median(t / s for t, s in zip(tokens[loop], seconds[loop]))
        print(
            f"  {loop:8s}: {rate[loop]:7.0f} tokens/s  "
            f"({statistics.median(seconds[loop]):.3f} s per call, {statistics.fmean(tokens[loop]):.0f} tokens)"
        )
    print(f"lean / generate: {rate['lean'] / rate['generate']:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "tokens_per_s": rate, "seconds": seconds, "tokens": tokens}, indent=2)
        )


if __name__ == "__main__":
    main()
