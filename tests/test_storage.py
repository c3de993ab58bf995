"""Run storage on an object store: checkpoints and the ledger at s3:// URIs, through pyarrow's S3 filesystem.

The object store is a real S3 server (moto's, on loopback, started and stopped here); nothing is mocked
in dpsynth or pyarrow. gs:// goes through the same pyarrow code path (GcsFileSystem) and is not served here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpsynth.release import owner_path
from dpsynth.config import ConfigError, load_config
from dpsynth.privacy import Budget, MirroredLedger, SampledGaussian, epsilon, ledger_exists, open_ledger
from dpsynth.storage import Storage

pafs = pytest.importorskip("pyarrow.fs")
pytest.importorskip("moto")

def _objects(uri_of, prefix: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(uri_of(prefix))
    return sorted(i.path.removeprefix(path + "/") for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
                  if i.type == pafs.FileType.File)


# ---------------------------------------------------------------- config


def test_object_store_uris_are_accepted_for_the_ledger_and_checkpoints():
    cfg = load_config(None, ["privacy.ledger=s3://b/dpsynth/ledger.sqlite", "scaling.storage_path=gs://b/ckpt"])
    assert cfg.privacy.ledger == "s3://b/dpsynth/ledger.sqlite" and cfg.scaling.storage_path == "gs://b/ckpt"
    again = load_config(None, [], base=cfg.model_dump(mode="json"))  # survives the trip to workers
    assert again.privacy.ledger == cfg.privacy.ledger
    assert isinstance(load_config(None, ["privacy.ledger=~/l.sqlite"]).privacy.ledger, Path)


@pytest.mark.parametrize("key, value, why", [("privacy.ledger", "ftp://host/ledger.sqlite", "unsupported scheme 'ftp'"),
                                             ("scaling.storage_path", "s3:///no-bucket", "no bucket")])
def test_unsupported_uris_are_refused_with_the_key_named(key, value, why):
    with pytest.raises(ConfigError, match=rf"^config error: {key}: .*{why}") as err:
        load_config(None, [f"{key}={value}"])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- Storage


@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_round_trip(where, s3, tmp_path):
    root = Storage(tmp_path / "store" if where == "local" else s3("roundtrip"))
    job = root.child("job-1")
    assert job.read_text("state.json") is None and job.listdir() == [] and not job.exists("state.json")
    job.write_text("state.json", '{"a": 1}')
    job.write_text("state.json", '{"a": 2}')  # overwrite
    src = tmp_path / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "opt.pt").write_bytes(b"x")
    job.child("ckpt").upload(src, "step-00000005")
    assert json.loads(job.read_text("state.json")) == {"a": 2}
    assert job.listdir() == ["ckpt", "state.json"] and job.child("ckpt").listdir() == ["step-00000005"]
    local, temporary = job.child("ckpt").fetch("step-00000005")
    assert (local / "adapter" / "w.bin").read_bytes() == b"\x00\x01" * 1000 and (local / "opt.pt").read_bytes() == b"x"
    assert temporary == (where == "s3")
    job.write_text("STOP", "2")  # a marker file (the stop request) is deleted like a directory is
    job.delete("STOP")
    job.delete("never-written")
    assert not job.exists("STOP") and job.listdir() == ["ckpt", "state.json"]
    job.child("ckpt").delete("step-00000005")
    assert job.child("ckpt").listdir() == []
    job.delete()
    assert root.listdir() == [] and job.read_text("state.json") is None
    if where == "s3":
        assert "endpoint_override" in job.root  # a child keeps the URI's endpoint options


# ---------------------------------------------------------------- the ledger on an object store


def test_mirrored_ledger_survives_a_restart_from_the_object_alone(s3):
    uri = s3("ledgers/restart.sqlite")
    first = open_ledger(uri)
    assert isinstance(first, MirroredLedger) and ledger_exists(uri)
    first.set_budget("fp", Budget(1e6, 1e-5))
    first.open_run("r", "fp", [SampledGaussian(1.0, 0.01, 5)], "rdp")
    for _ in range(3):
        first.charge("r", SampledGaussian(1.0, 0.01))
    cache = first.path
    del first  # the process's local copy goes with it: only the object remains
    assert not cache.exists()
    second = open_ledger(uri)  # a head restart: a fresh accountant loads the object
    assert second.charged("r") == (SampledGaussian(1.0, 0.01, 3),)
    second.charge("r", SampledGaussian(1.0, 0.01, 2))
    with pytest.raises(Exception, match="admitted plan allows 5"):
        second.charge("r", SampledGaussian(1.0, 0.01))
    reader = open_ledger(uri, readonly=True)
    assert reader.charged("r") == (SampledGaussian(1.0, 0.01, 5),)
    with pytest.raises(ValueError, match="read-only"):
        reader.abandon("r")


def test_a_superseded_accountant_fails_closed_instead_of_overwriting(s3):
    uri = s3("ledgers/fence.sqlite")
    old = open_ledger(uri)
    old.set_budget("fp", Budget(1e6, 1e-5))
    old.open_run("r", "fp", [SampledGaussian(1.0, 0.01, 10)], "rdp")
    old.charge("r", SampledGaussian(1.0, 0.01))
    new = open_ledger(uri)  # e.g. another cluster's accountant opened the same object
    new.charge("r", SampledGaussian(1.0, 0.01, 2))
    with pytest.raises(RuntimeError, match="claimed by another accountant"):
        old.charge("r", SampledGaussian(1.0, 0.01))  # refused: it would overwrite the newer charges
    assert open_ledger(uri, readonly=True).charged("r") == (SampledGaussian(1.0, 0.01, 3),)


def test_ledger_actor_restart_reloads_charges_from_the_object_store(s3):
    import ray
    from conftest import kill_and_await_restart

    from dpsynth.privacy.service import LedgerClient
    from dpsynth.runtime import ensure_ray

    ensure_ray(None)
    uri = s3("ledgers/actor.sqlite")
    client = LedgerClient(uri)
    client.set_budget("fp", Budget(1e6, 1e-5))
    client.open_run("r", "fp", [SampledGaussian(1.0, 0.01, 10)], "rdp")
    for _ in range(4):
        assert client.try_charge("r", SampledGaussian(1.0, 0.01))
    assert ray.get(client.actor.path.remote()) == uri
    kill_and_await_restart(client.actor)  # a fresh process: it can only have the charges from the object
    assert client.charged("r") == (SampledGaussian(1.0, 0.01, 4),)
    ray.kill(client.actor, no_restart=True)


# ---------------------------------------------------------------- training with everything on the object store


@pytest.mark.slow
def test_training_with_checkpoints_and_ledger_on_s3_resumes_after_a_worker_is_killed(s3, tiny_job, tmp_path):
    from test_distributed import train_and_kill_a_worker

    from dpsynth.models import load_adapter
    from dpsynth.runtime import ensure_ray

    ensure_ray(None)
    ledger_uri, storage_uri = s3("e2e/ledger.sqlite"), s3("e2e/checkpoints")
    steps = 40
    cfg = load_config(None, [*tiny_job, f"privacy.ledger={ledger_uri}", f"scaling.storage_path={storage_uri}",
                             f"training.steps={steps}", "scaling.checkpoint_every=5", "scaling.max_failures=2",
                             "sampling.label_proportions=uniform"])
    seen_checkpoint = []

    def a_checkpoint_is_on_s3() -> bool:  # kill only once there is something on S3 to resume from
        seen_checkpoint.append(any(o.endswith("/LATEST") for o in _objects(s3, "e2e/checkpoints")))
        return any(seen_checkpoint)

    run_dir = train_and_kill_a_worker(cfg, when=a_checkpoint_is_on_s3)
    cert = json.loads((run_dir / "certificate.json").read_text())
    metrics = json.loads(owner_path(run_dir, "metrics.json").read_text())
    assert metrics["restarts"] >= 1  # the restarted worker group resumed from the checkpoint on S3
    (run,) = open_ledger(ledger_uri, readonly=True).runs()
    assert run["status"] == "closed" and run["certificate"] == cert
    mech = cert["mechanism"]
    assert mech["steps"] == sum(e.count for e in run["charged"]) == steps  # every charged step, those lost in the crash too
    assert mech["steps_applied"] <= steps and metrics["train"][-1]["step"] == mech["steps_applied"]
    assert cert["epsilon"] == pytest.approx(epsilon([SampledGaussian(mech["noise_multiplier"], mech["sampling_rate"], steps)],
                                                     cert["delta"], cert["accountant"]))
    model, _ = load_adapter(run_dir, cfg.model)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert _objects(s3, "e2e/checkpoints") == []  # private scratch removed from the bucket after release
    assert not (run_dir / ".checkpoints").exists()


def test_the_object_store_cluster_config_keeps_the_ledger_and_checkpoints_in_a_bucket():
    cfg = load_config(Path(__file__).parents[1] / "cluster" / "job-objectstore.yaml")
    assert str(cfg.privacy.ledger).startswith("s3://") and str(cfg.scaling.storage_path).startswith("s3://")
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 2


def test_budget_cli_reads_an_object_store_ledger_without_claiming_it(s3):
    def budget(ledger: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dpsynth", "budget", "--ledger", ledger], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})

    uri = s3("ledgers/cli.sqlite")
    writer = open_ledger(uri)
    writer.set_budget("f" * 64, Budget(8.0, 1e-5))
    writer.open_run("run-a", "f" * 64, [SampledGaussian(1.0, 0.01, 5)], "prv")
    writer.charge("run-a", SampledGaussian(1.0, 0.01, 2))
    out = budget(uri)
    assert out.returncode == 0, out.stderr
    assert "run-a" in out.stdout and "8.000" in out.stdout
    writer.charge("run-a", SampledGaussian(1.0, 0.01))  # the reader did not take the ledger over
    missing = budget(s3("ledgers/none.sqlite"))
    assert missing.returncode == 2 and "does not exist" in missing.stdout + missing.stderr
