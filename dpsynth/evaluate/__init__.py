"""Evaluation of a certified run: utility, fidelity, privacy audit, report.

Modules, one job each: embed (MiniLM features), classifiers (+ dp_sgd for baseline (c)), utility,
fidelity, attacks, audit (canary runs over epsilon), corpora, pipeline (`evaluate`), report.
"""

from dpsynth.evaluate.classifiers import score, tfidf_logreg
from dpsynth.evaluate.corpora import find_corpus, read_corpus
from dpsynth.evaluate.pipeline import FULL_SUITE, evaluate
from dpsynth.evaluate.report import report

__all__ = ["FULL_SUITE", "evaluate", "find_corpus", "read_corpus", "report", "score", "tfidf_logreg"]
