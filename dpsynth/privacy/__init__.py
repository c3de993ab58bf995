"""Differential-privacy accounting: events, accountants, noise calibration, the budget ledger."""

from .accountants import ACCOUNTANTS, epsilon
from .calibration import calibrate_noise_multiplier
from .events import Event, Gaussian, Laplace, RepeatAndSelect, SampledGaussian, from_dict, merge, to_dict, to_dp_event
from .ledger import Budget, BudgetExceeded, Ledger

__all__ = [
    "ACCOUNTANTS",
    "Budget",
    "BudgetExceeded",
    "Event",
    "Gaussian",
    "Laplace",
    "Ledger",
    "RepeatAndSelect",
    "SampledGaussian",
    "calibrate_noise_multiplier",
    "epsilon",
    "from_dict",
    "merge",
    "to_dict",
    "to_dp_event",
]
