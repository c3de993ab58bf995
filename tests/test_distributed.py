"""Ray Train: DP semantics independent of the worker count, DeepSpeed, the ledger actor, fault tolerance.

All on a real local Ray with gloo CPU workers and the tiny random Llama.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpsynth.config import load_config
from dpsynth.data import prepare
from dpsynth.errors import UserError
from dpsynth.privacy import Budget, Ledger, SampledGaussian, epsilon
from dpsynth.privacy.service import LedgerClient
from dpsynth.train.driver import ensure_ray, fit, loop_config
from dpsynth.train.worker import local_checkpoint

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(None)  # in-process, as `dpsynth train` on a laptop


def _cfg(tiny_job, *extra):
    return load_config(None, [*tiny_job, "training.batch_size=16", *extra])


def _initial_lora(cfg) -> dict[str, torch.Tensor]:
    """The LoRA weights every worker starts from (same seed, same init order as the worker)."""
    from peft import get_peft_model_state_dict

    from dpsynth.models import load_base, wrap_lora

    torch.manual_seed(cfg.training.seed)
    model, _, _ = load_base(cfg.model)
    return {k: v.clone() for k, v in get_peft_model_state_dict(wrap_lora(model, cfg.lora)).items()}


def _fit_fixed(cfg, tmp: Path, name: str, *, sigma: float, steps: int, seeds=(11, 22)) -> dict[str, torch.Tensor]:
    """One Ray Train fit with fixed batch and noise seeds and plain SGD (so updates compare exactly)."""
    splits = prepare(cfg.data)
    q = cfg.training.batch_size / len(splits.train)
    ledger = LedgerClient(cfg.privacy.ledger)
    ledger.set_budget(splits.fingerprint, Budget(1e6, 1e-5))
    ledger.open_run(name, splits.fingerprint, [SampledGaussian(sigma, q, steps)], "rdp")
    config = loop_config(cfg, splits, run_id=name, ledger_path=ledger.path, sigma=sigma, q=q, steps=steps,
                         sampler_seed=seeds[0], noise_seed=seeds[1], scratch=tmp / name, optimizer="sgd")
    fit(cfg, config)
    assert sum(e.count for e in ledger.charged(name)) == steps  # rank 0 charged every step, once
    with local_checkpoint(config["scratch"]) as ckpt:
        return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


def _same(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_worker_reference(local_ray, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ref")
    from conftest import make_rows

    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(240)))
    job = [f"data.source={data}", "data.text_column=review", "data.label_column=sentiment", f"model.base={tiny_model_dir}",
           "model.max_length=32", "lora.r=2", "training.learning_rate=0.5", f"privacy.ledger={tmp / 'ledger.sqlite'}",
           f"output_dir={tmp / 'run'}"]
    cfg = _cfg(job)
    return job, tmp, _fit_fixed(cfg, tmp, "w1", sigma=0.5, steps=2)


def test_two_workers_equal_one_worker_for_the_same_noise_draw(one_worker_reference):
    job, tmp, ref = one_worker_reference
    two = _fit_fixed(_cfg(job, "scaling.num_workers=2"), tmp, "w2", sigma=0.5, steps=2)
    init = _initial_lora(_cfg(job))
    assert _same(two, init, 0) > 1e-3  # training moved the adapter...
    assert _same(two, ref, 0) < 1e-5  # ...exactly as one worker does


def test_deepspeed_update_equals_the_reference_dp_update(one_worker_reference):
    job, tmp, ref = one_worker_reference
    ds = _fit_fixed(_cfg(job, "scaling.num_workers=2", "scaling.deepspeed_stage=2"), tmp, "ds2", sigma=0.5, steps=2)
    assert _same(ds, ref, 0) < 1e-5


def test_aggregated_noise_std_is_sigma_c_over_expected_batch_not_sqrt_workers(one_worker_reference):
    job, tmp, _ = one_worker_reference
    sigma, batch = 40.0, 16
    cfg = _cfg(job, "scaling.num_workers=2", "training.learning_rate=1.0", "training.max_grad_norm=1.0")
    after = _fit_fixed(cfg, tmp, "noise", sigma=sigma, steps=1, seeds=(5, 6))
    before = _initial_lora(cfg)
    update = torch.cat([(after[k] - before[k]).flatten() for k in after])
    expected = sigma * 1.0 / batch  # the clipped signal is at most 1/batch per step in norm: negligible here
    assert update.numel() > 300
    assert abs(update.std().item() / expected - 1) < 0.12, (update.std().item(), expected)


def test_zero_stage_3_and_bf16_without_deepspeed_are_refused(tiny_job):
    from dpsynth.train.driver import train

    for extra, what in (("scaling.deepspeed_stage=3", "ZeRO stage 3"), ("scaling.bf16=true", "scaling.bf16")):
        with pytest.raises(UserError, match=what):
            train(_cfg(tiny_job, extra), show_progress=False)
    assert not Path(_cfg(tiny_job).output_dir).exists()


def test_ledger_actor_concurrent_charges_are_exact(local_ray, tmp_path):
    path = tmp_path / "ledger.sqlite"
    client = LedgerClient(path)
    client.set_budget("fp", Budget(1e6, 1e-5))
    client.open_run("r", "fp", [SampledGaussian(1.0, 0.01, 300)], "rdp")

    @ray.remote(num_cpus=0.05)
    def hammer(path: str, k: int) -> int:
        c = LedgerClient(path)
        return sum(c.try_charge("r", SampledGaussian(1.0, 0.01)) for _ in range(k))

    accepted = ray.get([hammer.remote(str(path), 50) for _ in range(8)])  # 400 attempts on a plan of 300
    assert sum(accepted) == 300
    assert Ledger(path).charged("r") == (SampledGaussian(1.0, 0.01, 300),)  # nothing lost, nothing doubled
    with pytest.raises(Exception, match="admitted plan allows 300"):
        client.charge("r", SampledGaussian(1.0, 0.01))


def kill_and_await_restart(actor) -> None:
    """Kill the actor's process and wait until Ray has restarted it."""
    old_pid = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 60
    while True:  # wait with a read-only call: a charge sent mid-restart may or may not run (over-count, allowed)
        try:
            if ray.get(actor.pid.remote()) != old_pid:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        assert time.time() < deadline, "the ledger actor did not restart"
        time.sleep(0.5)


