"""Utility: downstream classifiers trained on (a) real, (b) DP synthetic, (c) real with DP-SGD at the
same epsilon, (d) zero-shot synthetic data, all tested on the same real test split (Kurakin et al.
2023, Tables 2-4); and hyperparameter tuning on synthetic data (their Section 5.3)."""

from __future__ import annotations

import logging

import numpy as np
from scipy import stats

from dpsynth.data import Example
from dpsynth.evaluate.classifiers import Context, dp_predict, metrics, predict, tfidf_logreg

log = logging.getLogger(__name__)

SOURCES = {"real": "(a) real data (upper bound)", "synthetic": "(b) DP synthetic corpus",
           "dp_real": "(c) real data, DP-SGD at the same epsilon", "zero_shot": "(d) zero-shot synthetic (floor)"}


def subset(examples: list[Example], k: int | None, seed: int) -> list[Example]:
    if k is None or len(examples) <= k:
        return list(examples)
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), k, replace=False))
    return [examples[i] for i in idx]


def utility_table(classifiers, test: list[Example], real: list[Example], synthetic: list[Example],
                  zero_shot: list[Example] | None, ctx: Context, *, dp: dict | None = None,
                  max_real_examples: int | None = None) -> dict:
    """{classifier: {source: {accuracy, macro_f1, train_examples, ...}}}.

    `dp` = {epsilon, delta, accountant, epochs, batch_size} enables (c). The MiniLM and transformer
    classifiers train on a seeded subset of `max_real_examples` real examples (embedding cost); (a)
    and (c) use the same subset so they stay comparable.
    """
    truth, texts = [ex.label for ex in test], [ex.text for ex in test]
    table: dict = {}
    for name in classifiers:
        train_real = real if name == "tfidf_logreg" else subset(real, max_real_examples, ctx.seed)
        row: dict = {}
        sources = [("real", train_real), ("synthetic", synthetic)] + ([("zero_shot", zero_shot)] if zero_shot else [])
        for src, train in sources:
            log.info("utility: %s trained on %s (%d examples)", name, src, len(train))
            row[src] = {**metrics(truth, predict(name, train, texts, ctx)), "train_examples": len(train)}
        if dp is not None:
            log.info("utility: %s trained with DP-SGD on real (%d examples, eps=%.3g)", name, len(train_real), dp["epsilon"])
            pred, info = dp_predict(name, train_real, texts, target_epsilon=dp["epsilon"], delta=dp["delta"],
                                    accountant=dp["accountant"], ctx=ctx, epochs=dp.get("epochs", 5.0),
                                    batch_size=dp.get("batch_size", 256))
            row["dp_real"] = {**metrics(truth, pred), "train_examples": len(train_real), "dp": info.certificate(),
                              **({"features": "hashed n-grams (a TF-IDF vocabulary would leak)"} if name == "tfidf_logreg" else {})}
        table[name] = row
    return table


GRID = [{"C": c, "ngram_max": g} for c in (0.03, 0.3, 3.0, 30.0) for g in (1, 2)]


def tuning_rank_correlation(real_train: list[Example], real_val: list[Example], synthetic: list[Example],
                            test: list[Example], seed: int = 0, grid=GRID) -> dict:
    """Rank hyperparameter configurations of the TF-IDF classifier twice: trained on real train and
    scored on the real validation split, and trained/scored on an 80/20 split of the synthetic corpus.
    Spearman's rho between the two rankings says whether synthetic data can stand in for real data
    when tuning (Kurakin et al. 2023, Sec. 5.3). Also the real test accuracy of each side's pick."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(synthetic))
    cut = max(1, int(0.8 * len(synthetic)))
    syn_train = [synthetic[i] for i in order[:cut]]
    syn_val = [synthetic[i] for i in order[cut:]] or syn_train
    if len({ex.label for ex in syn_train}) < 2 or len({ex.label for ex in real_train}) < 2:
        return {"spearman_rho": None, "note": "a training set has a single label"}

    def acc(train, val, h):
        clf = tfidf_logreg(seed, **h).fit([e.text for e in train], [e.label for e in train])
        return float(np.mean(clf.predict([e.text for e in val]) == np.array([e.label for e in val])))

    real_scores = [acc(real_train, real_val, h) for h in grid]
    syn_scores = [acc(syn_train, syn_val, h) for h in grid]
    constant = len(set(real_scores)) < 2 or len(set(syn_scores)) < 2  # a ranking of ties: rho undefined
    rho = np.nan if constant else stats.spearmanr(real_scores, syn_scores).statistic
    pick_real, pick_syn = grid[int(np.argmax(real_scores))], grid[int(np.argmax(syn_scores))]
    return {
        "spearman_rho": None if np.isnan(rho) else float(rho), "grid": grid, "real_validation_accuracy": real_scores,
        "synthetic_validation_accuracy": syn_scores, "picked_on_real": pick_real, "picked_on_synthetic": pick_syn,
        "test_accuracy_of_real_pick": acc(real_train, test, pick_real),
        "test_accuracy_of_synthetic_pick": acc(real_train, test, pick_syn),
    }


def majority_class(test: list[Example]) -> dict:
    """The constant classifier that predicts the test split's most common label: the chance line."""
    from collections import Counter

    label, count = Counter(ex.label for ex in test).most_common(1)[0]
    return {"label": label, "accuracy": count / len(test), "test_examples": len(test)}


