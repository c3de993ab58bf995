"""Audit experiments: extra DP-LoRA runs on a canary-augmented copy of the data, one per epsilon (`inf` = no
noise), for the privacy-utility curve and the DP-vs-non-DP audit (Carlini et al. 2019 canaries; Jagielski et al.
2020 auditing).

Each run goes through the public training API (dpsynth.train.driver.train, so the one private-run path) with its
own output directory and its own ledger: its dataset fingerprint differs from the real dataset's, so it is never
charged to the real dataset's budget. The runs do train on the real records, so their artefacts and the report
are for the data owner, not for release. Evaluation only reads what they produced (dpsynth.evaluate.audit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dpsynth.records import RecordSchema
from dpsynth.release import owner_path
from dpsynth.config import EvaluationConfig, JobConfig, load_config
from dpsynth.data import Splits, prepare
from dpsynth.privacy.secret import ledger_secret
from dpsynth.evaluate.audit import Canary, make_canaries, privacy_audit
from dpsynth.evaluate.corpora import find_corpus, read_corpus
from dpsynth.io import atomic_write_text
from dpsynth.privacy.certificate import read_certificate

log = logging.getLogger(__name__)

NO_NOISE_SIGMA = 0.01
"""`inf` audit runs: the driver refuses sigma = 0, so noise std 0.01 C on a sum of ~batch clipped gradients."""


def eps_name(eps) -> str:
    return "inf" if eps == "inf" else f"{float(eps):g}"


def audit_dataset(splits: Splits, canaries: list[Canary], path: Path, units: bool) -> Path:
    """The run's records (all splits: prepare() re-splits them) plus every canary copy, as JSONL. With `units`
    each record keeps its privacy unit and every canary copy is a unit of its own (so exposure still reads against
    the number of copies)."""
    rows = [{"text": ex.text, "label": ex.label, **({"unit": ex.unit} if units else {})}
            for ex in splits.train + splits.validation + splits.test]
    rows += [{"text": r.text, "label": r.label, **({"unit": f"canary-{c.secret}-{j}"} if units else {})}
             for c in canaries for j, r in enumerate(c.records())]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != body:
        atomic_write_text(path, body)
    return path


def audit_config(cfg: JobConfig, eps, data: Path, out: Path, dataset_name: str, delta: float, overrides=()) -> JobConfig:
    """The run's config on the canary data. Near-duplicates are kept apart: canary copies are near-duplicates by
    design, and the audit measures exposure against how many of them were trained on."""
    tree = cfg.model_dump(mode="json")
    tree["data"].update(source=str(data), text_column="text", label_column="label", name=dataset_name, subset_fraction=None,
                        unit_column="unit" if cfg.data.unit_column else None, near_duplicates="keep",
                        # the canary file holds each record as its training text and cell (dpsynth.records)
                        text_columns=None, attribute_values=None,
                        attribute_columns=[] if RecordSchema.of(cfg.data).unlabelled else None,
                        max_attribute_values=max(cfg.data.max_attribute_values, cfg.data.max_cells))
    tree["privacy"].update(delta=delta, ledger=str(out.parent / "ledgers" / f"eps-{eps_name(eps)}.sqlite"))
    tree["output_dir"] = str(out)
    if eps == "inf":  # no DP: tiny fixed noise (the driver refuses 0), accounted with RDP just to have a number
        tree["privacy"].update(epsilon=1e9, dataset_epsilon=1e9, accountant="rdp")
        tree["training"]["noise_multiplier"] = NO_NOISE_SIGMA
    else:
        tree["privacy"].update(epsilon=float(eps), dataset_epsilon=float(eps))
        tree["training"]["noise_multiplier"] = None
    return load_config(None, list(overrides), base=tree)


def point_utility(ev: EvaluationConfig, ctx, embedder, splits: Splits, synthetic) -> dict:
    """The headline classifier on one audit point's real test split, trained on real and on synthetic data."""
    from dpsynth.evaluate import fidelity
    from dpsynth.evaluate.classifiers import metrics, predict

    test, real = list(splits.test), list(splits.train)
    truth, texts = [e.label for e in test], [e.text for e in test]
    if len(set(truth)) < 2:  # unlabelled data: nothing to classify at this point, only MAUVE
        none = {"accuracy": None, "macro_f1": None}
        out = {"classifier": None, "real": none, "synthetic": dict(none)}
    else:
        out = {"classifier": ev.classifier, "real": metrics(truth, predict(ev.classifier, real, texts, ctx)),
               "synthetic": metrics(truth, predict(ev.classifier, synthetic, texts, ctx))}
    if ev.mauve:
        out["mauve"] = fidelity.mauve_score(embedder([e.text for e in synthetic]), embedder(texts), ev.seed,
                                             ev.mauve_texts, ev.mauve_draws)["mauve"]
    return out


