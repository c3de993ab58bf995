"""Fidelity of a synthetic corpus to the real data: MAUVE, length and vocabulary statistics, label
fidelity, duplicates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from dpsynth.data import Example
from dpsynth.evaluate.attacks import words


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 0) -> dict:
    """MAUVE (Pillutla et al. 2021, "MAUVE: Measuring the Gap Between Neural Text and Human Text")
    between two feature sets, via the `mauve-text` package with precomputed MiniLM features (its own
    featurizer downloads GPT-2). Kurakin et al. 2023 use MAUVE as a proxy for synthetic data quality.
    Buckets: n/10 of the smaller set (the package's heuristic), at least 2."""
    import mauve

    n = min(len(p_features), len(q_features))
    if n < 4:
        return {"mauve": None, "note": f"too few texts ({n})"}
    out = mauve.compute_mauve(p_features=np.asarray(p_features, np.float32), q_features=np.asarray(q_features, np.float32),
                              num_buckets=max(2, round(n / 10)), kmeans_num_redo=3, kmeans_max_iter=300, seed=seed + 25,
                              verbose=False)
    return {"mauve": float(out.mauve), "p": len(p_features), "q": len(q_features), "buckets": int(out.num_buckets)}


def text_stats(texts: Sequence[str]) -> dict:
    """Length (words, characters) and vocabulary statistics; distinct-n is Li et al. 2016's diversity."""
    toks = [words(t) for t in texts]
    lens = np.array([len(w) for w in toks], float) if toks else np.zeros(1)
    chars = np.array([len(t) for t in texts], float) if texts else np.zeros(1)
    unigrams = Counter(w for ws in toks for w in ws)
    bigrams = Counter(tuple(ws[i : i + 2]) for ws in toks for i in range(len(ws) - 1))
    total = max(1, sum(unigrams.values()))
    return {
        "texts": len(texts), "words_mean": float(lens.mean()), "words_median": float(np.median(lens)), "words_std": float(lens.std()),
        "chars_mean": float(chars.mean()), "vocabulary": len(unigrams), "type_token_ratio": len(unigrams) / total,
        "distinct_1": len(unigrams) / total, "distinct_2": len(bigrams) / max(1, sum(bigrams.values())),
        "length_histogram": np.histogram(lens, bins=np.arange(0, 81, 4))[0].tolist(),
    }


def length_fidelity(synthetic: Sequence[str], real: Sequence[str], bins: int = 24) -> dict:
    """How the synthetic texts' lengths (words) compare with the real ones: the two-sample Kolmogorov-Smirnov
    distance (0 = the same distribution; with its p-value), means and 95th percentiles, and one histogram on shared
    bins (log-spaced when the texts are long) for the report's plot."""
    from scipy import stats

    a = np.array([len(words(t)) for t in synthetic], float)
    b = np.array([len(words(t)) for t in real], float)
    if not len(a) or not len(b):
        return {"ks": None, "note": "no texts"}
    ks = stats.ks_2samp(a, b)
    top = max(a.max(), b.max(), 1.0)
    edges = (np.unique(np.geomspace(1, top + 1, bins).round()) if top > 200 else np.linspace(0, top + 1, bins)).tolist()
    return {"ks": float(ks.statistic), "ks_p_value": float(ks.pvalue), "synthetic_words_mean": float(a.mean()),
            "real_words_mean": float(b.mean()), "synthetic_words_p95": float(np.percentile(a, 95)),
            "real_words_p95": float(np.percentile(b, 95)), "bins": edges,
            "synthetic_histogram": np.histogram(a, bins=edges)[0].tolist(),
            "real_histogram": np.histogram(b, bins=edges)[0].tolist()}


def vocabulary_overlap(synthetic: Sequence[str], real: Sequence[str]) -> dict:
    """Share of the synthetic corpus's vocabulary (types) and tokens also seen in the real texts."""
    real_vocab = {w for t in real for w in words(t)}
    syn = Counter(w for t in synthetic for w in words(t))
    if not syn:
        return {"type_overlap": 0.0, "token_overlap": 0.0, "jaccard": 0.0}
    inter = set(syn) & real_vocab
    return {"type_overlap": len(inter) / len(syn), "token_overlap": sum(syn[w] for w in inter) / sum(syn.values()),
            "jaccard": len(inter) / len(set(syn) | real_vocab)}


def duplicate_rate(texts: Sequence[str]) -> dict:
    """Fraction of texts that repeat an earlier text of the same corpus (exact, after whitespace trim)."""
    seen: set[str] = set()
    dup = 0
    for t in texts:
        key = " ".join(t.split())
        dup += key in seen
        seen.add(key)
    return {"duplicate_rate": dup / len(texts) if texts else 0.0, "unique": len(seen), "texts": len(texts)}


def label_fidelity(synthetic: Sequence[Example], predicted: Sequence[str]) -> dict:
    """Agreement between the synthetic labels and what a classifier trained on real data predicts for
    the synthetic texts: does the text carry the label it was generated for?"""
    agree = [p == ex.label for ex, p in zip(synthetic, predicted)]
    per_label: dict[str, list[bool]] = {}
    for ex, a in zip(synthetic, agree):
        per_label.setdefault(ex.label, []).append(a)
    return {"agreement": float(np.mean(agree)) if agree else 0.0,
            "per_label": {lab: float(np.mean(v)) for lab, v in sorted(per_label.items())}}
