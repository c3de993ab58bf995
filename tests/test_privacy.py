"""Privacy accounting: events, accountants, noise calibration and the budget ledger."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld
from hypothesis import given, settings
from hypothesis import strategies as st

from dpsynth.privacy import (
    ACCOUNTANTS,
    CalibrationError,
    Gaussian,
    Laplace,
    SampledGaussian,
    calibrate,
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


# ---------------------------------------------------------------- events: properties (hypothesis)

noise = st.floats(min_value=0.3, max_value=50.0, allow_nan=False)
rates = st.floats(min_value=1e-4, max_value=1.0, allow_nan=False)
counts = st.integers(min_value=1, max_value=10_000)
basic_events = st.one_of(st.builds(SampledGaussian, noise, rates, counts), st.builds(Gaussian, noise, counts),
                         st.builds(Laplace, noise, counts))


@given(basic_events)
def test_any_event_round_trips_through_json_exactly(event):
    back = from_dict(json.loads(json.dumps(to_dict(event))))
    assert back == event and type(back) is type(event)


@given(st.lists(basic_events, max_size=12))
def test_merge_keeps_every_count_and_is_idempotent(events):
    merged = merge(events)
    assert merge(merged) == merged
    assert sum(e.count for e in merged) == sum(e.count for e in events)
    assert len({(type(e), to_dict(e)["noise_multiplier"], getattr(e, "sampling_rate", None)) for e in merged}) == len(merged)


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=0.5, max_value=5.0), st.floats(min_value=1.05, max_value=3.0), st.sampled_from(ACCOUNTANTS))
def test_epsilon_decreases_with_noise(sigma, factor, accountant):
    q, steps = 0.01, 200
    assert epsilon([SampledGaussian(sigma * factor, q, steps)], DELTA, accountant) <= \
        epsilon([SampledGaussian(sigma, q, steps)], DELTA, accountant) * (1 + 1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=2000), st.integers(min_value=1, max_value=2000), st.sampled_from(ACCOUNTANTS))
def test_epsilon_grows_with_the_number_of_steps(steps, more, accountant):
    few, many = SampledGaussian(1.0, 0.01, steps), SampledGaussian(1.0, 0.01, steps + more)
    assert epsilon([many], DELTA, accountant) >= epsilon([few], DELTA, accountant) * (1 - 1e-6)


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


def dp_sgd(q: float, steps: int, prior=()):
    """What a DP-SGD run with a prior release spends at noise s: the calibrator's `events_for`."""
    return lambda s: (*prior, SampledGaussian(s, q, steps))


@pytest.mark.parametrize("target, q, steps, accountant", [
    (1.0, 0.01, 2000, "prv"), (3.0, 0.005, 3000, "prv"), (8.0, 0.01, 500, "prv"), (3.0, 0.01, 1000, "pld"),
    (8.0, 0.005, 1000, "rdp")])
def test_calibration_hits_target_from_below(target, q, steps, accountant):
    sigma = calibrate(dp_sgd(q, steps), target, DELTA, accountant=accountant)
    eps = epsilon([SampledGaussian(sigma, q, steps)], DELTA, accountant)
    assert target * (1 - 0.002) <= eps <= target
    if accountant != "rdp":
        assert pld_epsilon_direct(sigma, q, steps, DELTA) == pytest.approx(target, rel=0.01)


def test_calibration_accounts_for_prior_events():
    prior = (Gaussian(3.0),)
    plain = calibrate(dp_sgd(0.01, 1000), 3.0, DELTA, accountant="rdp")
    with_prior = calibrate(dp_sgd(0.01, 1000, prior), 3.0, DELTA, accountant="rdp")
    assert with_prior > plain * 1.02
    eps = epsilon(prior + (SampledGaussian(with_prior, 0.01, 1000),), DELTA, "rdp")
    assert 3.0 * (1 - 0.002) <= eps <= 3.0


def test_one_calibrator_serves_any_mechanism():
    """The same calibrator over a Laplace plan (in-context votes) and a lone Gaussian (a label histogram)."""
    laplace = calibrate(lambda b: (Laplace(b, 40),), 4.0, DELTA, accountant="pld", bounds=(1e-3, 1e6))
    assert 4.0 * 0.998 <= epsilon([Laplace(laplace, 40)], DELTA, "pld") <= 4.0
    hist = calibrate(lambda s: (Gaussian(s),), 0.4, DELTA, accountant="prv", bounds=(0.05, 1e5))
    assert 0.4 * 0.998 <= epsilon([Gaussian(hist)], DELTA, "prv") <= 0.4


@pytest.mark.parametrize("target, prior, match", [
    (1.0, (Gaussian(1.0),), "too small"),  # a sigma=1 histogram alone costs eps~4.4: no noise fits the rest
    (1e-6, (), "too small"),
    (1e4, (), "vacuous"),
])
def test_impossible_calibration_raises(target, prior, match):
    with pytest.raises(CalibrationError, match=match):
        calibrate(dp_sgd(0.01, 1000, prior), target, DELTA, accountant="pld")


# ---------------------------------------------------------------- the ledger: see test_ledger_contract.py


# ---------------------------------------------------------------- one composition rule per dataset


