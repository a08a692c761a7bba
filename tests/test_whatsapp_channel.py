"""The WhatsApp channel's pure parts: formatting, splitting, digests, pacing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from konstruct.channels.text import split_message as split_text
from konstruct.channels.whatsapp.channel import Pacer, hex_digest, to_whatsapp
from konstruct.channels.whatsapp.graph import GraphError, signature_ok


def test_markdown_becomes_whatsapp_formatting() -> None:
    assert to_whatsapp("**Total:** ~~10~~ 8 EUR") == "*Total:* ~10~ 8 EUR"
    assert to_whatsapp("## Steps\n1. [Portal](https://example.com/x)") == "*Steps*\n1. Portal (https://example.com/x)"


def test_split_keeps_every_word_within_the_limit() -> None:
    text = "\n\n".join(" ".join(f"w{p}-{n}" for n in range(300)) for p in range(5))
    parts = split_text(text, limit=1000)
    assert all(len(p) <= 1000 for p in parts) and len(parts) > 5
    assert " ".join(parts).split() == text.split()
    assert split_text("x" * 2500, limit=1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # no spaces: hard cuts
    assert split_text("   ", limit=1000) == []


def test_media_digests_in_hex_or_base64() -> None:
    data = b"some image bytes"
    digest = hashlib.sha256(data).hexdigest()
    assert hex_digest(digest.upper()) == digest
    assert hex_digest(base64.b64encode(hashlib.sha256(data).digest()).decode()) == digest
    assert hex_digest("not a digest") is None and hex_digest(None) is None and hex_digest(base64.b64encode(b"short").decode()) is None


def test_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"object":"whatsapp_business_account"}'
    plain_hash = "sha256=" + hashlib.sha256(body).hexdigest()  # not keyed: worthless
    right = "sha256=" + hmac.new(b"secret", body, hashlib.sha256).hexdigest()
    assert signature_ok("secret", body, right)
    assert not signature_ok("secret", body + b" ", right)
    assert not signature_ok("other", body, right)
    assert not signature_ok("secret", body, plain_hash) and not signature_ok("secret", body, None) and not signature_ok("", body, right)


def test_retryable_graph_errors() -> None:
    assert GraphError(130429, "rate").retryable and GraphError(131056, "pair").retryable
    assert GraphError(0, "unreachable").retryable and GraphError(100, "x", http_status=503).retryable
    assert not GraphError(131026, "undeliverable", http_status=400).retryable and not GraphError(190, "token").retryable


@pytest.mark.alone  # it measures time: run with nothing beside it (the Makefile's second pass)
async def test_pacing_per_person_and_per_number() -> None:
    pacer = Pacer(rate=20.0, interval=0.2)
    start = time.monotonic()
    for _ in range(3):
        await pacer.wait("N1", "P1")
    assert time.monotonic() - start >= 0.4  # three to one person: two intervals
    start = time.monotonic()
    for n in range(6):
        await pacer.wait("N2", f"P{n}")
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 0.4  # six people from one number at 20/s: five gaps of 50 ms
