"""The privacy cost of a hyperparameter search (Papernot & Steinke, ICLR 2022).

Choosing the best of several DP training runs by a score computed on private data leaks
more than one run. Papernot & Steinke's fix: run a *random* number K of independent trials
(K ~ Poisson or truncated negative binomial), each one a DP mechanism that releases its model
and a DP score, and release only the best. Its cost is a `RepeatAndSelect` event, accounted with
RDP (dp_accounting's RepeatAndSelectDpEvent); each trial's noise is calibrated so the whole
search (plus the DP label histogram) fits the total budget.

Trials must be i.i.d.: hyperparameters drawn from a fixed distribution (random search),
not adapted to earlier scores, and no early stopping on private metrics.
"""

from __future__ import annotations

import math

import numpy as np

from .accountants import epsilon
from .calibration import DEFAULT_BOUNDS, CalibrationError, calibrate
from .events import Event, Gaussian, RepeatAndSelect, SampledGaussian

ACCOUNTANT = "rdp"  # the only accountant here with a RepeatAndSelect analysis


def trial_events(sigma: float, q: float, steps: int, score_sigma: float) -> tuple[Event, ...]:
    """What one trial releases: its DP-SGD steps and one Gaussian-noised validation score."""
    return (SampledGaussian(sigma, q, steps), Gaussian(score_sigma))


def search_events(sigma: float, q: float, steps: int, *, score_sigma: float, mean: float, shape: float,
                  prior: tuple[Event, ...] = ()) -> list[Event]:
    """The whole search: what it releases once (`prior`, e.g. the DP label histogram), then the search itself."""
    return [*prior, RepeatAndSelect(trial_events(sigma, q, steps, score_sigma), mean, shape)]


def calibrate_search(target_epsilon: float, delta: float, q: float, steps: int, *, score_sigma: float, mean: float,
                     shape: float, prior: tuple[Event, ...] = (), max_sigma: float = 50.0) -> float:
    """Smallest per-trial noise multiplier whose whole search stays within target_epsilon (RDP, the one calibrator).

    Raises ValueError naming the largest feasible mean number of trials when even sigma = max_sigma does not fit.
    """
    def events_for(s: float):
        return search_events(s, q, steps, score_sigma=score_sigma, mean=mean, shape=shape, prior=prior)

    at_max = epsilon(events_for(max_sigma), delta, ACCOUNTANT)
    if at_max > target_epsilon:
        best = largest_feasible_mean(target_epsilon, delta, q, steps, score_sigma=score_sigma, shape=shape,
                                     prior=prior, sigma=max_sigma)
        hint = (f"at most {best:.2f} trials on average fit" if best else "no search fits: raise the budget")
        raise ValueError(f"a search of {mean:g} trials on average spends eps={at_max:.3f} > {target_epsilon:g} even at "
                         f"noise multiplier {max_sigma:g}; {hint} (tune.mean_trials)")
    try:
        return calibrate(events_for, target_epsilon, delta, accountant=ACCOUNTANT, bounds=(DEFAULT_BOUNDS[0], max_sigma))
    except CalibrationError as e:
        raise ValueError(f"privacy.epsilon: {e}") from None


def largest_feasible_mean(target_epsilon: float, delta: float, q: float, steps: int, *, score_sigma: float,
                          shape: float, prior: tuple[Event, ...], sigma: float) -> float | None:
    """The largest mean number of trials (>= 1) whose search fits at this sigma, or None."""
    def fits(m: float) -> bool:
        return epsilon(search_events(sigma, q, steps, score_sigma=score_sigma, mean=m, shape=shape,
                                     prior=prior), delta, ACCOUNTANT) <= target_epsilon

    lo, hi = 1.0, 2.0
    if not fits(lo):
        return None
    while fits(hi) and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _tnb_gamma(mean: float, shape: float) -> float:
    """gamma of the truncated negative binomial with this mean (Papernot & Steinke 2022, Sec. 2)."""
    def mean_of(g: float) -> float:
        return shape * (1 - g) / (g * (1 - g**shape))

    lo, hi = 1e-12, 1 - 1e-12  # mean_of decreases from inf to 1 as gamma goes 0 -> 1
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_of(mid) > mean else (lo, mid)
    return (lo + hi) / 2


def draw_num_trials(mean: float, shape: float, rng: np.random.Generator | None = None) -> int:
    """K ~ Poisson(mean) for shape = inf, else truncated negative binomial (never 0).

    Fresh OS entropy by default: K must stay secret and independent of the data.
    """
    rng = rng or np.random.default_rng()
    if math.isinf(shape):
        return int(rng.poisson(mean))
    if mean <= 1:
        raise ValueError("a truncated negative binomial needs a mean number of trials > 1")
    gamma = _tnb_gamma(mean, shape)
    while True:
        k = int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k
