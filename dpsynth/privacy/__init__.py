"""Differential-privacy accounting: events, accountants, noise calibration, the budget ledger."""

from .accountants import ACCOUNTANTS, epsilon
from .calibration import calibrate_noise_multiplier
from .events import Event, Gaussian, Laplace, RepeatAndSelect, SampledGaussian, from_dict, merge, to_dict, to_dp_event
from .ledger import Budget, BudgetExceeded, Ledger
from .mirror import MirroredLedger, ledger_exists, open_ledger

__all__ = [
    "ACCOUNTANTS",
    "Budget",
    "BudgetExceeded",
    "Event",
    "Gaussian",
    "Laplace",
    "Ledger",
    "MirroredLedger",
    "RepeatAndSelect",
    "SampledGaussian",
    "calibrate_noise_multiplier",
    "epsilon",
    "from_dict",
    "ledger_exists",
    "merge",
    "open_ledger",
    "to_dict",
    "to_dp_event",
]