def test_a_gaussians_purpose_keeps_it_apart_in_the_ledger_but_not_in_accounting():
    hist = Gaussian(5.0, purpose="histogram")
    assert to_dict(hist) == {"kind": "gaussian", "noise_multiplier": 5.0, "count": 1, "purpose": "histogram"}
    assert from_dict(to_dict(hist)) == hist and "purpose" not in to_dict(Gaussian(5.0))
    assert merge([Gaussian(5.0), hist, hist]) == (Gaussian(5.0), Gaussian(5.0, 2, "histogram"))
    for acc in ACCOUNTANTS:
        assert epsilon([hist, TRAIN], DELTA, acc) == pytest.approx(epsilon([Gaussian(5.0), TRAIN], DELTA, acc))
    with pytest.raises(TypeError, match="purpose"):
        Gaussian(5.0, purpose=1)


def test_a_dataset_composes_with_its_accountant_or_the_tightest_that_can():
    from dpsynth.privacy import RepeatAndSelect
    from dpsynth.privacy.accountants import can_account, dataset_accountant, dataset_epsilon

    search = RepeatAndSelect((SampledGaussian(1.0, 0.01, 100), Gaussian(20.0)), 2.0, 1.0)
    assert dataset_accountant([TRAIN, Gaussian(5.0)], "prv") == "prv"
    assert dataset_accountant([TRAIN, Laplace(3.0)], "prv") == "pld"  # PRV cannot account Laplace
    assert dataset_accountant([TRAIN, search], "prv") == dataset_accountant([TRAIN, search], "pld") == "rdp"
    assert dataset_accountant([Laplace(3.0), search], "pld") == "rdp"  # RDP accounts Laplace with RepeatAndSelect
    assert dataset_accountant([TRAIN], "rdp") == "rdp"  # the registered one whenever it can
    assert not can_account([search], "pld") and not can_account([Laplace(1.0)], "prv") and can_account([search], "rdp")
    assert dataset_epsilon([TRAIN, Laplace(3.0)], DELTA, "prv") == epsilon([TRAIN, Laplace(3.0)], DELTA, "pld")
    assert dataset_epsilon([], DELTA, "prv") == 0.0


# ---------------------------------------------------------------- a histogram is charged once, by the ledger's record


class _Counting:
    """A PrivateRun stand-in over a real ledger that counts its charges."""

    def __init__(self, run):
        self.run, self.charges = run, 0

    def charge(self, event):
        self.charges += 1
        self.run.charge(event)

    def charged(self):
        return self.run.charged()


@pytest.fixture()
def histogram_run(tmp_path):
    from dpsynth.privacy import Ledger
    from dpsynth.privacy.certificate import DatasetBlock, HistogramBlock
    from dpsynth.privacy.histogram import histogram_event
    from dpsynth.privacy.run import Plan, PrivateRun
    from dpsynth.storage import Storage

    block = HistogramBlock(noise_multiplier=20.0, budget_share=0.05)
    dataset = DatasetBlock(name="d", fingerprint="f" * 64, units=100, train_units=80)
    # labels then lengths with the same noise, and an in-context style Gaussian of that same noise besides
    plan = Plan((histogram_event(20.0), histogram_event(20.0), Gaussian(20.0, 3)), "prv", DELTA)
    run = PrivateRun.open(Ledger(tmp_path / "ledger.sqlite"), dataset=dataset, plan=plan, total_epsilon=8.0,
                          kind="t", config_hash="h")
    return _Counting(run), block, Storage(tmp_path / "private")


UNITS = [["a"]] * 30 + [["b"]] * 10


def test_a_crash_between_the_charge_and_the_saved_release_is_not_charged_again(histogram_run):
    from dpsynth.privacy.histogram import histogram_event, release_once

    run, block, storage = histogram_run
    run.charge(Gaussian(20.0))  # an in-context token step of the same noise: not a histogram
    run.charge(histogram_event(20.0))  # the label histogram was charged, then the process died before saving it
    first = release_once(run, block, UNITS, ["a", "b"], storage, "labels.json", ordinal=1)
    assert run.charges == 2 and set(first) == {"a", "b"}  # drawn fresh under the charge on record
    # the lengths histogram, same noise: second of its kind, not charged yet
    release_once(run, block, UNITS, ["a", "b"], storage, "lengths.json", ordinal=2)
    assert run.charges == 3
    assert run.charged() == (Gaussian(20.0), Gaussian(20.0, 2, purpose="histogram"))
    assert not any(name.endswith(".charged") for name in storage.listdir())


def test_a_resumed_release_returns_what_was_saved_and_charges_nothing(histogram_run):
    from dpsynth.privacy import BudgetExceeded
    from dpsynth.privacy.histogram import release_once

    run, block, storage = histogram_run
    first = release_once(run, block, UNITS, ["a", "b"], storage, "labels.json", ordinal=1)
    assert run.charges == 1
    assert release_once(run, block, UNITS, ["a", "b"], storage, "labels.json", ordinal=1) == first
    assert run.charges == 1
    second = release_once(run, block, UNITS, ["a", "b"], storage, "lengths.json", ordinal=2)
    assert release_once(run, block, UNITS, ["a", "b"], storage, "lengths.json", ordinal=2) == second
    assert run.charges == 2
    with pytest.raises(BudgetExceeded):  # a third histogram of that noise was never planned
        release_once(run, block, UNITS, ["a", "b"], storage, "third.json", ordinal=3)
    with pytest.raises(ValueError, match="ordinal"):
        release_once(run, block, UNITS, ["a", "b"], storage, "x.json", ordinal=0)
