"""Basic utility evaluation: one classifier trained on real vs synthetic, tested on real test data."""

from __future__ import annotations

import json
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline

from dpsynth.data import Example, prepare
from dpsynth.errors import UserError
from dpsynth.io import atomic_write_json
from dpsynth.privacy.certificate import read_certificate
from dpsynth.sample import load_run_config


def tfidf_logreg(seed: int):
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, random_state=seed))


def score(train: list[Example], test: list[Example], seed: int = 0) -> dict[str, float]:
    """Accuracy and macro-F1 on `test` of a TF-IDF + logistic-regression classifier fit on `train`."""
    labels = {ex.label for ex in train}
    if not labels:
        raise UserError("evaluation: the classifier's training data is empty")
    truth = [ex.label for ex in test]
    if len(labels) == 1:
        # A DP label histogram can legitimately zero a rare label; the honest score is a constant classifier's.
        pred = [next(iter(labels))] * len(test)
    else:
        clf = tfidf_logreg(seed).fit([ex.text for ex in train], [ex.label for ex in train])
        pred = list(clf.predict([ex.text for ex in test]))
    return {"accuracy": float(accuracy_score(truth, pred)),
            "macro_f1": float(f1_score(truth, pred, average="macro", labels=sorted(set(truth))))}


def read_corpus(path: Path) -> list[Example]:
    import pandas as pd

    df = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path, keep_default_na=False)
    return [Example(str(t), str(lab)) for t, lab in zip(df["text"], df["label"])]


def find_corpus(run_dir: Path) -> Path:
    for fmt in ("jsonl", "csv"):
        if (run_dir / f"synthetic.{fmt}.certificate.json").is_file():
            return run_dir / f"synthetic.{fmt}"
    raise UserError(f"{run_dir}: no certified synthetic corpus (run `dpsynth sample {run_dir}` first)")


def evaluate(run_dir: Path) -> dict:
    """Compare real-trained and synthetic-trained classifiers on the real test split; write evaluation.json."""
    run_dir = Path(run_dir)
    cert = read_certificate(run_dir / "certificate.json")
    cfg = load_run_config(run_dir)
    splits = prepare(cfg.data)
    if splits.fingerprint != cert["dataset_fingerprint"]:
        raise UserError(f"data: the dataset changed since training (fingerprint {splits.fingerprint} != {cert['dataset_fingerprint']})")
    corpus = find_corpus(run_dir)
    synthetic = read_corpus(corpus)
    test = list(splits.test)
    seed = cfg.evaluation.seed
    result = {
        "classifier": cfg.evaluation.classifier, "test_examples": len(test), "corpus": corpus.name,
        "synthetic_examples": len(synthetic), "real_train_examples": len(splits.train),
        "real": score(list(splits.train), test, seed), "synthetic": score(synthetic, test, seed),
        "epsilon": cert["epsilon"], "delta": cert["delta"],
    }
    atomic_write_json(run_dir / "evaluation.json", result)
    return result
