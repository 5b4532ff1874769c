"""`alphadrive-ray model ...`: build the tiny default model, inspect a checkpoint.

alphadrive-ray model init-tiny artifacts/tiny-qwen2vl --seed 0
alphadrive-ray model info artifacts/tiny-qwen2vl
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="build the tiny default model or inspect a checkpoint")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser("init-tiny", help="build a tiny random Qwen2-VL with an in-process tokenizer")
    init.add_argument("out_dir", help="folder to save the model and processor in")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    init.add_argument("--text-only", action="store_true", help="build a text-only Qwen2 instead (no vision tower)")
    init.set_defaults(func=run_init_tiny)

    info = sub.add_parser("info", help="load a local checkpoint and print its size and type")
    info.add_argument("path", help="local model folder")
    info.set_defaults(func=run_info)


def run_init_tiny(args: argparse.Namespace) -> int:
    from alphadrive_ray.models.tiny import TinySpec, build_tiny_qwen2vl

    if args.text_only:
        from alphadrive_ray.models.tiny import build_tiny_qwen2

        out = build_tiny_qwen2(args.out_dir, TinySpec(seed=args.seed))
    else:
        out = build_tiny_qwen2vl(args.out_dir, TinySpec(seed=args.seed), log=lambda line: print(line, flush=True))
    return run_info(argparse.Namespace(path=str(out)))


def run_info(args: argparse.Namespace) -> int:
    from alphadrive_ray.models.loading import load_model, load_processor, read_model_type

    model_type = read_model_type(args.path)
    model = load_model(args.path)
    processor = load_processor(args.path)
    tokenizer = getattr(processor, "tokenizer", processor)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.path}: {model_type}, {n / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    print(
        f"load with: Qwen2VLForConditionalGeneration.from_pretrained({args.path!r}) / AutoProcessor.from_pretrained({args.path!r})"
        if model_type.endswith("_vl")
        else f"load with: AutoModelForCausalLM.from_pretrained({args.path!r})"
    )
    return 0
