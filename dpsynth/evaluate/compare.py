"""Two certified runs side by side at their certified budgets: utility, fidelity, privacy audit.

Made for in-context DP generation vs DP-LoRA on the same dataset (SafeSynthDP, arXiv 2412.20641, compares
training-free generation with DP fine-tuning the same way: classifiers trained on each synthetic corpus,
tested on the same real test split, plus membership inference). Each column is read from that run's own
certificate.json and evaluation.json; a run is evaluated only when it has no evaluation of its current corpus.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from dpsynth.release import owner_path
from dpsynth.config import EvaluationConfig
from dpsynth.errors import UserError
from dpsynth.privacy.certificate import Certificate, read_certificate

log = logging.getLogger(__name__)

EPSILON_RTOL = 0.01
"""Two certificates are "at the same epsilon" when their epsilons differ by at most 1 % (calibration lands
just under the target, e.g. 7.998 vs 7.9998)."""


def method(cert: Certificate) -> str:
    """One line naming the certified mechanism."""
    m = cert.mechanism
    if m.kind == "in_context":
        return (f"in-context DP few-shot, {m.mechanism} noise: {m.token_steps} token steps charged, noise multiplier "
                f"{m.noise_multiplier:.4g} (scale {m.noise_scale:.4g} votes)")
    if m.kind == "private_search":
        return (f"private search: {m.trials_run} DP-LoRA trials x {m.steps_per_trial} DP-SGD steps, q={m.sampling_rate:.5f}, "
                f"sigma={m.noise_multiplier:.4f}, selected C={m.max_grad_norm:.3g}")
    return (f"DP-LoRA: {m.steps} DP-SGD steps, q={m.sampling_rate:.5f}, sigma={m.noise_multiplier:.4f}, "
            f"C={m.max_grad_norm:.3g}")


def unit_sentence(cert: Certificate) -> str:
    """The privacy unit in plain words, beside epsilon."""
    d = cert.dataset
    if d.unit in ("record", "record+near-duplicates"):
        copies = " together with its near-duplicate copies" if d.unit != "record" else ""
        return (f"each record{copies} is protected at eps={cert.epsilon:.3g} ({d.units:,} units); "
                "a person with k records is protected only at about k x eps (set data.unit_column)")
    return (f"each {d.unit} ({d.units:,} in all) is protected at eps={cert.epsilon:.3g}, all its "
            "records together; a record-level guarantee would have been weaker for those with many records")


def saved_evaluation(run_dir: Path, cert: Certificate) -> dict | None:
    """The run's evaluation.json if it evaluated the current certificate and corpus (not older than either)."""
    path = owner_path(run_dir, "evaluation.json")
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    corpus = run_dir / str(res.get("corpus", ""))
    fresh = (res.get("epsilon") == cert.epsilon and corpus.is_file()
             and res.get("dataset_fingerprint", cert.dataset.fingerprint) == cert.dataset.fingerprint
             and path.stat().st_mtime >= max(corpus.stat().st_mtime, (run_dir / "certificate.json").stat().st_mtime))
    return res if fresh else None


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def column(run_dir: Path, cert: Certificate, res: dict, source: str) -> dict:
    """What the comparison shows of one run, all from its certificate and evaluation."""
    clf = res.get("classifier")
    gen_loss = _get(res, "privacy", "generator", "loss", "auc")
    return {
        "run_dir": str(run_dir), "method": method(cert), "generator": cert.generator, "privacy_unit": cert.dataset.unit,
        "epsilon": cert.epsilon, "delta": cert.delta, "accountant": cert.accountant,
        "dataset_fingerprint": cert.dataset.fingerprint, "synthetic_examples": res.get("synthetic_examples"),
        "test_examples": res.get("test_examples"), "evaluation": source,
        "utility": {"classifier": clf, "synthetic_accuracy": _get(res, "synthetic", "accuracy"),
                    "synthetic_macro_f1": _get(res, "synthetic", "macro_f1"), "real_accuracy": _get(res, "real", "accuracy"),
                    "dp_sgd_real_accuracy": _get(res, "utility", clf, "dp_real", "accuracy")},
        "fidelity": {"mauve": _get(res, "fidelity", "mauve", "synthetic_vs_test", "mauve"),
                     "label_fidelity": _get(res, "fidelity", "label_fidelity", "agreement"),
                     "duplicate_rate": _get(res, "fidelity", "duplicates", "duplicate_rate")},
        "audit": {"mia_auc_generator_loss": gen_loss,
                  "mia_auc_corpus_nearest_neighbour": _get(res, "privacy", "corpus_nearest_neighbour", "auc"),
                  "empirical_epsilon_lower_bound": _get(res, "privacy", "empirical_epsilon", "lower_bound")},
    }


