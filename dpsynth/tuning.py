"""A private search over clipping norm C and learning rate, within one total privacy budget.

Papernot & Steinke (ICLR 2022): draw a secret random number K of trials; each trial draws
(C, lr) at random (log-uniform), trains with DP-SGD on the train split and releases a
Gaussian-noised validation loss; only the best trial is released. The search's cost
(RepeatAndSelect under RDP, plus the DP label histogram) is admitted and charged to the
ledger as one run *before* any trial starts; each trial's noise is calibrated so that it fits.

The Ray Tune layer (search space, Tuner, Optuna's random sampler) lives in tune/ and is
named by import path, as `serve run` names an app: dpsynth never imports tune/.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from dpsynth.config import JobConfig, load_config
from dpsynth.data import format_prefix, prepare
from dpsynth.errors import UserError
from dpsynth.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dpsynth.models import adapter_digest, base_info, load_base, load_tokenizer
from dpsynth.privacy import Budget, epsilon
from dpsynth.privacy.certificate import FORMAT as CERTIFICATE_FORMAT
from dpsynth.privacy.certificate import code_version, now
from dpsynth.storage import Storage
from dpsynth.train.worker import local_checkpoint
from dpsynth.privacy.tuning import ACCOUNTANT, calibrate_search, draw_num_trials, search_events, trial_events

log = logging.getLogger(__name__)
RUNNER = "tune.search:run_trials"


def _shape(cfg: JobConfig) -> float:
    return math.inf if cfg.tune.distribution == "poisson" else cfg.tune.shape


def check_search(cfg: JobConfig) -> None:
    """Refuse what the accounting does not cover, before anything runs."""
    if cfg.tune.scheduler != "fifo":
        raise UserError(f"tune.scheduler: '{cfg.tune.scheduler}' stops trials early on private metrics, a cost this "
                        "search's accounting (Papernot & Steinke) does not cover; use fifo")
    if cfg.training.noise_multiplier is not None:
        raise UserError("training.noise_multiplier: a search calibrates each trial's noise to the total budget; unset it")


def dp_score(cfg: JobConfig, adapter_dir: Path, texts: list[tuple[str, str]], dataset_name: str) -> float:
    """Mean validation loss with Gaussian noise: each example's loss clipped to [0, L], so one example
    moves the sum by at most L; noise N(0, (score_noise_multiplier * L)^2) (Gaussian mechanism,
    Dwork & Roth 2014), fresh OS entropy."""
    from peft import PeftModel

    from dpsynth.train.step import collate, encode, per_example_loss

    model, tok, _ = load_base(cfg.model)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    enc = [encode(tok, format_prefix(cfg.model.prefix_template, dataset_name, lab), t, cfg.model.max_length) for t, lab in texts]
    clip = cfg.tune.score_loss_clip
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(enc), 32):
            losses = per_example_loss(model, collate(enc[i:i + 32], tok.pad_token_id))
            total += losses.clamp(0.0, clip).sum().item()
    noise = np.random.default_rng().normal(0.0, cfg.tune.score_noise_multiplier * clip)
    return (total + noise) / len(enc)


def trial(config: dict) -> dict:
    """One trial (runs inside a Ray Tune trial): DP-train with this (C, lr), then release a DP score."""
    from dpsynth.train.driver import fit, loop_config

    plan = config["plan"]
    cfg = load_config(None, [f"training.max_grad_norm={config['max_grad_norm']}",
                             f"training.learning_rate={config['learning_rate']}"], base=plan["cfg"])
    splits = prepare(cfg.data)
    scratch = Storage(plan["scratch"]).child(f"trial-{uuid.uuid4().hex[:8]}")
    fit(cfg, loop_config(cfg, splits, run_id=plan["run_id"], ledger_path=plan["ledger"], sigma=plan["sigma"],
                                q=plan["q"], steps=plan["steps"], sampler_seed=int.from_bytes(os.urandom(7), "little"),
                                noise_seed=int.from_bytes(os.urandom(7), "little"), scratch=scratch,
                                covered_by=plan["run_id"]))
    rng = np.random.default_rng(cfg.data.seed)  # which validation examples: data-independent given the split size
    val = list(splits.validation)
    pick = rng.choice(len(val), size=min(cfg.tune.score_examples, len(val)), replace=False)
    with local_checkpoint(scratch) as ckpt:
        score = dp_score(cfg, ckpt / "adapter", [(val[i].text, val[i].label) for i in pick], splits.name)
    return {"score": score, "checkpoint": str(scratch)}


def _load_runner(import_path: str):
    module, _, attr = import_path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"tune: cannot import the search runner {import_path} ({e})") from None


def search(cfg: JobConfig, *, runner: str = RUNNER, show_progress: bool = True, num_trials: int | None = None) -> Path:
    """Run the private search; write the selected adapter, its certificate and the trial table into output_dir.

    `num_trials` exists for tests only: it replaces the secret random draw of K.
    """
    from dpsynth.privacy.service import LedgerClient
    from dpsynth.train.driver import (_scaling, check_labels, dp_label_histogram, ensure_ray, job_storage,
                                      remove_job_storage, resolve_delta, write_release)

    check_search(cfg)
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if (run_dir / "certificate.json").exists():
        raise UserError(f"output_dir: {run_dir} already holds a certified run; choose another output_dir")
    splits = prepare(cfg.data)
    if not splits.validation:
        raise UserError("data.validation_fraction: a search scores trials on the validation split; it must not be 0")
    base = base_info(cfg.model)
    load_tokenizer(cfg.model)
    check_labels(splits, cfg.training.batch_size)
    _scaling(cfg)
    runner_fn = _load_runner(runner)
    ensure_ray(cfg.scaling.address)
    ledger = LedgerClient(cfg.privacy.ledger)
    delta = resolve_delta(cfg, splits, ledger.budget(splits.fingerprint))
    n, t = len(splits.train), cfg.training
    q = t.batch_size / n
    steps = t.steps or max(1, math.ceil(t.epochs / q))
    label_sigma = cfg.sampling.label_noise_multiplier if cfg.sampling.label_proportions == "dp" else None
    common = {"score_sigma": cfg.tune.score_noise_multiplier, "mean": cfg.tune.mean_trials, "shape": _shape(cfg),
              "label_sigma": label_sigma}
    try:
        sigma = calibrate_search(cfg.privacy.epsilon, delta, q, steps, max_sigma=cfg.tune.max_noise_multiplier, **common)
    except ValueError as e:
        raise UserError(f"tune: {e}") from None
    events = search_events(sigma, q, steps, **common)
    try:
        ledger.set_budget(splits.fingerprint, Budget(cfg.privacy.dataset_epsilon or cfg.privacy.epsilon, delta))
    except ValueError as e:
        raise UserError(f"privacy: {e}") from None
    run_id = f"{run_dir.name}-search-{uuid.uuid4().hex[:8]}"
    ledger.open_run(run_id, splits.fingerprint, events, ACCOUNTANT)
    storage = job_storage(cfg, run_dir, run_id)
    certificate = None
    try:
        # The whole search is charged before the first trial exists; trials then charge nothing per step.
        ledger.charge(run_id, events[-1])
        label_dist = None
        if label_sigma:
            ledger.charge(run_id, events[0])
            label_dist = dp_label_histogram([ex.label for ex in splits.train], splits.labels, label_sigma)
        k = num_trials if num_trials is not None else draw_num_trials(cfg.tune.mean_trials, _shape(cfg))
        log.info("search: %s trials (secret draw, mean %g), %d steps each, q=%.5f, per-trial sigma=%.4f, delta=%.3g",
                 k, cfg.tune.mean_trials, steps, q, sigma, delta)
        if k == 0:
            raise UserError("tune: the random number of trials came out 0 (Poisson); the search's budget is spent "
                            "and nothing is released")
        plan = {"cfg": cfg.model_dump(mode="json"), "run_id": run_id, "ledger": ledger.path, "sigma": sigma,
                "q": q, "steps": steps, "scratch": str(storage)}
        trials = runner_fn(trial, plan=plan, space={"max_grad_norm": cfg.tune.max_grad_norm,
                                                    "learning_rate": cfg.tune.learning_rate},
                           num_trials=k, max_concurrent=cfg.tune.max_concurrent_trials, storage=str(storage.child("tune")))
        done = [r for r in trials if r.get("score") is not None and math.isfinite(r["score"])]
        if not done:
            raise RuntimeError(f"search {run_id}: no trial finished")
        best = min(done, key=lambda r: r["score"])
        selected = load_config(None, [f"training.max_grad_norm={best['max_grad_norm']}",
                                      f"training.learning_rate={best['learning_rate']}"], base=cfg.model_dump(mode="json"))
        trial_eps = epsilon(trial_events(sigma, q, steps, cfg.tune.score_noise_multiplier), delta, ACCOUNTANT)
        with local_checkpoint(best["checkpoint"]) as ckpt:
            certificate = ledger.certify(run_id, delta, {
                "format": CERTIFICATE_FORMAT, "created": now(), "config_hash": selected.training_hash(),
                "adapter_sha256": adapter_digest(ckpt / "adapter"),
                "noise_multiplier": sigma, "sampling_rate": q, "steps_per_trial": steps, "max_grad_norm": best["max_grad_norm"],
                "expected_batch_size": t.batch_size, "label_histogram_noise_multiplier": label_sigma,
                "dataset_fingerprint": splits.fingerprint, "dataset": {"name": splits.name, "train_examples": n},
                "base_model": base, "lora": cfg.lora.model_dump(mode="json"), "code_version": code_version(),
                "tuning": {"method": "Papernot & Steinke 2022 random number of trials (RepeatAndSelect, RDP)",
                           "covers_selection": True, "mean_trials": cfg.tune.mean_trials,
                           "distribution": cfg.tune.distribution, "shape": _shape(cfg) if math.isfinite(_shape(cfg)) else "inf",
                           "trials_run": len(trials), "per_trial_epsilon_alone": trial_eps,
                           "selected": {"max_grad_norm": best["max_grad_norm"], "learning_rate": best["learning_rate"],
                                        "dp_validation_loss": best["score"]}},
            })
            write_release(run_dir, selected, ckpt, splits, label_dist, certificate)
        _write_trials(run_dir, trials, best, trial_eps, certificate["epsilon"])
    finally:
        if certificate is None:
            ledger.close_run(run_id, None)
        remove_job_storage(storage)  # unselected trials' adapters are never released
    return run_dir


def _write_trials(run_dir: Path, trials: list[dict], best: dict, trial_eps: float, total_eps: float) -> None:
    """trials.csv and trials.png: every trial's C, lr, DP score and epsilon (alone; the search total is certified)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"trial": i, "max_grad_norm": r["max_grad_norm"], "learning_rate": r["learning_rate"],
             "dp_validation_loss": r.get("score"), "epsilon_trial_alone": trial_eps, "selected": r is best}
            for i, r in enumerate(trials)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "trials.csv", buf.getvalue())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ok = [r for r in rows if r["dp_validation_loss"] is not None]
    sc = ax.scatter([r["max_grad_norm"] for r in ok], [r["learning_rate"] for r in ok],
                    c=[r["dp_validation_loss"] for r in ok], cmap="viridis_r", s=80)
    for r in ok:
        if r["selected"]:
            ax.scatter([r["max_grad_norm"]], [r["learning_rate"]], s=260, facecolors="none", edgecolors="red")
    ax.set(xscale="log", yscale="log", xlabel="clipping norm C", ylabel="learning rate",
           title=f"{len(rows)} trials, eps {trial_eps:.2f} each alone; search total eps {total_eps:.2f}")
    fig.colorbar(sc, label="DP validation loss")
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(run_dir / "trials.png", out.getvalue())
    atomic_write_json(run_dir / "tuning.json", {"trials": rows})
