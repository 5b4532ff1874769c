"""What a chat backend is and returns, and the API's errors: the part of serving that the
backends need (the transformers one in app.py, the vLLM one in alphadrive_ray/engines/vllm_engine.py),
without the HTTP app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ApiError(Exception):
    """An error answered to the client as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ChatSampling:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ChatChoice:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass
class ChatResult:
    choices: list[ChatChoice]
    prompt_tokens: int


class ChatBackend(Protocol):
    vision: bool
    """Whether the model takes images."""

    def generate(self, messages: list[dict], images: list, params: ChatSampling) -> ChatResult:
        """`messages`: [{"role", "content": [{"type": "text", "text"} | {"type": "image"}]}], the
        i-th image part standing for `images[i]` (PIL RGB images)."""
        ...
