"""Utility of the synthetic corpus against its baselines, one table, one run.

Rows, all scored on the same real test split:
  real            classifiers trained on the real train split (the ceiling)
  majority        the constant classifier (the chance line)
  zero-shot       the base model with the Prefix-LM prefix and no training (no private data), with and without
                  label sharpening (scored by the base model)
  eps=E           DP-LoRA at each epsilon in --eps (inf = no noise), with and without label sharpening
  DP-direct eps=E the classifiers trained with DP-SGD directly on the real data at the same epsilon
Columns: accuracy and macro-F1 of TF-IDF + logistic regression and of MiniLM + logistic regression, label
fidelity (a real-trained TF-IDF classifier agreeing with the synthetic label) and MAUVE vs the real test split.

The generator is trained by the production DP step (dpsynth.train.step.DPLoRAStep, Poisson batches, sigma
calibrated by dpsynth.privacy to the target epsilon including the DP label histogram) in this process: no Ray, no
ledger, no vLLM, so the same script runs on a bare GPU box with torch, transformers, peft, opacus and scikit-learn.
Columns whose packages are missing there (MiniLM, MAUVE) print as "-".

    python bench/utility.py --preset cpu-demo --eps 1,8,inf --json bench/results/utility-cpu.json
    python bench/utility.py --preset gpu --eps 1,8,inf --json bench/results/utility-gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from datetime import date

import numpy as np


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def optional_embedder():
    try:
        from dpsynth.evaluate.embed import Embedder, model_dir

        model_dir()
        import sentence_transformers  # noqa: F401

        return Embedder()
    except Exception as e:  # a bare GPU box: no MiniLM package
        log(f"MiniLM columns off ({type(e).__name__}: {e})")
        return None


def score_corpus(train, test, real_fidelity_clf, embedder, test_emb, seed: int = 0) -> dict:
    """Classifier accuracy / macro-F1 on the real test split, label fidelity and MAUVE of one training set."""
    from dpsynth.evaluate.classifiers import Context, metrics, predict

    truth, texts = [e.label for e in test], [e.text for e in test]
    ctx = Context(seed, embedder)
    out = {"examples": len(train)}
    for name in ("tfidf_logreg", "minilm_logreg"):
        if name == "minilm_logreg" and embedder is None:
            continue
        m = metrics(truth, predict(name, train, texts, ctx))
        out[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
    if real_fidelity_clf is not None:
        pred = real_fidelity_clf.predict([e.text for e in train])
        out["label_fidelity"] = float(np.mean([p == e.label for p, e in zip(pred, train)]))
    if embedder is not None and test_emb is not None:
        try:
            from dpsynth.evaluate.fidelity import mauve_score

            out["mauve"] = mauve_score(embedder([e.text for e in train]), test_emb, seed)["mauve"]
        except ImportError:
            pass
    return out


def generate_and_sharpen(model, tok, prompts, counts, sampling, max_length):
    """(candidates in generation order, sharpened corpus): the production sampler and sharpener."""
    import torch

    from dpsynth.data import Example
    from dpsynth.sample import TransformersEngine, generate_corpus
    from dpsynth.sample.sharpen import candidates_needed, sharpen

    torch.manual_seed(sampling.seed)
    wanted = {lab: candidates_needed(c, sampling.keep_rate) for lab, c in counts.items()}
    rows = generate_corpus(TransformersEngine(model, tok), prompts, wanted, sampling, show_progress=False)
    kept, stats = sharpen(model, tok, rows, counts, prompts, {lab: 1.0 for lab in counts}, max_length)
    taken: Counter = Counter()
    plain = []
    for r in rows:  # what sampling without sharpening would have released: the first counts[label] per label
        if taken[r["label"]] < counts[r["label"]]:
            plain.append(Example(r["text"], r["label"]))
            taken[r["label"]] += 1
    return plain, [Example(r["text"], r["label"]) for r in kept], stats


def exact_lengths(cfg, splits):
    """`auto` lengths from the exact length distribution of the train split. This script is an experiment, not a
    release: a real run reads the distribution through its DP length histogram (dpsynth.data_releases)."""
    from dpsynth.data_releases import resolve_lengths
    from dpsynth.lengths import bin_of, text_lengths
    from dpsynth.models import load_tokenizer, model_context

    tok = load_tokenizer(cfg.model)
    lengths = text_lengths(tok, [ex.text for ex in splits.train])
    shares = {k: v / len(lengths) for k, v in Counter(bin_of(n) for n in lengths).items()}
    resolved, _ = resolve_lengths(cfg, splits, tok, shares, model_context(cfg.model))
    return resolved


def train_generator(cfg, splits, eps, delta):
    """DP-LoRA (or, for eps=inf, the same non-private step) on the train split; returns (model, tok, info)."""
    import torch

    from dpsynth.config import load_config
    from dpsynth.prompts import label_prompt
    from dpsynth.models import load_base, resolve_device, wrap_lora
    from dpsynth.prefixlm import collate, encode
    from dpsynth.privacy.sampling import poisson_batches
    from dpsynth.train.plan import plan_training
    from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, auto_micro_batch_size

    device = resolve_device("auto")
    torch.manual_seed(cfg.training.seed)
    model, tok, _ = load_base(cfg.model, device)
    model = wrap_lora(model, cfg.lora)
    n = len(splits.train)
    private = math.isfinite(eps)
    run_cfg = load_config(None, [f"privacy.epsilon={eps if private else 1.0}"], base=cfg.model_dump(mode="json"))
    tp = plan_training(run_cfg, n, delta)  # the production plan: label histogram + DP-SGD, one calibrator
    sigma, q, steps = tp.sigma, tp.schedule.q, tp.schedule.steps
    micro = cfg.training.micro_batch_size
    micro = auto_micro_batch_size(model, device, cfg.model.max_length, cfg.training.batch_size) if micro == "auto" else micro
    if private:
        step = DPLoRAStep(model, noise_multiplier=sigma, max_grad_norm=cfg.training.max_grad_norm,
                          expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                          micro_batch_size=micro)
    else:
        step = PlainLoRAStep(model, expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                             micro_batch_size=micro)
    encoded = [encode(tok, label_prompt(cfg, tok, splits.name, ex.label), ex.text, cfg.model.max_length)
               for ex in splits.train]
    t0 = time.perf_counter()
    for i, idx in enumerate(poisson_batches(n, q, steps), start=1):
        loss = step(collate([encoded[j] for j in idx], tok.pad_token_id, device))
        if i % 20 == 0 or i == steps:
            log(f"eps={eps}: step {i}/{steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return model, tok, {"sigma": sigma if private else 0.0, "q": q, "steps": steps, "train_s": time.perf_counter() - t0,
                        "micro_batch": micro, "epsilon": tp.plan.epsilon if private else math.inf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--eps", default="1,8,inf")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. training.steps=50")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from dpsynth.config import load_config
    from dpsynth.data import prepare
    from dpsynth.prompts import label_prompts
    from dpsynth.privacy.secret import ledger_secret
    from dpsynth.evaluate.classifiers import Context, dp_predict, metrics, tfidf_logreg
    from dpsynth.evaluate.utility import majority_class
    from dpsynth.models import load_base, resolve_device
    from dpsynth.sample import label_counts
    from dpsynth.privacy.run import default_delta

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = load_config(None, args.set, preset=args.preset)
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger))
    cfg = exact_lengths(cfg, splits)
    log(f"lengths: max_length {cfg.model.max_length}, max_new_tokens {cfg.sampling.max_new_tokens}")
    train, test = list(splits.train), list(splits.test)
    delta = cfg.privacy.delta or default_delta(splits.dataset_size)
    embedder = optional_embedder()
    test_emb = embedder([e.text for e in test]) if embedder is not None else None
    real_clf = tfidf_logreg(0).fit([e.text for e in train], [e.label for e in train])
    results: dict = {"majority": majority_class(test)}
    log(f"{splits.name}: {len(train)} train, {len(test)} test, majority {results['majority']['accuracy']:.3f}")
    results["real"] = score_corpus(train, test, real_clf, embedder, test_emb)
    counts = label_counts(splits.labels, {lab: 1.0 for lab in splits.labels}, cfg.sampling.num_examples)
    log("zero-shot floor: the base model, no training")
    base, tok, _ = load_base(cfg.model, resolve_device("auto"))
    prompts = label_prompts(cfg, tok, splits.name, splits.labels)
    base.eval()
    t0 = time.perf_counter()
    plain, kept, stats = generate_and_sharpen(base, tok, prompts, counts, cfg.sampling, cfg.model.max_length)
    results["zero_shot"] = {"plain": score_corpus(plain, test, real_clf, embedder, test_emb),
                            "sharpened": score_corpus(kept, test, real_clf, embedder, test_emb),
                            "sample_s": time.perf_counter() - t0, "adapter_agrees": stats["adapter_agrees"]}
    del base
    truth, texts = [e.label for e in test], [e.text for e in test]
    for eps in [float(e) for e in args.eps.split(",")]:
        name = "inf" if math.isinf(eps) else f"{eps:g}"
        log(f"eps={name}: training")
        model, tok, info = train_generator(cfg, splits, eps, delta)
        t0 = time.perf_counter()
        plain, kept, stats = generate_and_sharpen(model, tok, prompts, counts, cfg.sampling, cfg.model.max_length)
        row = {**info, "sample_and_sharpen_s": time.perf_counter() - t0, "adapter_agrees": stats["adapter_agrees"],
               "plain": score_corpus(plain, test, real_clf, embedder, test_emb),
               "sharpened": score_corpus(kept, test, real_clf, embedder, test_emb)}
        if math.isfinite(eps):
            direct = {}
            for clf in ("tfidf_logreg", "minilm_logreg"):
                if clf == "minilm_logreg" and embedder is None:
                    continue
                pred, dp_info = dp_predict(clf, train, texts, target_epsilon=eps, delta=delta,
                                           accountant=cfg.privacy.accountant, ctx=Context(0, embedder),
                                           epochs=cfg.evaluation.dp_baseline_epochs,
                                           batch_size=cfg.evaluation.dp_baseline_batch_size)
                direct[clf] = metrics(truth, pred)
            row["dp_direct"] = direct
        results[f"eps={name}"] = row
        log(f"eps={name}: {json.dumps({k: row[k] for k in ('plain', 'sharpened')})}")
        del model

    def cells(r: dict) -> list[str]:
        f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        t, m = r.get("tfidf_logreg", {}), r.get("minilm_logreg", {})
        return [f(t.get("accuracy")), f(t.get("macro_f1")), f(m.get("accuracy")), f(m.get("macro_f1")),
                f(r.get("label_fidelity")), f(r.get("mauve"))]

    lines = ["| source | TF-IDF acc | TF-IDF F1 | MiniLM acc | MiniLM F1 | label fidelity | MAUVE |", "|---|---|---|---|---|---|---|"]
    lines.append("| real data | " + " | ".join(cells(results["real"])) + " |")
    lines.append(f"| majority class | {results['majority']['accuracy']:.3f} | | | | | |")
    for key in [k for k in results if k == "zero_shot" or k.startswith("eps=")]:
        label = "zero-shot (no training)" if key == "zero_shot" else f"DP-LoRA {key}"
        lines.append(f"| {label} | " + " | ".join(cells(results[key]["plain"])) + " |")
        lines.append(f"| {label}, sharpened | " + " | ".join(cells(results[key]["sharpened"])) + " |")
        for clf, m in results[key].get("dp_direct", {}).items():
            lines.append(f"| DP-SGD on real data, {key} ({clf}) | " +
                         (f"{m['accuracy']:.3f} | {m['macro_f1']:.3f} | | |" if clf == "tfidf_logreg"
                          else f" | | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |") + " | |")
    print("\n".join(lines))
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "device": str(resolve_device("auto")) + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            "preset": args.preset, "overrides": args.set, "dataset": splits.name, "train": len(train), "test": len(test),
            "delta": delta, "wall_s": round(time.perf_counter() - t_start, 1), "command": "python " + " ".join(sys.argv)}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results, "table": lines}, fh, indent=2)


if __name__ == "__main__":
    main()
