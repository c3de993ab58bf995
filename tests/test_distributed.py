"""Ray Train: DP semantics independent of the worker count, DeepSpeed, the ledger actor, fault tolerance.

All on a real local Ray with gloo CPU workers and the tiny random Llama.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpsynth.release import owner_path
from dpsynth.config import load_config
from dpsynth.data import dataset_block, prepare
from dpsynth.errors import UserError
from dpsynth.privacy import Ledger, SampledGaussian
from dpsynth.privacy.ledger import Budget
from dpsynth.privacy.run import Plan, PrivateRun
from dpsynth.privacy.sampling import schedule
from dpsynth.privacy.secret import ledger_secret
from dpsynth.privacy.service import LedgerClient
from dpsynth.runtime import ensure_ray
from dpsynth.storage import Storage
from dpsynth.train.driver import fit, worker_plan
from dpsynth.train.worker import BATCHES, STATE, local_checkpoint

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(None)  # in-process, as `dpsynth train` on a laptop


def _cfg(tiny_job, *extra):
    # float32: these tests compare updates across worker counts to 1e-5, below bf16's rounding
    return load_config(None, [*tiny_job, "training.batch_size=16", "model.dtype=float32", *extra])


def _initial_lora(cfg) -> dict[str, torch.Tensor]:
    """The LoRA weights every worker starts from (same seed, same init order as the worker)."""
    from peft import get_peft_model_state_dict

    from dpsynth.models import load_base, wrap_lora

    torch.manual_seed(cfg.training.seed)
    model, _, _ = load_base(cfg.model)
    return {k: v.clone() for k, v in get_peft_model_state_dict(wrap_lora(model, cfg.lora)).items()}


def _fit(cfg, tmp: Path, name: str, *, sigma: float, steps: int, full_batch: bool = False) -> dict:
    """One Ray Train fit with plain SGD (updates compare exactly): its final adapter, state.json and each rank's batch
    log. Batches and noise are drawn from OS entropy, so only a full batch (q = 1: every unit, every step) with a
    negligible sigma makes two fits comparable update for update."""
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger))
    # Poisson sampling is over units, as in production (dpsynth.train.plan): near-duplicate records share one, so a
    # split's record count can exceed its unit count, by how many depends on the owner's key
    units = len(splits.train_units())
    if full_batch:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"batch_size": units})})
    sched = schedule(units, cfg.training.batch_size, steps=steps)
    dataset = dataset_block(splits)
    # composed with RDP: PRV cannot compute an epsilon for SIGMA_0
    Ledger(cfg.privacy.ledger).set_budget(dataset.fingerprint, Budget(1e10, 1e-5, dataset.unit, "rdp"))
    run = PrivateRun.open(LedgerClient(cfg.privacy.ledger), dataset=dataset,
                          plan=Plan((SampledGaussian(sigma, sched.q, steps),), "rdp", 1e-5), total_epsilon=1e10,
                          kind=name, config_hash=name)
    scratch = Storage(tmp / name)
    plan = worker_plan(cfg, splits, run, sigma=sigma, sched=sched, scratch=scratch, stop=scratch, optimizer="sgd")
    fit(cfg, plan)
    assert run.charged_count(SampledGaussian) == steps  # rank 0 charged every step, once
    with local_checkpoint(plan.scratch) as ckpt:
        return {"adapter": load_file(str(ckpt / "adapter" / "adapter_model.safetensors")),
                "state": json.loads((ckpt / STATE).read_text()), "n": units, "q": sched.q,
                "batches": [json.loads((ckpt / BATCHES.format(r)).read_text()) for r in range(cfg.scaling.num_workers)]}


def _fit_fixed(cfg, tmp: Path, name: str, *, sigma: float, steps: int) -> dict[str, torch.Tensor]:
    return _fit(cfg, tmp, name, sigma=sigma, steps=steps, full_batch=True)["adapter"]


def _same(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_worker_reference(local_ray, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ref")
    from conftest import make_rows

    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(120)))
    job = [f"data.source={data}", "data.text_column=review", "data.label_column=sentiment", f"model.base={tiny_model_dir}",
           "model.max_length=72", "lora.r=2", "training.learning_rate=0.5", f"privacy.ledger={tmp / 'ledger.sqlite'}",
           f"output_dir={tmp / 'run'}"]
    cfg = _cfg(job)
    return job, tmp, _fit_fixed(cfg, tmp, "w1", sigma=SIGMA_0, steps=2)


SIGMA_0 = 1e-4
"""Noise the comparisons below cannot see (update noise ~1e-7 per coordinate, the tolerance is 1e-5): noise is drawn
from OS entropy, so two fits can agree only where it is negligible. That it is added once per step, whatever the
worker count, is test_aggregated_noise_std_is_sigma_c_over_expected_batch_not_sqrt_workers."""


def test_two_workers_equal_one_worker_for_the_same_batch(one_worker_reference):
    job, tmp, ref = one_worker_reference
    two = _fit_fixed(_cfg(job, "scaling.num_workers=2"), tmp, "w2", sigma=SIGMA_0, steps=2)
    init = _initial_lora(_cfg(job))
    assert _same(two, init, 0) > 1e-3  # training moved the adapter...
    assert _same(two, ref, 0) < 1e-5  # ...exactly as one worker does


def test_deepspeed_update_equals_the_reference_dp_update(one_worker_reference):
    job, tmp, ref = one_worker_reference
    ds = _fit_fixed(_cfg(job, "scaling.num_workers=2", "scaling.deepspeed_stage=2"), tmp, "ds2", sigma=SIGMA_0, steps=2)
    assert _same(ds, ref, 0) < 1e-5


def test_aggregated_noise_std_is_sigma_c_over_expected_batch_not_sqrt_workers(one_worker_reference):
    job, tmp, _ = one_worker_reference
    sigma, batch = 40.0, 16
    cfg = _cfg(job, "scaling.num_workers=2", "training.learning_rate=1.0", "training.max_grad_norm=1.0")
    after = _fit(cfg, tmp, "noise", sigma=sigma, steps=1)["adapter"]
    before = _initial_lora(cfg)
    update = torch.cat([(after[k] - before[k]).flatten() for k in after])
    expected = sigma * 1.0 / batch  # the clipped signal is at most 1/batch per step in norm: negligible here
    assert update.numel() > 300
    assert abs(update.std().item() / expected - 1) < 0.12, (update.std().item(), expected)


def test_the_worker_draws_fresh_poisson_batches_and_every_rank_trains_on_rank_0s(one_worker_reference):
    """The batches the Ray Train worker actually trains on (its checkpoint's per-rank batch logs): Binomial(N, q)
    sizes, mean and variance (fixed-size shuffled batches would have none), drawn afresh by each fit of the same
    config (there is no seed to replay them from), and at every step the same global batch on both ranks (rank 0
    draws it and broadcasts it)."""
    job, tmp, _ = one_worker_reference
    cfg = _cfg(job, "scaling.num_workers=2", "training.batch_size=8", "scaling.checkpoint_every=1000")
    steps = 100
    fits = [_fit(cfg, tmp, f"poisson{k}", sigma=1.0, steps=steps) for k in range(2)]
    for f in fits:
        rank0, rank1 = f["batches"]  # [step, size, sum of unit indices] per step
        assert [b[0] for b in rank0] == list(range(1, steps + 1))
        assert rank0 == rank1
        assert [h["batch_size"] for h in f["state"]["history"]] == [b[1] for b in rank0]
    assert fits[0]["batches"][0] != fits[1]["batches"][0]
    n, q = fits[0]["n"], fits[0]["q"]
    sizes = np.array([b[1] for f in fits for b in f["batches"][0]], dtype=float)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / len(sizes)), (sizes.mean(), mean)
    assert abs(sizes.var(ddof=1) / var - 1) < 0.4, (sizes.var(ddof=1), var)  # ~4 standard errors (200 draws)
    sums = np.array([b[2] for f in fits for b in f["batches"][0]], dtype=float)
    assert abs(sums.sum() / sizes.sum() - (n - 1) / 2) < 0.1 * n  # the members are spread over all N units


def test_zero_stage_3_and_bf16_without_deepspeed_are_refused(tiny_job):
    from dpsynth.train.driver import train

    for extra, what in (("scaling.deepspeed_stage=3", "ZeRO stage 3"), ("scaling.bf16=true", "scaling.bf16")):
        with pytest.raises(UserError, match=what):
            train(_cfg(tiny_job, extra), show_progress=False)
    assert not Path(_cfg(tiny_job).output_dir).exists()


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes of *this* test's Ray (descendants of this process; Ray names them ray::RayTrainWorker)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def train_and_kill_a_worker(cfg, when) -> Path:
    """Run `dpsynth train` in a thread, SIGKILL one Ray Train worker once `when()` holds; return the run dir."""
    from dpsynth.train.driver import train

    box: dict = {}
    runner = threading.Thread(target=lambda: box.setdefault("dir", train(cfg, show_progress=False)), daemon=True)
    runner.start()
    killed = None
    while runner.is_alive() and killed is None:
        if when() and (pids := _train_worker_pids()):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    runner.join(timeout=900)
    assert killed is not None, "training finished before the worker could be killed"
    assert "dir" in box, "training did not finish after the worker was killed"
    return box["dir"]


# A Ray Train worker killed mid-run: test_storage.py::test_training_with_checkpoints_and_ledger_on_s3_resumes_after_a_worker_is_killed
# (the restarted group resumes from the last checkpoint; the certificate counts every charged step).
# Workers on two nodes: test_cluster.py::test_two_node_local_cluster_runs_a_training_job_through_ray_job_submit.


# ---------------------------------------------------------------- interruptions: the same command resumes


def _assert_no_seed_or_rng_state(scratch: Path) -> None:
    """Nothing a run keeps to resume replays its batches or its noise: no RNG state file, no seed in its own state."""
    files = [f for f in scratch.rglob("*") if f.is_file()]
    names = [f.name for f in files]
    assert "dpsynth-run.json" in names and "state.json" in names, names  # the resume state is there...
    assert not [n for n in names if "rng" in n.lower() or "seed" in n.lower()], names  # ...no generator state

    def keys(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from keys(v)
        elif isinstance(x, list):
            for v in x:
                yield from keys(v)

    for f in files:
        if f.name in ("dpsynth-run.json", "state.json") or f.name.startswith("batches-rank"):
            found = [k for k in keys(json.loads(f.read_text())) if "seed" in k.lower() or "rng" in k.lower()]
            assert not found, (f, found)


def _charged_steps(ledger_path: Path) -> int:
    if not ledger_path.exists():
        return 0
    return sum(e.count for r in Ledger(ledger_path).runs() for e in r["charged"] if isinstance(e, SampledGaussian))


def test_sigterm_and_sigint_both_stop_at_a_step_boundary():
    """graceful_stop: SIGTERM and Ctrl-C set the same flag and call on_stop once; a second signal stops at once; the
    previous handlers come back after the block. (Ctrl-C mid-training end to end is the test below; kill -9 mid-training
    is test_budget.py::test_a_resumed_auto_run_repeats_the_plan_of_its_first_attempt.)"""
    from dpsynth.interrupt import graceful_stop

    caught: list[int] = []  # a signal graceful_stop failed to take lands here, instead of killing the test process
    original = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    recorder = {s: signal.getsignal(s) for s in original}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            stops: list[int] = []
            with graceful_stop(stops.append) as received:
                assert received() is None
                os.kill(os.getpid(), sig)
                time.sleep(0.1)  # the handler runs on the main thread between bytecodes
                assert received() == sig and stops == [sig] and not caught
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.1)
            assert {s: signal.getsignal(s) for s in original} == recorder  # the handlers before the block are back
    finally:
        for s, h in original.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_an_interrupted_driver_loses_no_spend_and_the_same_command_resumes_it(tiny_job, tmp_path):
    """Ctrl-C mid-training (Ray Train would abort at once on the main thread; dpsynth fits off it): the run stays open
    with its charges, and the same command finishes it with every charged step applied and certified."""
    import subprocess
    import sys

    sig = signal.SIGINT
    steps = 40
    args = [sys.executable, "-m", "dpsynth", "train", "--quiet",
            *[a for o in [*tiny_job, "training.batch_size=16", f"training.steps={steps}", "scaling.checkpoint_every=4",
                          "model.max_length=48"] for a in ("--set", o)]]
    ledger_path = Path(load_config(None, tiny_job).privacy.ledger)
    run_dir = Path(load_config(None, tiny_job).output_dir)
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while _charged_steps(ledger_path) < 10:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    first.send_signal(sig)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 128 + sig, err[-2000:]
    assert "stays open" in err and "run the same command" in err
    (run,) = Ledger(ledger_path).runs()
    stopped_at = _charged_steps(ledger_path)
    assert run["status"] == "open" and 10 <= stopped_at < steps  # stopped early, its charges kept
    assert not (run_dir / "certificate.json").exists()
    _assert_no_seed_or_rng_state(run_dir / ".checkpoints")

    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    (run,) = Ledger(ledger_path).runs()
    cert = json.loads((run_dir / "certificate.json").read_text())
    assert run["status"] == "closed" and run["certificate"] == cert
    assert cert["mechanism"]["steps"] == _charged_steps(ledger_path) == steps, again.stderr[-3000:]  # every charged step certified
    metrics = json.loads(owner_path(run_dir, "metrics.json").read_text())
    assert [h["step"] for h in metrics["train"]] == list(range(1, cert["mechanism"]["steps_applied"] + 1))
    assert cert["mechanism"]["steps_applied"] == steps  # a clean stop at a step boundary loses no work
