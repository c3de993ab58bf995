"""The DP-LoRA step vs the same non-private step, and vs the step as it was before the lean rewrite.

Modes (each measured in its own fresh process, interleaved round by round so machine noise hits all alike):
  plain       non-private LoRA step (the reference for the DP overhead)
  dp          the production DP step: bf16 frozen base where native (model.dtype auto), loss and head only at the
              loss positions, micro-batches of `--micro` (auto: from free memory on a GPU, 32 on a CPU)
  dp-legacy   the DP step as it was: float32 base, full-vocabulary logits at every position, one-shot batch
  plain-legacy  the non-private step the same way

Reports seconds per step, samples/s, peak memory (GPU: allocated; CPU: RSS), DP/plain ratios and the speed-up
over the legacy step at the same batch. Needs only torch + transformers + peft + opacus (no Ray, no vLLM), so it
runs on a bare GPU box.

    python bench/dp_step.py --batch 16,64 --steps 6 --repeats 2                      # CPU
    python bench/dp_step.py --batch 64,256,1024 --steps 10 --repeats 2 --preset gpu   # one GPU
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

MODES = ("plain", "dp", "dp-legacy", "plain-legacy")


def _filled(texts: list[str], tok, max_length: int) -> list[str]:
    """Long documents from short ones: consecutive texts joined until each reaches max_length tokens."""
    out, i = [], 0
    while i < len(texts):
        parts = []
        while i < len(texts) and len(tok(" ".join(parts)).input_ids) < max_length:
            parts.append(texts[i])
            i += 1
        out.append(" ".join(parts))
    return out


def worker(mode: str, batch_size: int, steps: int, max_length: int, threads: int, preset: str | None, micro: str,
           fill: bool = False) -> dict:
    import torch

    import dpsynth.prefixlm as prefixlm
    from dpsynth.config import load_config
    from dpsynth.data import prepare
    from dpsynth.prompts import label_prompt
    from dpsynth.privacy.secret import ledger_secret
    from dpsynth.models import load_base, resolve_device, wrap_lora
    from dpsynth.prefixlm import collate, encode
    from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, auto_micro_batch_size

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    legacy = mode.endswith("-legacy")
    cfg = load_config(None, ["model.dtype=float32"] if legacy else [], preset=preset)
    device = resolve_device("auto")
    if legacy:
        prefixlm.lean_head = lambda model: None  # full-vocabulary logits at every position, as before
    model, tok, _ = load_base(cfg.model, device)
    model = wrap_lora(model, cfg.lora)
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger))
    need = batch_size * (steps + 2)
    pool = list(splits.train) * (need // len(splits.train) + 1)
    texts = [ex.text for ex in pool]
    if fill:
        texts = _filled(texts[:need * (max_length // 16 + 1)], tok, max_length)
    examples = [encode(tok, label_prompt(cfg, tok, splits.name, ex.label), text, max_length)
                for ex, text in zip(pool[:need], texts[:need], strict=True)]
    batches = [collate(examples[i * batch_size:(i + 1) * batch_size], tok.pad_token_id, device) for i in range(steps + 2)]
    if legacy:
        size = None
    elif micro == "auto":
        size = auto_micro_batch_size(model, device, max_length, batch_size)
    else:
        size = int(micro)
    if mode.startswith("plain"):
        step = PlainLoRAStep(model, expected_batch_size=batch_size, learning_rate=1e-3, micro_batch_size=size)
    else:
        step = DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
                          learning_rate=1e-3, micro_batch_size=size)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, batch in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        step(batch)
        sync()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    out = {"mode": mode, "batch": batch_size, "median_step_s": t, "samples_per_s": batch_size / t, "micro_batch": size,
           "dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype).replace("torch.", ""),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "device": str(device),
           "tokens_per_batch": int(sum(b.attention_mask.sum() for b in batches) / len(batches))}
    if cuda:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run_one(mode: str, batch: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--batch", str(batch), "--steps", str(args.steps), "--max-length",
           str(args.max_length), "--threads", str(args.threads), "--micro", args.micro]
    if args.preset:
        cmd += ["--preset", args.preset]
    if args.fill:
        cmd += ["--fill"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"mode": mode, "batch": batch, "error": tail}  # e.g. out of memory: a result, not a crash
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="16,64", help="comma-separated logical batch sizes")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per mode")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--preset", default=None, help="model/LoRA settings of a preset (e.g. gpu); default: the defaults")
    ap.add_argument("--micro", default="auto", help="micro-batch size of the new step (auto or a number)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fill", action="store_true", help="join texts so every example is --max-length tokens (long documents)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, int(args.batch), args.steps, args.max_length, args.threads, args.preset,
                                args.micro, args.fill)))
        return
    modes, batches = args.modes.split(","), [int(b) for b in args.batch.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {(m, b): [] for b in batches for m in modes}
    for r in range(args.repeats):
        for b in batches:
            for m in modes:
                res = run_one(m, b, args)
                runs[(m, b)].append(res)
                msg = res.get("error") or f"{res['median_step_s']:.3f} s/step, {res['samples_per_s']:.1f} samples/s"
                print(f"round {r + 1} batch {b} {m}: {msg}", file=sys.stderr, flush=True)

    def med(m: str, b: int, key: str):
        vals = [x[key] for x in runs.get((m, b), []) if key in x]
        return statistics.median(vals) if vals else None

    rows = []
    for b in batches:
        for m in modes:
            ok = [x for x in runs[(m, b)] if "error" not in x]
            if not ok:
                rows.append({"mode": m, "batch": b, "error": runs[(m, b)][0]["error"]})
                continue
            mem_key = "peak_gpu_gib" if "peak_gpu_gib" in ok[0] else "peak_rss_gib"
            row = {"mode": m, "batch": b, "step_s": round(med(m, b, "median_step_s"), 3),
                   "samples_per_s": round(med(m, b, "samples_per_s"), 1), "peak_gib": round(med(m, b, mem_key), 2),
                   "memory": "GPU allocated" if mem_key == "peak_gpu_gib" else "RSS", "dtype": ok[0]["dtype"],
                   "micro_batch": ok[0]["micro_batch"], "tokens_per_batch": ok[0]["tokens_per_batch"]}
            ref = "plain" if not m.endswith("legacy") else "plain-legacy"
            if m.startswith("dp") and med(ref, b, "median_step_s"):
                row["dp_over_plain_time"] = round(med(m, b, "median_step_s") / med(ref, b, "median_step_s"), 3)
                row["dp_over_plain_memory"] = round(med(m, b, mem_key) / med(ref, b, mem_key), 3)
            if m == "dp" and med("dp-legacy", b, "samples_per_s"):
                row["speedup_over_legacy"] = round(med("dp", b, "samples_per_s") / med("dp-legacy", b, "samples_per_s"), 2)
            rows.append(row)
    first = next(x for v in runs.values() for x in v if "error" not in x)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "device": first.get("gpu", first["device"]), "steps": args.steps, "max_length": args.max_length, "fill": args.fill,
            "repeats": args.repeats, "threads": args.threads, "preset": args.preset,
            "command": "python " + " ".join(sys.argv)}
    print("| batch | mode | step (s) | samples/s | peak (GiB) | DP/plain time | DP/plain memory | vs legacy |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['batch']} | {row['mode']} | failed: {row['error'][:60]} | | | | | |")
            continue
        print(f"| {row['batch']} | {row['mode']} | {row['step_s']} | {row['samples_per_s']} | {row['peak_gib']} | "
              f"{row.get('dp_over_plain_time', '')} | {row.get('dp_over_plain_memory', '')} | {row.get('speedup_over_legacy', '')} |")
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "runs": {f"{m}@{b}": v for (m, b), v in runs.items()}}, fh, indent=2)


if __name__ == "__main__":
    main()
