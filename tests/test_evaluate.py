"""Evaluation metrics on cases whose answer is known (no language model training here)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats

from dpsynth.data import Example
from dpsynth.evaluate import attacks, fidelity
from dpsynth.evaluate.classifiers import Context, score
from dpsynth.evaluate.utility import tuning_rank_correlation, utility_table

from conftest import make_rows


def examples(n: int, seed: int = 0) -> list[Example]:
    return [Example(r["review"], r["sentiment"]) for r in make_rows(n, seed)]


# --- attack evaluation and the epsilon lower bound -----------------------------------------------

def test_identical_score_distributions_give_chance_auc_and_no_epsilon():
    rng = np.random.default_rng(0)
    m, n = rng.normal(size=2000), rng.normal(size=2000)
    rep = attacks.attack_report(m, n, delta=1e-5)
    assert abs(rep["auc"] - 0.5) < 0.04
    assert rep["tpr_at_0.01_fpr"] < 0.05
    assert rep["epsilon_lower_bound"] < 0.3


def test_disjoint_scores_give_the_closed_form_clopper_pearson_bound():
    m, n = np.linspace(1, 2, 1000), np.linspace(-2, -1, 1000)
    rep = attacks.attack_report(m, n, delta=1e-5)
    assert rep["auc"] == 1.0 and rep["tpr_at_0.01_fpr"] == 1.0
    # no errors on the 500 + 500 held-out half: one-sided 95% upper bound on FPR and FNR is 1 - 0.05^(1/500)
    hi = 1 - 0.05 ** (1 / 500)
    assert rep["epsilon_lower_bound"] == pytest.approx(math.log((1 - 1e-5 - hi) / hi), rel=1e-6)


def test_epsilon_lower_bound_of_randomised_response_is_below_its_true_epsilon():
    """Randomised response with eps=2 is exactly 2-DP: the audit must find most of it, never more."""
    rng = np.random.default_rng(1)
    eps, n = 2.0, 20000
    p = math.exp(eps) / (1 + math.exp(eps))
    members = (rng.random(n) < p).astype(float)
    nonmembers = (rng.random(n) < 1 - p).astype(float)
    lb = attacks.epsilon_lower_bound(members, nonmembers, delta=0.0)["epsilon_lower_bound"]
    assert 1.7 < lb <= eps


def test_clopper_pearson_matches_the_beta_quantiles():
    lo, hi = attacks.clopper_pearson(3, 10, 0.05)
    assert lo == pytest.approx(stats.beta.ppf(0.025, 3, 8)) and hi == pytest.approx(stats.beta.ppf(0.975, 4, 7))
    assert attacks.clopper_pearson(0, 10, 0.05)[0] == 0.0 and attacks.clopper_pearson(10, 10, 0.05)[1] == 1.0


# --- canary exposure -----------------------------------------------------------------------------

def test_exposure_of_a_planted_canary_is_high_and_of_a_typical_one_about_one_bit():
    cand = np.random.default_rng(2).normal(30.0, 2.0, size=1000)
    memorised = attacks.exposure(5.0, cand, 1e6)
    assert memorised["sampled"] == pytest.approx(math.log2(1001))  # ranks first among all candidates
    assert memorised["extrapolated"] > memorised["sampled"]  # the fitted tail reaches past the sample
    assert memorised["extrapolated"] <= math.log2(1e6)
    typical = attacks.exposure(float(np.median(cand)), cand, 1e6)
    assert typical["sampled"] == pytest.approx(1.0, abs=0.1) and typical["extrapolated"] == pytest.approx(1.0, abs=0.2)


# --- attacks on the corpus alone -----------------------------------------------------------------

def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_nearest_neighbour_attack_finds_copied_members_and_not_independent_text():
    rng = np.random.default_rng(3)
    members, nonmembers = _unit(rng.normal(size=(300, 32))), _unit(rng.normal(size=(300, 32)))
    leaky = _unit(members[:200] + 0.05 * rng.normal(size=(200, 32)))
    s = attacks.nearest_neighbour_scores(np.r_[members, nonmembers], leaky)
    assert attacks.roc_summary(s[:300], s[300:])["auc"] > 0.8
    independent = _unit(rng.normal(size=(200, 32)))
    s = attacks.nearest_neighbour_scores(np.r_[members, nonmembers], independent)
    assert abs(attacks.roc_summary(s[:300], s[300:])["auc"] - 0.5) < 0.07


def test_verbatim_memorisation_finds_a_planted_copy_and_nothing_in_disjoint_text():
    train = [ex.text for ex in examples(200)]
    secret = "the quick brown fox jumps over the lazy dog near my house at dawn"
    train.append(secret)
    planted = ["an intro then " + secret + " and more", "zzz qqq"]
    res = attacks.memorisation(planted, train)
    assert attacks.longest_common_substring_words(planted, train) == [len(attacks.words(secret)), 0]
    assert res["shared_8gram_rate"] == 0.5 and res["lcs_words_max"] == 14 and res["exact_copies"] == 0
    assert attacks.memorisation([secret], train)["exact_copies"] == 1
    disjoint = attacks.memorisation(["alpha beta gamma delta epsilon zeta eta theta iota"], train)
    assert disjoint["lcs_words_max"] == 0 and disjoint["shared_8gram_rate"] == 0.0


# --- fidelity ------------------------------------------------------------------------------------

def test_duplicates_lengths_and_label_fidelity():
    assert fidelity.duplicate_rate(["a b", "a  b", "c", "a b"]) == {"duplicate_rate": 0.5, "unique": 2, "texts": 4}
    st = fidelity.text_stats(["one two three", "four five"])
    assert st["words_mean"] == 2.5 and st["vocabulary"] == 5 and st["distinct_1"] == 1.0
    syn = [Example("x", "pos"), Example("y", "pos"), Example("z", "neg"), Example("w", "neg")]
    lf = fidelity.label_fidelity(syn, ["pos", "neg", "neg", "neg"])
    assert lf["agreement"] == 0.75 and lf["per_label"] == {"neg": 1.0, "pos": 0.5}
    assert fidelity.vocabulary_overlap(["a b c"], ["a b"])["type_overlap"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def embedder():
    from dpsynth.evaluate.embed import Embedder

    return Embedder()


def test_mauve_with_minilm_features_high_for_same_distribution_low_for_disjoint(embedder):
    same_a = [ex.text for ex in examples(300, seed=1)]
    same_b = [ex.text for ex in examples(300, seed=2)]
    rng = random.Random(0)
    other = [" ".join(str(rng.randint(0, 10**6)) for _ in range(6)) + " invoice total EUR" for _ in range(300)]
    a, b, o = embedder(same_a), embedder(same_b), embedder(other)
    assert a.shape == (300, 384) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    same = fidelity.mauve_score(a, b)["mauve"]
    disjoint = fidelity.mauve_score(a, o)["mauve"]
    assert same > 0.8 and disjoint < 0.2


def test_mauve_headline_is_at_a_fixed_size_so_corpora_of_different_sizes_compare(embedder):
    """The headline MAUVE subsamples both sides to `texts` (10 buckets) whatever the corpus size; all texts (buckets
    growing with the corpus) is kept beside it; a corpus below the size is flagged not comparable."""
    real = embedder([ex.text for ex in examples(500, seed=2)])
    rng = random.Random(0)
    junk = embedder([" ".join(str(rng.randint(0, 10**6)) for _ in range(6)) + " invoice total EUR" for _ in range(250)])
    half_junk = np.concatenate([embedder([ex.text for ex in examples(250, seed=1)]), junk])
    half_junk = half_junk[np.random.default_rng(0).permutation(len(half_junk))]
    small, large = fidelity.mauve_score(half_junk[:100], real), fidelity.mauve_score(half_junk, real)
    for r in (small, large):
        assert (r["texts"], r["draws"], r["buckets"], r["comparable"]) == (100, 5, 10, True) and r["sd"] >= 0
    assert large["all_texts"]["buckets"] == 50 and small["all_texts"]["buckets"] == 10
    assert abs(small["mauve"] - large["mauve"]) < 0.1 and small["mauve"] < 0.5  # the same corpus, half junk, at any size
    assert fidelity.mauve_score(half_junk, real) == large  # seeded draws
    few = fidelity.mauve_score(half_junk[:60], real)
    assert few["texts"] == 60 and few["comparable"] is False


# --- utility -------------------------------------------------------------------------------------

def test_utility_real_copy_matches_real_and_shuffled_labels_fall_to_chance(embedder):
    train, test = examples(400, seed=3), examples(200, seed=4)
    shuffled_labels = [ex.label for ex in train]
    random.Random(0).shuffle(shuffled_labels)
    shuffled = [Example(ex.text, lab) for ex, lab in zip(train, shuffled_labels)]
    ctx = Context(seed=0, embedder=embedder)
    table = utility_table(["tfidf_logreg", "minilm_logreg"], test, train, list(train), shuffled, ctx)
    for name, row in table.items():
        assert row["real"]["accuracy"] > 0.95, name  # the toy task is easy
        assert row["synthetic"] == row["real"]  # the same data gives the same classifier
        assert 0.3 < row["zero_shot"]["accuracy"] < 0.7, name  # labels carry no signal


def test_single_label_training_data_is_a_constant_classifier():
    test = [Example("good", "pos")] * 3 + [Example("bad", "neg")]
    for name in ("tfidf_logreg", "minilm_logreg"):
        res = score([Example("anything", "pos"), Example("else", "pos")], test, classifier=name)
        assert res["accuracy"] == 0.75


def test_tuning_on_identical_data_ranks_identically():
    """When the synthetic corpus's 80/20 split is exactly real train / real validation, both rankings agree."""
    data = examples(300, seed=5)
    rng = random.Random(1)  # label noise so that hyperparameters matter
    data = [Example(ex.text, rng.choice(["pos", "neg"])) if rng.random() < 0.3 else ex for ex in data]
    train, val = data[:240], data[240:]
    order = np.random.default_rng(0).permutation(300)  # the permutation tuning_rank_correlation draws with seed 0
    syn: list = [None] * 300
    for pos, ex in enumerate(train + val):
        syn[order[pos]] = ex
    res = tuning_rank_correlation(train, val, syn, examples(100, seed=6), seed=0)
    assert res["real_validation_accuracy"] == res["synthetic_validation_accuracy"]
    assert len(set(res["real_validation_accuracy"])) > 1 and res["spearman_rho"] == pytest.approx(1.0)
    assert res["picked_on_real"] == res["picked_on_synthetic"]
    assert res["test_accuracy_of_real_pick"] == res["test_accuracy_of_synthetic_pick"]


