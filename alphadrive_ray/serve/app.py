"""An OpenAI-compatible chat-completions server for a planner checkpoint.

`create_app(backend, name)` is a FastAPI app with `/health`, `/v1/models` and
`/v1/chat/completions` (non-streaming; `n`, `temperature`, `top_p`, `max_tokens`,
`seed`, `stop`; image content parts as data URLs, http(s) URLs of hosts named by
`--allowed-media-domains`, or local files under `--allowed-local-media-path`; token usage in
the response). Errors are OpenAI-style
bodies, `{"error": {"message", "type", "param", "code"}}`, with 4xx codes for the
caller's mistakes.

A backend turns chat messages into completions; `HFChatBackend` runs transformers on CPU
or one GPU, sampling through `apply_sampling_transform` as the rollout engine does. The
vLLM backend lives in `alphadrive_ray/engines/vllm_engine.py` (the one module that
touches vLLM) as `build_chat_backend(model_dir, **options)`, loaded lazily.

    alphadrive-ray serve artifacts/tiny-qwen2vl --port 8000
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union
from urllib.parse import unquote, urljoin, urlparse

from pydantic import BaseModel, ConfigDict, Field

from alphadrive_ray.data.records import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from alphadrive_ray.errors import UserError
from alphadrive_ray.serve.backend import ApiError, ChatBackend, ChatChoice, ChatResult, ChatSampling, bad_request

MAX_IMAGE_BYTES = 20 * 1024 * 1024
HTTP_IMAGE_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
MAX_N = 16
# looked up with a request's role as sent (any JSON value)
ROLES: dict[Any, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# --- images ------------------------------------------------------------------------------


def decode_image(raw: bytes, param: str):
    from PIL import Image, UnidentifiedImageError

    if len(raw) > MAX_IMAGE_BYTES:
        raise bad_request(f"{param}: image is {len(raw)} bytes; at most {MAX_IMAGE_BYTES}", param, "image_too_large")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
                raise bad_request(f"{param}: image is {width}x{height}; at most {MAX_IMAGE_SIDE} px per side", param, "image_too_large")
            if width < 1 or height < 1:
                raise bad_request(f"{param}: image has no pixels", param, "invalid_image")
            img.load()
            return img.convert("RGB")
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise bad_request(f"{param}: not an image (unknown or corrupt format)", param, "invalid_image") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise bad_request(f"{param}: corrupt or truncated image ({type(exc).__name__}: {exc})", param, "invalid_image") from None


def load_image_url(url: Any, param: str, allowed_local_media_path: Path | None = None, allowed_media_domains: Sequence[str] = ()):
    """A PIL RGB image from a data URL, an http(s) URL of an allowed host, or an allowed local file.

    Remote fetching is off unless `allowed_media_domains` names hosts: a server that fetched
    any URL a client sends could be made to read from every address it can reach (server-side
    request forgery). Hosts are compared exactly (lower case), redirects included.
    """
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param}: expected a URL string", param, "invalid_image_url")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request(f"{param}: only base64 data URLs are supported (data:image/png;base64,...)", param, "invalid_image_url")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise bad_request(f"{param}: image is larger than {MAX_IMAGE_BYTES} bytes", param, "image_too_large")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: the data URL's payload is not valid base64", param, "invalid_image_url") from None
        return decode_image(raw, param)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return decode_image(_fetch(url, param, allowed_media_domains), param)
    if scheme == "file" or url.startswith("/"):
        path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
        if allowed_local_media_path is None:
            raise bad_request(
                f"{param}: local image files are disabled; start serve with --allowed-local-media-path DIR or send the image as a data URL",
                param,
                "local_files_disabled",
            )
        root = allowed_local_media_path.resolve()
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise bad_request(f"{param}: {path} is outside the allowed media folder", param, "local_file_not_allowed")
        try:
            raw = resolved.read_bytes()
        except OSError as exc:
            raise bad_request(f"{param}: cannot read {path}: {exc.strerror or exc}", param, "invalid_image_url") from None
        return decode_image(raw, param)
    raise bad_request(f"{param}: unsupported URL {url[:40]!r}; send a data: URL (or http(s)://)", param, "invalid_image_url")


def check_media_domain(url: str, param: str, allowed_media_domains: Sequence[str]) -> None:
    """Refuse (400) a URL whose host is not one of `allowed_media_domains`; none: all refused."""
    if not allowed_media_domains:
        raise bad_request(
            f"{param}: this server does not fetch image URLs; send the image as a data URL "
            f"(data:image/png;base64,...), or start serve with --allowed-media-domains HOST",
            param,
            "remote_media_disabled",
        )
    host = (urlparse(url).hostname or "").lower()
    if host not in {d.lower() for d in allowed_media_domains}:
        raise bad_request(f"{param}: host {host or '(none)'!r} is not in this server's --allowed-media-domains", param, "media_domain_not_allowed")


def _fetch(url: str, param: str, allowed_media_domains: Sequence[str] = ()) -> bytes:
    import httpx

    try:
        with httpx.Client(timeout=HTTP_IMAGE_TIMEOUT_S, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                check_media_domain(url, param, allowed_media_domains)  # every hop: a redirect may point anywhere
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"{param}: fetching the image returned HTTP {response.status_code}", param, "invalid_image_url")
                    chunks, size = [], 0
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > MAX_IMAGE_BYTES:
                            raise bad_request(f"{param}: image is larger than {MAX_IMAGE_BYTES} bytes", param, "image_too_large")
                        chunks.append(chunk)
                    return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise bad_request(f"{param}: could not fetch the image ({type(exc).__name__})", param, "invalid_image_url") from None
    raise bad_request(f"{param}: more than {MAX_REDIRECTS} redirects", param, "invalid_image_url")


def normalise_messages(
    messages: Sequence[Any], allowed_local_media_path: Path | None = None, allowed_media_domains: Sequence[str] = ()
) -> tuple[list[dict], list]:
    """OpenAI chat messages -> (messages with text / image placeholder parts, PIL images)."""
    out: list[dict] = []
    images: list = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: expected an object with role and content", where)
        role = ROLES.get(message.get("role"))
        if role is None:
            raise bad_request(f"{where}.role: {message.get('role')!r} is not supported; use system, user or assistant", f"{where}.role")
        content = message.get("content")
        parts: list[dict] = []
        if content is None:
            pass
        elif isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    images.append(load_image_url(url, f"{at}.image_url", allowed_local_media_path, allowed_media_domains))
                    parts.append({"type": "image"})
                else:
                    raise bad_request(f"{at}: unsupported content part {kind!r}; expected text or image_url", at, "invalid_content")
        else:
            raise bad_request(f"{where}.content: expected a string or a list of parts", f"{where}.content")
        out.append({"role": role, "content": parts})
    if not out:
        raise bad_request("messages: at least one message is required", "messages")
    return out, images


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut at the first stop string (which is not included); whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# --- the transformers backend ------------------------------------------------------------


class HFChatBackend:
    """transformers generation for one model; calls are serialised (one model, one device)."""

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: str = "float32", min_pixels: int = 0, max_pixels: int = 0):
        import torch

        from alphadrive_ray.inputs import vision_placeholder_ids
        from alphadrive_ray.models.loading import load_model, load_processor

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_model(model_dir, dtype).to(self.device)
        self.model.requires_grad_(False)
        self.processor = load_processor(model_dir, min_pixels, max_pixels)
        self.vision = hasattr(self.processor, "image_processor")
        self.tokenizer = self.processor.tokenizer if self.vision else self.processor
        eos = {self.tokenizer.eos_token_id}
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            eos.add(im_end)
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        # vision placeholders are never generated, as in the rollout engine
        self.banned_ids = vision_placeholder_ids(self.tokenizer).to(self.device)
        self._lock = threading.Lock()

    def encode(self, messages: list[dict], images: list) -> dict:
        if images and not self.vision:
            raise bad_request("this model is text-only; send no image parts", "messages", "images_not_supported")
        if self.vision:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return dict(self.processor(text=[text], images=images or None, return_tensors="pt"))
        flat = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")} for m in messages]
        text = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
        return dict(self.tokenizer([text], add_special_tokens=False, return_tensors="pt"))

    def generate(self, messages: list[dict], images: list, params: ChatSampling) -> ChatResult:
        torch = self.torch
        from transformers import LogitsProcessorList

        from alphadrive_ray.engines.hf import SamplingTransform

        batch = {k: v.to(self.device) for k, v in self.encode(messages, images).items()}
        prompt_len = batch["input_ids"].shape[1]
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens,
            # arg-max decoding has one answer: it is generated once and repeated below
            num_return_sequences=1 if params.temperature == 0 else params.n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            top_k=None,
            top_p=None,
            temperature=None,
        )
        if params.temperature == 0:  # greedy: the arg-max of the same transformed logits
            kwargs["do_sample"] = False
            kwargs["logits_processor"] = LogitsProcessorList([SamplingTransform(1.0, 1.0, self.banned_ids)])
        else:
            kwargs["do_sample"] = True
            kwargs["logits_processor"] = LogitsProcessorList([SamplingTransform(params.temperature, params.top_p, self.banned_ids)])
        with self._lock, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed % (2**63))
            sequences = self.model.generate(**batch, **kwargs)
        rows = sequences[:, prompt_len:].tolist()  # [n, T]
        if params.temperature == 0:
            rows = rows * params.n
        choices = []
        for row in rows:
            ids, finish = row, "length"
            for k, token in enumerate(row):
                if token in self.eos_ids:
                    ids, finish = row[: k + 1], "stop"
                    break
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = apply_stop(text, params.stop)
            choices.append(ChatChoice(text, "stop" if stopped else finish, len(ids)))
        return ChatResult(choices, int(prompt_len))


def load_backend(
    engine: str,
    model_dir: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    min_pixels: int = 0,
    max_pixels: int = 0,
    enforce_eager: bool = False,
) -> ChatBackend:
    from alphadrive_ray.models.loading import read_model_type

    read_model_type(model_dir)  # a clear UserError for a wrong folder, before anything heavy
    if engine == "hf":
        return HFChatBackend(model_dir, device=device, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels)
    if engine == "vllm":
        return load_vllm_backend(model_dir, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels, enforce_eager=enforce_eager)
    raise UserError(f"unknown engine {engine!r}; expected hf or vllm")


def load_vllm_backend(model_dir: str, **options) -> ChatBackend:
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "serve --engine vllm needs vLLM, which is not installed in this environment; install the GPU extra "
            "(pip install 'alphadrive-ray[gpu]') on a CUDA machine, or use --engine hf"
        )
    try:
        from alphadrive_ray.engines import vllm_engine
    except ModuleNotFoundError as exc:
        if exc.name == "alphadrive_ray.engines.vllm_engine":
            raise UserError("serve --engine vllm: this checkout has no alphadrive_ray/engines/vllm_engine.py; use --engine hf") from None
        raise
    factory = getattr(vllm_engine, "build_chat_backend", None)
    if factory is None:
        raise UserError("serve --engine vllm: alphadrive_ray.engines.vllm_engine has no build_chat_backend(model_dir, **options); use --engine hf")
    return factory(model_dir, **options)


# --- the HTTP app ------------------------------------------------------------------------


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat-completions request this server reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    messages: list[Any] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False


@dataclass
class ServerOptions:
    served_model_name: str
    model_dir: str = ""
    allowed_local_media_path: Path | None = None
    allowed_media_domains: tuple[str, ...] = ()  # hosts whose image URLs may be fetched; none: no fetching
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(backend: ChatBackend, options: ServerOptions):
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="alphadrive-ray planner", docs_url=None, redoc_url=None)
    name = options.served_model_name

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = []
        param = None
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            param = param or (".".join(loc) or None)
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
        return error_response(bad_request("; ".join(problems) or "invalid request body", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": options.created, "owned_by": "alphadrive-ray"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        if request.model is not None and request.model not in (name, options.model_dir):
            raise ApiError(
                404,
                f"model {request.model!r} does not exist; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )
        if request.stream:
            raise bad_request("stream: streaming is not supported by this server; send stream=false", "stream")
        max_tokens = request.max_completion_tokens or request.max_tokens or options.default_max_tokens
        if max_tokens > options.max_tokens_limit:
            raise bad_request(f"max_tokens: {max_tokens} is above this server's limit of {options.max_tokens_limit}", "max_tokens")
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        params = ChatSampling(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            max_tokens=max_tokens,
            seed=request.seed,
            stop=stop,
        )
        messages, images = await anyio.to_thread.run_sync(
            normalise_messages, request.messages, options.allowed_local_media_path, options.allowed_media_domains
        )
        try:
            result = await anyio.to_thread.run_sync(backend.generate, messages, images, params)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - answer the client, keep the server up
            import logging

            logging.getLogger("alphadrive_ray.serve").exception("generation failed")
            raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}") from None
        completion_tokens = sum(c.completion_tokens for c in result.choices)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": None,
                }
                for i, c in enumerate(result.choices)
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": result.prompt_tokens + completion_tokens,
            },
        }

    return app
