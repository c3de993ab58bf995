"""Plan, admit, run (on Ray Train) and certify one DP-LoRA training run.

Order matters for privacy: the plan is admitted by the ledger before any private data is
touched, each step is charged before its noisy update is applied, and the certificate's
epsilon is recomputed from the charged events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import uuid
from collections import Counter
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from dpsynth.config import JobConfig
from dpsynth.data import Splits, prepare
from dpsynth.errors import UserError
from dpsynth.io import atomic_dir, atomic_write_json, atomic_write_text
from dpsynth.models import adapter_digest, base_info, load_tokenizer
from dpsynth.privacy import Budget, Gaussian, SampledGaussian, calibrate_noise_multiplier, epsilon
from dpsynth.privacy.certificate import FORMAT as CERTIFICATE_FORMAT
from dpsynth.privacy.certificate import code_version, now, read_certificate, write_certificate
from dpsynth.progress import progress_bar
from dpsynth.storage import Storage
from dpsynth.train.worker import STATE, latest_checkpoint, local_checkpoint

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


def ensure_ray(address: str | None) -> None:
    """Join the configured cluster (or RAY_ADDRESS), else start Ray in-process: one code path everywhere."""
    import ray

    if ray.is_initialized():
        return
    # "local": a fresh in-process Ray; a bare ray.init() would silently join any `ray start` cluster on this host.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)


def _scaling(cfg: JobConfig):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    s = cfg.scaling
    if s.deepspeed_stage == 3:
        # ZeRO-3 partitions the LoRA weights themselves; Opacus's per-example hooks and our surrogate
        # gradient would then see empty shards, so the clipping bound could not be enforced.
        raise UserError("scaling.deepspeed_stage: ZeRO stage 3 cannot keep the per-example clipping guarantee "
                        "for partitioned LoRA weights; use stage 0, 1 or 2 (the frozen base is not trained anyway)")
    if s.bf16 and s.deepspeed_stage is None:
        raise UserError("scaling.bf16: bf16 training runs under DeepSpeed; set scaling.deepspeed_stage too")
    backend = s.backend if s.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    resources = dict(s.resources_per_worker) if s.resources_per_worker else None
    return (ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
            TorchConfig(backend=backend))


def job_storage(cfg: JobConfig, run_dir: Path, name: str) -> Storage:
    """A job's private scratch (checkpoints, seeds) on the run storage: never part of what is released."""
    return Storage(cfg.scaling.storage_path or run_dir / ".checkpoints").child(name)


def remove_job_storage(storage: Storage) -> None:
    storage.delete()
    if storage.is_local:
        with suppress(OSError):
            storage.local_path.parent.rmdir()  # the default root inside the run dir, if nothing else lives there


def _resume_state(storage: Storage, cfg: JobConfig, ledger) -> dict | None:
    """A previous attempt of this very job whose ledger run is still open: continue it, don't start over."""
    text = storage.read_text("dpsynth-run.json")
    if text is None:
        return None
    state = json.loads(text)
    if state.get("config_hash") != cfg.training_hash():
        return None
    open_runs = {r["run_id"] for r in ledger.runs() if r["status"] == "open"}
    return state if state["run_id"] in open_runs else None


def loop_config(cfg: JobConfig, splits: Splits, *, run_id: str, ledger_path, sigma: float, q: float, steps: int,
                sampler_seed: int, noise_seed: int, scratch: Storage | Path, **extra) -> dict:
    """Everything a worker needs; the train split travels with it (validation/test never do)."""
    return {"cfg": cfg.model_dump(mode="json"), "examples": [(ex.text, ex.label) for ex in splits.train],
            "dataset_name": splits.name, "run_id": run_id, "ledger": str(ledger_path), "sigma": sigma, "q": q,
            "steps": steps, "sampler_seed": sampler_seed, "noise_seed": noise_seed, "scratch": str(scratch), **extra}


