"""Privacy events: plain, immutable descriptions of what a mechanism released.

Events carry no accounting logic; accountants (``accountants.py``) interpret
them. All mechanisms are normalised to sensitivity 1, so ``noise_multiplier``
is the noise scale divided by the sensitivity, and adjacency is add/remove
one example.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import dp_event


def _check_noise(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"noise_multiplier must be a real number, got {value!r}")
    # NaN slips through `<= 0`, so test finiteness explicitly.
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"noise_multiplier must be finite and > 0, got {value!r}")
    return float(value)


def _check_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"count must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"count must be >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SampledGaussian:
    """Poisson-subsampled Gaussian mechanism (one DP-SGD step), composed ``count`` times.

    Each step adds N(0, noise_multiplier^2) noise to a sum of per-example
    gradients clipped to L2 norm 1, with every example included independently
    with probability ``sampling_rate`` (Abadi et al. 2016, "Deep Learning with
    Differential Privacy"). ``sampling_rate == 1.0`` means no subsampling.
    """

    noise_multiplier: float
    sampling_rate: float
    count: int = 1

    def __post_init__(self) -> None:
        # Normalise to float/int so equal parameters compare and serialise equally.
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, numbers.Real):
            raise TypeError(f"sampling_rate must be a real number, got {q!r}")
        if not 0 < q <= 1:  # also rejects NaN
            raise ValueError(f"sampling_rate must be in (0, 1], got {q!r}")
        object.__setattr__(self, "sampling_rate", float(q))
        object.__setattr__(self, "count", _check_count(self.count))


@dataclass(frozen=True)
class Gaussian:
    """Gaussian mechanism, L2 sensitivity 1, noise std ``noise_multiplier``, ``count`` times.

    Used e.g. for a DP label histogram: adding/removing one example changes
    one count by 1 (Dwork & Roth 2014, "The Algorithmic Foundations of DP").

    ``purpose`` tells a run's Gaussian releases apart in the ledger (charges are summed per kind and parameters,
    so a histogram's Gaussian never merges with an in-context token's of the same noise); accountants ignore it.
    Empty (the default) is left out of the event's dict, so plain Gaussians serialise as they always did.
    """

    noise_multiplier: float
    count: int = 1
    purpose: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        object.__setattr__(self, "count", _check_count(self.count))
        if not isinstance(self.purpose, str):
            raise TypeError(f"purpose must be a string, got {self.purpose!r}")


@dataclass(frozen=True)
class Laplace:
    """Laplace mechanism, L1 sensitivity 1, scale b = ``noise_multiplier``, ``count`` times."""

    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_noise(self.noise_multiplier))
        object.__setattr__(self, "count", _check_count(self.count))


@dataclass(frozen=True)
class RepeatAndSelect:
    """Run a trial mechanism a random number K of times and release only the best one.

    Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential Privacy" (ICLR):
    K ~ Poisson(mean) (``shape = inf``) or a truncated negative binomial with shape ``shape``
    (``shape = 1``: geometric, never 0). ``trial`` is the composition of what one trial releases
    (its training steps and its noisy score). Accounted with RDP only.
    """

    trial: tuple
    mean: float
    shape: float
    count: int = 1

    def __post_init__(self) -> None:
        trial = tuple(from_dict(e) if isinstance(e, dict) else e for e in self.trial)
        if not trial or any(isinstance(e, RepeatAndSelect) or type(e) not in _KIND_OF for e in trial):
            raise ValueError("trial must be a non-empty sequence of basic privacy events")
        object.__setattr__(self, "trial", trial)
        if not (math.isfinite(self.mean) and self.mean > 0):
            raise ValueError(f"mean number of trials must be finite and > 0, got {self.mean!r}")
        if not (self.shape >= 0 or self.shape == math.inf):
            raise ValueError(f"shape must be >= 0 or inf, got {self.shape!r}")
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "shape", float(self.shape))
        object.__setattr__(self, "count", _check_count(self.count))


Event = SampledGaussian | Gaussian | Laplace | RepeatAndSelect

_KINDS: dict[str, type] = {
    "sampled_gaussian": SampledGaussian,
    "gaussian": Gaussian,
    "laplace": Laplace,
    "repeat_and_select": RepeatAndSelect,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def _kind(event: Event) -> str:
    try:
        return _KIND_OF[type(event)]
    except KeyError:
        raise TypeError(f"not a privacy event: {event!r}") from None


def to_dict(event: Event) -> dict[str, Any]:
    """JSON-ready dict of ``event``, tagged with its ``"kind"``."""
    if isinstance(event, RepeatAndSelect):
        shape = event.shape if math.isfinite(event.shape) else "inf"  # JSON has no infinity
        return {"kind": _kind(event), "trial": [to_dict(e) for e in event.trial], "mean": event.mean, "shape": shape,
                "count": event.count}
    d = {"kind": _kind(event), **dataclasses.asdict(event)}
    if d.get("purpose") == "":
        del d["purpose"]
    return d


def from_dict(d: dict[str, Any]) -> Event:
    """Inverse of :func:`to_dict`. Strict: unknown kinds or fields raise ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a dict, got {type(d).__name__}")
    fields = dict(d)
    kind = fields.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(fields) - names:
        raise ValueError(f"unknown field(s) for {kind!r}: {sorted(unknown)}")
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    if missing := required - set(fields):
        raise ValueError(f"missing field(s) for {kind!r}: {sorted(missing)}")
    if cls is RepeatAndSelect:
        fields["shape"] = math.inf if fields["shape"] == "inf" else fields["shape"]
        fields["trial"] = tuple(from_dict(e) for e in fields["trial"])
    return cls(**fields)


def to_dp_event(event: Event) -> dp_accounting.DpEvent:
    """The equivalent ``dp_accounting`` event (for the PLD and RDP accountants)."""
    match event:
        case SampledGaussian(noise_multiplier=sigma, sampling_rate=q, count=n):
            mechanism: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
            if q < 1.0:
                mechanism = dp_accounting.PoissonSampledDpEvent(q, mechanism)
        case Gaussian(noise_multiplier=sigma, count=n):
            mechanism = dp_accounting.GaussianDpEvent(sigma)
        case Laplace(noise_multiplier=b, count=n):
            mechanism = dp_accounting.LaplaceDpEvent(b)
        case RepeatAndSelect(trial=trial, mean=mean, shape=shape, count=n):
            mechanism = dp_event.RepeatAndSelectDpEvent(
                dp_accounting.ComposedDpEvent([to_dp_event(e) for e in trial]), mean, shape)
        case _:
            raise TypeError(f"not a privacy event: {event!r}")
    return dp_accounting.SelfComposedDpEvent(mechanism, n)


def merge(events: Iterable[Event]) -> tuple[Event, ...]:
    """Group events with identical kind and parameters, summing their counts.

    Composition is commutative, so this preserves the privacy guarantee while
    letting a run of 10,000 one-step charges be accounted as one event.
    Groups keep the order of their first appearance.
    """
    totals: dict[tuple, Event] = {}
    for event in events:
        key = (_kind(event), dataclasses.replace(event, count=1))
        if key in totals:
            totals[key] = dataclasses.replace(totals[key], count=totals[key].count + event.count)
        else:
            totals[key] = event
    return tuple(totals.values())
