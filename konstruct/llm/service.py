"""Every LLM call of the product: the tenant's own key (or the platform's), retries and fallback models,
the budget checked before and accounted after, one usage row per call.

Failures come back as LLMError with a message free of keys; they are recorded and audited here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.llm import budget, ledger, probe
from konstruct.llm.client import Completion, LLMError, ToolCall, load_litellm
from konstruct.llm.keys import TenantKey, check_api_base
from konstruct.llm.probe import provider_of
from konstruct.mail import Notice
from konstruct.money import usd

log = logging.getLogger("konstruct.llm")


ENDPOINT_RECHECK = 30.0  # seconds a tenant API base's public-address check is trusted
INLINE_ESTIMATE = 20_000  # characters of prompt up to which its tokens are counted on the event loop


class BudgetExhausted(LLMError):
    """The tenant's monthly budget is used up and its action is 'block'."""


@dataclass(frozen=True)
class CallContext:
    tenant_id: uuid.UUID
    agent_id: uuid.UUID | None = None
    conversation_id: uuid.UUID | None = None
    purpose: str = "reply"
    actor: str = "agent"


@dataclass(frozen=True)
class Deployment:
    model: str
    provider: str
    api_key: str | None
    api_base: str | None
    source: str  # tenant | platform
    key_from: str | None = None  # where the key came from, for messages: "$OPENAI_API_KEY", "the tenant's key"


def deployments(settings: Settings, keys: dict[str, TenantKey], models: list[str]) -> list[Deployment]:
    """For each model: the tenant's key for its provider if it brought one, else the platform key."""
    out = []
    for model in models:
        provider = provider_of(model)
        own = keys.get(provider)
        if own is not None:
            out.append(
                Deployment(model, provider, own.key, own.api_base or settings.llm.api_base, "tenant", f"the tenant's {provider} key")
            )
            continue
        platform = probe.platform_key(settings, provider, here="the worker's environment")
        if platform.problem is not None:
            raise LLMError(f"the platform key for {model}: {platform.problem}")
        key = platform.value or probe.keyless(provider, settings.llm.api_base)
        out.append(Deployment(model, provider, key, settings.llm.api_base, "platform", platform.source))
    return out


