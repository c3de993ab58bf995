"""Noise calibration: the least noise whose composed events meet a target epsilon.

One calibrator for every mechanism (DP-SGD steps, a private search, in-context votes, a label histogram):
the caller describes what it would release at noise multiplier `s` as a function `events_for(s)`, and
`calibrate` finds the smallest `s` whose epsilon is at most the target. As in dp_accounting's calibrator,
epsilon must be non-increasing in `s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .accountants import epsilon
from .events import Event

DEFAULT_BOUNDS = (0.1, 1e4)
"""Noise multipliers outside this range mean a vacuous guarantee or a useless release (DP-SGD's range)."""
_MAX_ITERATIONS = 30


class CalibrationError(ValueError):
    """No noise multiplier within the bounds meets the target (the message says which way it fails)."""


class _OutOfRange(ValueError):
    def __init__(self, sigma: float, eps: float) -> None:
        super().__init__(sigma, eps)
        self.sigma, self.eps = sigma, eps


def calibrate(events_for: Callable[[float], Sequence[Event]], target_epsilon: float, delta: float, *,
              accountant: str = "prv", bounds: tuple[float, float] = DEFAULT_BOUNDS, rel_tol: float = 1e-3) -> float:
    """Smallest noise multiplier s in `bounds` with epsilon(events_for(s), delta, accountant) <= target_epsilon.

    The returned s was itself evaluated as feasible, so it never exceeds the target under `accountant`, and its
    epsilon is >= (1 - rel_tol) * target unless the bracket is exhausted at float precision. An accountant that
    fails at absurdly small noise (dp_accounting's PLD can) counts as infeasible there.

    Raises CalibrationError when even the largest noise does not fit (the events without noise already spend
    the target) or when the smallest noise is already under the target (a vacuous guarantee).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if not 0 < rel_tol < 1:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    lo_bound, hi_bound = bounds

    def eps_of(acc: str) -> Callable[[float], float]:
        def eps(s: float) -> float:
            try:
                return epsilon(events_for(s), delta, acc)
            except (ArithmeticError, IndexError, ValueError) as e:
                if "cannot account" in str(e):  # a real refusal (e.g. Laplace under PRV), not numerical trouble
                    raise
                return math.inf
        return eps

    # RDP is cheap at any noise and (up to numerical error) never below the tight accountants, so it gives a
    # starting point that keeps the expensive PRV/PLD evaluations near the target.
    try:
        hint = _solve(eps_of("rdp"), target_epsilon, 0.02 if accountant != "rdp" else rel_tol, start=1.0, factor=2.0,
                      bounds=bounds)
    except _OutOfRange as e:
        if e.sigma == lo_bound:
            raise CalibrationError(f"target eps={target_epsilon:.4g} is so large that noise multiplier < {lo_bound:g} would "
                                   "meet it; such a guarantee is vacuous") from None
        hint = hi_bound  # RDP is looser; let the requested accountant decide
    if accountant == "rdp":
        return hint
    try:
        return _solve(eps_of(accountant), target_epsilon, rel_tol, start=hint, factor=1.25, bounds=bounds)
    except _OutOfRange as e:
        what = "large" if e.sigma == lo_bound else "small"
        raise CalibrationError(f"target eps={target_epsilon:.4g} at delta={delta:.3g} is too {what}: noise multiplier "
                               f"{e.sigma:g} gives eps={e.eps:.4g} ({accountant}), and the search is bounded to "
                               f"[{lo_bound:g}, {hi_bound:g}]") from None


def _solve(eps: Callable[[float], float], target: float, rel_tol: float, *, start: float, factor: float,
           bounds: tuple[float, float]) -> float:
    """Smallest sigma with eps(sigma) <= target, to within rel_tol of target.

    Brackets from ``start`` in growing geometric steps, then runs regula falsi (Illinois variant) on log eps
    against log sigma, where eps is nearly linear. Only ever returns a sigma whose evaluated eps is <= target.
    """
    lo_bound, hi_bound = bounds
    lo = hi = None  # (sigma, eps): lo infeasible, hi feasible
    sigma, step = min(max(start, lo_bound), hi_bound), factor
    while lo is None or hi is None:
        e = eps(sigma)
        if e <= target:
            hi = (sigma, e)
            if lo is None and sigma == lo_bound:
                raise _OutOfRange(sigma, e)
            sigma = max(sigma / step, lo_bound)
        else:
            lo = (sigma, e)
            if hi is None and sigma == hi_bound:
                raise _OutOfRange(sigma, e)
            sigma = min(sigma * step, hi_bound)
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
