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
from dpsynth.release import export, owner_path
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


def _pmf(k: np.ndarray, mean: float, shape: float) -> np.ndarray:
    """Papernot & Steinke 2022 (Sec. 2): Poisson(mean) for shape = inf, else the truncated negative binomial
    P[K=k] = (1-g)^k / (g^-shape - 1) * prod_{l<k} (l+shape)/(l+1), k >= 1, with g solving its mean."""
    from scipy.special import gammaln
    from scipy.stats import poisson

    from dpsynth.privacy.tuning import _tnb_gamma

    if math.isinf(shape):
        return poisson.pmf(k, mean)
    g = _tnb_gamma(mean, shape)
    log_prod = gammaln(k + shape) - gammaln(shape) - gammaln(k + 1)
    return np.where(k >= 1, np.exp(k * np.log1p(-g) + log_prod) / (g**-shape - 1), 0.0)


@pytest.mark.parametrize("mean,shape", [(4.0, 1.0), (4.0, 0.5), (4.0, math.inf), (2.5, 2.0)])
def test_number_of_trials_has_the_configured_distribution(mean, shape):
    """The whole shape, not just the mean: a chi-square goodness-of-fit against the closed-form pmf (a sampler of the
    right mean but the wrong law, e.g. a geometric or a shifted Poisson, fails it)."""
    from scipy.stats import chi2

    rng = np.random.default_rng(0)
    n = 20000
    ks = np.array([draw_num_trials(mean, shape, rng) for _ in range(n)])
    top = 12
    support = np.arange(0, top)
    expected = np.append(_pmf(support, mean, shape), 0.0) * n
    expected[-1] = n - expected[:-1].sum()  # the tail k >= top
    observed = np.append(np.bincount(np.minimum(ks, top), minlength=top + 1)[:top], (ks >= top).sum())
    keep = expected > 5
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert stat < chi2.ppf(0.999, keep.sum() - 1), (observed, expected.round(1))
    assert ks.mean() == pytest.approx(mean, rel=0.03)
    if math.isfinite(shape):
        assert ks.min() >= 1


def test_a_wrong_trial_count_law_fails_the_shape_check():
    """The check above has teeth: a geometric K of the same mean (the truncated negative binomial of shape 1, not the
    configured 0.5) is rejected by the same statistic."""
    from scipy.stats import chi2

    rng = np.random.default_rng(0)
    n, mean, shape, top = 20000, 4.0, 0.5, 12
    ks = rng.geometric(1 / mean, n)  # mean 4, support >= 1, the right mean and minimum but the wrong law
    expected = np.append(_pmf(np.arange(top), mean, shape), 0.0) * n
    expected[-1] = n - expected[:-1].sum()
    observed = np.append(np.bincount(np.minimum(ks, top), minlength=top + 1)[:top], (ks >= top).sum())
    keep = expected > 5
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    assert stat > chi2.ppf(0.999, keep.sum() - 1)


def test_failed_and_unfinished_trials_count_as_the_worst_and_stopped_ones_do_not(tmp_path):
    """Which trials count must not depend on the data: a failure, a non-finite score or a trial that died without a
    result is a trial with the worst score; only a trial stopped by the owner's stop request is drawn again."""
    from dpsynth.storage import Storage
    from dpsynth.tuning import WORST, trial_records

    store = Storage(tmp_path).child("trials")
    def started(name, **result):
        store.write_text(f"{name}.started.json", json.dumps({"trial": name, "max_grad_norm": 1.0, "learning_rate": 1e-3}))
        if result:
            store.write_text(f"{name}.json", json.dumps({"trial": name, "max_grad_norm": 1.0, "learning_rate": 1e-3,
                                                         **result}))
    started("trial-a", score=2.5, status="ok")
    started("trial-b", score=WORST, status="failed", error="RuntimeError")
    started("trial-c")  # killed: no result
    started("trial-d", score=None, status="stopped")
    records = {r["trial"]: r for r in trial_records(Storage(tmp_path))}
    assert set(records) == {"trial-a", "trial-b", "trial-c"}
    assert records["trial-a"]["score"] == 2.5
    assert records["trial-b"]["score"] == records["trial-c"]["score"] == math.inf
    assert min(records.values(), key=lambda r: r["score"])["trial"] == "trial-a"


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
def test_three_trial_search_end_to_end(tiny_job, tmp_path):
    from dpsynth.models import load_adapter
    from dpsynth.tuning import search

    cfg = load_config(None, [*tiny_job, "training.steps=3", "privacy.epsilon=6", "tune.score_examples=24",
                             "tune.max_concurrent_trials=1", "privacy.dataset_epsilon=20"])
    run_dir = search(cfg, runner=run_trials, show_progress=False, num_trials=3)  # K fixed here only; a real search draws it in secret
    cert = json.loads((run_dir / "certificate.json").read_text())
    assert not (run_dir / "trials.csv").exists() and not (run_dir / "tuning.json").exists()  # owner-only
    rows = list(csv.DictReader(owner_path(run_dir, "trials.csv").open()))
    assert len(rows) == 3 and sum(r["selected"] == "True" for r in rows) == 1
    best = next(r for r in rows if r["selected"] == "True")
    assert float(best["dp_validation_loss"]) == min(float(r["dp_validation_loss"]) for r in rows)
    lo, hi = cfg.tune.max_grad_norm
    assert all(lo <= float(r["max_grad_norm"]) <= hi for r in rows)
    search_block = cert["mechanism"]
    assert search_block["kind"] == "private_search" and "trials_run" not in search_block  # K stays secret
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
    assert owner_path(run_dir, "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run_dir / ".checkpoints").exists()  # unselected trials' adapters are not left behind
    # the export: only the selected trial leaves; no trace of the others, of K, or of the plots
    dest = tmp_path / "shared"
    written = export(run_dir, dest)
    assert not {"trials.csv", "trials.png", "tuning.json"} & set(written)
    text = "\n".join((dest / f).read_text(errors="replace") for f in written if not f.endswith(".safetensors"))
    for r in rows:
        if r["selected"] != "True":
            for key in ("max_grad_norm", "learning_rate", "dp_validation_loss"):
                assert r[key] not in text and repr(float(r[key])) not in text, (key, r[key])
    assert "trials_run" not in text and "num_trials" not in text
    model, _ = load_adapter(run_dir, cfg.model)
    assert model is not None

    # then a PRV training run on the same dataset: the dataset's budget composes both (RDP where PRV cannot), and
    # `dpsynth budget` lists both runs
    import subprocess
    import sys

    train = [o for o in tiny_job if not o.startswith("output_dir=")] + [f"output_dir={tmp_path / 'trained'}",
                                                                         "privacy.epsilon=4", "privacy.dataset_epsilon=20"]
    res = subprocess.run([sys.executable, "-m", "dpsynth", "train", "--quiet", *[a for o in train for a in ("--set", o)]],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    trained = json.loads((tmp_path / "trained" / "certificate.json").read_text())
    assert trained["accountant"] == "prv" and trained["dataset"]["fingerprint"] == cert["dataset"]["fingerprint"]
    import os

    res = subprocess.run([sys.executable, "-m", "dpsynth", "budget", "--ledger", str(cfg.privacy.ledger)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert cert["run_id"] in res.stdout and trained["run_id"] in res.stdout
    spent = Ledger(cfg.privacy.ledger).spent(cert["dataset"]["fingerprint"])
    assert cert["epsilon"] < spent <= 20 and spent >= trained["epsilon"]