# ---------------------------------------------------------------- baselines and the verdict line


def test_majority_class_is_the_constant_classifier():
    from dpsynth.data import Example
    from dpsynth.evaluate.utility import majority_class

    test = [Example(str(i), "a" if i < 7 else "b") for i in range(10)]
    assert majority_class(test) == {"label": "a", "accuracy": 0.7, "test_examples": 10}


@pytest.mark.parametrize("synthetic, zero_shot, dp_direct, level", [
    (0.574, None, 0.68, "no_signal"),          # the demo's measured case: at the majority rate
    (0.60, None, 0.68, "no_signal"),           # +2.2 points on 1,275 examples: inside two standard errors
    (0.64, 0.63, 0.68, "no_signal"),           # above chance, but no better than the zero-shot floor
    (0.65, 0.57, 0.70, "below_dp_direct"),
    (0.69, 0.57, 0.70, "competitive"),
    (0.75, 0.57, 0.70, "competitive"),
    (0.65, None, None, "signal"),
])
def test_verdict_reads_the_synthetic_accuracy_against_its_baselines(synthetic, zero_shot, dp_direct, level):
    from dpsynth.evaluate.utility import verdict

    v = verdict(synthetic, 1275, 0.578, zero_shot, dp_direct)
    assert v["level"] == level, v
    assert f"{synthetic:.3f}" in v["text"]


