"""DP-LoRA step vs the same non-private LoRA step: time and peak memory, side by side.

Each measurement runs in a fresh subprocess (peak RSS is per process) and the modes are
interleaved (plain, dp, plain, dp, ...) so machine noise hits both alike. Needs only
torch + transformers + peft + opacus (no Ray, no vLLM).

    python bench/dp_step.py --batch 16 --steps 10 --repeats 2 --modes plain,hooks,ghost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date


def worker(mode: str, batch_size: int, steps: int, max_length: int, threads: int) -> dict:
    import torch

    from dpsynth.config import LoraConfig, ModelConfig
    from dpsynth.data import format_prefix, prepare
    from dpsynth.config import DataConfig
    from dpsynth.models import load_base, wrap_lora
    from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, collate, encode, per_example_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = load_base(ModelConfig())
    model = wrap_lora(model.to(device), LoraConfig())  # to(device) before LoRA: opacus issue 820
    splits = prepare(DataConfig())
    examples = [encode(tok, format_prefix("[{dataset}][{label}]: ", splits.name, ex.label), ex.text, max_length)
                for ex in splits.train[: batch_size * (steps + 2)]]
    batches = [collate(examples[i * batch_size:(i + 1) * batch_size], tok.pad_token_id, device) for i in range(steps + 2)]
    if mode == "plain":
        step = PlainLoRAStep(model, expected_batch_size=batch_size, learning_rate=1e-3)
    elif mode == "ghost":
        step = GhostStep(model, batch_size)
    else:
        step = DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
                          learning_rate=1e-3, grad_sample_mode=mode)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for i, batch in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        step(batch)
        sync()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    out = {"mode": mode, "median_step_s": statistics.median(times), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "rss_after_load_gib": rss_loaded, "tokens_per_batch": int(sum(b.attention_mask.sum() for b in batches) / len(batches)),
           "device": device}
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class GhostStep:
    """Opacus ghost clipping (fast gradient clipping) through PrivacyEngine, for comparison only."""

    def __init__(self, model, batch_size: int):
        import torch
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from dpsynth.train.step import trainable

        model.train()
        self.module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", use_ghost_clipping=True)
        self.optimizer = DPOptimizerFastGradientClipping(torch.optim.AdamW(trainable(model), lr=1e-3), noise_multiplier=1.0,
                                                         max_grad_norm=1.0, expected_batch_size=batch_size, loss_reduction="mean")
        criterion = _PerExample()
        criterion.model = self.module
        self.loss = DPLossFastGradientClipping(self.module, self.optimizer, criterion, loss_reduction="mean")

    def __call__(self, batch):
        loss = self.loss(batch, None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _PerExample:
    """Criterion adapter: DPLossFastGradientClipping wants criterion(input, target) with reduction='none'."""

    reduction = "mean"  # DPLossFastGradientClipping switches it to "none" around each call

    def __init__(self):
        self.model = None

    def __call__(self, batch, _target):
        from dpsynth.train.step import per_example_loss

        return per_example_loss(self.model, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per mode")
    ap.add_argument("--modes", default="plain,hooks")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps, args.max_length, args.threads)))
        return
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in modes:
            cmd = [sys.executable, __file__, "--worker", m, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--max-length", str(args.max_length), "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            runs[m].append(res)
            print(f"round {r + 1} {m}: {res['median_step_s']:.3f} s/step, peak RSS {res['peak_rss_gib']:.2f} GiB", file=sys.stderr)
    base_t = statistics.median(x["median_step_s"] for x in runs["plain"])
    base_m = statistics.median(x["peak_rss_gib"] for x in runs["plain"])
    rows = []
    for m in modes:
        t = statistics.median(x["median_step_s"] for x in runs[m])
        mem = statistics.median(x["peak_rss_gib"] for x in runs[m])
        row = {"mode": m, "step_s": round(t, 3), "time_ratio": round(t / base_t, 3), "peak_rss_gib": round(mem, 2),
               "memory_ratio": round(mem / base_m, 3), "tokens_per_batch": runs[m][0]["tokens_per_batch"]}
        if "peak_gpu_gib" in runs[m][0]:
            row["peak_gpu_gib"] = round(statistics.median(x["peak_gpu_gib"] for x in runs[m]), 3)
        rows.append(row)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "device": runs["plain"][0]["device"], "batch": args.batch, "steps": args.steps, "max_length": args.max_length,
            "repeats": args.repeats, "threads": args.threads, "command": "python " + " ".join(sys.argv)}
    print("| mode | step (s) | DP/plain time | peak RSS (GiB) | DP/plain memory |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['step_s']} | {row['time_ratio']} | {row['peak_rss_gib']} | {row['memory_ratio']} |")
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
