"""Records benchmark (issue 19): the bundled Rotten Tomatoes reviews as a single-label run and as records.

The records file turns the one public attribute into two, the label and a public length band (`short` / `long`,
split at a fixed 20 words), and the one text into two fields, the review's first and second half (`opening`,
`rest`). Both files carry a record id as the privacy unit, and both runs use one owner key, so their keyed splits
(hence their test sets) are the same reviews. Side by side, at the CPU demo scale (the defaults; `--set` adds
overrides to both runs):

- parse rate (generations that parsed into both fields; the rest were redrawn);
- per-attribute utility (TF-IDF, trained on synthetic / on real) against the majority rate;
- attribute fidelity (a real-trained classifier of the attribute agrees with the synthetic value);
- wall time.

    python bench/records.py --out bench/results/records.json                      # two runs, ~30 min on 2 cores
    python bench/records.py --rows 400 --set training.steps=2 --set sampling.num_examples=20 \\
        --set evaluation.zero_shot_examples=0 --work /tmp/records-smoke --out /tmp/records-smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genres import dig, dpsynth_command, git_state  # noqa: E402

LONG_WORDS = 20
"""The public length band's cut: a fixed number (a band read from the data's own median would be a private fact)."""


def build(work: Path, rows: int | None, seed: int) -> dict[str, Path]:
    """Both views of the same reviews, with a record id column (the unit)."""
    import pandas as pd

    from dpsynth.config import load_config
    from dpsynth.data import load_examples

    _, examples = load_examples(load_config(None, []).data)
    df = pd.DataFrame({"text": [e.text for e in examples], "label": [e.label for e in examples]}).drop_duplicates()
    if rows and len(df) > rows:
        df = df.sample(rows, random_state=seed)
    df = df.reset_index(drop=True)
    df["id"] = [f"r{i}" for i in range(len(df))]
    words = df["text"].str.split()
    df["length"] = ["long" if len(w) > LONG_WORDS else "short" for w in words]
    df["opening"] = [" ".join(w[: len(w) // 2]) for w in words]
    df["rest"] = [" ".join(w[len(w) // 2:]) for w in words]
    work.mkdir(parents=True, exist_ok=True)
    single, records = work / "reviews.csv", work / "reviews_records.csv"
    df[["id", "text", "label"]].to_csv(single, index=False)
    df[["id", "opening", "rest", "label", "length"]].to_csv(records, index=False)
    return {"single": single, "records": records, "rows": len(df)}


ARMS = {
    "single-label": lambda files: [f"data.source={files['single']}", "data.text_column=text", "data.label_column=label",
                                   "data.name=reviews"],
    "records": lambda files: [f"data.source={files['records']}", "data.text_columns=[opening,rest]",
                              "data.attribute_columns=[label,length]", "data.name=reviews"],
}


def read(run_dir: Path) -> dict:
    ev = json.loads((run_dir / "owner" / "evaluation.json").read_text())
    cert = json.loads((run_dir / "certificate.json").read_text())
    attrs = {c: {"synthetic": dig(a, "synthetic", "accuracy"), "real": dig(a, "real", "accuracy"),
                 "majority": dig(a, "majority_class", "accuracy"), "fidelity": a.get("fidelity")}
             for c, a in (ev.get("attributes") or {}).items()}
    if not attrs:  # the single-label run: its one attribute is the label
        attrs = {"label": {"synthetic": dig(ev, "synthetic", "accuracy"), "real": dig(ev, "real", "accuracy"),
                           "majority": dig(ev, "baselines", "majority_class", "accuracy"),
                           "fidelity": dig(ev, "fidelity", "label_fidelity", "agreement")}}
    return {"epsilon": cert["epsilon"], "steps": dig(cert, "mechanism", "steps"), "attributes": attrs,
            "parse_rate": dig(ev, "records", "parse_rate"), "mauve": dig(ev, "fidelity", "mauve", "synthetic_vs_test", "mauve"),
            "label_mix_over": dig(cert, "label_histogram", "over"), "verdict": dig(ev, "verdict", "text"),
            "test_examples": ev.get("test_examples")}


def run(arm: str, files: dict, sets: list[str], work: Path, timeout: float) -> dict:
    from dpsynth.privacy.secret import SUFFIX as KEY_SUFFIX, ledger_secret

    run_dir, ledger = work / "runs" / arm, work / "ledgers" / f"{arm}.sqlite"
    shutil.rmtree(run_dir, ignore_errors=True)
    for p in ledger.parent.glob(ledger.name + "*"):
        p.unlink()
    ledger.parent.mkdir(parents=True, exist_ok=True)
    key = work / "ledgers" / "shared.sqlite"
    ledger_secret(key)  # one owner key: the same keyed splits of the same ids in both arms
    shutil.copyfile(str(key) + KEY_SUFFIX, str(ledger) + KEY_SUFFIX)
    overrides = [*ARMS[arm](files), "data.unit_column=id", f"privacy.ledger={ledger}", *sets]
    cmd = [*dpsynth_command(), "run", "-o", str(run_dir), "--quiet", *[x for s in overrides for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    wall = round(time.perf_counter() - t0, 1)
    (work / f"{arm}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    out = {"arm": arm, "overrides": overrides, "returncode": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return out
    return {**out, **read(run_dir)}


def table(results: list[dict]) -> str:
    lines = ["| run | steps | wall | parse rate | attribute | synthetic | real | majority | attribute fidelity | MAUVE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in results:
        if r["returncode"] != 0:
            lines.append(f"| {r['arm']} | - | {r['wall_s']:.0f} s | failed: {r.get('error', '')[:80]} | | | | | | |")
            continue
        for i, (col, a) in enumerate(r["attributes"].items()):
            head = (f"| {r['arm']} | {r['steps']} | {r['wall_s']:.0f} s | {f(r['parse_rate'])} " if i == 0 else "| | | | ")
            lines.append(head + f"| {col} | {f(a['synthetic'])} | {f(a['real'])} | {f(a['majority'])} | "
                                f"{f(a['fidelity'])} | {f(r['mauve']) if i == 0 else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=0, help="a seeded subset of the reviews; 0 = all")
    ap.add_argument("--set", action="append", default=[], help="config override for both runs")
    ap.add_argument("--work", default="runs/records")
    ap.add_argument("--run-timeout", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/records.json")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "command": "python " + " ".join(sys.argv), "code": git_state(), "set": args.set}
    files = build(work / "data", args.rows or None, args.seed)
    results = []
    for arm in ARMS:
        print(f"{arm}: dpsynth run ...", flush=True)
        results.append(run(arm, files, args.set, work, args.run_timeout))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": files["rows"], "results": results}, indent=2))
    print(table(results))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
