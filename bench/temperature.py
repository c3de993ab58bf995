"""Sampling temperature side by side on one certified adapter: MAUVE, out-of-genre share and label signal.

Temperature is post-processing of the adapter, so one trained run (made by bench/genres.py) is resampled at each
temperature through the real CLI, `dpsynth sample RUN --set sampling.temperature=T`, then `dpsynth evaluate RUN`;
each evaluation is copied aside before the next temperature. Every temperature sees the same adapter, the same
test split and the same seed, so the differences are the temperature's alone (and MAUVE's sampling noise: compare
against the spread between seeds, `--seeds`). The run's corpus is resampled last at its configured temperature, seed
0 (with the same --set overrides), unless that was the last one drawn.

    python bench/genres.py --corpora sms --variant described --set training.time_budget=15m --work runs/genres
    python bench/temperature.py --work runs/genres --runs sms-described --temperatures 0.6,0.7,0.8 \\
        --out bench/results/temperature.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genres import dpsynth_command, git_state, log, read_results  # noqa: E402

from dpsynth.sample import load_run_config  # noqa: E402


def cli(args: list[str], log_file: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([*dpsynth_command(), *args], capture_output=True, text=True, check=False)
    with log_file.open("a") as f:
        f.write(f"$ dpsynth {' '.join(args)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise SystemExit(f"dpsynth {args[0]} failed (exit {proc.returncode}): {lines[-1] if lines else ''} (log: {log_file})")
    return time.perf_counter() - t0


def one(run_dir: Path, ledger: Path, temperature: float, seed: int, log_file: Path, extra: list[str]) -> dict:
    sets = ["--set", f"sampling.temperature={temperature}", "--set", f"sampling.seed={seed}"]
    sample = [x for s in extra if s.startswith("sampling.") for x in ("--set", s)]
    evaluate = [x for s in extra if s.startswith("evaluation.") for x in ("--set", s.removeprefix("evaluation."))]
    sample_s = cli(["sample", str(run_dir), "--quiet", "--ledger", str(ledger), *sets, *sample], log_file)
    evaluate_s = cli(["evaluate", str(run_dir), "--quiet", *evaluate], log_file)
    res = read_results(run_dir)
    shutil.copyfile(run_dir / "owner" / "evaluation.json", run_dir / "owner" / f"evaluation-t{temperature:g}-s{seed}.json")
    return {"temperature": temperature, "seed": seed, "sample_s": round(sample_s, 1), "evaluate_s": round(evaluate_s, 1),
            **{k: res[k] for k in ("mauve", "out_of_genre_share", "label_fidelity", "utility", "majority",
                                    "zero_shot_floor", "synthetic_examples", "verdict", "samples")}}


def table(rows: list[dict]) -> str:
    def acc(r, clf):
        return (r["utility"].get(clf) or {}).get("synthetic")

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    out = ["| run | temperature | seed | texts | out-of-genre | MAUVE | label fidelity | TF-IDF | MiniLM | majority |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        oog = "-" if r["out_of_genre_share"] is None else f"{100 * r['out_of_genre_share']:.1f} %"
        out.append(f"| {r['run']} | {r['temperature']:g} | {r['seed']} | {r['synthetic_examples']} | {oog} | "
                   f"{f(r['mauve'])} | {f(r['label_fidelity'])} | {f(acc(r, 'tfidf_logreg'))} | "
                   f"{f(acc(r, 'minilm_logreg'))} | {f(r['majority'])} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/genres"), help="bench/genres.py's work dir")
    ap.add_argument("--runs", required=True, help="comma-separated run names under WORK/runs (corpus-variant)")
    ap.add_argument("--temperatures", default="0.6,0.7,0.8")
    ap.add_argument("--seeds", default="0", help="comma-separated sampling seeds (MAUVE's spread between seeds)")
    ap.add_argument("--set", action="append", default=[], help="sampling.* or evaluation.* override (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/temperature.json"))
    args = ap.parse_args()
    temps = [float(t) for t in args.temperatures.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    doc = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
           "command": "python " + " ".join(sys.argv), "code": git_state(), "rows": []}
    for name in args.runs.split(","):
        run_dir, ledger = args.work / "runs" / name, args.work / "ledgers" / f"{name}.sqlite"
        if not (run_dir / "certificate.json").is_file():
            raise SystemExit(f"--runs: {run_dir} is not a finished run (make it with bench/genres.py first)")
        configured = load_run_config(run_dir).sampling.temperature
        log_file = args.work / "logs" / f"{name}-temperature.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for t in temps:
                log(f"{name}: temperature {t:g}, seed {seed} ...")
                doc["rows"].append({"run": name, **one(run_dir, ledger, t, seed, log_file, args.set)})
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(doc, indent=1))
        if (temps[-1], seeds[-1]) != (configured, 0):  # leave the run's corpus as `dpsynth run` made it
            one(run_dir, ledger, configured, 0, log_file, args.set)
    print(table(doc["rows"]))


if __name__ == "__main__":
    main()
