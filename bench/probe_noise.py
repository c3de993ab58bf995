"""How far one timing of the plan's probe step is from the next: the case for the slowest of PROBE_REPEATS.

The run plan (dpsynth.train.budget.probe) times the DP step's forward/backward on public dummy tokens of the planned
shape and scales it to the expected batch. This times that same call (budget.step_timings on budget.dummy_rows: PROBE_BATCH
rows of `--tokens` random ids after a conditioning prompt) `--repeats` times in a row, in `--rounds` rounds
`--gap` seconds apart, and reports per round: min / median / max, the first timing after the warm-up (what the plan
read before 3b2dc1d) and the slowest of the first PROBE_REPEATS (what it reads now), each relative to the round's
median, and the spread of the medians across rounds (the machine's drift, which no probe of seconds can see).

    python bench/probe_noise.py --tokens 128 --repeats 10 --rounds 3 --gap 60 --out bench/results/probe-noise.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=60.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from dpsynth.config import JobConfig
    from dpsynth.models import load_base, wrap_lora
    from dpsynth.train.budget import PROBE_BATCH, PROBE_REPEATS, dummy_rows, step_timings
    from dpsynth.train.step import DPLoRAStep

    cfg = JobConfig()
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    model, tok, _ = load_base(cfg.model, device)
    model = wrap_lora(model, cfg.lora)
    head = tok("news text, label bbc: ", add_special_tokens=False).input_ids
    rows = dummy_rows(tok, head, args.tokens, PROBE_BATCH)
    step = DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=PROBE_BATCH,
                      learning_rate=cfg.training.learning_rate)
    rounds = []
    for r in range(args.rounds):
        if r:
            time.sleep(args.gap)
        t = step_timings(step, rows, tok.pad_token_id, device, args.repeats)  # the probe's own timing, warm-up first
        med = statistics.median(t)
        rounds.append({"timings_s": t, "min": min(t), "median": med, "max": max(t), "first_over_median": t[0] / med,
                       "slowest_of_probe_over_median": max(t[:PROBE_REPEATS]) / med})
        print(f"round {r + 1}: {args.tokens} tokens x {PROBE_BATCH}: min {min(t):.2f} s, median {med:.2f}, "
              f"max {max(t):.2f}; first/median {t[0] / med:.2f}, slowest of {PROBE_REPEATS}/median "
              f"{max(t[:PROBE_REPEATS]) / med:.2f}", flush=True)
    medians = [r["median"] for r in rounds]
    print(f"medians across rounds: {min(medians):.2f} .. {max(medians):.2f} s (max/min {max(medians) / min(medians):.2f})")
    if args.out:
        args.out.write_text(json.dumps({"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                        "command": " ".join(["python", *sys.argv]), "probe_repeats": PROBE_REPEATS,
                                        "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
