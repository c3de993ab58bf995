"""Plan, admit, run and certify one DP-LoRA training run (single process).

Order matters for privacy: the plan is admitted by the ledger before any private data is
touched, each step is charged before its noisy update is applied, and the certificate's
epsilon is recomputed from the charged events.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from dpsynth.config import JobConfig
from dpsynth.data import Splits, format_prefix, prepare
from dpsynth.errors import UserError
from dpsynth.io import atomic_dir, atomic_write_json, atomic_write_text
from dpsynth.models import load_base, wrap_lora
from dpsynth.privacy import Budget, Gaussian, Ledger, SampledGaussian, calibrate_noise_multiplier, epsilon, to_dict
from dpsynth.privacy.certificate import code_version, now, read_certificate, write_certificate
from dpsynth.progress import progress_bar
from dpsynth.train.step import DPLoRAStep, collate, encode

log = logging.getLogger(__name__)


def default_delta(n: int) -> float:
    """1/N^1.1: comfortably below 1/N, the point where 'leak one record' would be allowed."""
    return 1.0 / n**1.1


def resolve_delta(cfg: JobConfig, splits: Splits, registered: Budget | None) -> float:
    """The run's delta: explicit, else the dataset's registered one, else 1/N^1.1 for the whole dataset."""
    n = len(splits.train)
    if cfg.privacy.delta is not None:
        delta = cfg.privacy.delta
    else:
        delta = registered.delta if registered else default_delta(splits.dataset_size)
    if delta >= 1.0 / n and not cfg.privacy.allow_large_delta:
        raise UserError(f"privacy.delta: {delta:.3g} is not below 1/N = {1 / n:.3g} for N={n} training examples "
                        "(set privacy.allow_large_delta: true to override)")
    return delta


def check_labels(splits: Splits, batch_size: int) -> None:
    counts = Counter(ex.label for ex in splits.train)
    for label in splits.labels:
        if counts[label] < batch_size:
            raise UserError(f"data: label '{label}' has {counts[label]} training examples; "
                            f"training.batch_size {batch_size} needs at least that many per label")


def plan(cfg: JobConfig, n: int, delta: float) -> tuple[list, float, float, int]:
    """Return (planned events, noise multiplier, sampling rate q, steps) meeting the target epsilon."""
    t = cfg.training
    if t.batch_size > n:
        raise UserError(f"training.batch_size: {t.batch_size} exceeds the {n} training examples")
    q = t.batch_size / n
    steps = t.steps or max(1, math.ceil(t.epochs / q))
    prior = [Gaussian(cfg.sampling.label_noise_multiplier)] if cfg.sampling.label_proportions == "dp" else []
    if t.noise_multiplier is None:
        try:
            sigma = calibrate_noise_multiplier(cfg.privacy.epsilon, delta, q, steps, accountant=cfg.privacy.accountant,
                                               prior_events=tuple(prior))
        except ValueError as e:
            raise UserError(f"privacy.epsilon: {e}") from None
    else:
        sigma = t.noise_multiplier
        if sigma <= 0:
            raise UserError("training.noise_multiplier: must be > 0 (sigma = 0 is not private)")
    events = prior + [SampledGaussian(sigma, q, steps)]
    planned_eps = epsilon(events, delta, cfg.privacy.accountant)
    if planned_eps > cfg.privacy.epsilon:
        raise UserError(f"training.noise_multiplier: sigma={sigma} spends eps={planned_eps:.3f} over {steps} steps, "
                        f"above privacy.epsilon={cfg.privacy.epsilon}")
    return events, sigma, q, steps


def poisson_sampler(n: int, q: float, steps: int, seed: int | None = None) -> UniformWithReplacementSampler:
    """`steps` batches, each example included independently with probability q (what the accountant assumes).

    Seeded from fresh OS entropy unless a seed is given (tests): batch membership is part of the mechanism.
    """
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    return UniformWithReplacementSampler(num_samples=n, sample_rate=q, steps=steps, generator=torch.Generator().manual_seed(seed))


def dp_label_histogram(labels: list[str], classes: tuple[str, ...], noise_multiplier: float) -> dict[str, float]:
    """Label proportions from Gaussian-noised counts (L2 sensitivity 1 under add/remove one example)."""
    rng = np.random.default_rng()  # fresh OS entropy: DP noise must not be reproducible from a seed
    counts = Counter(labels)
    noisy = np.array([counts[c] + rng.normal(0.0, noise_multiplier) for c in classes]).clip(min=0.0)
    if noisy.sum() <= 0:
        noisy = np.ones(len(classes))
    return dict(zip(classes, (noisy / noisy.sum()).tolist()))


def _reuse_existing(cfg: JobConfig, run_dir: Path) -> bool:
    cert_path = run_dir / "certificate.json"
    if not cert_path.exists():
        return False
    cert = read_certificate(cert_path)
    if cert.get("config_hash") != cfg.training_hash():
        raise UserError(f"output_dir: {run_dir} already holds a certified run with a different config; choose another output_dir")
    log.info("%s already holds a certified adapter for this config (eps=%.3f); reusing it", run_dir, cert["epsilon"])
    return True


def train(cfg: JobConfig, *, show_progress: bool = True) -> Path:
    """DP-LoRA fine-tune on the train split; write adapter + certificate into cfg.output_dir."""
    run_dir = Path(cfg.output_dir)
    if _reuse_existing(cfg, run_dir):
        return run_dir
    splits = prepare(cfg.data)
    n = len(splits.train)
    ledger = Ledger(cfg.privacy.ledger)
    delta = resolve_delta(cfg, splits, ledger.budget(splits.fingerprint))
    check_labels(splits, cfg.training.batch_size)
    events, sigma, q, steps = plan(cfg, n, delta)
    try:
        ledger.set_budget(splits.fingerprint, Budget(cfg.privacy.dataset_epsilon or cfg.privacy.epsilon, delta))
    except ValueError as e:
        raise UserError(f"privacy: {e}") from None

    torch.manual_seed(cfg.training.seed)  # fixes LoRA init only; batches and noise use fresh entropy below
    model, tok, base_info = load_base(cfg.model)
    model = wrap_lora(model, cfg.lora)
    encoded = [encode(tok, format_prefix(cfg.model.prefix_template, splits.name, ex.label), ex.text, cfg.model.max_length)
               for ex in splits.train]

    run_id = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
    ledger.open_run(run_id, splits.fingerprint, events, cfg.privacy.accountant)
    certificate = None
    try:
        label_dist = None
        if cfg.sampling.label_proportions == "dp":
            ledger.charge(run_id, events[0])
            label_dist = dp_label_histogram([ex.label for ex in splits.train], splits.labels, cfg.sampling.label_noise_multiplier)

        sampler = poisson_sampler(n, q, steps)
        noise = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        step = DPLoRAStep(model, noise_multiplier=sigma, max_grad_norm=cfg.training.max_grad_norm,
                          expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                          grad_sample_mode=cfg.training.grad_sample_mode, noise_generator=noise)
        metrics = []
        log.info("training %d steps: q=%.5f sigma=%.4f C=%g delta=%.3g (N=%d)", steps, q, sigma, cfg.training.max_grad_norm, delta, n)
        with progress_bar("DP-LoRA training", total=steps, enabled=show_progress) as advance:
            for i, idx in enumerate(sampler, start=1):
                ledger.charge(run_id, SampledGaussian(sigma, q))  # before the noisy update exists
                loss = step(collate([encoded[j] for j in idx], tok.pad_token_id))
                metrics.append({"step": i, "batch_size": len(idx), "loss": loss})
                if i % cfg.training.log_every == 0 or i == steps:
                    log.info("step %d/%d loss %.4f batch %d", i, steps, loss, len(idx))
                advance(f"loss {loss:.3f}")

        charged = list(ledger.charged(run_id))
        certificate = {
            "run_id": run_id, "created": now(), "config_hash": cfg.training_hash(),
            "epsilon": epsilon(charged, delta, cfg.privacy.accountant), "delta": delta, "accountant": cfg.privacy.accountant,
            "noise_multiplier": sigma, "sampling_rate": q, "steps": steps, "max_grad_norm": cfg.training.max_grad_norm,
            "expected_batch_size": cfg.training.batch_size, "events": [to_dict(e) for e in charged],
            "label_histogram_noise_multiplier": cfg.sampling.label_noise_multiplier if label_dist else None,
            "dataset_fingerprint": splits.fingerprint, "dataset": {"name": splits.name, "train_examples": n},
            "base_model": base_info, "lora": cfg.lora.model_dump(mode="json"), "code_version": code_version(),
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        with atomic_dir(run_dir / "adapter") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        atomic_write_json(run_dir / "metrics.json", {"train": metrics})
        atomic_write_json(run_dir / "labels.json", list(splits.labels))
        if label_dist is not None:
            atomic_write_json(run_dir / "label_distribution.json", label_dist)
        write_certificate(run_dir / "certificate.json", certificate)  # last: its presence marks a complete run
    finally:
        ledger.close_run(run_id, certificate)
    return run_dir
