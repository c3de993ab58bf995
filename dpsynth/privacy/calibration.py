"""Noise calibration for DP-SGD: the least noise that meets a target epsilon."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from .accountants import epsilon
from .events import Event, SampledGaussian

# A noise multiplier outside this range means a vacuous guarantee or a useless model.
_SIGMA_MIN = 0.1
_SIGMA_MAX = 1e4
_MAX_ITERATIONS = 30


class _OutOfRange(ValueError):
    def __init__(self, sigma: float, eps: float) -> None:
        super().__init__(sigma, eps)
        self.sigma, self.eps = sigma, eps


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str = "prv",
    prior_events: Iterable[Event] = (),
    rel_tol: float = 1e-3,
) -> float:
    """Smallest DP-SGD noise multiplier meeting ``target_epsilon`` at ``delta``.

    Returns sigma such that ``epsilon(prior_events + (SampledGaussian(sigma,
    sampling_rate, steps),), delta, accountant)`` is ``<= target_epsilon`` and
    ``>= (1 - rel_tol) * target_epsilon``. The returned sigma was itself
    evaluated as feasible, so it never exceeds the target under ``accountant``.

    DP-SGD: Abadi et al. 2016, "Deep Learning with Differential Privacy".
    Default PRV accounting: Gopi, Lee & Wutschitz 2021, "Numerical Composition
    of Differential Privacy".

    Raises ValueError if the prior events alone reach the target, or if the
    target needs sigma outside [0.1, 1e4].
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    SampledGaussian(1.0, sampling_rate, steps)  # validate before any accounting
    prior = tuple(prior_events)
    if prior and (spent := epsilon(prior, delta, accountant)) >= target_epsilon:
        raise ValueError(
            f"prior events alone spend eps={spent:.4g} >= target eps={target_epsilon:.4g}"
        )

    def eps_of(acc: str) -> Callable[[float], float]:
        return lambda s: epsilon(prior + (SampledGaussian(s, sampling_rate, steps),), delta, acc)

    # RDP is cheap at any sigma and (up to numerical error) never below the
    # tight accountants, so it gives a starting point that keeps the expensive
    # PRV/PLD evaluations near the target instead of at huge epsilons.
    try:
        hint = _solve(eps_of("rdp"), target_epsilon, 0.02 if accountant != "rdp" else rel_tol,
                      start=1.0, factor=2.0)
    except _OutOfRange as e:
        if e.sigma == _SIGMA_MIN:
            raise ValueError(
                f"target eps={target_epsilon:.4g} is so large that noise_multiplier < {_SIGMA_MIN} "
                f"would meet it; such a guarantee is vacuous"
            ) from None
        hint = _SIGMA_MAX  # RDP is looser; let the requested accountant decide
    if accountant == "rdp":
        return hint
    try:
        return _solve(eps_of(accountant), target_epsilon, rel_tol, start=hint, factor=1.25)
    except _OutOfRange as e:
        what = "large" if e.sigma == _SIGMA_MIN else "small"
        raise ValueError(
            f"target eps={target_epsilon:.4g} at delta={delta:.3g} is too {what}: "
            f"noise_multiplier={e.sigma:g} gives eps={e.eps:.4g} ({accountant}), "
            f"and the search is bounded to [{_SIGMA_MIN}, {_SIGMA_MAX:g}]"
        ) from None


def _solve(
    eps: Callable[[float], float], target: float, rel_tol: float, *, start: float, factor: float
) -> float:
    """Smallest sigma with eps(sigma) <= target, to within rel_tol of target.

    Brackets from ``start`` in growing geometric steps, then runs regula falsi
    (Illinois variant) on log eps against log sigma, where eps is nearly
    linear. Only ever returns a sigma whose evaluated eps is <= target.
    """
    lo = hi = None  # (sigma, eps): lo infeasible, hi feasible
    sigma, step = min(max(start, _SIGMA_MIN), _SIGMA_MAX), factor
    while lo is None or hi is None:
        e = eps(sigma)
        if e <= target:
            hi = (sigma, e)
            if lo is None and sigma == _SIGMA_MIN:
                raise _OutOfRange(sigma, e)
            sigma = max(sigma / step, _SIGMA_MIN)
        else:
            lo = (sigma, e)
            if hi is None and sigma == _SIGMA_MAX:
                raise _OutOfRange(sigma, e)
            sigma = min(sigma * step, _SIGMA_MAX)
        step *= factor

    def g(e: float) -> float:  # root-finding residual; +inf for an infinite epsilon
        return math.log(max(e, 1e-300) / target)

    (s_lo, e_lo), (s_hi, e_hi) = lo, hi
    x_lo, g_lo, x_hi, g_hi = math.log(s_lo), g(e_lo), math.log(s_hi), g(e_hi)
    side = 0
    for _ in range(_MAX_ITERATIONS):
        if e_hi >= (1 - rel_tol) * target:
            break
        x = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo) if math.isfinite(g_lo) else math.nan
        if not x_lo < x < x_hi:
            x = (x_lo + x_hi) / 2
        sigma = math.exp(x)
        if not s_lo < sigma < s_hi:  # bracket exhausted at float precision
            break
        e = eps(sigma)
        if e <= target:
            s_hi, e_hi, x_hi, g_hi = sigma, e, x, g(e)
            if side == 1:
                g_lo /= 2  # Illinois: stop one end from sticking
            side = 1
        else:
            s_lo, x_lo, g_lo = sigma, x, g(e)
            if side == -1:
                g_hi /= 2
            side = -1
    return s_hi
