"""Label sharpening: over-generate, then keep the texts the DP adapter itself reads as their own label.

Free: it reads only the certified adapter and the texts it generated (post-processing of the DP release), never
the private data, so it spends no privacy.

Each candidate text t generated under label y is scored under every label's prefix with the adapter, as a
generative classifier: log p(t | prefix(l)), contextually calibrated (Zhao et al. 2021: each label's mean score
over all candidates is subtracted, so a prefix that makes every text likelier does not win by itself), plus
log pi(l), pi being the label proportions the corpus is drawn with (the DP histogram by default). The margin of t
is its own label's score minus the best other label's. Per label, the candidates with the largest margins are
kept: exactly `counts[y]` of `ceil(counts[y] / keep_rate)` generated. A positive margin means the adapter agrees
with the label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def candidates_needed(count: int, keep_rate: float) -> int:
    """How many candidates to generate for `count` kept texts."""
    return count if keep_rate >= 1.0 else math.ceil(count / keep_rate)


def label_scores(model, tok, texts: Sequence[str], prompts: dict[str, str], max_length: int,
                 batch_size: int = 32) -> np.ndarray:
    """(texts x labels) log-likelihood of each text (its tokens and EOS) after each label's prefix."""
    from dpsynth.prefixlm import score_texts

    model.eval()
    cols = [[-float(x.sum()) for x in score_texts(model, tok, [(prompts[lab], t) for t in texts], max_length, batch_size)]
            for lab in prompts]
    return np.array(cols, dtype=np.float64).T.reshape(len(texts), len(prompts))


def margins(scores: np.ndarray, own: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """Own label's calibrated log posterior minus the best other label's (up to a shared constant)."""
    post = scores - scores.mean(axis=0, keepdims=True) + log_prior[None, :]
    mine = post[np.arange(len(own)), own]
    others = post.copy()
    others[np.arange(len(own)), own] = -np.inf
    return mine - others.max(axis=1)


def select(rows: list[dict], counts: dict[str, int], scores: np.ndarray, labels: Sequence[str],
           proportions: dict[str, float]) -> tuple[list[dict], dict]:
    """Keep counts[label] rows per label, largest margin first; exact duplicates of a kept text are skipped."""
    index = {lab: i for i, lab in enumerate(labels)}
    own = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    total = sum(proportions.get(lab, 0.0) for lab in labels) or 1.0
    # a label with zero weight gets a tiny prior, not -inf: its texts can still be compared with it
    log_prior = np.log(np.array([max(proportions.get(lab, 0.0) / total, 1e-6) for lab in labels]))
    m = margins(scores, own, log_prior)
    kept: list[dict] = []
    per_label: dict[str, dict] = {}
    for lab, want in counts.items():
        mine = sorted((i for i in range(len(rows)) if rows[i]["label"] == lab), key=lambda i: -m[i])
        seen: set[str] = set()
        chosen = []
        for i in mine:
            key = " ".join(rows[i]["text"].split())
            if key in seen:
                continue
            seen.add(key)
            chosen.append(i)
            if len(chosen) == want:
                break
        if len(chosen) < want:  # fewer distinct texts than asked: fill with the best duplicates rather than come short
            chosen += [i for i in mine if i not in set(chosen)][: want - len(chosen)]
        kept += [rows[i] for i in chosen]
        agree = [m[i] > 0 for i in mine]
        per_label[lab] = {"candidates": len(mine), "kept": len(chosen),
                          "adapter_agrees": float(np.mean(agree)) if agree else None,
                          "kept_margin_min": float(min(m[i] for i in chosen)) if chosen else None}
    stats = {"candidates": len(rows), "kept": len(kept), "keep_rate": len(kept) / len(rows) if rows else None,
             "adapter_agrees": float(np.mean(m > 0)) if len(rows) else None, "per_label": per_label}
    return kept, stats


def sharpen(model, tok, rows: list[dict], counts: dict[str, int], prompts: dict[str, str], proportions: dict[str, float],
            max_length: int) -> tuple[list[dict], dict]:
    """Score every candidate under every label with the adapter and keep the best counts[label] per label."""
    labels = list(prompts)
    scores = label_scores(model, tok, [r["text"] for r in rows], prompts, max_length)
    return select(rows, counts, scores, labels, proportions)
