"""A long-document run through `dpsynth run`, as a user would do it, and what came out: the lengths the run chose
from the data (`auto`), how much it cut, the planned tokens per step, the wall time of each phase, and the length
fidelity of the corpus (KS distance, mean and 95th-percentile words, real vs synthetic).

The bundled corpora are short (critic snippets, tweets), so the long documents are made from them: consecutive
snippets of the same label joined into one "review" of 4 to 24 snippets (about 90 to 530 words), so the lengths vary
the way letters or notes do. Everything runs through the real CLI, ledger and evaluation (a throw-away ledger).

    python bench/long_documents.py --docs 1200 --steps 12 --samples 60 --json bench/results/long_documents.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def make_corpus(path: Path, docs: int, seed: int) -> dict:
    from dpsynth.config import load_config
    from dpsynth.data import prepare
    from dpsynth.privacy.secret import ledger_secret

    base_cfg = load_config(None, [])
    splits = prepare(base_cfg.data, ledger_secret(base_cfg.privacy.ledger))
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for ex in splits.train:
        by_label.setdefault(ex.label, []).append(ex.text)
    rows, cursor = [], {lab: 0 for lab in by_label}
    for i in range(docs):
        lab = sorted(by_label)[i % len(by_label)]
        k = int(rng.integers(4, 25))
        pool = by_label[lab]
        start = cursor[lab] % len(pool)
        cursor[lab] += k
        rows.append({"text": " ".join(pool[(start + j) % len(pool)] for j in range(k)), "label": lab})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = np.array([len(r["text"].split()) for r in rows])
    return {"docs": docs, "words_mean": float(words.mean()), "words_p95": float(np.percentile(words, 95)),
            "words_max": int(words.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="more config overrides")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpsynth-long-"))
    corpus = make_corpus(work / "long.jsonl", args.docs, args.seed)
    run_dir = work / "run"
    sets = [f"data.source={work / 'long.jsonl'}", "data.name=reviews", f"privacy.ledger={work / 'ledger.sqlite'}",
            f"privacy.epsilon={args.epsilon}", f"training.steps={args.steps}", f"training.batch_size={args.batch}",
            f"sampling.num_examples={args.samples}", "sampling.batch_size=32", "evaluation.classifiers=[tfidf_logreg]",
            "evaluation.dp_baseline=false", "evaluation.tuning=false", "evaluation.zero_shot_examples=0",
            "evaluation.attack_examples=32", *args.set]
    cmd = [sys.executable, "-m", "dpsynth", "run", "--quiet", "-o", str(run_dir), *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"dpsynth run failed: {proc.stderr.strip().splitlines()[-1]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ev = json.loads((run_dir / "evaluation.json").read_text())
    cert = json.loads((run_dir / "certificate.json").read_text())
    log = (run_dir / "dpsynth.log").read_text() if (run_dir / "dpsynth.log").exists() else ""
    planned = [line for line in log.splitlines() if "planned about" in line or "estimate" in line.lower()]
    lf = ev["fidelity"]["lengths"]
    result = {"corpus": corpus, "lengths": metrics["lengths"], "certificate_lengths": cert.get("lengths"),
              "length_fidelity": {k: v for k, v in lf.items() if "histogram" not in k and k != "bins"},
              "epsilon": cert["epsilon"], "wall_s": round(wall, 1), "planned_log": planned[:2],
              "synthetic_accuracy": ev["synthetic"]["accuracy"], "real_accuracy": ev["real"]["accuracy"]}
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "command": "python " + " ".join(sys.argv), "overrides": sets[2:]}
    print(f"corpus: {corpus['docs']} docs, {corpus['words_mean']:.0f} words mean, p95 {corpus['words_p95']:.0f}")
    print(f"lengths: {metrics['lengths']}")
    print("| | real test | synthetic |\n|---|---|---|")
    print(f"| words, mean | {lf['real_words_mean']:.0f} | {lf['synthetic_words_mean']:.0f} |")
    print(f"| words, 95th percentile | {lf['real_words_p95']:.0f} | {lf['synthetic_words_p95']:.0f} |")
    print(f"KS distance {lf['ks']:.3f} (p={lf['ks_p_value']:.2g}); eps {cert['epsilon']:.3f}; wall {wall:.0f} s")
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "result": result}, fh, indent=2)


if __name__ == "__main__":
    main()
