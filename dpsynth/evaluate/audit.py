"""Privacy audit of a trained generator and its corpus, and the extra audit runs with canaries.

`privacy_audit` attacks one run: loss-based membership inference on the generator, distance-to-
closest-record and verbatim-memorisation attacks on the released corpus alone, canary exposure when
the run was trained with canaries, and the empirical epsilon lower bound next to the certified one.

`audit_runs` trains extra runs through the public training API (dpsynth.train.driver.train) on a
canary-augmented copy of the data, one per epsilon (`inf` = no noise), each with its own output
directory and its own ledger: their dataset fingerprint differs from the real dataset's, and they
are never charged to its budget. They do train on the real records, so their artefacts and the
report are for the data owner, not for release.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.config import EvaluationConfig, JobConfig, load_config
from dpsynth.data import Example, Splits, format_prefix, prepare
from dpsynth.evaluate import attacks
from dpsynth.evaluate.corpora import find_corpus, read_corpus
from dpsynth.evaluate.embed import Embedder
from dpsynth.io import atomic_write_text
from dpsynth.privacy.certificate import read_certificate

log = logging.getLogger(__name__)

CANARY_CONTEXT = "my secret code is"
SECRET_DIGITS = 6
SECRET_SPACE = 10.0**SECRET_DIGITS
NO_NOISE_SIGMA = 0.01
"""`inf` audit runs: the driver refuses sigma = 0, so noise std 0.01 C on a sum of ~batch clipped gradients."""


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


def privacy_audit(run_dir: Path, cfg: JobConfig, splits: Splits, synthetic: list[Example], embedder: Embedder,
                  ev: EvaluationConfig, canaries: list[Canary] = ()) -> dict:
    """Attack one run and its corpus; members = its train split, non-members = its held-out splits."""
    from dpsynth.models import load_adapter

    cert = read_certificate(Path(run_dir) / "certificate.json")
    delta = cert["delta"]
    canary_texts = {r.text for c in canaries for r in c.records()}
    members = _pick([ex for ex in splits.train if ex.text not in canary_texts], ev.attack_examples, ev.seed)
    nonmembers = _pick([ex for ex in splits.test + splits.validation if ex.text not in canary_texts], ev.attack_examples, ev.seed + 1)
    result: dict = {"certified_epsilon": cert["epsilon"], "delta": delta, "members": len(members), "nonmembers": len(nonmembers)}

    if not (Path(run_dir) / "adapter").is_dir():
        # a training-free (in-context) run has no trained generator to attack: only the released corpus
        result["generator"] = {}
        result["generator_note"] = "no adapter (in-context run): corpus attacks only"
        return _corpus_attacks(result, splits, synthetic, members, nonmembers, embedder, ev, delta, cert)
    # generator: loss threshold, and calibrated by the public base model (the adapter switched off)
    model, tok = load_adapter(Path(run_dir), cfg.model)
    prefix_of = lambda label: format_prefix(cfg.model.prefix_template, cert["dataset"]["name"], label)  # noqa: E731
    items = [(prefix_of(ex.label), ex.text) for ex in members + nonmembers]
    scores = attacks.loss_attack_scores(model, tok, items, reference=model.disable_adapter, max_length=cfg.model.max_length)
    result["generator"] = {name: attacks.attack_report(s[: len(members)], s[len(members) :], delta, ev.seed)
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
    return _corpus_attacks(result, splits, synthetic, members, nonmembers, embedder, ev, delta, cert)


def _corpus_attacks(result: dict, splits: Splits, synthetic, members, nonmembers, embedder: Embedder,
                    ev: EvaluationConfig, delta: float, cert: dict) -> dict:
    # the released corpus only: nearest synthetic neighbour, verbatim overlap
    syn_emb = embedder([ex.text for ex in synthetic])
    nn = attacks.nearest_neighbour_scores(embedder([ex.text for ex in members + nonmembers]), syn_emb)
    result["corpus_nearest_neighbour"] = attacks.attack_report(nn[: len(members)], nn[len(members) :], delta, ev.seed)
    train_texts = [ex.text for ex in splits.train]
    result["memorisation"] = {
        "synthetic_vs_train": attacks.memorisation([ex.text for ex in synthetic], train_texts),
        "heldout_vs_train": attacks.memorisation([ex.text for ex in _pick(list(splits.test), len(synthetic), ev.seed)], train_texts),
    }
    bounds = {f"generator.{k}": v["epsilon_lower_bound"] for k, v in result["generator"].items()}
    bounds["corpus_nearest_neighbour"] = result["corpus_nearest_neighbour"]["epsilon_lower_bound"]
    best = max(bounds, key=bounds.get)
    result["empirical_epsilon"] = {"lower_bound": bounds[best], "attack": best, "all": bounds, "certified": cert["epsilon"]}
    return result


# --- extra runs: canary-augmented data, one per epsilon --------------------------------------------

def eps_name(eps) -> str:
    return "inf" if eps == "inf" else f"{float(eps):g}"


def audit_dataset(splits: Splits, canaries: list[Canary], path: Path) -> Path:
    """The run's records (all splits: prepare() re-splits them) plus every canary copy, as JSONL."""
    rows = [{"text": ex.text, "label": ex.label} for ex in splits.train + splits.validation + splits.test]
    rows += [{"text": r.text, "label": r.label} for c in canaries for r in c.records()]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != body:
        atomic_write_text(path, body)
    return path


