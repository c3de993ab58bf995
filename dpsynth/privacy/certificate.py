"""Privacy certificates: what was spent, by which mechanism, on which data and model (typed, pydantic).

A certificate has the fields every release shares (dataset and its privacy unit, delta, accountant, the charged
events and their epsilon, base model, code version, artefact digests) and one block for the mechanism that spent
the budget: DP-SGD, a private search over DP-SGD trials, or in-context voting; a DP label histogram adds its own
block. Its epsilon is always computed from the events the ledger charged, never copied from the plan: the ledger
refuses to close a run with a certificate whose events are not its charges (dpsynth.privacy.ledger.Ledger.certify).
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpsynth.errors import UserError
from dpsynth.io import atomic_write_json

FORMAT = "dpsynth-certificate/3"


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetBlock(_Block):
    """The data the budget is held for, and its privacy unit."""

    name: str
    fingerprint: str
    unit: str = "record"
    """`record` (one text + label), `record+near-duplicates` (a record and its near copies), or the column naming
    the person or account each record belongs to."""
    units: int
    """Privacy units in the whole dataset: the N of delta < 1/N."""
    train_units: int
    """Units in the train split: the population DP-SGD samples from."""
    # No record counts: exact counts of private records are not released (units are declared public).


class BaseModelBlock(_Block):
    name: str
    sha256: str | None = None


class HistogramBlock(_Block):
    """A DP histogram released by the run (Gaussian, L2 sensitivity 1 per unit): the label mix, or text lengths."""

    noise_multiplier: float
    budget_share: float | None = None
    """Share of the run's epsilon this histogram alone spends (it was calibrated to it)."""
    over: str | None = None
    """What it counts, for the attribute mix of several attributes (dpsynth.records): `joint` (every cell) or
    `marginals` (each attribute's values, noise scaled by sqrt(attributes) for the same charge)."""


LabelHistogramBlock = HistogramBlock


class DpSgdBlock(_Block):
    kind: Literal["dp_sgd"] = "dp_sgd"
    noise_multiplier: float
    sampling_rate: float
    steps: int
    """DP-SGD steps charged (a crash can charge a step whose update was lost: steps >= steps_applied)."""
    steps_applied: int
    max_grad_norm: float
    expected_batch_size: int
    """Expected units per batch (q x train units)."""
    max_records_per_unit: int | None = None
    workers: int = 1
    deepspeed_stage: int | None = None
    lora: dict[str, Any] = {}


class SearchBlock(_Block):
    """A private search (Papernot & Steinke 2022): a secret random number of DP-SGD trials, the best released."""

    kind: Literal["private_search"] = "private_search"
    method: str = "Papernot & Steinke 2022 random number of trials (RepeatAndSelect, RDP)"
    covers_selection: bool = True
    noise_multiplier: float
    """Each trial's DP-SGD noise multiplier."""
    sampling_rate: float
    steps_per_trial: int
    expected_batch_size: int
    max_records_per_unit: int | None = None
    score_noise_multiplier: float
    mean_trials: float
    distribution: str
    shape: float | Literal["inf"]
    per_trial_epsilon_alone: float
    selected: dict[str, float]
    """The released trial's clipping norm, learning rate and DP validation loss."""
    lora: dict[str, Any] = {}

    @property
    def max_grad_norm(self) -> float:
        return self.selected["max_grad_norm"]

    @property
    def steps(self) -> int:
        return self.steps_per_trial


class InContextBlock(_Block):
    """Training-free DP few-shot generation: noisy argmax of disjoint groups' next-token votes."""

    kind: Literal["in_context"] = "in_context"
    mechanism: Literal["gaussian", "laplace"]
    noise_multiplier: float
    noise_scale: float
    sensitivity: dict[str, Any]
    token_steps: int
    examples_charged: int
    planned_epsilon: float
    pure_dp_epsilon: float | None = None
    settings: dict[str, Any] = {}


Mechanism = Annotated[Union[DpSgdBlock, SearchBlock, InContextBlock], Field(discriminator="kind")]


class CorpusBlock(_Block):
    """A released synthetic corpus: post-processing of the certified release, so it shares its certificate."""

    file: str
    sha256: str
    examples: int
    label_counts: dict[str, int]
    engine: str
    created: str
    sampling: dict[str, Any] | None = None
    sharpening: dict[str, Any] | None = None
    candidates_file: str | None = None
    records: dict[str, Any] | None = None
    """A record schema's corpus (dpsynth.records): its columns, and how many generations were drawn and how many
    were redrawn for not parsing into the text fields (post-processing: counts of public outputs)."""


class Certificate(_Block):
    format: Literal["dpsynth-certificate/3"] = FORMAT
    run_id: str
    created: str
    code_version: str
    config_hash: str
    epsilon: float
    delta: float
    accountant: str
    events: tuple[dict[str, Any], ...]
    dataset: DatasetBlock
    base_model: BaseModelBlock
    mechanism: Mechanism
    label_histogram: HistogramBlock | None = None
    length_histogram: HistogramBlock | None = None
    lengths: dict[str, Any] | None = None
    """max_length and max_new_tokens as resolved (from the DP length histogram when `auto`)."""
    artefacts: dict[str, str] = {}
    """sha256 of each released artefact the certificate pins, e.g. {"adapter": ...}."""
    corpus: CorpusBlock | None = None

    @property
    def generator(self) -> str:
        return "in_context" if self.mechanism.kind == "in_context" else "dp_lora"

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_corpus(self, corpus: CorpusBlock) -> Certificate:
        return self.model_copy(update={"corpus": corpus})

    def without_corpus(self) -> Certificate:
        return self.model_copy(update={"corpus": None})


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


def write_certificate(path: Path, cert: Certificate) -> None:
    atomic_write_json(path, cert.to_json())


def parse_certificate(data: dict, where: str = "certificate") -> Certificate:
    """A certificate from its JSON form; one line naming what is wrong otherwise."""
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise UserError(f"{where}: certificate format {data.get('format')!r} is not {FORMAT!r} (written by another "
                        "dpsynth version; retrain or regenerate to certify with this one)")
    try:
        return Certificate.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{where}: not a valid dpsynth certificate ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None


def read_certificate(path: Path) -> Certificate:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent}: no certificate.json, so not a certified run (did training finish?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not a valid dpsynth certificate (not JSON)") from None
    return parse_certificate(data, str(path))