def certificates(run_a: Path, run_b: Path) -> list[Certificate]:
    """Both runs' certificates; refused unless both are certified runs on the same dataset."""
    certs = []
    for run_dir in (Path(run_a), Path(run_b)):
        if not (run_dir / "certificate.json").is_file():
            raise UserError(f"compare: {run_dir} is not a certified run (no certificate.json)")
        certs.append(read_certificate(run_dir / "certificate.json"))
    if certs[0].dataset.fingerprint != certs[1].dataset.fingerprint:
        raise UserError(f"compare: {run_a} and {run_b} are on different datasets (fingerprints "
                        f"{certs[0].dataset.fingerprint} vs {certs[1].dataset.fingerprint}); their test splits "
                        "differ, so their scores do not compare")
    return certs


def compare(run_a: Path, run_b: Path, ev: EvaluationConfig | None = None, *, evaluation_a: dict | None = None,
            show_progress: bool = False) -> dict:
    """Side-by-side columns of two runs on the same dataset; `same_budget` says whether their certificates agree
    on epsilon (within EPSILON_RTOL) and delta. A run without a current evaluation.json is evaluated (config `ev`,
    default: its own)."""
    from dpsynth.evaluate.pipeline import evaluate

    runs = [Path(run_a), Path(run_b)]
    certs = certificates(*runs)
    cols = []
    for run_dir, cert, given in zip(runs, certs, (evaluation_a, None)):
        res, source = given, "this report"
        if res is None:
            res, source = saved_evaluation(run_dir, cert), "evaluation.json"
        if res is None:
            log.info("%s has no evaluation of its current corpus: evaluating it", run_dir)
            res, source = evaluate(run_dir, ev, show_progress=show_progress), "evaluated for this comparison"
        cols.append(column(run_dir, cert, res, source))
    a, b = cols
    same_eps = math.isclose(a["epsilon"], b["epsilon"], rel_tol=EPSILON_RTOL)
    same_delta = math.isclose(a["delta"], b["delta"], rel_tol=1e-9)
    note = (f"same budget: eps {a['epsilon']:.3f} vs {b['epsilon']:.3f} (within {EPSILON_RTOL:.0%}), delta {a['delta']:.3g}"
            if same_eps and same_delta else
            f"NOT the same budget: eps {a['epsilon']:.3f} vs {b['epsilon']:.3f}, delta {a['delta']:.3g} vs {b['delta']:.3g}; "
            "the scores below are not a same-epsilon comparison")
    if not (same_eps and same_delta):
        log.warning("compare: %s", note)
    return {"runs": cols, "same_budget": same_eps and same_delta, "budget_note": note, "epsilon_rtol": EPSILON_RTOL}


ROWS = [
    ("method", ("method",)), ("privacy unit", ("privacy_unit",)), ("certified epsilon", ("epsilon",)), ("delta", ("delta",)), ("accountant", ("accountant",)),
    ("synthetic examples", ("synthetic_examples",)), ("real test examples", ("test_examples",)),
    ("utility: classifier", ("utility", "classifier")),
    ("utility: test accuracy, trained on synthetic", ("utility", "synthetic_accuracy")),
    ("utility: macro-F1, trained on synthetic", ("utility", "synthetic_macro_f1")),
    ("utility: test accuracy, trained on real (upper bound)", ("utility", "real_accuracy")),
    ("utility: test accuracy, real with DP-SGD at this epsilon", ("utility", "dp_sgd_real_accuracy")),
    ("fidelity: MAUVE, synthetic vs real test", ("fidelity", "mauve")),
    ("fidelity: label fidelity", ("fidelity", "label_fidelity")),
    ("fidelity: duplicate rate", ("fidelity", "duplicate_rate")),
    ("audit: MIA AUC, generator loss (DP-LoRA only)", ("audit", "mia_auc_generator_loss")),
    ("audit: MIA AUC, corpus nearest neighbour", ("audit", "mia_auc_corpus_nearest_neighbour")),
    ("audit: empirical epsilon lower bound", ("audit", "empirical_epsilon_lower_bound")),
    ("numbers from", ("evaluation",)),
]
"""The comparison table, row by row: (label, path into a column)."""


def table_rows(comparison: dict) -> list[list]:
    """[label, value of run A, value of run B] per row; None where a run has no such number (tiny values such as
    delta as text, so a 3-decimal table keeps their digits)."""
    def shown(v):
        return f"{v:.3g}" if isinstance(v, float) and 0 < abs(v) < 1e-3 else v

    return [[label, *[shown(_get(col, *path)) for col in comparison["runs"]]] for label, path in ROWS]
