"""Ray Train DP-LoRA: samples/s of 1 vs 2 workers, and the DP/non-DP step-time ratio under Ray
vs the plain single-process loop, side by side in one run.

Every configuration trains the bundled SmolLM2-135M on Rotten Tomatoes with the same Poisson
batches (expected size --batch) for --steps steps; per-step wall time is measured inside the
loop (the first two steps are warm-up and dropped), so Ray start-up is not counted. Configurations
are interleaved over --repeats rounds so machine noise hits them alike.

    python bench/ray_train.py --batch 16 --steps 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpsynth.config import load_config  # noqa: E402
from dpsynth.data import prepare  # noqa: E402
from dpsynth.prompts import label_prompt  # noqa: E402
from dpsynth.privacy.secret import ledger_secret  # noqa: E402
from dpsynth.privacy import SampledGaussian  # noqa: E402
from dpsynth.privacy.sampling import poisson_batches  # noqa: E402


def plain_loop(cfg, splits, private: bool, q: float, steps: int, seed: int) -> list[float]:
    """The single-process loop: no Ray, the same step classes and the same batches."""
    from dpsynth.models import load_base, wrap_lora
    from dpsynth.prefixlm import collate, encode
    from dpsynth.train.step import DPLoRAStep, PlainLoRAStep

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model, tok, _ = load_base(cfg.model)
    model = wrap_lora(model, cfg.lora)
    # one row per unit, as the worker samples units (a unit's first record: near-duplicates share a unit)
    enc = [encode(tok, label_prompt(cfg, tok, splits.name, unit[0].label), unit[0].text, cfg.model.max_length)
           for unit in splits.train_units()]
    t = cfg.training
    step = (DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=t.max_grad_norm, expected_batch_size=t.batch_size,
                       learning_rate=t.learning_rate) if private else
            PlainLoRAStep(model, expected_batch_size=t.batch_size, learning_rate=t.learning_rate))
    times, sizes = [], []
    for idx in poisson_batches(len(enc), q, steps, torch.Generator().manual_seed(seed)):  # a benchmark replays batches
        t0 = time.perf_counter()
        step(collate([enc[j] for j in idx], tok.pad_token_id))
        times.append(time.perf_counter() - t0)
        sizes.append(len(idx))
    return list(zip(sizes, times))


def ray_fit(cfg, splits, private: bool, q: float, steps: int, seed: int, tmp: Path, name: str) -> list[float]:
    from dpsynth.data import dataset_block
    from dpsynth.privacy.run import Plan, PrivateRun
    from dpsynth.privacy.sampling import schedule
    from dpsynth.privacy.service import LedgerClient
    from dpsynth.storage import Storage
    from dpsynth.train.driver import fit, worker_plan
    from dpsynth.train.worker import STATE

    sched = schedule(len(splits.train_units()), cfg.training.batch_size, steps=steps)  # units, as the worker samples
    run = PrivateRun.open(LedgerClient(tmp / "ledger.sqlite"), dataset=dataset_block(splits),
                          plan=Plan((SampledGaussian(1.0, sched.q, steps),), "rdp", 1e-6), total_epsilon=1e9, kind=name,
                          config_hash=name) if private else None
    scratch = Storage(tmp / name)
    ckpt = fit(cfg, worker_plan(cfg, splits, run, sigma=1.0, sched=sched, scratch=scratch,
                                stop=scratch))
    history = json.loads(ckpt.read_text(STATE))["history"]
    return [(h["batch_size"], h["seconds"]) for h in history]


def summarise(runs: list[list[tuple[int, float]]]) -> dict:
    kept = [pair for run in runs for pair in run[2:]]
    per_step = statistics.median(s for _, s in kept)
    return {"median_step_s": round(per_step, 4), "samples_per_s": round(sum(b for b, _ in kept) / sum(s for _, s in kept), 3),
            "steps_measured": len(kept)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-examples", type=int, default=2000)
    ap.add_argument("--out", default="bench/results/ray_train.json")
    args = ap.parse_args()

    from dpsynth.runtime import ensure_ray

    ensure_ray(None)
    cfg1 = load_config(None, [f"training.batch_size={args.batch}", f"data.subset_fraction={min(1.0, args.max_examples / 12752)}"])
    cfg2 = load_config(None, [f"training.batch_size={args.batch}", f"data.subset_fraction={min(1.0, args.max_examples / 12752)}",
                              "scaling.num_workers=2"])
    splits = prepare(cfg1.data, ledger_secret(cfg1.privacy.ledger))
    q = args.batch / len(splits.train_units())  # Poisson sampling is over units
    configs = {
        "plain_loop_nondp": lambda s, tmp: plain_loop(cfg1, splits, False, q, args.steps, s),
        "plain_loop_dp": lambda s, tmp: plain_loop(cfg1, splits, True, q, args.steps, s),
        "ray_1w_nondp": lambda s, tmp: ray_fit(cfg1, splits, False, q, args.steps, s, tmp, f"r1n{s}"),
        "ray_1w_dp": lambda s, tmp: ray_fit(cfg1, splits, True, q, args.steps, s, tmp, f"r1d{s}"),
        "ray_2w_nondp": lambda s, tmp: ray_fit(cfg2, splits, False, q, args.steps, s, tmp, f"r2n{s}"),
        "ray_2w_dp": lambda s, tmp: ray_fit(cfg2, splits, True, q, args.steps, s, tmp, f"r2d{s}"),
    }
    raw: dict[str, list] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, run in configs.items():
                t0 = time.time()
                raw[name].append(run(100 + r, Path(tmp)))
                print(f"round {r} {name}: {time.time() - t0:.0f}s wall", flush=True)
    res = {k: summarise(v) for k, v in raw.items()}
    ratios = {
        "dp_over_nondp_step_time_plain_loop": round(res["plain_loop_dp"]["median_step_s"] / res["plain_loop_nondp"]["median_step_s"], 3),
        "dp_over_nondp_step_time_ray_1w": round(res["ray_1w_dp"]["median_step_s"] / res["ray_1w_nondp"]["median_step_s"], 3),
        "dp_over_nondp_step_time_ray_2w": round(res["ray_2w_dp"]["median_step_s"] / res["ray_2w_nondp"]["median_step_s"], 3),
        "ray_1w_dp_over_plain_loop_dp_step_time": round(res["ray_1w_dp"]["median_step_s"] / res["plain_loop_dp"]["median_step_s"], 3),
        "samples_per_s_2w_over_1w_dp": round(res["ray_2w_dp"]["samples_per_s"] / res["ray_1w_dp"]["samples_per_s"], 3),
    }
    out = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
           "command": "python " + " ".join(sys.argv), "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
           "model": cfg1.model.base, "lora": cfg1.lora.model_dump(mode="json"), "results": res, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"results": res, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
