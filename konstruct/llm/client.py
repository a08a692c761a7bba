"""LLM calls through litellm. Imported lazily: `import litellm` takes seconds."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from konstruct.config import LLMSettings
from konstruct.errors import KonstructError


class LLMError(KonstructError):
    """The model could not be reached or refused; the message says why, without secrets."""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    tool_calls: tuple[ToolCall, ...] = ()

    def assistant_message(self) -> dict[str, Any]:
        """This turn as a message for the next request (tool calls included)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls
            ]
        return message


def supports_vision(model: str) -> bool:
    """Whether the model takes image input. litellm's model map decides; a model it does not know is trusted to."""
    litellm = load_litellm()
    try:
        litellm.get_model_info(model)
    except Exception:
        return True
    try:
        return bool(litellm.supports_vision(model=model))
    except Exception:
        return True


_litellm: Any = None


def load_litellm() -> Any:
    global _litellm
    if _litellm is None:
        # Never fetch the price map over the network at import (there is no network here).
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm

        litellm.suppress_debug_info = True
        litellm.telemetry = False
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _litellm = litellm
    return _litellm


def _scrub(message: str, secret: str | None) -> str:
    if secret and secret in message:
        message = message.replace(secret, "****")
    return message[:300]


async def complete(
    settings: LLMSettings, *, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> Completion:
    """One chat completion with the configured timeout and retries; LLMError on any failure."""
    litellm = _litellm or await asyncio.to_thread(load_litellm)  # never block the event loop on the import
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    started = time.perf_counter()
    try:
        response = await litellm.acompletion(
            model=model,
            messages=messages,
            api_base=settings.api_base or None,
            api_key=api_key,
            timeout=settings.timeout,
            num_retries=settings.retries,
            **({"tools": tools} if tools else {}),
        )
    except Exception as exc:
        raise LLMError(f"{type(exc).__name__}: {_scrub(str(exc), api_key)}") from None
    latency_ms = int((time.perf_counter() - started) * 1000)
    choice = response.choices[0]
    text = (choice.message.content or "").strip()
    calls = tuple(
        ToolCall(str(c.id), str(c.function.name), str(c.function.arguments or "{}"))
        for c in (getattr(choice.message, "tool_calls", None) or [])
    )
    if not text and not calls:
        raise LLMError(f"the model {model} returned an empty answer (finish_reason={choice.finish_reason})")
    usage = getattr(response, "usage", None)
    return Completion(
        text=text,
        model=getattr(response, "model", None) or model,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        latency_ms=latency_ms,
        tool_calls=calls,
    )