def run_audit_experiments(run_dir: Path, ev: EvaluationConfig, show_progress: bool = False) -> dict:
    """Train (or reuse) one canary run per epsilon in ev.audit_epsilons, sample it, attack it, score its utility."""
    from dpsynth.evaluate.classifiers import Context
    from dpsynth.evaluate.embed import Embedder
    from dpsynth.sample import load_run_config, sample
    from dpsynth.train.driver import train

    cfg = load_run_config(run_dir)
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger, create=False))
    embedder = Embedder(owner_path(run_dir, "evaluation") / "cache")
    ctx = Context(ev.seed, embedder, ev.transformer_epochs, ev.transformer_layers)
    root = owner_path(run_dir, "evaluation") / "audit"
    cert = read_certificate(Path(run_dir) / "certificate.json")
    canaries = make_canaries(ev.canary_repetitions, ev.canaries_per_repetition, list(splits.labels), ev.seed)
    data = audit_dataset(splits, canaries, root / "data.jsonl", units=cfg.data.unit_column is not None)
    points = []
    for eps in ev.audit_epsilons:
        acfg = audit_config(cfg, eps, data, root / f"eps-{eps_name(eps)}", splits.name, cert.delta, ev.audit_overrides)
        log.info("audit run eps=%s -> %s", eps_name(eps), acfg.output_dir)
        adir = train(acfg, show_progress=show_progress)
        try:
            corpus = find_corpus(adir)
        except Exception:
            corpus = sample(adir, acfg.sampling, show_progress=show_progress)
        synthetic = read_corpus(corpus, RecordSchema.of(acfg.data))
        asplits = prepare(acfg.data, ledger_secret(acfg.privacy.ledger))
        canary_texts = {r.text for c in canaries for r in c.records()}
        clean = Splits(asplits.name, tuple(e for e in asplits.train if e.text not in canary_texts),
                       tuple(e for e in asplits.validation if e.text not in canary_texts),
                       tuple(e for e in asplits.test if e.text not in canary_texts), asplits.labels, asplits.fingerprint,
                       asplits.dataset_size)
        acert = read_certificate(Path(adir) / "certificate.json")
        points.append({
            "target_epsilon": eps_name(eps), "run_dir": str(adir), "certified_epsilon": acert.epsilon,
            "noise_multiplier": acert.mechanism.noise_multiplier, "steps": acert.mechanism.steps,
            "dataset_fingerprint": acert.dataset.fingerprint, "ledger": str(acfg.privacy.ledger),
            "utility": point_utility(ev, ctx, embedder, clean, synthetic),
            "privacy": privacy_audit(adir, acfg, asplits, synthetic, embedder, ev, canaries),
        })
    return {"root": str(root), "canaries": len(canaries), "canary_records": sum(c.repetitions for c in canaries),
            "real_dataset_fingerprint": cert.dataset.fingerprint, "points": points,
            "note": ("Audit runs train on a canary-augmented copy of the real records (a different dataset fingerprint), "
                     "each with its own ledger under " + str(root / "ledgers") + "; nothing is charged to the real "
                     "dataset's budget. They do use the private records: these numbers are for the data owner, not for release.")}
