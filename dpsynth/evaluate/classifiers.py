"""Downstream classifiers of the utility comparisons (Kurakin et al. 2023, Section 5):

- `tfidf_logreg`: TF-IDF uni+bigrams + logistic regression;
- `minilm_logreg`: frozen all-MiniLM-L6-v2 sentence embeddings + logistic regression;
- `transformer`: MiniLM with its top layers and a linear head fine-tuned (a small BERT-style classifier).

Each can also be trained with DP-SGD directly on the real data (baseline (c), see dp_sgd.py). For
`tfidf_logreg` the DP variant uses hashed n-gram features: a TF-IDF vocabulary and IDF weights fitted
on the private data would themselves leak it, hashing is data-independent.

A training set with a single label (a DP label histogram can zero a rare label) is scored as the
constant classifier that predicts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline

from dpsynth.data import Example
from dpsynth.errors import UserError
from dpsynth.evaluate.dp_sgd import DPTrainResult, dp_sgd_train
from dpsynth.evaluate.embed import Embedder, model_dir

NAMES = ("tfidf_logreg", "minilm_logreg", "transformer")


def tfidf_logreg(seed: int, C: float = 1.0, ngram_max: int = 2):
    return make_pipeline(TfidfVectorizer(ngram_range=(1, ngram_max), min_df=1, sublinear_tf=True),
                         LogisticRegression(C=C, max_iter=2000, random_state=seed))


def metrics(truth: list[str], pred: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels present in `truth`."""
    return {"accuracy": float(accuracy_score(truth, pred)),
            "macro_f1": float(f1_score(truth, pred, average="macro", labels=sorted(set(truth))))}


@dataclass
class Context:
    """What the classifiers share: the seed, a (cached) MiniLM embedder, transformer settings."""

    seed: int = 0
    embedder: Embedder | None = None
    transformer_epochs: float = 1.0
    transformer_layers: int = 2

    def embed(self, texts) -> np.ndarray:
        if self.embedder is None:
            self.embedder = Embedder()
        return self.embedder(texts)


def _labels(train: list[Example]) -> list[str]:
    labels = sorted({ex.label for ex in train})
    if not labels:
        raise UserError("evaluation: the classifier's training data is empty")
    return labels


def predict(name: str, train: list[Example], test_texts: list[str], ctx: Context | None = None) -> list[str]:
    """Fit classifier `name` on `train` (non-private) and predict `test_texts`."""
    ctx = ctx or Context()
    labels = _labels(train)
    if len(labels) == 1:
        return [labels[0]] * len(test_texts)
    texts, y = [ex.text for ex in train], [ex.label for ex in train]
    if name == "tfidf_logreg":
        return list(tfidf_logreg(ctx.seed).fit(texts, y).predict(test_texts))
    if name == "minilm_logreg":
        clf = LogisticRegression(C=10.0, max_iter=2000, random_state=ctx.seed).fit(ctx.embed(texts), y)
        return list(clf.predict(ctx.embed(test_texts)))
    if name == "transformer":
        model = TransformerClassifier(len(labels), ctx.transformer_layers, ctx.seed)
        model.fit(texts, [labels.index(lab) for lab in y], epochs=ctx.transformer_epochs)
        return [labels[i] for i in model.predict(test_texts)]
    raise UserError(f"evaluation.classifiers: unknown classifier '{name}' (choose from {', '.join(NAMES)})")


