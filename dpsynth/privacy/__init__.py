"""Differential privacy: events, accountants, the one calibrator, the ledger, certificates, and the one
private-run path (plan -> admit -> charge -> certify) every privacy-spending feature goes through."""

from .accountants import ACCOUNTANTS, epsilon
from .calibration import CalibrationError, calibrate
from .events import Event, Gaussian, Laplace, RepeatAndSelect, SampledGaussian, from_dict, merge, to_dict, to_dp_event
from .ledger import Budget, BudgetExceeded, Ledger
from .mirror import MirroredLedger, ledger_exists, open_ledger

__all__ = [
    "ACCOUNTANTS",
    "Budget",
    "BudgetExceeded",
    "CalibrationError",
    "Event",
    "Gaussian",
    "Laplace",
    "Ledger",
    "MirroredLedger",
    "RepeatAndSelect",
    "SampledGaussian",
    "calibrate",
    "epsilon",
    "from_dict",
    "ledger_exists",
    "merge",
    "open_ledger",
    "to_dict",
    "to_dp_event",
]