def test_ledger_actor_restart_reloads_every_charge(local_ray, tmp_path):
    client = LedgerClient(tmp_path / "ledger.sqlite")
    client.set_budget("fp", Budget(1e6, 1e-5))
    client.open_run("r", "fp", [SampledGaussian(1.0, 0.01, 10)], "rdp")
    for _ in range(4):
        client.charge("r", SampledGaussian(1.0, 0.01))
    kill_and_await_restart(client.actor)
    assert client.charged("r") == (SampledGaussian(1.0, 0.01, 4),)  # every committed charge survived the restart
    client.charge("r", SampledGaussian(1.0, 0.01))
    assert client.charged("r") == (SampledGaussian(1.0, 0.01, 5),)


def test_budget_refusal_states_spent_requested_total(local_ray, tmp_path):
    client = LedgerClient(tmp_path / "ledger.sqlite")
    client.set_budget("fp", Budget(1.0, 1e-5))
    from dpsynth.privacy import BudgetExceeded

    with pytest.raises(BudgetExceeded, match=r"spent eps=0\.00.*requested \+.*total eps=1\.00"):
        client.open_run("big", "fp", [SampledGaussian(0.5, 0.1, 1000)], "rdp")


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


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_and_certificate_counts_every_charged_step(local_ray, tiny_job, tmp_path):
    from dpsynth.models import load_adapter

    steps = 120
    cfg = _cfg(tiny_job, f"training.steps={steps}", "scaling.checkpoint_every=5", "scaling.max_failures=2",
               "sampling.label_proportions=uniform", "model.max_length=48")
    ledger = Ledger(cfg.privacy.ledger)

    def eight_steps_charged() -> bool:
        return sum(e.count for r in ledger.runs() for e in r["charged"]) >= 8

    run_dir = train_and_kill_a_worker(cfg, when=eight_steps_charged)
    cert = json.loads((run_dir / "certificate.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run,) = Ledger(cfg.privacy.ledger).runs()
    charged_steps = sum(e.count for e in run["charged"])
    assert metrics["restarts"] >= 1
    assert cert["steps"] == charged_steps == steps  # every charged step counts, including those lost in the crash
    assert cert["steps_applied"] <= steps and metrics["train"][-1]["step"] == cert["steps_applied"]
    assert cert["epsilon"] == pytest.approx(epsilon([SampledGaussian(cert["noise_multiplier"], cert["sampling_rate"], steps)],
                                                     cert["delta"], cert["accountant"]))
    assert run["status"] == "closed" and run["certificate"] == cert
    model, _ = load_adapter(run_dir, cfg.model)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not (run_dir / ".checkpoints").exists()  # private scratch (seeds, optimizer state) is not left in the release


@pytest.mark.slow
def test_two_node_cluster_places_workers_on_both_nodes(tiny_job, tmp_path):
    from ray.cluster_utils import Cluster

    from dpsynth.train.driver import train

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cfg = _cfg(tiny_job, "scaling.num_workers=2", "sampling.label_proportions=uniform")
        run_dir = train(cfg, show_progress=False)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        cert = json.loads((run_dir / "certificate.json").read_text())
        assert len(set(metrics["worker_nodes"])) == 2
        assert cert["workers"] == 2 and cert["steps"] == cfg.training.steps
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ledger_issues_certificates_from_charges_not_plans(local_ray, tmp_path):
    client = LedgerClient(tmp_path / "ledger.sqlite")
    client.set_budget("fp", Budget(100.0, 1e-5))
    client.open_run("r", "fp", [SampledGaussian(1.0, 0.01, 50)], "pld")
    for _ in range(7):  # the run ends early: the certificate must say 7 steps, not the planned 50
        client.charge("r", SampledGaussian(1.0, 0.01))
    cert = client.certify("r", 1e-5, {"note": "kept"})
    assert cert["steps"] == 7 and cert["accountant"] == "pld" and cert["note"] == "kept"
    assert cert["epsilon"] == pytest.approx(epsilon([SampledGaussian(1.0, 0.01, 7)], 1e-5, "pld"))
    assert cert["epsilon"] < epsilon([SampledGaussian(1.0, 0.01, 50)], 1e-5, "pld")
    (run,) = client.runs()
    assert run["status"] == "closed" and run["certificate"] == cert
    with pytest.raises(ValueError, match="already closed"):
        client.certify("r", 1e-5, {})