def _scrub(message: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 6:
            message = message.replace(secret, "****")
    return " ".join(message.split())[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class LLMService:
    def __init__(self, settings: Settings, db: Database, notify: Callable[[Notice], None] | None = None) -> None:
        self.settings, self.db, self.notify = settings, db, notify
        self._cooling: dict[tuple[str, str, str | None], float] = {}  # deployment -> skipped until (monotonic)
        self._endpoints: dict[str, tuple[float, str | None]] = {}  # tenant API base -> (checked at, why refused)

    # -- the call itself --

    async def _call(self, plan: list[Deployment], messages: list[dict[str, Any]], extra: dict[str, Any]) -> tuple[Any, Deployment]:
        """litellm's own call, deployment by deployment: each tried `llm.retries` more times after a failure a retry
        may mend (a timeout, a lost connection, 408, 409, 429, 5xx), then the next model in the plan; one that failed
        is skipped for `llm.cooldown` seconds while another is ready. (A litellm Router did this for ~2 ms of CPU a
        call, more than everything else the worker does around it.) Raises the first model's failure."""
        litellm = load_litellm()
        llm = self.settings.llm
        now = time.monotonic()
        ready = [d for d in plan if self._cooling.get(_identity(d), 0.0) <= now] or plan
        failure: tuple[Exception, Deployment] | None = None
        for d in ready:
            for _attempt in range(llm.retries + 1):
                try:
                    response = await litellm.acompletion(
                        model=d.model, api_key=d.api_key, api_base=d.api_base, timeout=llm.timeout, max_retries=0,
                        messages=messages, max_tokens=llm.max_tokens, **extra,
                    )  # fmt: skip
                    return response, d
                except Exception as exc:
                    failure = failure or (exc, d)
                    if not _retryable(exc):
                        break
            if llm.cooldown:
                self._cool(d, llm.cooldown)
        assert failure is not None  # the plan is never empty
        raise _Failed(*failure)

    def _cool(self, deployment: Deployment, seconds: float) -> None:
        now = time.monotonic()
        if len(self._cooling) > 1000:
            self._cooling = {k: until for k, until in self._cooling.items() if until > now}
        self._cooling[_identity(deployment)] = now + seconds

    # -- estimates and costs --

    def estimate(self, models: list[str], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Decimal:
        """An upper bound of one call's cost: the prompt counted (plus a margin), the longest answer allowed."""
        litellm = load_litellm()
        worst = Decimal(0)
        for model in models:
            try:
                prompt = litellm.token_counter(model=model, messages=messages, tools=tools)
            except Exception:
                prompt = sum(len(str(m.get("content") or "")) for m in messages) // 2 + 200
            prompt = int(prompt * 1.1) + 50
            try:
                cost_in, cost_out = litellm.cost_per_token(
                    model=model, prompt_tokens=prompt, completion_tokens=self.settings.llm.max_tokens
                )
            except Exception:
                continue  # a model litellm has no price for costs nothing we can know
            worst = max(worst, Decimal(str(cost_in)) + Decimal(str(cost_out)))
        return worst

    @staticmethod
    def cost(response: Any) -> Decimal:
        hidden = getattr(response, "_hidden_params", None) or {}
        value = hidden.get("response_cost")
        if value is None:
            try:
                value = load_litellm().completion_cost(completion_response=response)
            except Exception:
                value = 0
        return Decimal(str(value or 0)).quantize(Decimal("0.00000001"))

    # -- the call --

    async def complete(
        self,
        ctx: CallContext,
        *,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        fallbacks: list[str] | None = None,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Completion:
        """One call with the tenant's keys, budgeted and recorded. With `on_text` the answer is streamed:
        each piece of text is handed to it as it arrives (tool calls are gathered, not handed on), and the
        Completion returned, the usage row and the cost are those of the whole stream, as without it."""
        if not _loaded():
            await asyncio.to_thread(load_litellm)  # never block the event loop on the import
        models = [model, *[m for m in (fallbacks if fallbacks is not None else self.settings.llm.fallbacks) if m != model]]
        keys, limit = await ledger.terms(self.db, self.settings, ctx.tenant_id)
        await self._check_endpoints(keys)
        reservation: uuid.UUID | None = None
        if limit is not None:
            models, reservation = await self._admit(ctx, limit, models, messages, tools)
        started = time.perf_counter()
        try:
            plan = deployments(self.settings, keys, models)
        except LLMError as exc:
            await self._record(ctx, models[0], "platform", None, Decimal(0), started, reservation, limit, error=str(exc))
            raise
        secrets = [d.api_key for d in plan if d.api_key and d.api_key != probe.LOCAL_SERVER_KEY]
        used = plan[0]
        try:
            extra: dict[str, Any] = {"tools": tools} if tools else {}
            if on_text is not None:
                extra.update(stream=True, stream_options={"include_usage": True})  # usage in the last chunk: the cost
            response, used = await self._call(plan, messages, extra)
            if on_text is not None:
                response = await self._gather(response, messages, on_text)
            result = self._completion(response, used.model, started)
        except Exception as exc:
            cause: Exception = exc
            if isinstance(exc, _Failed):
                cause, used = exc.cause, exc.deployment
            named = probe.describe_failure(
                cause, model=used.model, api_base=used.api_base, source=used.key_from, timeout=self.settings.llm.timeout
            )
            reason = _scrub(f"{type(cause).__name__}: {named}" if named else _first_line(cause), secrets)
            await self._record(ctx, used.model, used.source, None, Decimal(0), started, reservation, limit, error=reason)
            raise LLMError(reason) from None
        await self._record(ctx, result.model, used.source, result, self.cost(response), started, reservation, limit)
        return result

    async def _check_endpoints(self, keys: dict[str, TenantKey]) -> None:
        """A tenant's own API base must still be a public address when it is used, not only when it was added
        (a key stored before the check existed, a name that now resolves elsewhere). Re-resolved every 30 s."""
        now = time.monotonic()
        for key in keys.values():
            if key.api_base is None:
                continue
            checked = self._endpoints.get(key.api_base)
            if checked is None or now - checked[0] > ENDPOINT_RECHECK:
                try:
                    await check_api_base(self.settings, key.api_base)
                    checked = (now, None)
                except ValidationError as exc:
                    checked = (now, str(exc))
                self._endpoints[key.api_base] = checked
            if checked[1] is not None:
                raise LLMError(f"the tenant's {key.provider} key cannot be used: {checked[1]}")

    async def _admit(
        self, ctx: CallContext, limit: budget.Limit, models: list[str], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[str], uuid.UUID | None]:
        """Hold an estimate against the budget; wait while calls in flight may still leave room.
        Returns the models to use (downgraded at the limit) and the reservation."""
        if sum(len(str(m.get("content") or "")) for m in messages) + len(str(tools or "")) > INLINE_ESTIMATE:
            estimate = await asyncio.to_thread(self.estimate, models, messages, tools)  # a long prompt's count takes a while
        else:
            estimate = self.estimate(models, messages, tools)  # a short one takes less than the trip to a thread (~40 µs)
        llm = self.settings.llm
        hold = llm.timeout * (llm.retries + 1) * len(models) + 60
        deadline = time.monotonic() + llm.timeout
        pause = 0.05
        while True:
            admission = await ledger.ledger(self.db).admit(ledger.Request(ctx.tenant_id, limit, estimate, hold))  # audits the first refusal
            if admission.allowed:
                return models, admission.reservation
            if admission.first_time:
                await self._notify_exhausted(ctx.tenant_id, limit)
            if admission.over_limit or time.monotonic() > deadline:
                break
            await asyncio.sleep(pause)  # calls in flight hold the rest of the budget: see what they really cost
            pause = min(pause * 2, 1.0)
        # The wait ran out with the rest held by calls in flight: refused all the same.
        if not admission.over_limit and await ledger.ledger(self.db).refused(ctx.tenant_id, limit):
            await self._notify_exhausted(ctx.tenant_id, limit)
        if limit.action == "downgrade":
            cheaper = limit.downgrade_model or self.settings.budget.downgrade_model
            if cheaper:
                return [cheaper], None
        raise BudgetExhausted(f"the monthly budget of {usd(limit.monthly_usd)} is used up")

    @staticmethod
    async def _gather(stream: Any, messages: list[dict[str, Any]], on_text: Callable[[str], Awaitable[None]]) -> Any:
        """Read a stream to its end, handing each text delta on; the whole response, as a non-streamed call gives it.
        A receiver that fails is dropped (the answer still completes and is recorded); the stream's own failure raises."""
        chunks: list[Any] = []
        receiver: Callable[[str], Awaitable[None]] | None = on_text
        async for chunk in stream:
            chunks.append(chunk)
            delta = chunk.choices[0].delta if chunk.choices else None
            text = getattr(delta, "content", None) if delta is not None else None
            if text and receiver is not None:
                try:
                    await receiver(text)
                except Exception as exc:
                    log.warning("a streamed answer's receiver failed, the rest is not streamed: %s", _first_line(exc))
                    receiver = None
        if not chunks:
            raise LLMError("the model's stream ended before it began")
        return load_litellm().stream_chunk_builder(chunks, messages=messages)

    def _completion(self, response: Any, model: str, started: float) -> Completion:
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
            model=model,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            latency_ms=int((time.perf_counter() - started) * 1000),
            tool_calls=calls,
        )

    async def _record(
        self,
        ctx: CallContext,
        model: str,
        source: str,
        result: Completion | None,
        cost: Decimal,
        started: float,
        reservation: uuid.UUID | None,
        limit: budget.Limit | None,
        error: str | None = None,
    ) -> None:
        """The usage row, the month's spending, alerts crossed, and (for a failure) an audit event (konstruct.llm.ledger)."""
        entry = ledger.Entry(
            tenant_id=ctx.tenant_id, agent_id=ctx.agent_id, conversation_id=ctx.conversation_id, purpose=ctx.purpose, actor=ctx.actor,
            model=model, key_source=source, prompt_tokens=result.prompt_tokens if result else 0,
            completion_tokens=result.completion_tokens if result else 0, cost=cost,
            latency_ms=int((time.perf_counter() - started) * 1000), reservation=reservation, limit=limit, error=error,
        )  # fmt: skip
        try:
            crossed = await ledger.ledger(self.db).account(entry)
        except Exception as exc:  # the answer is worth more than its bookkeeping; say so loudly
            log.error("tenant %s: could not record an LLM call: %s", ctx.tenant_id, _first_line(exc))
            return
        if limit is not None:
            for percent in crossed:
                await self._send(
                    Notice(
                        ctx.tenant_id, "budget.alert", f"LLM budget: {percent}% used this month",
                        f"Your organisation has used {percent}% of its monthly LLM budget of {usd(limit.monthly_usd)}.\n"
                        + ("When it is used up, the agents stop answering until next month or until the budget is raised.\n"
                           if limit.action == "block" else "When it is used up, the agents switch to a cheaper model.\n"),
                    )
                )  # fmt: skip

    async def _notify_exhausted(self, tenant_id: uuid.UUID, limit: budget.Limit) -> None:
        what = (
            "The agents now tell people they are unavailable"
            if limit.action == "block"
            else "The agents now answer with the cheaper model " + (limit.downgrade_model or self.settings.budget.downgrade_model or "")
        )
        await self._send(
            Notice(
                tenant_id, "budget.exhausted", "LLM budget used up",
                f"Your organisation's monthly LLM budget of {usd(limit.monthly_usd)} is used up. {what} until next month, "
                "or until the budget is raised (`konstruct budget set`).\n",
            )
        )  # fmt: skip

    async def _send(self, notice: Notice) -> None:
        if self.notify is None:
            return
        try:
            await asyncio.to_thread(self.notify, notice)  # queueing is blocking I/O
        except Exception as exc:
            log.error("tenant %s: could not queue the %s notice: %s", notice.tenant_id, notice.kind, type(exc).__name__)


class _Failed(Exception):
    """Every deployment of a call failed; the first one's failure."""

    def __init__(self, cause: Exception, deployment: Deployment) -> None:
        super().__init__(str(cause))
        self.cause, self.deployment = cause, deployment


def _identity(d: Deployment) -> tuple[str, str, str | None]:
    return (d.model, hashlib.sha256((d.api_key or "").encode()).hexdigest()[:16], d.api_base)


def _retryable(exc: Exception) -> bool:
    """Whether another try may get an answer: a timeout, a dropped connection, a 408/409/429 or a 5xx;
    not a bad request, a refused key or a model that does not exist."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status in (408, 409, 429) or status >= 500
    return isinstance(exc, (TimeoutError, OSError)) or type(exc).__module__.split(".")[0] in ("litellm", "openai", "httpx", "aiohttp")


def _loaded() -> bool:
    from konstruct.llm import client

    return client._litellm is not None
