"""LLM calls through litellm. Imported lazily: `import litellm` takes seconds."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

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
    """Whether the model takes image input. litellm's bundled model map decides; a model it does not know is trusted to.

    A litellm Router registers each of its models in that map (with no capabilities) when it is made, so "known" means
    known when litellm was loaded: otherwise an unknown model would take images until its first call, and then never.
    """
    litellm = load_litellm()
    try:
        info = litellm.get_model_info(model)
    except Exception:
        return True
    if info.get("key") not in _bundled_models:
        return True
    try:
        return bool(litellm.supports_vision(model=model))
    except Exception:
        return True


_litellm: Any = None
_bundled_models: frozenset[str] = frozenset()


def load_litellm() -> Any:
    global _litellm, _bundled_models
    if _litellm is None:
        # Never fetch the price map over the network at import (there is no network here).
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        # litellm caps its connections at 500 per host (1,000 in all), read once at import: a worker at concurrency 1,000
        # against one provider held only 500 calls in flight. worker.concurrency (1,000 at most) is the limit that counts.
        # (0 is no better: aiohttp's own default of 100 then applies.)
        os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT_PER_HOST", "1000")
        os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT", "2000")
        import litellm

        _bundled_models = frozenset(litellm.model_cost)
        litellm.suppress_debug_info = True
        litellm.telemetry = False
        # litellm logs failures with request details at ERROR; ours are recorded, audited and key-free.
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _litellm = litellm
    return _litellm
