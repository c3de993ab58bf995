"""Privacy certificates: what was spent, by what mechanism, on which data and model.

A certificate's epsilon is always recomputed from the events the ledger charged, never
copied from the plan.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from dpsynth.errors import UserError
from dpsynth.io import atomic_write_json

FORMAT = "dpsynth-certificate/1"
REQUIRED = ("epsilon", "delta", "accountant", "noise_multiplier", "sampling_rate", "steps", "max_grad_norm",
            "dataset_fingerprint", "base_model", "code_version", "events", "run_id")


def code_version() -> str:
    from dpsynth import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"dpsynth {__version__}" + (f"+g{sha}" if sha else "")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_certificate(path: Path, cert: dict) -> None:
    missing = [k for k in REQUIRED if k not in cert]
    if missing:
        raise ValueError(f"certificate lacks {', '.join(missing)}")
    atomic_write_json(path, {"format": FORMAT, **cert})


def read_certificate(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent}: no certificate.json, so not a certified run (did training finish?)")
    cert = json.loads(path.read_text())
    missing = [k for k in REQUIRED if k not in cert]
    if cert.get("format") != FORMAT or missing:
        raise UserError(f"{path}: not a valid dpsynth certificate (missing {', '.join(missing) or 'format'})")
    return cert
