"""Privacy audit of a trained generator and its corpus, and the extra audit runs with canaries.

`privacy_audit` attacks one run: loss-based membership inference on the generator, distance-to-
closest-record and verbatim-memorisation attacks on the released corpus alone, canary exposure when
the run was trained with canaries, and the empirical epsilon lower bound next to the certified one.

The extra training runs with canaries (one per epsilon) are experiments, not evaluation: they live in
dpsynth.audit_experiments and hand their points to this module's attacks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.config import EvaluationConfig, JobConfig
from dpsynth.data import Example, Splits, group_by_unit
from dpsynth.evaluate import attacks
from dpsynth.evaluate.embed import Embedder
from dpsynth.privacy.certificate import read_certificate
from dpsynth.prompts import label_prompt

log = logging.getLogger(__name__)

CANARY_CONTEXT = "my secret code is"
SECRET_DIGITS = 6
SECRET_SPACE = 10.0**SECRET_DIGITS


@dataclass(frozen=True)
class Canary:
    """A random secret inserted `repetitions` times (Carlini et al. 2019). Copies differ only in a
    trailing marker, so dedupe keeps them as separate records, and the secret is scored given the
    same context."""

    secret: str
    repetitions: int
    label: str

    def records(self) -> list[Example]:
        return [Example(f"{CANARY_CONTEXT} {self.secret} (copy {j + 1})", self.label) for j in range(self.repetitions)]


def random_secret(rng: np.random.Generator) -> str:
    return " ".join(str(d) for d in rng.integers(0, 10, SECRET_DIGITS))


def make_canaries(repetitions, per_repetition: int, labels, seed: int) -> list[Canary]:
    """`per_repetition` canaries for each count in `repetitions`, plus as many never inserted
    (repetitions 0: the control, whose exposure should look like a random candidate's)."""
    rng = np.random.default_rng([seed, 0xCA7A])
    counts = [0, *sorted(set(repetitions))]
    secrets: set[str] = set()
    out = []
    for r in counts:
        for _ in range(per_repetition):
            s = random_secret(rng)
            while s in secrets:
                s = random_secret(rng)
            secrets.add(s)
            out.append(Canary(s, r, labels[len(out) % len(labels)]))
    return out


def canary_exposures(model, tok, prefix_of, canaries: list[Canary], in_train: dict[str, int], candidates: int,
                     seed: int, max_length: int = 64) -> list[dict]:
    """Exposure of each canary against `candidates` random secrets scored under the same label prefix."""
    rng = np.random.default_rng([seed, 0x5EC])
    taken = {c.secret for c in canaries}
    pool: list[str] = []
    while len(pool) < candidates:
        s = random_secret(rng)
        if s not in taken:
            pool.append(s)
    n_ctx = len(tok(CANARY_CONTEXT, add_special_tokens=False).input_ids)

    def log_perplexity(label: str, secrets: list[str]) -> np.ndarray:
        texts = [f"{CANARY_CONTEXT} {s}" for s in secrets]
        nll = attacks.token_nll(model, tok, [(prefix_of(label), t) for t in texts], max_length)
        lens = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
        return np.array([x[n_ctx:n] .sum() / math.log(2) for x, n in zip(nll, lens)])  # bits, secret tokens only

    cand = {lab: log_perplexity(lab, pool) for lab in sorted({c.label for c in canaries})}
    out = []
    for c, lp in zip(canaries, np.concatenate([log_perplexity(c.label, [c.secret]) for c in canaries]) if canaries else []):
        out.append({"secret": c.secret, "label": c.label, "inserted": c.repetitions, "in_train": in_train.get(c.secret, 0),
                    "log_perplexity_bits": float(lp), **attacks.exposure(lp, cand[c.label], SECRET_SPACE)})
    return out


def exposure_by_count(rows: list[dict]) -> list[dict]:
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["in_train"], []).append(r)
    return [{"in_train": k, "canaries": len(v), "exposure_sampled_mean": float(np.mean([r["sampled"] for r in v])),
             "exposure_extrapolated_mean": float(np.mean([r["extrapolated"] for r in v])),
             "exposure_extrapolated_max": float(np.max([r["extrapolated"] for r in v]))} for k, v in sorted(groups.items())]


def _pick(examples: list[Example], k: int, seed: int) -> list[Example]:
    if len(examples) <= k:
        return list(examples)
    return [examples[i] for i in np.sort(np.random.default_rng(seed).choice(len(examples), k, replace=False))]


def _units_of(examples, k: int, seed: int) -> list[tuple[Example, ...]]:
    return _pick(group_by_unit(examples), k, seed)


def _per_unit(scores: np.ndarray, sizes: list[int]) -> np.ndarray:
    """A unit's attack score: the mean of its records' scores (membership is asked of the person, not the record)."""
    ends = np.cumsum(sizes)
    return np.array([scores[e - n:e].mean() for n, e in zip(sizes, ends)]) if sizes else np.zeros(0)


