"""Epsilon of a composition of privacy events, under add/remove-one adjacency.

Three accountants:

* ``"prv"`` (default): numerical composition of privacy loss random variables
  (Gopi, Lee & Wutschitz 2021, "Numerical Composition of Differential
  Privacy"), via Opacus. Returns the PRV *upper* bound. Gaussians only.
* ``"pld"``: privacy loss distributions (Meiser & Mohammadi 2018; Koskela et
  al. 2020; Doroshenko et al. 2022), via ``dp_accounting``, pessimistic
  discretisation.
* ``"rdp"``: Renyi DP (Mironov 2017; Mironov, Talwar & Zhang 2019 for the
  sampled Gaussian), via ``dp_accounting``. Looser, but cheap at any epsilon.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable

import numpy as np
from dp_accounting import pld, rdp

from .events import Event, Gaussian, Laplace, RepeatAndSelect, SampledGaussian, merge, to_dp_event

# dp_accounting's RDP logs (via absl) each order it drops for not converging; dropping an
# order only loosens the bound, so these are noise to a user.
logging.getLogger("absl").setLevel(logging.ERROR)

ACCOUNTANTS = ("prv", "pld", "rdp")

# Dense low orders for large epsilon, high orders for tiny epsilon, so the
# optimum is rarely at the edge of the range; high orders are sparser because
# they are the expensive ones and the bound is flat there.
_RDP_ORDERS = (tuple(np.linspace(1.01, 10.0, 200)) + tuple(range(11, 64))
               + tuple(range(64, 257, 8)) + (512, 1024))

# PRV's cost grows like epsilon / eps_error, so the error is relative to a
# cheap RDP estimate (0.1%), floored so tiny epsilons stay affordable.
_PRV_REL_ERROR = 1e-3
_PRV_MIN_ERROR = 1e-4


def epsilon(events: Iterable[Event], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of the composition of all ``events``.

    Events are merged first (composition commutes), so many one-step events
    cost the same as one event with a large count. No events -> 0.0.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    merged = merge(events)
    if not merged:
        return 0.0
    eps = {"prv": _prv, "pld": _pld, "rdp": _rdp}[accountant](merged, delta)
    if math.isnan(eps):  # NaN compares False with everything, so it must never escape
        raise RuntimeError(f"accountant {accountant!r} returned NaN for {merged}")
    return eps


def can_account(events: Iterable[Event], accountant: str) -> bool:
    """Whether `accountant` can compose every one of `events`: RDP composes them all (dp_accounting's RDP has the
    Laplace mechanism's exact RDP and the RepeatAndSelect analysis); PLD all but RepeatAndSelect; PRV Gaussians only."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    events = merge(events)
    if accountant == "rdp":
        return True
    if any(isinstance(e, RepeatAndSelect) for e in events):
        return False
    return accountant == "pld" or not any(isinstance(e, Laplace) for e in events)


def dataset_accountant(events: Iterable[Event], registered: str) -> str:
    """The accountant a dataset's budget composes `events` with: the one registered with its budget when it can
    account every event, else the tightest that can (PLD, then RDP, which accounts every event dpsynth charges)."""
    events = merge(events)
    for accountant in dict.fromkeys((registered, "pld", "rdp")):
        if can_account(events, accountant):
            return accountant
    kinds = sorted({type(e).__name__ for e in events})
    raise ValueError(f"no accountant can compose {', '.join(kinds)} on one dataset; the composition is refused")


def dataset_epsilon(events: Iterable[Event], delta: float, registered: str) -> float:
    """Epsilon at `delta` of every event on one dataset, under `dataset_accountant(events, registered)`: the one
    composition rule of a dataset's budget (admission, spend, `dpsynth budget`). Each accountant's epsilon is an upper
    bound, so whichever one composes is a valid (conservative) spend."""
    events = merge(events)
    return epsilon(events, delta, dataset_accountant(events, registered))


def _rdp_only(events: tuple[Event, ...], accountant: str) -> None:
    if any(isinstance(e, RepeatAndSelect) for e in events):
        raise ValueError(f"accountant {accountant!r} cannot account a private hyperparameter search "
                         "(RepeatAndSelect, Papernot & Steinke 2022); use 'rdp'")


def _pld(events: tuple[Event, ...], delta: float) -> float:
    _rdp_only(events, "pld")
    acc = pld.PLDAccountant()  # add/remove adjacency, pessimistic estimate
    for event in events:
        acc.compose(to_dp_event(event))
    return float(acc.get_epsilon(delta))


def _rdp(events: tuple[Event, ...], delta: float) -> float:
    acc = rdp.RdpAccountant(list(_RDP_ORDERS))  # add/remove adjacency
    for event in events:
        acc.compose(to_dp_event(event))
    return float(acc.get_epsilon(delta))


def _prv(events: tuple[Event, ...], delta: float) -> float:
    # Imported lazily: Opacus pulls in torch, which the ledger's callers may not need.
    from opacus.accountants import PRVAccountant

    _rdp_only(events, "prv")
    history = []
    for event in events:
        match event:
            case SampledGaussian(noise_multiplier=sigma, sampling_rate=q, count=n):
                history.append((sigma, q, n))
            case Gaussian(noise_multiplier=sigma, count=n):
                history.append((sigma, 1.0, n))  # sampling rate 1 = no subsampling
            case Laplace():
                raise ValueError("accountant 'prv' cannot account Laplace events; use 'pld'")
    eps_error = max(_PRV_MIN_ERROR, _PRV_REL_ERROR * _rdp(events, delta))
    acc = PRVAccountant()
    acc.history = history
    # Opacus's PRV evaluates log(0) at the domain edges, and its RDP-based
    # domain bound may warn about the order range (it only widens the domain).
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(acc.get_epsilon(delta, eps_error=eps_error))
