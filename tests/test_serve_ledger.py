"""Serving and sampling check a certificate against the server's own ledger, never one the run directory names.

Cheap: the run directory and its certificate are built by hand (no training, no Ray); the ledgers are real."""

from __future__ import annotations

import json

import pytest

from dpsynth.config import load_config
from dpsynth.errors import UserError
from dpsynth.privacy import Budget, Ledger, SampledGaussian, epsilon, to_dict
from dpsynth.privacy.certificate import BaseModelBlock, Certificate, DatasetBlock, DpSgdBlock, write_certificate

FP = "9c" * 32
DELTA = 1e-5
STEPS = SampledGaussian(1.0, 0.01, 10)


def certify(ledger: Ledger, cert: Certificate) -> None:
    ledger.set_budget(FP, Budget(8.0, DELTA, accountant="rdp"))
    ledger.open_run(cert.run_id, FP, [STEPS], "rdp")
    ledger.charge(cert.run_id, STEPS)
    ledger.certify(cert.run_id, cert.to_json())


@pytest.fixture()
def forged(tmp_path):
    """A run directory whose config names a forged ledger that holds its (forged) certificate."""
    cert = Certificate(run_id="train-forged", created="2026-01-01T00:00:00+00:00", code_version="test",
                       config_hash="h", epsilon=epsilon([STEPS], DELTA, "rdp"), delta=DELTA, accountant="rdp",
                       events=(to_dict(STEPS),), dataset=DatasetBlock(name="reviews", fingerprint=FP, units=100,
                                                                      train_units=80),
                       base_model=BaseModelBlock(name="tiny"),
                       mechanism=DpSgdBlock(noise_multiplier=1.0, sampling_rate=0.01, steps=10, steps_applied=10,
                                            max_grad_norm=1.0, expected_batch_size=1))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 2}))
    (run / "labels.json").write_text(json.dumps(["neg", "pos"]))
    fake = tmp_path / "forged-ledger.sqlite"
    (run / "config.yaml").write_text(load_config(None, [f"privacy.ledger={fake}"]).to_yaml())
    write_certificate(run / "certificate.json", cert)
    certify(Ledger(fake), cert)
    server = tmp_path / "server" / "ledger.sqlite"
    Ledger(server)  # the server's own ledger exists, and does not hold the run
    return {"run": run, "cert": cert, "fake": fake, "server": server}


def test_a_run_directory_cannot_name_the_ledger_it_is_checked_against(forged, monkeypatch):
    from dpsynth.sample.adapters import load_certified
    from serve.app import certified_adapters, parse_config

    load_certified(forged["run"], ledger=forged["fake"])  # the forgery is consistent with its own ledger...
    with pytest.raises(UserError, match="not in the ledger"):
        load_certified(forged["run"], ledger=forged["server"])  # ...but the server's ledger does not hold it
    monkeypatch.setenv("DPSYNTH_LEDGER", str(forged["server"]))
    with pytest.raises(UserError, match=f"not in the ledger {forged['server']}"):
        load_certified(forged["run"])  # no ledger named: the server's default, not the run's config
    cfg = parse_config({"adapters": [str(forged["run"])]})
    assert str(cfg.ledger) == str(forged["server"])
    with pytest.raises(UserError, match="not in the ledger"):
        certified_adapters(cfg)
    monkeypatch.delenv("DPSYNTH_LEDGER")
    monkeypatch.setenv("HOME", str(forged["run"].parent / "home"))  # ~/.dpsynth/ledger.sqlite: there is none
    with pytest.raises(UserError, match="not found"):
        load_certified(forged["run"])


def test_a_run_the_servers_own_ledger_certified_is_served(forged, monkeypatch):
    from dpsynth.sample.adapters import load_certified
    from serve.app import certified_adapters, parse_config

    certify(Ledger(forged["server"]), forged["cert"])
    assert load_certified(forged["run"], ledger=forged["server"]).certificate == forged["cert"]
    monkeypatch.setenv("DPSYNTH_LEDGER", str(forged["server"]))
    adapters, _ = certified_adapters(parse_config({"adapters": [f"a={forged['run']}"]}))
    assert [(name, str(a.run_dir)) for name, a in adapters.items()] == [("a", str(forged["run"].resolve()))]


def test_dpsynth_sample_checks_the_ledger_it_is_given(forged):
    from typer.testing import CliRunner

    from dpsynth.cli import app

    res = CliRunner().invoke(app, ["sample", str(forged["run"]), "--ledger", str(forged["server"]), "-q"])
    assert isinstance(res.exception, UserError) and "not in the ledger" in str(res.exception)