def score(train: list[Example], test: list[Example], seed: int = 0, classifier: str = "tfidf_logreg",
          ctx: Context | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 on `test` of classifier `classifier` fit on `train`."""
    ctx = ctx or Context(seed=seed)
    return metrics([ex.label for ex in test], predict(classifier, train, [ex.text for ex in test], ctx))


# --- DP-SGD trained on the real data: baseline (c) -------------------------------------------------

def _hashed(texts) -> "np.ndarray":
    vec = HashingVectorizer(ngram_range=(1, 2), n_features=2**14, alternate_sign=False, norm="l2", binary=True)
    return vec.transform(texts).astype(np.float32).tocsr()


def _linear_predict(module: torch.nn.Module, X, batch: int = 1024) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, X.shape[0], batch):
            rows = X[i : i + batch]
            rows = rows.toarray() if hasattr(rows, "toarray") else rows
            out.append(module(torch.as_tensor(np.asarray(rows), dtype=torch.float32)).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def dp_predict(name: str, train: list[Example], test_texts: list[str], *, target_epsilon: float, delta: float,
               accountant: str, ctx: Context | None = None, epochs: float = 5.0, batch_size: int = 256,
               max_grad_norm: float = 1.0) -> tuple[list[str], DPTrainResult]:
    """Fit classifier `name` on the real `train` with DP-SGD at (target_epsilon, delta); predict `test_texts`.

    The label set is treated as public (as for the generator); the training texts are protected.
    """
    ctx = ctx or Context()
    labels = _labels(train)
    y = torch.tensor([labels.index(ex.label) for ex in train])
    texts = [ex.text for ex in train]
    torch.manual_seed(ctx.seed)
    kw = dict(target_epsilon=target_epsilon, delta=delta, accountant=accountant, epochs=epochs, batch_size=batch_size,
              max_grad_norm=max_grad_norm)
    if name in ("tfidf_logreg", "minilm_logreg"):
        if name == "tfidf_logreg":
            X, Xt = _hashed(texts), _hashed(test_texts)
            get = lambda idx: (torch.from_numpy(X[idx].toarray()),)  # noqa: E731
        else:
            X, Xt = ctx.embed(texts), ctx.embed(test_texts)
            get = lambda idx: (torch.from_numpy(X[idx]),)  # noqa: E731
        module = torch.nn.Linear(X.shape[1], len(labels))
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)
        info = dp_sgd_train(module, len(texts), get, y, learning_rate=0.05, **kw)
        return [labels[i] for i in _linear_predict(module, Xt)], info
    if name == "transformer":
        model = TransformerClassifier(len(labels), ctx.transformer_layers, ctx.seed)
        ids = model.tokenize(texts)
        info = dp_sgd_train(model, len(texts), lambda idx: model.batch(ids, idx), y, learning_rate=1e-3, **kw)
        return [labels[i] for i in model.predict(test_texts)], info
    raise UserError(f"evaluation.classifiers: unknown classifier '{name}' (choose from {', '.join(NAMES)})")


# --- a small fine-tuned transformer ----------------------------------------------------------------

class TransformerClassifier(torch.nn.Module):
    """all-MiniLM-L6-v2 (public weights) with its top `layers` blocks and a linear head trainable.

    Mean-pooled over the attention mask. Lower blocks and embeddings stay frozen (cheap on CPU, and
    the frozen part needs no per-example gradients under DP).
    """

    max_length = 64

    def __init__(self, num_labels: int, layers: int = 2, seed: int = 0):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        torch.manual_seed(seed)
        where = str(model_dir())
        self.tok = AutoTokenizer.from_pretrained(where)
        self.encoder = AutoModel.from_pretrained(where, dtype=torch.float32, attn_implementation="eager")
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_labels)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        for block in self.encoder.encoder.layer[-layers:]:
            for p in block.parameters():
                p.requires_grad_(True)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tok(list(texts), truncation=True, max_length=self.max_length).input_ids

    @staticmethod
    def batch(ids: list[list[int]], idx) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [ids[i] for i in idx]
        width = max(len(r) for r in rows)
        x = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return x, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))

    def fit(self, texts: list[str], y: list[int], epochs: float = 1.0, batch_size: int = 32, lr: float = 2e-4) -> None:
        ids, target = self.tokenize(texts), torch.tensor(y)
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        rng = np.random.default_rng(0)
        steps = max(1, math.ceil(epochs * len(ids) / batch_size))
        order = np.concatenate([rng.permutation(len(ids)) for _ in range(math.ceil(epochs) + 1)])
        self.train()
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(self(*self.batch(ids, idx)), target[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.eval()

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 128) -> list[int]:
        self.eval()
        ids = self.tokenize(texts)
        out: list[int] = []
        for i in range(0, len(ids), batch_size):
            out.extend(self(*self.batch(ids, range(i, min(i + batch_size, len(ids))))).argmax(1).tolist())
        return out