def test_a_signal_only_another_classifier_finds_is_said_beside_the_primary_verdict():
    from dpsynth.evaluate.utility import across_classifiers, verdict

    # the Rotten Tomatoes run of 2026-12-01: TF-IDF at the majority rate, MiniLM +0.067 above it on 1,272 texts
    utility = {"tfidf_logreg": {"synthetic": {"accuracy": 0.604}, "zero_shot": {"accuracy": 0.508}},
               "minilm_logreg": {"synthetic": {"accuracy": 0.668}, "zero_shot": {"accuracy": 0.426}}}
    primary = verdict(0.604, 1272, 0.601, 0.508, 0.663)
    v = across_classifiers(primary, utility, "tfidf_logreg", 1272, 0.601)
    assert v["level"] == "no_signal" and v["by_classifier"] == {"tfidf_logreg": "no_signal", "minilm_logreg": "signal"}
    assert v["text"].startswith(primary["text"]) and "but minilm_logreg: label signal: synthetic 0.668" in v["text"]
    flat = {**utility, "minilm_logreg": {"synthetic": {"accuracy": 0.61}}}  # within noise: nothing added
    assert across_classifiers(primary, flat, "tfidf_logreg", 1272, 0.601)["text"] == primary["text"]


# ---------------------------------------------------------------- verbatim overlap: linear in the words


def _brute_lcs(text: list[str], refs: list[list[str]]) -> int:
    best = 0
    for r in refs:
        for i in range(len(text)):
            for j in range(len(r)):
                k = 0
                while i + k < len(text) and j + k < len(r) and text[i + k] == r[j + k]:
                    k += 1
                best = max(best, k)
    return best


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_word_lists = st.lists(st.lists(st.sampled_from(list("abcd")), max_size=12), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(_word_lists, st.lists(st.sampled_from(list("abcde")), max_size=15))
def test_suffix_automaton_finds_the_longest_shared_run(refs, text):
    sam = attacks.WordSuffixAutomaton(refs)
    assert sam.longest_match(text) == _brute_lcs(text, refs)


def test_near_duplicate_long_documents_cost_linear_work():
    """The news-corpus case: long near-duplicate articles share runs of hundreds of words. The automaton's size is
    linear in the reference's words, and the answer is the full shared run, not capped."""
    import random

    rng = random.Random(0)
    article = [f"w{rng.randrange(5000)}" for _ in range(2000)]
    refs = [article[:1000] + ["edited"] + article[1000:] for _ in range(3)]
    sam = attacks.WordSuffixAutomaton(refs)
    assert len(sam.length) <= 2 * sum(len(r) + 1 for r in refs)
    assert attacks.longest_common_substring_words([" ".join(article)], [" ".join(r) for r in refs]) == [1000]
