"""How much of a low MAUVE is the text window? Real texts cut to the model's window, against real texts in full.

A run with `model.max_length=128` trains on (and samples) the first ~89 tokens of each text, while MAUVE compares
the corpus with whole real texts (MiniLM reads their first 128 wordpieces). If the cut alone lowered MAUVE, a short
window would be punished for its length, not its content. Two disjoint seeded halves of a bench/genres.py corpus:
A scored against B, with A in full (the ceiling), cut to the window, and cut and framed the way the synthetic news
texts open ("A recent story from Aljazeera states that ..."); then, with --run, that run's synthetic corpus against
B in full and B cut. Every score is fidelity.mauve_score, the evaluation's own (the fixed-size mean ± sd over draws
and the all-texts value). No model is trained: a minute on 2 cores.

    python bench/genres.py --corpora news --variant described --set training.time_budget=15m \\
        --set model.max_length=128 --work runs/genres
    python bench/mauve_window.py --corpus news --tokens 89 --run runs/genres/runs/news-described \\
        --out bench/results/mauve-window.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genres import CORPORA, git_state, log, package_dir  # noqa: E402

from dpsynth.config import ModelConfig  # noqa: E402
from dpsynth.evaluate import fidelity  # noqa: E402
from dpsynth.evaluate.embed import Embedder  # noqa: E402
from dpsynth.models import load_tokenizer  # noqa: E402
from dpsynth.evaluate.corpora import read_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="news", choices=sorted(CORPORA))
    ap.add_argument("--tokens", type=int, default=89, help="the window: text tokens of the bundled model's tokenizer")
    ap.add_argument("--texts", type=int, default=300, help="real texts on each side (A and B, disjoint)")
    ap.add_argument("--run", type=Path, help="a bench/genres.py run of this corpus: its synthetic.jsonl is scored too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    corpus = CORPORA[args.corpus]
    rows = corpus.read(package_dir(corpus, install=True) / corpus.file)
    order = np.random.default_rng(args.seed).permutation(len(rows))
    a = [rows[i] for i in order[: args.texts]]
    b = [rows[i][0] for i in order[args.texts : 2 * args.texts]]
    tok = load_tokenizer(ModelConfig())

    def cut(text: str) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][: args.tokens]).strip()

    embed = Embedder()
    b_full, b_cut = embed(b), embed([cut(t) for t in b])
    sets = {"real A, full": [t for t, _ in a], f"real A, first {args.tokens} tokens": [cut(t) for t, _ in a],
            f"real A, first {args.tokens} tokens, framed": [f"A recent story from {lab.title()} states that {cut(t)}"
                                                            for t, lab in a]}
    if args.run:
        sets["synthetic (the run's corpus)"] = [ex.text for ex in read_corpus(args.run / "synthetic.jsonl")]
    results = []
    for name, texts in sets.items():
        emb = embed(texts)
        row = {"set": name, "texts": len(texts), "words_mean": float(np.mean([len(t.split()) for t in texts])),
               "vs_real_B_full": fidelity.mauve_score(emb, b_full, args.seed),
               "vs_real_B_cut": fidelity.mauve_score(emb, b_cut, args.seed)}
        log(f"{name}: {row['vs_real_B_full']['mauve']:.3f} vs B full, {row['vs_real_B_cut']['mauve']:.3f} vs B cut")
        results.append(row)

    f = lambda r: f"{r['mauve']:.3f} ± {r['sd']:.3f} (all texts {r['all_texts']['mauve']:.3f})"  # noqa: E731
    lines = [f"| set | texts | words mean | MAUVE vs real B, full | MAUVE vs real B, first {args.tokens} tokens |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['texts']} | {r['words_mean']:.0f} | {f(r['vs_real_B_full'])} | {f(r['vs_real_B_cut'])} |"
              for r in results]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, "
                                    f"{os.cpu_count()} cores", "code": git_state(),
                                    "command": " ".join(sys.argv), "corpus": args.corpus, "tokens": args.tokens,
                                    "results": results, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
