"""GET /metrics in Prometheus' text format (prometheus-client renders it), behind a bearer token.

The figures are read from the database at scrape time, so every gateway answers for the whole
installation (workers included) and nothing is lost when a process restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from konstruct.config import Settings
from konstruct.web.sessions import same


class Snapshot:
    """One scrape's figures, handed to prometheus-client as a collector."""

    def __init__(self, rows: list[tuple[str, str, float]], queue_depth: int | None) -> None:
        self.rows, self.queue_depth = rows, queue_depth

    def _values(self, name: str) -> list[tuple[str, float]]:
        return [(label, value) for n, label, value in self.rows if n == name]

    def collect(self) -> Iterator[Metric]:
        messages_in = CounterMetricFamily("konstruct_messages_in", "Messages received, by channel", labels=["channel"])
        for channel, value in self._values("messages_in"):
            messages_in.add_metric([channel], value)
        yield messages_in
        messages_out = CounterMetricFamily("konstruct_messages_out", "Replies sent, by delivery status", labels=["status"])
        for status, value in self._values("messages_out"):
            messages_out.add_metric([status], value)
        yield messages_out
        buckets = sorted(((int(label), value) for label, value in self._values("reply_latency_bucket")), key=lambda b: b[0])
        count = dict(self._values("reply_latency_count")).get("", 0.0)
        total = dict(self._values("reply_latency_sum")).get("", 0.0)
        latency = HistogramMetricFamily("konstruct_reply_latency_seconds", "Time the model took for a reply")
        latency.add_metric([], [(f"{ms / 1000:g}", value) for ms, value in buckets] + [("+Inf", count)], total)
        yield latency
        if self.queue_depth is not None:
            yield GaugeMetricFamily("konstruct_queue_depth", "Tasks waiting in the queue", value=self.queue_depth)
        calls = CounterMetricFamily("konstruct_llm_calls", "LLM calls, by outcome", labels=["outcome"])
        for outcome, value in self._values("llm_calls"):
            calls.add_metric([outcome], value)
        yield calls
        yield CounterMetricFamily("konstruct_llm_errors", "LLM calls that failed", value=dict(self._values("llm_calls")).get("error", 0.0))
        yield CounterMetricFamily("konstruct_llm_cost_usd", "LLM cost in US dollars", value=dict(self._values("llm_cost_usd")).get("", 0.0))
        tenants = GaugeMetricFamily("konstruct_tenants", "Tenants, by status", labels=["status"])
        for status, value in self._values("tenants"):
            tenants.add_metric([status], value)
        yield tenants
        yield GaugeMetricFamily(
            "konstruct_workers_alive", "Workers seen in the last minute", value=dict(self._values("workers_alive")).get("", 0.0)
        )
        yield from self._handoffs()

    def _handoffs(self) -> Iterator[Metric]:
        """Escalations to humans by outcome (open ones: "open"), and the time humans took to take and to answer them."""
        handoffs = CounterMetricFamily("konstruct_handoffs", "Escalations to humans, by outcome", labels=["outcome"])
        for outcome, value in self._values("handoffs"):
            handoffs.add_metric([outcome], value)
        yield handoffs
        for what, help_ in (
            ("take", "Seconds from an escalation to a human taking it"),
            ("answer", "Seconds from an escalation to the first human answer"),
        ):
            figures = dict(self._values(f"handoff_{what}_seconds_sum")), dict(self._values(f"handoff_{what}_seconds_count"))
            summary = SummaryMetricFamily(f"konstruct_handoff_{what}_seconds", help_)
            summary.add_metric([], int(figures[1].get("", 0.0)), figures[0].get("", 0.0))
            yield summary


async def metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    token = settings.web.metrics_token.get_secret_value() if settings.web.metrics_token else ""
    if not token:
        return PlainTextResponse("metrics are off: set [web] metrics_token\n", status_code=404)
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not same(given, token):
        return PlainTextResponse("a valid bearer token is needed\n", status_code=401, headers={"WWW-Authenticate": "Bearer"})
    async with request.app.state.db.system() as session:
        rows: list[Any] = list(await session.execute(text("select name, label, value from konstruct_metrics()")))
        rows += list(await session.execute(text("select name, label, value from konstruct_handoff_metrics()")))
    try:
        depth: int | None = await asyncio.wait_for(asyncio.to_thread(request.app.state.queue.pending), timeout=5)
    except Exception:
        depth = None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot([(r.name, r.label or "", float(r.value)) for r in rows], depth))  # type: ignore[arg-type]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
