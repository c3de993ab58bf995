"""Privacy accounting: events, accountants, noise calibration and the budget ledger."""

from __future__ import annotations

import json
import math
import multiprocessing
import sqlite3
import threading

import dp_accounting
import pytest
from dp_accounting import pld

from dpsynth.privacy import (
    ACCOUNTANTS,
    Budget,
    BudgetExceeded,
    Gaussian,
    Laplace,
    Ledger,
    SampledGaussian,
    calibrate_noise_multiplier,
    epsilon,
    from_dict,
    merge,
    to_dict,
    to_dp_event,
)

DELTA = 1e-5
TRAIN = SampledGaussian(1.0, 0.01, 1000)  # the anchor: sigma=1, q=0.01, T=1000


def pld_epsilon_direct(sigma: float, q: float, steps: int, delta: float) -> float:
    """Reference epsilon straight from dp_accounting, independent of our event mapping."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = pld.PLDAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------- events


@pytest.mark.parametrize("event", [
    SampledGaussian(0.1 + 0.2, 1 / 3, 7), SampledGaussian(1.0, 1.0), Gaussian(5.5, 2), Laplace(1e-3)])
def test_event_json_roundtrip_is_exact(event):
    d = json.loads(json.dumps(to_dict(event)))
    assert d["kind"] == {SampledGaussian: "sampled_gaussian", Gaussian: "gaussian", Laplace: "laplace"}[type(event)]
    back = from_dict(d)
    assert back == event and type(back) is type(event)
    assert back.noise_multiplier == event.noise_multiplier  # bit-exact floats


def test_event_parameters_are_normalised():
    # An int sigma and a float sigma are the same mechanism and must merge and serialise alike.
    assert SampledGaussian(1, 1, 3) == SampledGaussian(1.0, 1.0, 3)
    assert to_dict(Gaussian(2)) == {"kind": "gaussian", "noise_multiplier": 2.0, "count": 1}
    assert type(to_dict(Gaussian(2))["noise_multiplier"]) is float


@pytest.mark.parametrize("make, field", [
    (lambda: SampledGaussian(0.0, 0.01), "noise_multiplier"),
    (lambda: SampledGaussian(-1.0, 0.01), "noise_multiplier"),
    (lambda: SampledGaussian(math.nan, 0.01), "noise_multiplier"),
    (lambda: SampledGaussian(math.inf, 0.01), "noise_multiplier"),
    (lambda: SampledGaussian(1.0, 0.0), "sampling_rate"),
    (lambda: SampledGaussian(1.0, 1.5), "sampling_rate"),
    (lambda: SampledGaussian(1.0, math.nan), "sampling_rate"),
    (lambda: SampledGaussian(1.0, 0.01, 0), "count"),
    (lambda: Gaussian(0.0), "noise_multiplier"),
    (lambda: Gaussian(1.0, -2), "count"),
    (lambda: Laplace(-0.5), "noise_multiplier"),
    (lambda: Laplace(1.0, 0), "count"),
])
def test_event_validation(make, field):
    with pytest.raises(ValueError, match=field):
        make()


@pytest.mark.parametrize("d, match", [
    ({"kind": "exponential", "noise_multiplier": 1.0}, "unknown event kind"),
    ({"noise_multiplier": 1.0}, "unknown event kind"),
    ({"kind": "gaussian", "noise_multiplier": 1.0, "sampling_rate": 0.5}, "unknown field"),
    ({"kind": "sampled_gaussian", "noise_multiplier": 1.0}, "missing field"),
])
def test_from_dict_is_strict(d, match):
    with pytest.raises(ValueError, match=match):
        from_dict(d)


def test_merge_sums_counts_and_keeps_different_parameters_apart():
    events = [SampledGaussian(1.0, 0.01), SampledGaussian(1.0, 0.01, 3), Gaussian(2.0), SampledGaussian(1.0, 0.02),
              Laplace(2.0), SampledGaussian(1.0, 0.01), Gaussian(2.0, 4), SampledGaussian(1.1, 0.01)]
    assert merge(events) == (SampledGaussian(1.0, 0.01, 5), Gaussian(2.0, 5), SampledGaussian(1.0, 0.02),
                             Laplace(2.0), SampledGaussian(1.1, 0.01))
    assert merge([]) == ()


def test_to_dp_event():
    assert to_dp_event(SampledGaussian(2.0, 0.1, 5)) == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(2.0)), 5)
    # sampling_rate 1 is the bare mechanism, not a degenerate Poisson sample
    assert to_dp_event(SampledGaussian(2.0, 1.0, 5)) == to_dp_event(Gaussian(2.0, 5)) == \
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 5)
    assert to_dp_event(Laplace(3.0)) == dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(3.0), 1)


# ---------------------------------------------------------------- accountants


@pytest.mark.parametrize("accountant, expected, tol", [("rdp", 2.10, 0.01), ("prv", 1.83, 0.015), ("pld", 1.83, 0.015)])
def test_anchor_epsilons(accountant, expected, tol):
    assert epsilon([TRAIN], DELTA, accountant) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_many_one_step_events_equal_one_counted_event(accountant):
    one_steps = [SampledGaussian(1.0, 0.01)] * 1000
    assert epsilon(one_steps, DELTA, accountant) == pytest.approx(epsilon([TRAIN], DELTA, accountant), rel=1e-12)


def test_prv_matches_pld_and_is_an_upper_bound():
    prv, ref = epsilon([TRAIN], DELTA, "prv"), pld_epsilon_direct(1.0, 0.01, 1000, DELTA)
    assert ref <= prv <= ref * 1.005


def test_label_histogram_composes_with_training():
    mixed = [Gaussian(5.0), TRAIN]
    by = {acc: (epsilon(mixed, DELTA, acc), epsilon([TRAIN], DELTA, acc)) for acc in ("prv", "pld")}
    for acc, (with_hist, alone) in by.items():
        assert with_hist > alone + 0.05, acc  # a sigma=5 histogram costs ~0.16 on top
    assert by["prv"][0] == pytest.approx(by["pld"][0], rel=0.01)


def test_laplace_accounting():
    with pytest.raises(ValueError, match="'prv' cannot account Laplace events; use 'pld'"):
        epsilon([Laplace(1.0), TRAIN], DELTA, "prv")
    # Laplace with scale b and L1 sensitivity 1 is pure (1/b)-DP.
    assert 0.99 < epsilon([Laplace(1.0)], DELTA, "pld") <= 1.0 + 1e-3
    assert 1.9 < epsilon([Laplace(1.0, 2)], DELTA, "rdp") <= 2.0 + 0.05


def test_epsilon_argument_checks():
    with pytest.raises(ValueError, match=r"'moments'.*prv.*pld.*rdp"):
        epsilon([TRAIN], DELTA, "moments")
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            epsilon([TRAIN], bad)
    assert epsilon([], DELTA) == 0.0


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("target, q, steps, accountant", [
    (1.0, 0.01, 2000, "prv"), (3.0, 0.005, 3000, "prv"), (8.0, 0.01, 500, "prv"), (3.0, 0.01, 1000, "pld"),
    (8.0, 0.005, 1000, "rdp")])
def test_calibration_hits_target_from_below(target, q, steps, accountant):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant=accountant)
    eps = epsilon([SampledGaussian(sigma, q, steps)], DELTA, accountant)
    assert target * (1 - 0.002) <= eps <= target
    if accountant != "rdp":
        assert pld_epsilon_direct(sigma, q, steps, DELTA) == pytest.approx(target, rel=0.01)


def test_calibration_accounts_for_prior_events():
    prior = (Gaussian(3.0),)
    plain = calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="rdp")
    with_prior = calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="rdp", prior_events=prior)
    assert with_prior > plain * 1.02
    eps = epsilon(prior + (SampledGaussian(with_prior, 0.01, 1000),), DELTA, "rdp")
    assert 3.0 * (1 - 0.002) <= eps <= 3.0


@pytest.mark.parametrize("target, prior, match", [
    (1.0, (Gaussian(1.0),), "prior events alone"),  # a sigma=1 histogram alone costs eps~4.4
    (1e-6, (), "too small"),
    (1e4, (), "vacuous"),
])
def test_impossible_calibration_raises(target, prior, match):
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(target, DELTA, 0.01, 1000, accountant="pld", prior_events=prior)


# ---------------------------------------------------------------- ledger

FP = "3f2a9c0e5d7b11aa"


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "nested" / "ledger.sqlite")


def test_set_budget_is_fixed_once_set(ledger):
    assert ledger.budget(FP) is None
    ledger.set_budget(FP, Budget(8.0, 1e-5))
    ledger.set_budget(FP, Budget(8.0, 1e-5))  # idempotent
    assert ledger.budget(FP) == Budget(8.0, 1e-5)
    with pytest.raises(ValueError, match="epsilon=8.0"):
        ledger.set_budget(FP, Budget(9.0, 1e-5))
    with pytest.raises(ValueError):
        ledger.set_budget(FP, Budget(8.0, 1e-6))
    assert ledger.budget(FP) == Budget(8.0, 1e-5)
    with pytest.raises(ValueError):
        Budget(math.nan, 1e-5)


def test_open_run_requires_budget_and_unique_id(ledger):
    with pytest.raises(ValueError, match="no budget"):
        ledger.open_run("r1", FP, [TRAIN], "rdp")
    ledger.set_budget(FP, Budget(3.0, DELTA))
    ledger.open_run("r1", FP, [TRAIN], "rdp")
    with pytest.raises(ValueError, match="already exists"):
        ledger.open_run("r1", FP, [SampledGaussian(9.0, 0.01)], "rdp")


def test_open_run_refuses_plan_over_total(ledger):
    ledger.set_budget(FP, Budget(2.0, DELTA))
    with pytest.raises(BudgetExceeded) as exc:
        ledger.open_run("r1", FP, [TRAIN], "rdp")  # rdp eps 2.10 > 2.0
    msg = str(exc.value)
    assert "spent eps=0.00" in msg and "requested +2.10" in msg and "total eps=2.00" in msg and FP[:8] in msg
    assert ledger.runs() == []
    ledger.open_run("r2", FP, [SampledGaussian(1.0, 0.01, 800)], "rdp")  # ~1.93 fits
    assert [r["run_id"] for r in ledger.runs(FP)] == ["r2"]


def test_calibrated_plan_is_admitted(ledger):
    # The driver's path: calibrate to the dataset total (with a label histogram), then open the run.
    ledger.set_budget(FP, Budget(3.0, DELTA))
    sigma = calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000, prior_events=(Gaussian(5.0),))
    ledger.open_run("r1", FP, [Gaussian(5.0), SampledGaussian(sigma, 0.01, 1000)], "prv")
    assert ledger.runs(FP)[0]["planned"] == (Gaussian(5.0), SampledGaussian(sigma, 0.01, 1000))


def test_admission_has_no_slack(ledger):
    # RDP is exactly monotone: once a run fills the budget, one more step (~0.1% eps) is refused.
    ledger.set_budget(FP, Budget(3.0, DELTA))
    sigma = calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant="rdp", rel_tol=1e-4)
    ledger.open_run("r1", FP, [SampledGaussian(sigma, 0.01, 1000)], "rdp")
    with pytest.raises(BudgetExceeded, match="total eps=3.00"):
        ledger.open_run("r2", FP, [SampledGaussian(sigma, 0.01)], "rdp")


def test_open_runs_cannot_over_reserve_and_close_releases(ledger):
    ledger.set_budget(FP, Budget(2.7, DELTA))
    ledger.open_run("a", FP, [TRAIN], "rdp")  # 1000 steps: rdp 2.10
    with pytest.raises(BudgetExceeded, match="charged \\+ reserved"):
        ledger.open_run("b", FP, [TRAIN], "rdp")  # 2000 steps: 2.87 > 2.7
    for _ in range(5):
        ledger.charge("a", SampledGaussian(1.0, 0.01, 100))
    ledger.close_run("a", {"epsilon": 1.65})  # 500 steps used; the other 500 are released
    ledger.open_run("b", FP, [TRAIN], "rdp")  # 1500 steps: 2.50 <= 2.7
    assert {r["run_id"]: r["status"] for r in ledger.runs(FP)} == {"a": "closed", "b": "open"}


def test_charge_is_limited_to_the_admitted_plan(ledger):
    ledger.set_budget(FP, Budget(8.0, DELTA))
    ledger.open_run("r", FP, [SampledGaussian(1.0, 0.01, 3), Gaussian(5.0)], "prv")
    for _ in range(3):
        ledger.charge("r", SampledGaussian(1.0, 0.01))
    with pytest.raises(BudgetExceeded, match="requested \\+1"):
        ledger.charge("r", SampledGaussian(1.0, 0.01))
    with pytest.raises(BudgetExceeded):
        ledger.charge("r", SampledGaussian(0.9, 0.01))  # never planned: less noise
    with pytest.raises(BudgetExceeded):
        ledger.charge("r", Gaussian(5.0, 2))  # more than planned in one go
    ledger.charge("r", Gaussian(5.0))
    with pytest.raises(BudgetExceeded):
        ledger.charge("r", Gaussian(5.0))
    assert ledger.charged("r") == (SampledGaussian(1.0, 0.01, 3), Gaussian(5.0))
    ledger.close_run("r")
    with pytest.raises(ValueError, match="closed"):
        ledger.charge("r", SampledGaussian(1.0, 0.01))
    with pytest.raises(ValueError, match="unknown"):
        ledger.charge("nope", SampledGaussian(1.0, 0.01))
    with pytest.raises(ValueError, match="unknown"):
        ledger.charged("nope")


def test_charges_are_durable(tmp_path):
    path = tmp_path / "ledger.sqlite"
    first = Ledger(path)
    first.set_budget(FP, Budget(8.0, DELTA))
    first.open_run("r", FP, [TRAIN], "prv")
    for _ in range(7):
        first.charge("r", SampledGaussian(1.0, 0.01))
    # committed before charge() returned: a fresh instance and a raw connection both see them
    assert Ledger(path).charged("r") == (SampledGaussian(1.0, 0.01, 7),)
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT SUM(count) FROM charges").fetchone()[0] == 7
    assert Ledger(path).runs()[0]["planned"] == (TRAIN,)


def test_spent_is_epsilon_of_charged_events(ledger):
    ledger.set_budget(FP, Budget(8.0, DELTA))
    ledger.set_budget("other", Budget(8.0, DELTA))
    ledger.open_run("a", FP, [Gaussian(5.0), TRAIN], "rdp")
    ledger.open_run("b", FP, [SampledGaussian(2.0, 0.02, 400)], "rdp")
    ledger.open_run("c", "other", [TRAIN], "rdp")
    ledger.charge("a", Gaussian(5.0))
    ledger.charge("a", SampledGaussian(1.0, 0.01, 600))
    ledger.charge("b", SampledGaussian(2.0, 0.02, 400))
    ledger.charge("c", SampledGaussian(1.0, 0.01, 1000))
    charged = [Gaussian(5.0), SampledGaussian(1.0, 0.01, 600), SampledGaussian(2.0, 0.02, 400)]
    assert ledger.spent(FP) == pytest.approx(epsilon(charged, DELTA), rel=1e-12)  # default: prv
    expected = epsilon(charged, DELTA, "rdp")
    assert ledger.spent(FP, "rdp") == pytest.approx(expected, rel=1e-12)
    assert expected < epsilon([Gaussian(5.0), TRAIN, SampledGaussian(2.0, 0.02, 400)], DELTA, "rdp")
    datasets = {d["fingerprint"]: d for d in ledger.datasets("rdp")}
    assert datasets[FP]["spent"] == pytest.approx(expected, rel=1e-12)
    assert datasets["other"]["budget"] == Budget(8.0, DELTA)


def test_close_run_stores_certificate(ledger):
    ledger.set_budget(FP, Budget(8.0, DELTA))
    ledger.open_run("r", FP, [TRAIN], "prv")
    cert = {"epsilon": 1.23, "events": [to_dict(TRAIN)]}
    ledger.close_run("r", cert)
    ledger.close_run("r", cert)  # repeating the same close is a no-op
    ledger.close_run("r")
    with pytest.raises(ValueError, match="another certificate"):
        ledger.close_run("r", {"epsilon": 0.5})
    (run,) = ledger.runs(FP)
    assert run["status"] == "closed" and run["certificate"] == cert and run["charged"] == ()
    with pytest.raises(ValueError, match="unknown"):
        ledger.close_run("nope")


def test_laplace_plan_under_prv_is_refused(ledger):
    ledger.set_budget(FP, Budget(8.0, DELTA))
    with pytest.raises(ValueError, match="use 'pld'"):
        ledger.open_run("r", FP, [Laplace(1.0), TRAIN], "prv")
    assert ledger.runs() == []  # nothing half-written
    ledger.open_run("r", FP, [Laplace(1.0), TRAIN], "pld")


def _charge_worker(path, runs: list[str], attempts: int, barrier, results) -> None:
    """Worker: after the barrier, try `attempts` one-step charges on each run; report acceptances."""
    ledger, accepted = Ledger(path), dict.fromkeys(runs, 0)
    barrier.wait(timeout=60)
    for run_id in runs:
        for _ in range(attempts):
            try:
                ledger.charge(run_id, SampledGaussian(1.0, 0.01))
                accepted[run_id] += 1
            except BudgetExceeded:
                pass
    results.put(accepted)


def test_concurrent_charges_are_neither_lost_nor_double_counted(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.set_budget(FP, Budget(100.0, DELTA))
    runs = [f"r{i}" for i in range(12)]
    for run_id in runs:
        ledger.open_run(run_id, FP, [SampledGaussian(1.0, 0.01, 10)], "rdp")
    # 4 processes and 4 threads, released together, each try 4 steps on every run: 32 attempts
    # race for each plan of 10, so both the counts and the plan limit are contended.
    # fork: the worker need not be importable by module name (pytest import modes vary)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    args = (path, runs, 4, barrier, results)
    workers = [ctx.Process(target=_charge_worker, args=args) for _ in range(4)]
    workers += [threading.Thread(target=_charge_worker, args=args) for _ in range(4)]
    for w in workers:
        w.start()
    reports = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    assert all(w.exitcode == 0 for w in workers[:4])
    for run_id in runs:
        assert sum(r[run_id] for r in reports) == 10, run_id  # every acceptance is recorded, none beyond plan
        assert ledger.charged(run_id) == (SampledGaussian(1.0, 0.01, 10),)
    assert ledger.spent(FP, "rdp") == pytest.approx(epsilon([SampledGaussian(1.0, 0.01, 120)], DELTA, "rdp"))
