"""The LLM service under many calls at once: nothing below worker.concurrency caps the calls in flight."""

from __future__ import annotations

from konstruct.config import WorkerSettings
from konstruct.llm.client import load_litellm


def test_litellms_connection_caps_are_above_the_highest_worker_concurrency() -> None:
    """litellm's HTTP client held 500 connections per provider host (read once, at its import), so a worker at
    concurrency 1,000 had only 500 calls in flight: bench/worker_throughput.py with a 20 s fake LLM peaked at exactly
    500, and at 1,000 with the caps raised. (A behaviour test needs 1,000 slow calls started faster than the first
    returns: ~10 s of CPU here, so the caps are checked where litellm reads them.)"""
    load_litellm()
    from litellm import constants

    highest = WorkerSettings.model_fields["concurrency"].metadata
    ceiling = max(getattr(m, "le", 0) or 0 for m in highest)
    assert ceiling == 1000
    assert ceiling <= constants.AIOHTTP_CONNECTOR_LIMIT_PER_HOST
    assert ceiling <= constants.AIOHTTP_CONNECTOR_LIMIT
