"""Private search vs the default configuration at the same total budget: wall time and utility.

Both arms spend the same privacy.epsilon on the same dataset (separate ledgers, so neither
eats the other's budget): `default` trains once with the default C and learning rate;
`tuned` runs `dpsynth tune` (random number of trials, selection accounted). Each arm then
samples the same number of examples and is evaluated with the TF-IDF + logistic-regression
classifier on the real test split.

    python bench/tune_vs_default.py --max-examples 1500 --steps 10 --epsilon 8 --samples 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpsynth.config import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--mean-trials", type=float, default=3.0)
    ap.add_argument("--out", default="bench/results/tune_vs_default.json")
    args = ap.parse_args()

    from dpsynth.evaluate import score
    from dpsynth.data import prepare
    from dpsynth.privacy.secret import ledger_secret
    from dpsynth.sample import sample
    from dpsynth.sample import load_run_config
    from dpsynth.train.driver import train
    from dpsynth.tuning import search
    from tune.search import run_trials

    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arm in ("default", "tuned"):
            cfg = load_config(None, [f"data.subset_fraction={min(1.0, args.max_examples / 12752)}", f"training.steps={args.steps}",
                                     f"training.batch_size={args.batch}", f"privacy.epsilon={args.epsilon}",
                                     f"sampling.num_examples={args.samples}", f"tune.mean_trials={args.mean_trials}",
                                     f"privacy.ledger={tmp / arm / 'ledger.sqlite'}", f"output_dir={tmp / arm / 'run'}"])
            t0 = time.time()
            run_dir = search(cfg, runner=run_trials, show_progress=False) if arm == "tuned" else train(cfg, show_progress=False)
            t_train = time.time() - t0
            corpus = sample(run_dir, cfg.sampling, show_progress=False)
            from dpsynth.evaluate import read_corpus

            run_cfg = load_run_config(run_dir)
            splits = prepare(run_cfg.data, ledger_secret(run_cfg.privacy.ledger, create=False))
            cert = json.loads((run_dir / "certificate.json").read_text())
            mech = cert["mechanism"]
            util = score(read_corpus(corpus), list(splits.test))
            arms[arm] = {"train_or_search_wall_s": round(t_train, 1), "epsilon": cert["epsilon"], "accountant": cert["accountant"],
                         "max_grad_norm": mech.get("max_grad_norm", (mech.get("selected") or {}).get("max_grad_norm")),
                         "noise_multiplier": mech["noise_multiplier"], "trials": mech.get("trials_run", 1),
                         "synthetic_accuracy": util["accuracy"], "synthetic_macro_f1": util["macro_f1"]}
            print(arm, arms[arm], flush=True)
    out = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
           "command": "python " + " ".join(sys.argv), "args": vars(args), "arms": arms,
           "search_wall_over_default": round(arms["tuned"]["train_or_search_wall_s"] / arms["default"]["train_or_search_wall_s"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