def fit(cfg: JobConfig, config: dict) -> Storage:
    """Run the worker loop as a Ray Train TorchTrainer; return where its final checkpoint is stored."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from dpsynth.train.worker import train_loop

    scaling, torch_config = _scaling(cfg)
    fs, ray_path = Storage(config["scratch"]).child("ray").filesystem()
    trainer = TorchTrainer(
        train_loop, train_loop_config=config, scaling_config=scaling, torch_config=torch_config,
        run_config=RunConfig(name=config["run_id"], storage_path=ray_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    ckpt = latest_checkpoint(config["scratch"])
    if ckpt is None:
        raise RuntimeError(f"training run {config['run_id']} produced no checkpoint")
    return ckpt


def write_release(run_dir: Path, cfg: JobConfig, ckpt: Path, splits: Splits, label_dist: dict | None,
                  certificate: dict) -> None:
    """The released run directory, each file atomic; the certificate last: its presence marks a complete run."""
    final = json.loads((ckpt / STATE).read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    with atomic_dir(run_dir / "adapter") as tmp:
        shutil.copytree(ckpt / "adapter", tmp, dirs_exist_ok=True)
    atomic_write_json(run_dir / "metrics.json", {"train": final["history"], "restarts": final["restarts"],
                                                 "worker_nodes": final["worker_nodes"]})
    atomic_write_json(run_dir / "labels.json", list(splits.labels))
    if label_dist is not None:
        atomic_write_json(run_dir / "label_distribution.json", label_dist)
    write_certificate(run_dir / "certificate.json", certificate)


def train(cfg: JobConfig, *, show_progress: bool = True) -> Path:
    """DP-LoRA fine-tune on the train split with Ray Train; write adapter + certificate into cfg.output_dir."""
    from dpsynth.privacy.service import LedgerClient

    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if _reuse_existing(cfg, run_dir):
        return run_dir
    splits = prepare(cfg.data)
    n = len(splits.train)
    base = base_info(cfg.model)
    load_tokenizer(cfg.model)  # a bad model fails here, in one line, before any worker starts
    check_labels(splits, cfg.training.batch_size)
    _scaling(cfg)  # refuse a configuration that cannot keep the guarantee before anything starts
    ensure_ray(cfg.scaling.address)
    ledger = LedgerClient(cfg.privacy.ledger)
    delta = resolve_delta(cfg, splits, ledger.budget(splits.fingerprint))
    events, sigma, q, steps = plan(cfg, n, delta)
    try:
        ledger.set_budget(splits.fingerprint, Budget(cfg.privacy.dataset_epsilon or cfg.privacy.epsilon, delta))
    except ValueError as e:
        raise UserError(f"privacy: {e}") from None

    storage = job_storage(cfg, run_dir, run_dir.name)
    state = _resume_state(storage, cfg, ledger)
    if state is None:
        state = {"run_id": f"{run_dir.name}-{uuid.uuid4().hex[:8]}", "config_hash": cfg.training_hash(),
                 # batch membership and noise are part of the mechanism: fresh OS entropy, kept only in private storage
                 "sampler_seed": int.from_bytes(os.urandom(7), "little"), "noise_seed": int.from_bytes(os.urandom(7), "little")}
        ledger.open_run(state["run_id"], splits.fingerprint, events, cfg.privacy.accountant)
        storage.write_text("dpsynth-run.json", json.dumps(state))
    else:
        log.info("resuming ledger run %s from %s", state["run_id"], storage)
    run_id = state["run_id"]
    certificate = None
    try:
        label_dist = None
        if cfg.sampling.label_proportions == "dp":
            done = sum(e.count for e in ledger.charged(run_id) if isinstance(e, Gaussian))
            if not done:
                ledger.charge(run_id, events[0])
            label_dist = dp_label_histogram([ex.label for ex in splits.train], splits.labels, cfg.sampling.label_noise_multiplier)

        log.info("training %d steps on %d worker(s): q=%.5f sigma=%.4f C=%g delta=%.3g (N=%d)", steps,
                 cfg.scaling.num_workers, q, sigma, cfg.training.max_grad_norm, delta, n)
        config = loop_config(cfg, splits, run_id=run_id, ledger_path=ledger.path, sigma=sigma, q=q, steps=steps,
                             sampler_seed=state["sampler_seed"], noise_seed=state["noise_seed"], scratch=storage)
        with _ledger_progress(ledger, run_id, steps, show_progress):
            fit(cfg, config)
        with local_checkpoint(storage) as ckpt:
            if ckpt is None:
                raise RuntimeError(f"training run {run_id} produced no checkpoint")
            history = json.loads((ckpt / STATE).read_text())["history"]
            # The ledger issues the certificate: epsilon from the charges on record, and the run closes with it.
            certificate = ledger.certify(run_id, delta, {
                "format": CERTIFICATE_FORMAT, "created": now(), "config_hash": cfg.training_hash(),
                "adapter_sha256": adapter_digest(ckpt / "adapter"), "noise_multiplier": sigma, "sampling_rate": q, "steps_applied": history[-1]["step"] if history else 0,
                "max_grad_norm": cfg.training.max_grad_norm, "expected_batch_size": cfg.training.batch_size,
                "label_histogram_noise_multiplier": cfg.sampling.label_noise_multiplier if label_dist else None,
                "dataset_fingerprint": splits.fingerprint, "dataset": {"name": splits.name, "train_examples": n},
                "base_model": base, "lora": cfg.lora.model_dump(mode="json"), "code_version": code_version(),
                "workers": cfg.scaling.num_workers, "deepspeed_stage": cfg.scaling.deepspeed_stage,
            })
            write_release(run_dir, cfg, ckpt, splits, label_dist, certificate)
    finally:
        # An exception ends the run (its charges stay spent); only a hard crash of this driver leaves it
        # open, and then re-running the same job resumes it from its last checkpoint.
        if certificate is None:
            ledger.close_run(run_id, None)
    remove_job_storage(storage)
    return run_dir


@contextmanager
def _ledger_progress(ledger, run_id: str, steps: int, enabled: bool):
    """Progress from the ledger itself: a step is counted the moment it is charged."""
    stop = threading.Event()

    def poll(advance):
        seen = 0
        while not stop.wait(1.0):
            try:
                now_charged = sum(e.count for e in ledger.charged(run_id) if isinstance(e, SampledGaussian))
            except Exception:  # the bar must never take training down
                continue
            if now_charged > seen:
                advance(f"step {now_charged}/{steps}", now_charged - seen)
                seen = now_charged

    with progress_bar("DP-LoRA training (Ray Train)", total=steps, enabled=enabled) as advance:
        t = threading.Thread(target=poll, args=(advance,), daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
