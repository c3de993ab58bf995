"""Training-free DP few-shot generation on the bundled SmolLM2 + Rotten Tomatoes: tokens/s on each engine
(transformers vs vLLM, same config, one after the other) and epsilon per 100 examples; DP-LoRA for reference.

    OMP_NUM_THREADS=2 .venv/bin/python bench/incontext.py [--examples 10] [--tokens 16] [--engines transformers,vllm]
        [--dp-lora-run runs/demo]

Writes bench/results/incontext.json. Every run gets a fresh throw-away ledger: the bench never spends a real
dataset's budget. Every epsilon here is a certificate's (computed by the ledger from its charges) or the
accountant's epsilon of the same per-token events for 100 examples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dpsynth.config import load_config
from dpsynth.privacy import epsilon
from dpsynth.incontext import generate
from dpsynth.incontext.mechanism import plan_events


def dp_lora_point(run: Path) -> dict | None:
    """The DP-LoRA reference from an existing certified run: its epsilon covers any number of sampled examples."""
    if not (run / "certificate.json").is_file():
        return None
    cert = json.loads((run / "certificate.json").read_text())
    mech = cert["mechanism"]
    ev = json.loads((run / "evaluation.json").read_text()) if (run / "evaluation.json").is_file() else {}
    corpus = json.loads((run / "synthetic.jsonl.certificate.json").read_text()).get("corpus", {}) \
        if (run / "synthetic.jsonl.certificate.json").is_file() else {}
    return {"run": str(run), "certified_epsilon": cert["epsilon"], "delta": cert["delta"], "accountant": cert["accountant"],
            "dp_sgd_steps": mech["steps"], "noise_multiplier": mech["noise_multiplier"], "sampling_rate": mech["sampling_rate"],
            "synthetic_examples": corpus.get("examples"), "sampling_engine": corpus.get("engine"),
            "epsilon_per_100_examples": cert["epsilon"],  # sampling is post-processing: the same for 100 or 100,000
            "synthetic_accuracy_tfidf": (ev.get("synthetic") or {}).get("accuracy"),
            "real_accuracy_tfidf": (ev.get("real") or {}).get("accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--mechanisms", default="gaussian")
    ap.add_argument("--dp-lora-run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/incontext.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mechanism in args.mechanisms.split(","):
            for engine in args.engines.split(","):
                name = f"{mechanism}-{engine}"
                cfg = load_config(None, [
                    f"privacy.ledger={tmp}/ledger-{name}.sqlite", f"output_dir={tmp}/{name}",
                    f"privacy.epsilon={args.epsilon}", "privacy.accountant=pld", "sampling.label_proportions=uniform",
                    f"incontext.mechanism={mechanism}", f"incontext.engine={engine}", f"incontext.num_examples={args.examples}",
                    f"incontext.max_new_tokens={args.tokens}", f"incontext.groups={args.groups}",
                    f"incontext.examples_per_group={args.per_group}"])
                t0 = time.monotonic()
                run = generate(cfg, show_progress=False)
                total = time.monotonic() - t0
                cert = json.loads((run / "certificate.json").read_text())
                m = json.loads((run / "metrics.json").read_text())["incontext"]
                nm = cert["mechanism"]["noise_multiplier"]
                results.append({
                    "engine": m["engine"], "mechanism": mechanism, "accountant": "pld", "target_epsilon": args.epsilon,
                    "certified_epsilon": cert["epsilon"], "delta": cert["delta"], "noise_multiplier": nm,
                    "noise_scale_votes": cert["mechanism"]["noise_scale"], "groups_per_label": args.groups,
                    "examples_per_group": args.per_group, "examples": m["examples"], "max_new_tokens": args.tokens,
                    "tokens_released": m["tokens_released"], "token_steps_computed": m["token_steps_computed"],
                    "engine_start_s": m["engine_start_s"], "generation_s": m["wall_s"], "total_s": round(total, 2),
                    "tokens_per_s": m["tokens_per_s"], "token_steps_per_s": m["token_steps_per_s"],
                    "prompt_tokens": m.get("prompt_tokens"), "prefix_cache_hit_tokens": m.get("prefix_cache_hit_tokens"),
                    # the same per-token noise, charged for 100 examples of max_new_tokens steps each
                    "epsilon_per_100_examples_at_this_noise": epsilon(plan_events(cfg.incontext, nm, 100), cert["delta"], "pld"),
                    "samples": [json.loads(x)["text"] for x in (run / "synthetic.jsonl").read_text().splitlines()[:3]],
                })
                print(json.dumps(results[-1], indent=1), flush=True)
    command = (f"OMP_NUM_THREADS={args.threads} .venv/bin/python bench/incontext.py --examples {args.examples} --tokens "
               f"{args.tokens} --groups {args.groups} --per-group {args.per_group} --engines {args.engines} "
               f"--mechanisms {args.mechanisms} --dp-lora-run {args.dp_lora_run}")
    out = {"machine": f"{platform.machine()} 2-core CPU VM (shared), no GPU", "torch_threads": args.threads,
           "model": "smollm2-135m-instruct", "data": "rotten_tomatoes", "date": time.strftime("%Y-%m-%d"), "command": command,
           "load_average_at_end": os.getloadavg(), "results": results, "dp_lora": dp_lora_point(args.dp_lora_run)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
