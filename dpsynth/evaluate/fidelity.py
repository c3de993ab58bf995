"""Fidelity of a synthetic corpus to the real data: MAUVE, length and vocabulary statistics, label
fidelity, duplicates."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dpsynth.data import Example
from dpsynth.evaluate.attacks import words


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 0, texts: int = 100, draws: int = 5) -> dict:
    """MAUVE (Pillutla et al. 2021, "MAUVE: Measuring the Gap Between Neural Text and Human Text")
    between two feature sets, via the `mauve-text` package with precomputed MiniLM features (its own
    featurizer downloads GPT-2). Kurakin et al. 2023 use MAUVE as a proxy for synthetic data quality.

    The headline `mauve` is at a fixed size, so that corpora of different sizes compare: the mean over `draws` seeded
    subsamples of `texts` texts from each set, each quantized into texts/10 buckets (the package's heuristic). On all
    texts the buckets grow with the smaller set, and the score with them (one SMS adapter: 0.906 on 200 texts,
    0.604 on 500 from another). `all_texts` keeps that value; `comparable` is false when a set has fewer than `texts`."""
    import mauve

    def one(p: np.ndarray, q: np.ndarray, run_seed: int) -> tuple[float, int]:
        out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=max(2, round(min(len(p), len(q)) / 10)),
                                  kmeans_num_redo=3, kmeans_max_iter=300, seed=run_seed + 25, verbose=False)
        return float(out.mauve), int(out.num_buckets)

    p_all, q_all = np.asarray(p_features, np.float32), np.asarray(q_features, np.float32)
    n = min(len(p_all), len(q_all))
    if n < 4:
        return {"mauve": None, "note": f"too few texts ({n})"}
    size = min(n, texts)
    rng = np.random.default_rng(seed)
    scores = []
    for d in range(draws if max(len(p_all), len(q_all)) > size else 1):  # one draw when every text is in it
        p_sub = p_all[np.sort(rng.choice(len(p_all), size, replace=False))]
        q_sub = q_all[np.sort(rng.choice(len(q_all), size, replace=False))]
        score, buckets = one(p_sub, q_sub, seed + d)
        scores.append(score)
    everything, all_buckets = one(p_all, q_all, seed)
    return {"mauve": float(np.mean(scores)), "sd": float(np.std(scores)), "texts": size, "draws": len(scores),
            "buckets": buckets, "comparable": size == texts, "p": len(p_all), "q": len(q_all),
            "all_texts": {"mauve": everything, "buckets": all_buckets}}


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


# ------------------------------------------------------------------ out of genre: code or markup where the real data has none

GENRE_SIGNALS = {
    "symbols": r"[{}\[\]<>=|\\`~^]",
    "calls": r"\b[A-Za-z_]\w*\((?!\s)",
    "keywords": r"\b(?:def|return|import|class|function|var|const|elif|lambda|self|void|public|static|printf|println|"
                r"console|null|undefined|pass|except|isinstance|typeof)\b|#include|#define|\btry:|\w\.\w+\(|^\s*from [\w.]+ import\b",
    "comments": r"^\s*(?:#|//|/\*|\*|--)\s|\"\"\"|\'\'\'",
    "block_opens": r"\)\s*:\s*$|^\s*(?:if|for|while|else|with)\b[^\n]*:\s*$",
    "markup": r"</|/>|://|&[a-z]+;|&#\d+;|<[A-Za-z][\w-]*[\s>]",
    "operators": r"==|!=|<=|>=|\+=|-=|=>|->|::|&&|\|\|",
    "line_breaks": r"\n",
    "indentation": r"^(?:\t| {2,})\S",
    "statement_ends": r"[;{}]\s*$",
    "identifiers": r"\b[a-z][a-z0-9]*_[a-z0-9_]+\b|\b__?[a-z]\w*|\b[a-z]+[A-Z][A-Za-z0-9]*\b|\b[A-Z][a-z]+[A-Z][a-z]+[A-Za-z0-9]*\b",
}
"""What code and markup are made of: brackets and `=`, calls `f(x`, keywords, tags and URLs, operators, line breaks,
indented lines, `;`/`{` line ends, snake_case and camelCase identifiers. Each match counts once per pattern."""
_GENRE_RE = {name: re.compile(p, re.MULTILINE) for name, p in GENRE_SIGNALS.items()}


def genre_signals(text: str) -> dict[str, int]:
    return {name: len(rx.findall(text)) for name, rx in _GENRE_RE.items()}


def signal_rarity(reference: Sequence[str]) -> dict[str, float]:
    """Each signal's weight: how rare it is in the real texts, log((1 + n) / (1 + texts with it)) / log(1 + n), in
    [0, 1] (1: no real text has it). URLs in real tweets, or line breaks in real poems, weigh little."""
    n = len(reference)
    present = Counter(k for t in reference for k, c in genre_signals(t).items() if c)
    return {k: float(np.log((1 + n) / (1 + present[k])) / np.log(1 + n)) if n else 1.0 for k in GENRE_SIGNALS}


def markup_score(text: str, rarity: dict[str, float] | None = None) -> float:
    """Code/markup signals per 100 characters, each weighted by its rarity in the real texts (`signal_rarity`; all 1
    without); texts shorter than 20 characters count as 20."""
    sig = genre_signals(text)
    return 100.0 * sum(c * (rarity[k] if rarity else 1.0) for k, c in sig.items()) / max(len(text), 20)


def char_classes(text: str) -> dict[str, float]:
    """Shares of letters, digits, whitespace, punctuation, brackets and line breaks, and the length in characters."""
    n = max(len(text), 1)
    return {"letters": sum(c.isalpha() for c in text) / n, "digits": sum(c.isdigit() for c in text) / n,
            "whitespace": sum(c.isspace() for c in text) / n,
            "punctuation": sum(not (c.isalnum() or c.isspace()) for c in text) / n,
            "brackets": sum(c in "{}[]()<>" for c in text) / n, "line_breaks": text.count("\n") / n,
            "chars": float(len(text))}


def _means(rows: Sequence[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def out_of_genre(synthetic: Sequence[str], reference: Sequence[str], held_out: Sequence[str], *, quantile: float = 0.99,
                 min_score: float = 1.5, examples: int = 3) -> dict:
    """Share of synthetic texts that do not look like the real data: their code/markup score (`markup_score`, the
    signals weighted by their rarity in the real reference texts) is above the `quantile` of the reference texts'
    scores (and above `min_score`, so one stray `=` in a long text is not flagged). The same test on real texts held out from the reference is the
    floor (about 1 - quantile when the real data is homogeneous). The synthetic set is judged, never fitted on."""
    if not reference or not synthetic:
        return {"share": None, "note": "no texts"}
    rarity = signal_rarity(reference)
    ref = np.array([markup_score(t, rarity) for t in reference], float)
    threshold = max(float(np.quantile(ref, quantile)), min_score)
    syn = np.array([markup_score(t, rarity) for t in synthetic], float)
    held = np.array([markup_score(t, rarity) for t in held_out], float)
    flagged = syn > threshold
    worst: list[str] = []
    for i in np.argsort(-syn, kind="stable")[: int(flagged.sum())]:
        if len(worst) < examples and synthetic[i][:120] not in worst:
            worst.append(synthetic[i][:120])
    real_texts = list(reference) + list(held_out)
    return {"share": float(flagged.mean()), "real_share": float((held > threshold).mean()) if len(held) else None,
            "threshold": threshold, "quantile": quantile, "flagged": int(flagged.sum()), "synthetic_texts": len(syn),
            "reference_texts": len(ref), "held_out_texts": len(held),
            "score": "code/markup signals per 100 characters, weighted by their rarity in the real texts",
            "signal_rarity": rarity,
            "examples": worst,
            "signals": {"synthetic": _means([genre_signals(t) for t in synthetic]),
                        "real": _means([genre_signals(t) for t in real_texts])},
            "char_classes": {"synthetic": _means([char_classes(t) for t in synthetic]),
                             "real": _means([char_classes(t) for t in real_texts])}}
