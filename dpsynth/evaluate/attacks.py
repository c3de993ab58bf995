"""Privacy attacks: membership inference on the generator and on the released corpus, canary
exposure, verbatim memorisation, and an empirical epsilon lower bound from attack results.

Scores follow one convention: higher = "more likely a member".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from dpsynth.prefixlm import score_texts

# --- attack evaluation -----------------------------------------------------------------------------

def roc_summary(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr_at: float = 0.01) -> dict:
    """AUC and TPR at a fixed low FPR (Carlini et al. 2022, "Membership Inference Attacks From First
    Principles": report TPR at low FPR, not just AUC). Also a thinned ROC curve for plotting."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, _ = roc_curve(y, s)
    tpr_at = float(np.max(tpr[fpr <= fpr_at])) if np.any(fpr <= fpr_at) else 0.0
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
    return {"auc": float(roc_auc_score(y, s)), f"tpr_at_{fpr_at:g}_fpr": tpr_at, "members": len(m), "nonmembers": len(n),
            "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}}


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial confidence interval for k successes in n trials."""
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(member_scores: Sequence[float], nonmember_scores: Sequence[float], delta: float,
                        confidence: float = 0.95, seed: int = 0) -> dict:
    """Empirical epsilon lower bound from a membership attack's error rates.

    Any (eps, delta)-DP mechanism constrains every test between "member" and "non-member" to
    FPR + e^eps * FNR >= 1 - delta and FNR + e^eps * FPR >= 1 - delta (Kairouz, Oh & Viswanath 2015,
    the hypothesis-testing view of DP). Inverting with one-sided Clopper-Pearson upper bounds on FPR
    and FNR gives eps >= max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi))
    with the stated confidence (Jagielski, Ullman & Oprea 2020, "Auditing Differentially Private
    Machine Learning: How Private is Private SGD?"; Nasr et al. 2021).

    The threshold is chosen on a random half of the scores and the bound evaluated on the other
    half, so the choice does not inflate it. Members/non-members come from one training run with a
    random split, the one-run setting of Steinke, Nasr & Jagielski 2023: a heuristic audit, which is
    loose for natural data; canaries make it sharper.
    """
    rng = np.random.default_rng(seed)
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    m, n = m[rng.permutation(len(m))], n[rng.permutation(len(n))]
    (m_sel, m_ev), (n_sel, n_ev) = np.array_split(m, 2), np.array_split(n, 2)
    alpha = 1.0 - confidence

    def bound(ms: np.ndarray, ns: np.ndarray, t: float) -> float:
        fp, fn = int((ns >= t).sum()), int((ms < t).sum())
        fpr_hi = clopper_pearson(fp, len(ns), 2 * alpha)[1]  # one-sided (1 - alpha) upper bounds
        fnr_hi = clopper_pearson(fn, len(ms), 2 * alpha)[1]
        cands = [0.0]
        if fpr_hi > 0 and 1 - delta - fnr_hi > 0:
            cands.append(math.log((1 - delta - fnr_hi) / fpr_hi))
        if fnr_hi > 0 and 1 - delta - fpr_hi > 0:
            cands.append(math.log((1 - delta - fpr_hi) / fnr_hi))
        return max(cands)

    if min(len(m_sel), len(n_sel), len(m_ev), len(n_ev)) == 0:
        return {"epsilon_lower_bound": 0.0, "threshold": None, "confidence": confidence}
    values = np.unique(np.r_[m_sel, n_sel])
    thresholds = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values  # midpoints: no tie at the cut
    best = max(thresholds, key=lambda t: bound(m_sel, n_sel, t))
    return {"epsilon_lower_bound": float(bound(m_ev, n_ev, best)), "threshold": float(best), "confidence": confidence,
            "evaluated_on": {"members": len(m_ev), "nonmembers": len(n_ev)}}


def attack_report(member_scores, nonmember_scores, delta: float, seed: int = 0) -> dict:
    return {**roc_summary(member_scores, nonmember_scores), **epsilon_lower_bound(member_scores, nonmember_scores, delta, seed=seed)}


# --- scoring a causal LM ---------------------------------------------------------------------------

def token_nll(model, tok, items: Sequence[tuple[str, str]], max_length: int = 64, batch_size: int = 32) -> list[np.ndarray]:
    """Per-token NLL of each `text` given its `prefix`, for the text tokens followed by EOS (the Prefix-LM scorer
    training uses: prefix and text tokenized separately, the text truncated to fit `max_length`, never the prefix)."""
    model.eval()
    return score_texts(model, tok, items, max_length, batch_size)


def loss_attack_scores(model, tok, items: Sequence[tuple[str, str]], reference=None, max_length: int = 64) -> dict:
    """Loss-threshold membership inference (Yeom et al. 2018, "Privacy Risk in Machine Learning"):
    score = -mean token loss. With a `reference` callable (a context manager that switches the model
    to the public base model), also the difficulty-calibrated score loss_ref - loss (Carlini et al. 2021,
    "Extracting Training Data from Large Language Models", the reference-model comparison; Watson et al. 2022)."""
    loss = np.array([x.mean() for x in token_nll(model, tok, items, max_length)])
    res = {"loss": -loss}
    if reference is not None:
        with reference():
            ref = np.array([x.mean() for x in token_nll(model, tok, items, max_length)])
        res["reference_calibrated"] = ref - loss
    return res


# --- canaries (Carlini et al. 2019, "The Secret Sharer") -------------------------------------------

def exposure(canary_log_perplexity: float, candidate_log_perplexities: Sequence[float], space_size: float) -> dict:
    """Exposure of a canary (Carlini, Liu, Erlingsson, Kos & Song 2019, "The Secret Sharer", Sec. 4):
    exposure = log2 |R| - log2 rank, rank = position of the canary among all |R| candidate secrets
    ordered by log-perplexity under the model. Estimated from random candidates two ways:
    - `sampled`: rank/|R| ~ fraction of candidates at or below the canary's log-perplexity
      (Sec. 4.3, "sampling"), so exposure <= log2(candidates + 1);
    - `extrapolated`: the same fraction from a skew-normal fit to the candidates' log-perplexities
      (Sec. 4.3, "approximation by distribution modeling"), which reaches beyond the sample size.
    Both are capped at log2 |R|.
    """
    cand = np.asarray(candidate_log_perplexities, float)
    cap = math.log2(space_size)
    k = int((cand <= canary_log_perplexity).sum())
    sampled = -math.log2((k + 1) / (len(cand) + 1))
    a, loc, scale = stats.skewnorm.fit(cand)
    cdf = float(stats.skewnorm.cdf(canary_log_perplexity, a, loc, scale))
    extrapolated = cap if cdf <= 2.0**-cap else -math.log2(cdf)
    return {"sampled": min(sampled, cap), "extrapolated": min(max(extrapolated, 0.0), cap), "max_sampled": math.log2(len(cand) + 1),
            "max": cap}


# --- attacks on the released corpus only -----------------------------------------------------------

def nearest_neighbour_scores(query_emb: np.ndarray, corpus_emb: np.ndarray) -> np.ndarray:
    """Distance-to-closest-record attack on the synthetic corpus (as in the synthetic-data literature,
    e.g. Yale et al. 2019; Stadler, Oprisanu & Troncoso 2022): score = -(cosine distance from a
    candidate record to its nearest synthetic record). Embeddings must be L2-normalised."""
    if len(corpus_emb) == 0 or len(query_emb) == 0:
        return np.zeros(len(query_emb))
    sims = []
    for i in range(0, len(query_emb), 1024):
        sims.append((query_emb[i : i + 1024] @ corpus_emb.T).max(1))
    return -(1.0 - np.concatenate(sims))


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


class WordSuffixAutomaton:
    """Suffix automaton (Blumer et al. 1985) of a word corpus: built in time and memory linear in its total words;
    then the longest contiguous run of a text's words that occurs in the corpus takes time linear in the text.

    Texts are joined with a separator no query can contain, so no match crosses two corpus texts.
    """

    _SEP = -1

    def __init__(self, texts: Sequence[Sequence[str]]) -> None:
        self.vocab: dict[str, int] = {}
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length = [-1], [0]
        last = 0
        for ws in texts:
            for w in ws:
                last = self._extend(last, self.vocab.setdefault(w, len(self.vocab)))
            last = self._extend(last, self._SEP)

    def _extend(self, last: int, c: int) -> int:
        nxt, link, length = self.next, self.link, self.length
        cur = len(length)
        nxt.append({})
        length.append(length[last] + 1)
        link.append(0)
        p = last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        return cur

    def longest_match(self, ws: Sequence[str]) -> int:
        """Length of the longest contiguous run of `ws` that occurs in the corpus."""
        nxt, link, length = self.next, self.link, self.length
        state = run = best = 0
        for w in ws:
            c = self.vocab.get(w)
            if c is None:
                state = run = 0
                continue
            while state and c not in nxt[state]:
                state = link[state]
                run = length[state]
            if c in nxt[state]:
                state, run = nxt[state][c], run + 1
            else:
                state = run = 0
            best = max(best, run)
        return best


def longest_common_substring_words(texts: Sequence[str], reference: Sequence[str] | WordSuffixAutomaton,
                                   max_n: int | None = None, show_progress: bool = False) -> list[int]:
    """For each text, the length (in words) of its longest contiguous word sequence that also occurs contiguously
    in some reference text (verbatim memorisation; Carlini et al. 2021, 2023 measure extraction as verbatim copies
    of training text). Linear in the total words of both sides (a suffix automaton of the reference), however long
    the shared runs are: near-duplicate long documents cost no more than short snippets."""
    from dpsynth.progress import progress_bar

    automaton = reference if isinstance(reference, WordSuffixAutomaton) else WordSuffixAutomaton([words(t) for t in reference])
    out = []
    with progress_bar("verbatim overlap", total=len(texts), enabled=show_progress) as advance:
        for t in texts:
            n = automaton.longest_match(words(t))
            out.append(n if max_n is None else min(n, max_n))
            advance()
    return out


def memorisation(texts: Sequence[str], training: Sequence[str], n: int = 8, show_progress: bool = False,
                 automaton: WordSuffixAutomaton | None = None) -> dict:
    """Verbatim overlap of `texts` with `training`: longest common word substring and shared n-grams.
    `automaton`: the training texts' suffix automaton, when the caller already built it."""
    automaton = automaton or WordSuffixAutomaton([words(t) for t in training])
    lcs = np.array(longest_common_substring_words(texts, automaton, show_progress=show_progress), dtype=float)
    train_grams: set = set()
    for t in training:
        train_grams |= ngrams(words(t), n)
    shared = [ngrams(words(t), n) & train_grams for t in texts]
    train_set = set(training)
    return {
        "texts": len(texts), f"shared_{n}gram_rate": float(np.mean([bool(s) for s in shared])) if texts else 0.0,
        f"shared_{n}grams": int(sum(len(s) for s in shared)),
        "lcs_words_mean": float(lcs.mean()) if len(lcs) else 0.0, "lcs_words_p95": float(np.percentile(lcs, 95)) if len(lcs) else 0.0,
        "lcs_words_max": int(lcs.max()) if len(lcs) else 0,
        "exact_copies": int(sum(t in train_set for t in texts)),
    }