def privacy_audit(run_dir: Path, cfg: JobConfig, splits: Splits, synthetic: list[Example], embedder: Embedder,
                  ev: EvaluationConfig, canaries: list[Canary] = ()) -> dict:
    """Attack one run and its corpus, per privacy unit: members = units of its train split, non-members = units of
    its held-out splits (disjoint by construction); a unit's score is the mean of its records'."""
    from dpsynth.models import load_adapter

    cert = read_certificate(Path(run_dir) / "certificate.json")
    delta = cert.delta
    canary_texts = {r.text for c in canaries for r in c.records()}
    member_units = _units_of([ex for ex in splits.train if ex.text not in canary_texts], ev.attack_examples, ev.seed)
    nonmember_units = _units_of([ex for ex in splits.test + splits.validation if ex.text not in canary_texts],
                                ev.attack_examples, ev.seed + 1)
    members = [ex for u in member_units for ex in u]
    nonmembers = [ex for u in nonmember_units for ex in u]
    sizes = ([len(u) for u in member_units], [len(u) for u in nonmember_units])
    result: dict = {"certified_epsilon": cert.epsilon, "delta": delta, "unit": splits.unit, "members": len(member_units),
                    "nonmembers": len(nonmember_units), "member_records": len(members), "nonmember_records": len(nonmembers)}

    if not (Path(run_dir) / "adapter").is_dir():
        # a training-free (in-context) run has no trained generator to attack: only the released corpus
        result["generator"] = {}
        result["generator_note"] = "no adapter (in-context run): corpus attacks only"
        return _corpus_attacks(result, splits, synthetic, members, nonmembers, sizes, embedder, ev, delta, cert)
    # generator: loss threshold, and calibrated by the public base model (the adapter switched off)
    model, tok = load_adapter(Path(run_dir), cfg.model)
    def prefix_of(label: str) -> str:
        return label_prompt(cfg, tok, cert.dataset.name, label)

    items = [(prefix_of(ex.label), ex.text) for ex in members + nonmembers]
    scores = attacks.loss_attack_scores(model, tok, items, reference=model.disable_adapter, max_length=cfg.model.max_length)
    result["generator"] = {name: attacks.attack_report(_per_unit(s[: len(members)], sizes[0]),
                                                       _per_unit(s[len(members):], sizes[1]), delta, ev.seed)
                           for name, s in scores.items()}
    if canaries:
        in_train = {}
        for c in canaries:
            texts = {r.text for r in c.records()}
            in_train[c.secret] = sum(ex.text in texts for ex in splits.train)
        rows = canary_exposures(model, tok, prefix_of, list(canaries), in_train, ev.canary_candidates, ev.seed, cfg.model.max_length)
        result["canaries"] = {"context": CANARY_CONTEXT, "secret_space": SECRET_SPACE, "candidates": ev.canary_candidates,
                              "by_count": exposure_by_count(rows), "each": rows,
                              "secrets_in_corpus": sum(any(c.secret in ex.text for ex in synthetic) for c in canaries if c.repetitions)}
    del model
    return _corpus_attacks(result, splits, synthetic, members, nonmembers, sizes, embedder, ev, delta, cert)


def _corpus_attacks(result: dict, splits: Splits, synthetic, members, nonmembers, sizes, embedder: Embedder,
                    ev: EvaluationConfig, delta: float, cert) -> dict:
    # the released corpus only: nearest synthetic neighbour, verbatim overlap
    syn_emb = embedder([ex.text for ex in synthetic])
    nn = attacks.nearest_neighbour_scores(embedder([ex.text for ex in members + nonmembers]), syn_emb)
    result["corpus_nearest_neighbour"] = attacks.attack_report(_per_unit(nn[: len(members)], sizes[0]),
                                                               _per_unit(nn[len(members):], sizes[1]), delta, ev.seed)
    train_texts = [ex.text for ex in splits.train]
    automaton = attacks.WordSuffixAutomaton([attacks.words(t) for t in train_texts])  # built once, linear in the words
    result["memorisation"] = {
        "synthetic_vs_train": attacks.memorisation([ex.text for ex in synthetic], train_texts, automaton=automaton),
        "heldout_vs_train": attacks.memorisation([ex.text for ex in _pick(list(splits.test), len(synthetic), ev.seed)],
                                                 train_texts, automaton=automaton),
    }
    bounds = {f"generator.{k}": v["epsilon_lower_bound"] for k, v in result["generator"].items()}
    bounds["corpus_nearest_neighbour"] = result["corpus_nearest_neighbour"]["epsilon_lower_bound"]
    best = max(bounds, key=bounds.get)
    result["empirical_epsilon"] = {"lower_bound": bounds[best], "attack": best, "all": bounds, "certified": cert.epsilon}
    return result
