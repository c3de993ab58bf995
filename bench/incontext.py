"""Training-free DP few-shot generation on the bundled SmolLM2 + Rotten Tomatoes: tokens/s and epsilon per 100 examples.

    OMP_NUM_THREADS=1 .venv/bin/python bench/incontext.py [--examples 10] [--tokens 16]

Writes bench/results/incontext.json. A fresh throw-away ledger: the bench never spends a real dataset's budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dpsynth.config import load_config
from dpsynth.privacy import epsilon
from dpsynth.sample.incontext import generate, plan_events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mechanism, accountant in (("gaussian", "pld"), ("laplace", "pld")):
            cfg = load_config(None, [
                f"privacy.ledger={tmp}/ledger-{mechanism}.sqlite", f"output_dir={tmp}/{mechanism}",
                f"privacy.epsilon={args.epsilon}", f"privacy.accountant={accountant}", "sampling.label_proportions=uniform",
                f"incontext.mechanism={mechanism}", f"incontext.num_examples={args.examples}",
                f"incontext.max_new_tokens={args.tokens}", f"incontext.groups={args.groups}",
                f"incontext.examples_per_group={args.per_group}"])
            t0 = time.monotonic()
            run = generate(cfg, show_progress=False)
            total = time.monotonic() - t0
            cert = json.loads((run / "certificate.json").read_text())
            m = json.loads((run / "metrics.json").read_text())["incontext"]
            nm = cert["noise_multiplier"]
            results.append({
                "mechanism": mechanism, "accountant": accountant, "target_epsilon": args.epsilon,
                "certified_epsilon": cert["epsilon"], "delta": cert["delta"], "noise_multiplier": nm,
                "noise_scale_votes": cert["noise_scale"], "groups_per_label": args.groups, "examples_per_group": args.per_group,
                "examples": m["examples"], "max_new_tokens": args.tokens, "tokens_released": m["tokens_released"],
                "token_steps_computed": m["token_steps_computed"], "generation_s": m["wall_s"], "total_s": round(total, 2),
                "tokens_per_s": m["tokens_per_s"], "token_steps_per_s": m["token_steps_per_s"],
                # the same per-token noise, charged for 100 examples of max_new_tokens steps each
                "epsilon_per_100_examples_at_this_noise": epsilon(plan_events(cfg.incontext, nm, 100), cert["delta"], accountant),
                "samples": [json.loads(x)["text"] for x in (run / "synthetic.jsonl").read_text().splitlines()[:4]],
            })
            print(json.dumps(results[-1], indent=1))
    out = {"machine": f"{platform.machine()} {platform.processor() or ''} 2-core CPU VM (shared)", "torch_threads": args.threads,
           "model": "smollm2-135m-instruct (fp32)", "data": "rotten_tomatoes", "engine": "transformers (KV cache)",
           "date": "2026-11-23", "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/incontext.py " +
           f"--examples {args.examples} --tokens {args.tokens} --groups {args.groups} --per-group {args.per_group}",
           "results": results}
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/incontext.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
