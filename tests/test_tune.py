"""Private hyperparameter search: accounting against dp_accounting, refusals, a 3-trial search end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event, rdp

from dpsynth.config import load_config
from dpsynth.errors import UserError
from dpsynth.privacy import Gaussian, Ledger, RepeatAndSelect, SampledGaussian, epsilon
from dpsynth.privacy.events import from_dict, to_dict
from dpsynth.privacy.tuning import calibrate_search, draw_num_trials, largest_feasible_mean, search_events
from tune.search import run_trials


def _reference(sigma, q, steps, score_sigma, mean, shape, label_sigma, delta):
    """The same search composed directly in dp_accounting's RDP accountant."""
    trial = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps),
        dp_accounting.GaussianDpEvent(score_sigma)])
    acc = rdp.RdpAccountant(list(np.linspace(1.01, 10, 200)) + list(range(11, 64)) + list(range(64, 257, 8)) + [512, 1024])
    acc.compose(dp_accounting.GaussianDpEvent(label_sigma))
    acc.compose(dp_event.RepeatAndSelectDpEvent(trial, mean, shape))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("mean,shape", [(3.0, 1.0), (5.0, 0.5), (3.0, math.inf)])
def test_search_cost_matches_dp_accounting(mean, shape):
    events = search_events(1.2, 0.01, 300, score_sigma=20.0, mean=mean, shape=shape, prior=(Gaussian(50.0),))
    ours = epsilon(events, 1e-5, "rdp")
    assert ours == pytest.approx(_reference(1.2, 0.01, 300, 20.0, mean, shape, 50.0, 1e-5), rel=1e-9)
    assert ours > epsilon([SampledGaussian(1.2, 0.01, 300), Gaussian(20.0), Gaussian(50.0)], 1e-5, "rdp")  # selection costs
    assert from_dict(json.loads(json.dumps(to_dict(events[-1])))) == events[-1]


def test_tight_accountants_refuse_a_search_event():
    event = RepeatAndSelect((SampledGaussian(1.0, 0.01, 10),), 3.0, 1.0)
    for acc in ("prv", "pld"):
        with pytest.raises(ValueError, match="use 'rdp'"):
            epsilon([event], 1e-5, acc)


def test_calibrated_search_fits_the_total_and_is_tight():
    kw = dict(score_sigma=20.0, mean=3.0, shape=1.0, prior=(Gaussian(50.0),))
    sigma = calibrate_search(4.0, 1e-5, 0.02, 200, **kw)
    spent = epsilon(search_events(sigma, 0.02, 200, **kw), 1e-5, "rdp")
    assert 4.0 * 0.99 <= spent <= 4.0
    assert epsilon(search_events(sigma * 0.97, 0.02, 200, **kw), 1e-5, "rdp") > 4.0


def test_too_many_trials_refused_with_the_largest_feasible_mean():
    kw = dict(score_sigma=20.0, shape=1.0, prior=(Gaussian(50.0),))
    with pytest.raises(ValueError, match=r"at most (\d+\.\d+) trials on average fit") as err:
        calibrate_search(0.3, 1e-5, 0.01, 100, mean=300.0, max_sigma=20.0, **kw)
    best = float(err.value.args[0].split("at most ")[1].split(" ")[0])
    assert epsilon(search_events(20.0, 0.01, 100, mean=best, **kw), 1e-5, "rdp") <= 0.3
    assert epsilon(search_events(20.0, 0.01, 100, mean=best * 1.05, **kw), 1e-5, "rdp") > 0.3
    assert largest_feasible_mean(0.01, 1e-5, 0.01, 100, sigma=20.0, **kw) is None


@pytest.mark.parametrize("shape", [1.0, 0.5, math.inf])
def test_number_of_trials_has_the_configured_distribution(shape):
    rng = np.random.default_rng(0)
    ks = np.array([draw_num_trials(4.0, shape, rng) for _ in range(20000)])
    assert ks.mean() == pytest.approx(4.0, rel=0.03)
    assert (ks.min() >= 1) if math.isfinite(shape) else (ks == 0).mean() == pytest.approx(math.exp(-4.0), abs=0.01)


def test_early_stopping_scheduler_refused(tiny_job):
    from dpsynth.tuning import search

    with pytest.raises(UserError, match="tune.scheduler: 'asha'"):
        search(load_config(None, [*tiny_job, "tune.scheduler=asha"]), runner=run_trials, show_progress=False)


def test_infeasible_search_refused_before_any_trial(tiny_job):
    from dpsynth.tuning import search

    cfg = load_config(None, [*tiny_job, "privacy.epsilon=0.05", "tune.mean_trials=50", "tune.max_noise_multiplier=5"])
    with pytest.raises(UserError, match="tune.mean_trials"):
        search(cfg, runner=run_trials, show_progress=False)
    ledger = Path(cfg.privacy.ledger)
    assert not ledger.exists() or Ledger(ledger).runs() == []
    assert not Path(cfg.output_dir).exists()


@pytest.mark.slow
def test_three_trial_search_end_to_end(tiny_job):
    from dpsynth.models import load_adapter
    from dpsynth.tuning import search

    cfg = load_config(None, [*tiny_job, "training.steps=3", "privacy.epsilon=6", "tune.score_examples=24",
                             "tune.max_concurrent_trials=1"])
    run_dir = search(cfg, runner=run_trials, show_progress=False, num_trials=3)  # K fixed here only; a real search draws it in secret
    cert = json.loads((run_dir / "certificate.json").read_text())
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert len(rows) == 3 and sum(r["selected"] == "True" for r in rows) == 1
    best = next(r for r in rows if r["selected"] == "True")
    assert float(best["dp_validation_loss"]) == min(float(r["dp_validation_loss"]) for r in rows)
    lo, hi = cfg.tune.max_grad_norm
    assert all(lo <= float(r["max_grad_norm"]) <= hi for r in rows)
    search_block = cert["mechanism"]
    assert search_block["kind"] == "private_search" and search_block["trials_run"] == 3
    assert search_block["selected"]["max_grad_norm"] == pytest.approx(float(best["max_grad_norm"]))
    assert search_block["selected"]["learning_rate"] == pytest.approx(float(best["learning_rate"]))
    assert search_block["selected"]["dp_validation_loss"] == pytest.approx(float(best["dp_validation_loss"]))
    assert search_block["covers_selection"] is True and cert["accountant"] == "rdp"
    assert cert["epsilon"] <= cfg.privacy.epsilon and cert["epsilon"] > search_block["per_trial_epsilon_alone"]
    # the released adapter is the selected trial's, and the certificate is the search's (one RepeatAndSelect)
    events = [from_dict(e) for e in cert["events"]]
    assert sum(isinstance(e, RepeatAndSelect) for e in events) == 1
    assert cert["epsilon"] == pytest.approx(epsilon(events, cert["delta"], "rdp"), rel=1e-9)
    released = load_config(run_dir / "config.yaml")
    assert released.training.max_grad_norm == pytest.approx(float(best["max_grad_norm"]))
    (run,) = Ledger(cfg.privacy.ledger).runs()
    assert run["status"] == "closed" and run["certificate"] == cert
    assert Ledger(cfg.privacy.ledger).spent(cert["dataset"]["fingerprint"], "rdp") <= cfg.privacy.epsilon
    assert (run_dir / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / ".checkpoints").exists()  # unselected trials' adapters are not left behind
    model, _ = load_adapter(run_dir, cfg.model)
    assert model is not None
