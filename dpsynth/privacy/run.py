"""The one private-run path: plan -> admit -> charge -> certify.

Every feature that spends privacy (DP-LoRA training, the private search, in-context generation, and the DP label
histogram any of them releases) goes through `PrivateRun`:

1. plan: the feature states everything it may release as privacy events (`Plan`), calibrated with the one
   calibrator (dpsynth.privacy.calibration) to the target epsilon;
2. admit: `PrivateRun.open` registers the dataset's total budget (fixed once) and admits the plan against it in
   the ledger, reserving it; or resumes this very job's run if it is still open (same config, its run id kept in
   the job's private storage), so an interrupted job continues where it stopped;
3. charge: the feature charges each event before its result exists (`charge` / `try_charge`); the ledger never
   lets a run charge beyond its admitted plan;
4. certify: `certify` builds the typed certificate from the charges on record (never the plan) and the ledger
   closes the run with it, refusing a certificate that does not state what ran.

Interrupted runs stay open (their charges stay spent) until the same command resumes them or `abandon` closes them.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from dpsynth.errors import UserError

from .accountants import epsilon
from .events import Event, to_dict
from .ledger import Budget

log = logging.getLogger(__name__)

STATE = "dpsynth-run.json"
"""The job's resume record in its private storage: run id, config hash and the job's own state (seeds)."""


def default_delta(units: int) -> float:
    """1/N^1.1: comfortably below 1/N, the point where 'leak one unit' would be allowed."""
    return 1.0 / units**1.1


def resolve_delta(privacy, dataset, registered: Budget | None) -> float:
    """The run's delta for `dataset` (a DatasetBlock) under `privacy` (the config's privacy section): explicit, else the
    dataset's registered one, else 1/N^1.1 over the whole dataset's units. Refused at or above 1/N (N = training units)
    unless explicitly allowed, and refused outright when the dataset's budget is held per another unit."""
    if registered is not None and registered.unit != dataset.unit:
        raise UserError(f"data.unit_column: dataset {dataset.fingerprint}'s budget is held per {registered.unit}; a run "
                        f"protecting one {dataset.unit} cannot spend it (the guarantees would not compose)")
    delta = privacy.delta if privacy.delta is not None else (registered.delta if registered else default_delta(dataset.units))
    if delta >= 1.0 / dataset.train_units and not privacy.allow_large_delta:
        raise UserError(f"privacy.delta: {delta:.3g} is not below 1/N = {1 / dataset.train_units:.3g} for "
                        f"N={dataset.train_units} training units (set privacy.allow_large_delta: true to override)")
    return delta


@dataclass(frozen=True)
class Plan:
    """Everything a run may release, as privacy events, and how they are accounted."""

    events: tuple[Event, ...]
    accountant: str
    delta: float

    @property
    def epsilon(self) -> float:
        return epsilon(self.events, self.delta, self.accountant)


class PrivateRun:
    """One admitted run in the ledger (see the module docstring). Picklable: workers charge through it."""

    def __init__(self, ledger, run_id: str, dataset, plan: Plan, state: dict[str, Any], resumed: bool) -> None:
        self.ledger, self.run_id, self.dataset, self.plan, self.state, self.resumed = ledger, run_id, dataset, plan, state, resumed

    @classmethod
    def open(cls, ledger, *, dataset, plan: Plan, total_epsilon: float, kind: str, config_hash: str, storage=None,
             state: dict[str, Any] | None = None) -> PrivateRun:
        """Admit `plan` for `dataset` (a DatasetBlock), or resume this job's open run.

        `storage` (a dpsynth.storage.Storage in the job's private scratch) keeps the run id and `state` (e.g. the
        batch and noise seeds) so that running the same job again resumes it; without storage a run cannot be
        resumed. Raises BudgetExceeded when the plan does not fit the dataset's remaining budget.
        """
        try:
            ledger.set_budget(dataset.fingerprint, Budget(total_epsilon, plan.delta, dataset.unit,
                                                          accountant=plan.accountant))
        except ValueError as e:
            raise UserError(f"privacy: {e}") from None
        if storage is not None:
            saved = storage.read_text(STATE)
            if saved is not None:
                saved = json.loads(saved)
                record = ledger.run(saved["run_id"])
                if saved.get("config_hash") == config_hash and record is not None and record["status"] == "open":
                    log.info("resuming ledger run %s (%d event(s) charged so far)", saved["run_id"],
                             sum(e.count for e in record["charged"]))
                    return cls(ledger, saved["run_id"], dataset, plan, saved, True)
        run_id = f"{kind}-{uuid.uuid4().hex[:10]}"
        ledger.open_run(run_id, dataset.fingerprint, plan.events, plan.accountant)
        state = {"run_id": run_id, "config_hash": config_hash, **(state or {})}
        if storage is not None:
            # A fresh run inherits nothing: histograms, rows or trials left by an abandoned run (or another config)
            # were paid for by that run, and reusing them here would release what this run never charged.
            storage.delete()
            storage.write_text(STATE, json.dumps(state))
        log.info("ledger admitted run %s: planned eps=%.4f (%s, delta=%.3g)", run_id, plan.epsilon, plan.accountant,
                 plan.delta)
        return cls(ledger, run_id, dataset, plan, state, False)

    def extend(self, events: tuple[Event, ...]) -> None:
        """Admit more events into this run's plan (BudgetExceeded if the dataset's budget cannot cover them)."""
        from .events import merge

        self.ledger.extend_run(self.run_id, events)
        self.plan = Plan(tuple(merge(list(self.plan.events) + list(events))), self.plan.accountant, self.plan.delta)

    def planned(self) -> tuple[Event, ...]:
        """The run's admitted plan as the ledger holds it (a resumed run's extensions included)."""
        record = self.ledger.run(self.run_id)
        return tuple(record["planned"]) if record is not None else ()

    def charge(self, event: Event) -> None:
        """Durably charge `event`; call BEFORE its result exists. BudgetExceeded past the admitted plan."""
        self.ledger.charge(self.run_id, event)

    def try_charge(self, event: Event) -> bool:
        return self.ledger.try_charge(self.run_id, event)

    def charged(self) -> tuple[Event, ...]:
        return self.ledger.charged(self.run_id)

    def charged_count(self, kind: type) -> int:
        return sum(e.count for e in self.charged() if isinstance(e, kind))

    def certify(self, *, mechanism, base_model, config_hash: str, label_histogram=None, length_histogram=None,
                lengths: dict | None = None, artefacts=None):
        """Issue the certificate from the charges on record and close the run with it (the ledger checks it)."""
        from .certificate import BaseModelBlock, Certificate, code_version, now

        charged = self.charged()
        cert = Certificate(run_id=self.run_id, created=now(), code_version=code_version(), config_hash=config_hash,
                           epsilon=epsilon(charged, self.plan.delta, self.plan.accountant), delta=self.plan.delta,
                           accountant=self.plan.accountant, events=tuple(to_dict(e) for e in charged),
                           dataset=self.dataset, base_model=BaseModelBlock(**base_model), mechanism=mechanism,
                           label_histogram=label_histogram, length_histogram=length_histogram, lengths=lengths,
                           artefacts=dict(artefacts or {}))
        self.ledger.certify(self.run_id, cert.to_json())
        return cert

    def abandon(self) -> None:
        """Close without a certificate: the charges stay spent, the unused reservation is released."""
        self.ledger.abandon(self.run_id)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)