def _standard_error(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)))


def verdict(synthetic: float, test_examples: int, majority: float, zero_shot: float | None = None,
            dp_direct: float | None = None, z: float = 2.0) -> dict:
    """One honest line about the synthetic corpus's utility, against its baselines on the same test split.

    "Within noise" is |a - b| <= z standard errors of a binomial proportion over the test split (z = 2: about
    95 %), with the standard error of the difference of two accuracies on the same test set bounded by
    sqrt(2) times one accuracy's.
    """
    se = _standard_error(majority, test_examples)
    se_diff = np.sqrt(2) * max(se, _standard_error(synthetic, test_examples))
    floor = max(majority, zero_shot if zero_shot is not None else 0.0)
    floor_name = "the zero-shot floor" if zero_shot is not None and zero_shot > majority else "the majority-class rate"
    if synthetic <= majority + z * se or synthetic <= floor + z * se_diff:
        return {"level": "no_signal", "text": (f"no label signal at this budget: synthetic {synthetic:.3f} is within "
                                               f"noise of {floor_name} {floor:.3f}")}
    if dp_direct is None:
        return {"level": "signal", "text": f"label signal: synthetic {synthetic:.3f} is above {floor_name} {floor:.3f} "
                                           "(no DP-direct baseline computed)"}
    if synthetic < dp_direct - z * se_diff:
        return {"level": "below_dp_direct", "text": (f"label signal, below DP-direct: synthetic {synthetic:.3f} > "
                                                     f"{floor_name} {floor:.3f}, but DP-SGD on the real data reaches "
                                                     f"{dp_direct:.3f} at the same epsilon")}
    return {"level": "competitive", "text": (f"competitive with DP-direct: synthetic {synthetic:.3f} vs DP-SGD on the "
                                             f"real data {dp_direct:.3f} at the same epsilon")}


def across_classifiers(primary: dict, utility: dict, classifier: str, test_examples: int, majority: float) -> dict:
    """The primary classifier's verdict, with every other classifier's level beside it (`by_classifier`), and its
    line when that classifier finds a label signal the primary one does not: a corpus that carries the labels in
    what an embedding sees, not in its words, still carries them (each is judged against the same majority rate
    and noise bound; the zero-shot and DP-direct comparisons stay the primary's)."""
    out = {**primary, "by_classifier": {classifier: primary["level"]}}
    for name, table in utility.items():
        if name == classifier or "synthetic" not in table:
            continue
        other = verdict(table["synthetic"]["accuracy"], test_examples, majority,
                        (table.get("zero_shot") or {}).get("accuracy"))
        out["by_classifier"][name] = other["level"]
        if primary["level"] == "no_signal" and other["level"] != "no_signal":
            out["text"] += f"; but {name}: {other['text']}"
    return out


def genre_verdict(accuracy_verdict: dict, out_of_genre: dict | None, threshold: float) -> dict:
    """The verdict, overridden by "out of genre" when more than `threshold` of the synthetic texts look like code or
    markup where the real texts do not (fidelity.out_of_genre), whatever the accuracy: such a corpus is not the
    genre it claims to be, and its accuracy says nothing about it."""
    share = (out_of_genre or {}).get("share")
    if share is None or share <= threshold:
        return accuracy_verdict
    real = out_of_genre.get("real_share")
    floor = f"; real texts held out: {real:.0%}" if real is not None else ""
    return {"level": "out_of_genre", "accuracy_level": accuracy_verdict["level"],
            "text": (f"out of genre: {share:.0%} of the synthetic texts look like code or markup, unlike the real "
                     f"texts (above the {threshold:.0%} limit{floor}); accuracy aside: {accuracy_verdict['text']}")}