def audit_config(cfg: JobConfig, eps, data: Path, out: Path, dataset_name: str, delta: float, overrides=()) -> JobConfig:
    tree = cfg.model_dump(mode="json")
    tree["data"].update(source=str(data), text_column="text", label_column="label", name=dataset_name, max_examples=None)
    tree["privacy"].update(delta=delta, ledger=str(out.parent / "ledgers" / f"eps-{eps_name(eps)}.sqlite"))
    tree["output_dir"] = str(out)
    if eps == "inf":  # no DP: tiny fixed noise (the driver refuses 0), accounted with RDP just to have a number
        tree["privacy"].update(epsilon=1e9, dataset_epsilon=1e9, accountant="rdp")
        tree["training"]["noise_multiplier"] = NO_NOISE_SIGMA
    else:
        tree["privacy"].update(epsilon=float(eps), dataset_epsilon=float(eps))
        tree["training"]["noise_multiplier"] = None
    return load_config(None, list(overrides), base=tree)


def audit_runs(run_dir: Path, cfg: JobConfig, splits: Splits, ev: EvaluationConfig, embedder: Embedder, point_eval,
               show_progress: bool = False) -> dict:
    """Train (or reuse) one canary run per epsilon in ev.audit_epsilons, sample it, attack it, and
    score its utility with `point_eval(splits, synthetic) -> dict`."""
    from dpsynth.sample import sample
    from dpsynth.train.driver import train

    root = Path(run_dir) / "evaluation" / "audit"
    cert = read_certificate(Path(run_dir) / "certificate.json")
    canaries = make_canaries(ev.canary_repetitions, ev.canaries_per_repetition, list(splits.labels), ev.seed)
    data = audit_dataset(splits, canaries, root / "data.jsonl")
    points = []
    for eps in ev.audit_epsilons:
        acfg = audit_config(cfg, eps, data, root / f"eps-{eps_name(eps)}", splits.name, cert["delta"], ev.audit_overrides)
        log.info("audit run eps=%s -> %s", eps_name(eps), acfg.output_dir)
        adir = train(acfg, show_progress=show_progress)
        try:
            corpus = find_corpus(adir)
        except Exception:
            corpus = sample(adir, acfg.sampling, show_progress=show_progress)
        synthetic = read_corpus(corpus)
        asplits = prepare(acfg.data)
        canary_texts = {r.text for c in canaries for r in c.records()}
        clean = Splits(asplits.name, tuple(e for e in asplits.train if e.text not in canary_texts),
                       tuple(e for e in asplits.validation if e.text not in canary_texts),
                       tuple(e for e in asplits.test if e.text not in canary_texts), asplits.labels, asplits.fingerprint,
                       asplits.dataset_size)
        acert = read_certificate(Path(adir) / "certificate.json")
        points.append({
            "target_epsilon": eps_name(eps), "run_dir": str(adir), "certified_epsilon": acert["epsilon"],
            "noise_multiplier": acert["noise_multiplier"], "steps": acert["steps"], "dataset_fingerprint": acert["dataset_fingerprint"],
            "ledger": str(acfg.privacy.ledger), "utility": point_eval(clean, synthetic),
            "privacy": privacy_audit(adir, acfg, asplits, synthetic, embedder, ev, canaries),
        })
    return {"root": str(root), "canaries": len(canaries), "canary_records": sum(c.repetitions for c in canaries),
            "real_dataset_fingerprint": cert["dataset_fingerprint"], "points": points,
            "note": ("Audit runs train on a canary-augmented copy of the real records (a different dataset fingerprint), "
                     "each with its own ledger under " + str(root / "ledgers") + "; nothing is charged to the real "
                     "dataset's budget. They do use the private records: these numbers are for the data owner, not for release.")}
