"""Durable, process-safe privacy ledger: per-dataset budgets, run admission, charges.

One SQLite file holds every dataset's total budget, every run's admitted plan
and every charge. Each call opens its own connection and does its
read-check-write inside one ``BEGIN IMMEDIATE`` transaction, so concurrent
processes and threads serialise on the file lock. ``synchronous=FULL`` makes
each commit durable before the call returns: a crash can over-count what was
spent (a charged step whose result was never used), never under-count.

One composition rule per dataset budget: the accountant registered with the budget (``Budget.accountant``) composes
every charge and reservation on the dataset (admission, `spent`, `datasets`), falling back to the tightest accountant
that can account them all when it cannot (`accountants.dataset_accountant`): a PRV-registered dataset that a private
search (RepeatAndSelect) or a Laplace run has touched is composed with RDP or PLD, never refused by a raw accountant
error. A run's own certificate keeps its own accountant for its own charges (`certify`). A ledger written before
budgets named their accountant holds NULL there, read as the accountant of the dataset's first run (or PRV when it
has none), the accountant its admissions were computed with until then.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .accountants import ACCOUNTANTS, can_account, dataset_accountant, dataset_epsilon, epsilon
from .events import Event, from_dict, merge, to_dict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    fingerprint TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL, unit TEXT NOT NULL DEFAULT 'record',
    accountant TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL REFERENCES datasets,
    accountant TEXT NOT NULL, planned TEXT NOT NULL, status TEXT NOT NULL,
    certificate TEXT);
CREATE TABLE IF NOT EXISTS charges (
    run_id TEXT NOT NULL REFERENCES runs, params TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (run_id, params));
"""
# Admission tolerates only float noise from re-ordering the composition.
_REL_TOL = 1e-9
# A dataset's budget row with its composition accountant (NULL in a ledger from before: its first run's, else prv).
_BUDGET_COLUMNS = ("d.epsilon, d.delta, d.unit, COALESCE(d.accountant, (SELECT r.accountant FROM runs r "
                   "WHERE r.fingerprint = d.fingerprint ORDER BY r.rowid LIMIT 1), 'prv')")


@dataclass(frozen=True)
class Budget:
    """A dataset's total (epsilon, delta) privacy budget, held per privacy `unit` (a record, or a person's records):
    runs that protect another unit cannot spend it (a record-level epsilon is only a k-fold weaker one for a person
    with k records).

    `accountant` composes everything spent on the dataset (see the module docstring); it is chosen when the budget
    is first registered and a run under another accountant may still spend the budget."""

    epsilon: float
    delta: float
    unit: str = "record"
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; expected one of {ACCOUNTANTS}")


class BudgetExceeded(RuntimeError):
    """Admitting a run or charging an event would exceed the privacy budget."""


def _params(event: Event) -> str:
    """Canonical JSON of an event without its count: the key charges are summed under."""
    d = to_dict(event)
    del d["count"]
    return json.dumps(d, sort_keys=True)


def _events(text: str) -> tuple[Event, ...]:
    return tuple(from_dict(d) for d in json.loads(text))


class Ledger:
    """The privacy ledger stored at ``path`` (created with its parent directories).

    Holds only the path, so it can be pickled to worker processes.
    """

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):  # executescript() would commit mid-transaction
                if statement.strip():
                    db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(datasets)")}
            if "unit" not in columns:  # a ledger written before budgets named their unit: those were per record
                db.execute("ALTER TABLE datasets ADD COLUMN unit TEXT NOT NULL DEFAULT 'record'")
            if "accountant" not in columns:  # ... or their accountant: NULL, read as their first run's (_BUDGET_COLUMNS)
                db.execute("ALTER TABLE datasets ADD COLUMN accountant TEXT")

    @property
    def location(self) -> str:
        """Where the durable copy lives (a path here; a URI for MirroredLedger)."""
        return str(self.path)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        # Autocommit mode, so the BEGIN below is the only transaction; IMMEDIATE
        # takes the write lock up front, making read-check-write atomic.
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def set_budget(self, fingerprint: str, budget: Budget) -> None:
        """Register a dataset's total budget and its accountant. Fixed once set; re-setting it with the same epsilon,
        delta and unit is a no-op whatever its accountant (the registered one keeps composing the dataset)."""
        with self._tx() as db:
            existing = self._budget(db, fingerprint)
            if existing is None:
                db.execute("INSERT INTO datasets (fingerprint, epsilon, delta, unit, accountant) VALUES (?, ?, ?, ?, ?)",
                           (fingerprint, budget.epsilon, budget.delta, budget.unit, budget.accountant))
            elif existing.unit != budget.unit:
                raise ValueError(f"dataset {fingerprint}'s budget is held per {existing.unit}; a run protecting one "
                                 f"{budget.unit} cannot spend it (the guarantees would not compose)")
            elif (existing.epsilon, existing.delta) != (budget.epsilon, budget.delta):
                raise ValueError(f"dataset {fingerprint} already has total budget {existing}; "
                                 f"refusing to change it to {budget}")

    def budget(self, fingerprint: str) -> Budget | None:
        with self._tx(write=False) as db:
            return self._budget(db, fingerprint)

    def open_run(self, run_id: str, fingerprint: str, planned: Sequence[Event],
                 accountant: str) -> None:
        """Admit a run whose whole plan fits in the dataset's remaining budget, and reserve it.

        The committed budget is every charge on the dataset plus the uncharged
        rest of every open run's plan; since an open run's charges are covered
        by its plan, that is: closed runs' charges + open runs' plans. It is
        composed with the dataset's rule (`dataset_epsilon`, the budget's
        accountant or its fallback), and the plan alone under the run's own
        `accountant` (what its certificate will state) must fit the total too.
        """
        planned = merge(planned)
        if not can_account(planned, accountant):
            raise ValueError(f"run {run_id!r}: accountant {accountant!r} cannot account its plan "
                             f"({', '.join(sorted({type(e).__name__ for e in planned}))})")
        with self._tx() as db:
            budget = self._budget(db, fingerprint)
            if budget is None:
                raise ValueError(f"dataset {fingerprint} has no budget; call set_budget first")
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise ValueError(f"run {run_id!r} already exists")
            committed = self._committed(db, fingerprint)
            rule = dataset_accountant(committed + list(planned), budget.accountant)
            total = epsilon(committed + list(planned), budget.delta, rule)
            if not total <= budget.epsilon * (1 + _REL_TOL):  # written so NaN refuses
                before = epsilon(committed, budget.delta, rule)
                raise BudgetExceeded(
                    f"privacy budget exceeded for dataset {fingerprint[:12]}..: spent "
                    f"eps={before:.2f} (charged + reserved), requested +{total - before:.2f}, "
                    f"total eps={budget.epsilon:.2f} at delta={budget.delta:.2g} (composed with {rule})")
            own = total if rule == accountant and not committed else epsilon(planned, budget.delta, accountant)
            if not own <= budget.epsilon * (1 + _REL_TOL):
                raise BudgetExceeded(
                    f"privacy budget exceeded for dataset {fingerprint[:12]}..: run {run_id!r} alone plans "
                    f"eps={own:.2f} under its accountant {accountant}, more than the total "
                    f"eps={budget.epsilon:.2f} at delta={budget.delta:.2g}")
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, 'open', NULL)",
                       (run_id, fingerprint, accountant,
                        json.dumps([to_dict(e) for e in planned])))

    def extend_run(self, run_id: str, events: Sequence[Event]) -> None:
        """Add `events` to an open run's plan, admitted by the same rule as `open_run` (the dataset's composition
        with them must fit its budget, and so must the run's whole plan under its own accountant). For a run whose
        later events are sized by what its first ones released (steps from a DP length histogram); nothing is
        reserved for them until this call."""
        events = merge(events)
        with self._tx() as db:
            row = db.execute("SELECT fingerprint, accountant, status, planned FROM runs WHERE run_id=?",
                             (run_id,)).fetchone()
            if row is None or row[2] != "open":
                raise ValueError(f"run {run_id!r} is {'unknown' if row is None else 'closed'}")
            fingerprint, accountant, _, planned = row
            new_plan = merge(list(_events(planned)) + list(events))
            if not can_account(new_plan, accountant):
                raise ValueError(f"run {run_id!r}: accountant {accountant!r} cannot account its plan")
            budget = self._budget(db, fingerprint)
            committed = self._committed(db, fingerprint, other_than=run_id)
            rule = dataset_accountant(committed + list(new_plan), budget.accountant)
            total = epsilon(committed + list(new_plan), budget.delta, rule)
            own = epsilon(new_plan, budget.delta, accountant)
            if not (total <= budget.epsilon * (1 + _REL_TOL) and own <= budget.epsilon * (1 + _REL_TOL)):
                before = epsilon(committed + list(_events(planned)), budget.delta, rule) if planned else 0.0
                raise BudgetExceeded(
                    f"privacy budget exceeded for dataset {fingerprint[:12]}..: spent eps={before:.2f} (charged + "
                    f"reserved), requested +{total - before:.2f}, total eps={budget.epsilon:.2f} at "
                    f"delta={budget.delta:.2g} (composed with {rule})")
            db.execute("UPDATE runs SET planned=? WHERE run_id=?", (json.dumps([to_dict(e) for e in new_plan]), run_id))

    def charge(self, run_id: str, event: Event) -> None:
        """Durably record ``event`` for ``run_id``; call BEFORE releasing its result.

        Refused with BudgetExceeded unless the run's remaining admitted plan
        covers it, so a run can never spend more than it was admitted for.
        """
        key = _params(event)
        with self._tx() as db:
            row = db.execute("SELECT status, planned FROM runs WHERE run_id=?",
                             (run_id,)).fetchone()
            if row is None or row[0] != "open":
                raise ValueError(f"run {run_id!r} is {'unknown' if row is None else 'closed'}")
            plan = {_params(e): e.count for e in _events(row[1])}
            done = db.execute("SELECT count FROM charges WHERE run_id=? AND params=?",
                              (run_id, key)).fetchone()
            done = done[0] if done else 0
            if done + event.count > plan.get(key, 0):
                raise BudgetExceeded(
                    f"privacy budget exceeded for run {run_id!r}: {key} already charged "
                    f"{done}x, requested +{event.count}, admitted plan allows "
                    f"{plan.get(key, 0)}x")
            db.execute("INSERT INTO charges VALUES (?, ?, ?) ON CONFLICT (run_id, params) "
                       "DO UPDATE SET count = count + excluded.count",
                       (run_id, key, event.count))

    def try_charge(self, run_id: str, event: Event) -> bool:
        """Charge if the run's admitted plan still covers `event`; False (nothing charged) otherwise."""
        try:
            self.charge(run_id, event)
            return True
        except BudgetExceeded:
            return False

    def certify(self, run_id: str, certificate: dict) -> None:
        """Close the run with its certificate, refusing one that does not state what ran: its events must be
        exactly the charges on record, its accountant the run's, and its epsilon theirs at its delta.

        Certifying an already-closed run again with the same certificate is a no-op.
        """
        with self._tx() as db:
            row = db.execute("SELECT accountant, status, certificate FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise ValueError(f"run {run_id!r} is unknown")
            accountant, status, stored = row
            if status == "closed":
                if stored is not None and json.loads(stored) == certificate:
                    return
                raise ValueError(f"run {run_id!r} is already closed" + (" with another certificate" if stored else
                                                                         " (abandoned)"))
            charged = self._charged(db, run_id)
            events = [to_dict(e) for e in charged]
            if list(certificate.get("events", ())) != events:
                raise ValueError(f"certificate of run {run_id!r} lists events {certificate.get('events')} but the "
                                 f"ledger charged {events}")
            if certificate.get("accountant") != accountant:
                raise ValueError(f"certificate of run {run_id!r} names accountant {certificate.get('accountant')!r}; "
                                 f"the run was admitted under {accountant!r}")
            eps = epsilon(charged, certificate["delta"], accountant)
            if not math.isclose(eps, certificate.get("epsilon", math.nan), rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"certificate of run {run_id!r} states eps={certificate.get('epsilon')} but its "
                                 f"charges spend eps={eps}")
            db.execute("UPDATE runs SET status='closed', certificate=? WHERE run_id=?", (json.dumps(certificate), run_id))

    def abandon(self, run_id: str) -> None:
        """Close a run without a certificate: its unused reservation is released, its charges stay spent."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise ValueError(f"run {run_id!r} is unknown")
            if row[0] == "open":
                db.execute("UPDATE runs SET status='closed' WHERE run_id=?", (run_id,))

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run's record (as in `runs`), or None."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT run_id, fingerprint, accountant, status, planned, certificate FROM runs "
                             "WHERE run_id=?", (run_id,)).fetchone()
            return None if row is None else self._run_record(db, row)

    def charged(self, run_id: str) -> tuple[Event, ...]:
        """The run's charges, merged."""
        with self._tx(write=False) as db:
            if not db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise ValueError(f"run {run_id!r} is unknown")
            return self._charged(db, run_id)

    def spent(self, fingerprint: str, accountant: str | None = None) -> float:
        """Epsilon of every charge on the dataset, at the dataset's delta, composed by the dataset's rule
        (`dataset_epsilon`) from its registered accountant, or from `accountant` when given (with the same fallback,
        so it never fails on an event that accountant cannot account)."""
        with self._tx(write=False) as db:
            budget = self._budget(db, fingerprint)
            if budget is None:
                raise ValueError(f"dataset {fingerprint} has no budget")
            events = self._dataset_charges(db, fingerprint)
        return dataset_epsilon(events, budget.delta, accountant or budget.accountant)

    def rename_dataset(self, old_fingerprint: str, new_fingerprint: str) -> bool:
        """Re-key a dataset's budget and its runs from `old_fingerprint` to `new_fingerprint`, atomically, when the
        old one is registered and the new one is not (True); a no-op otherwise (False). Refused with ValueError when
        both are registered: two budgets for one dataset cannot be merged after the fact. (A ledger from before
        fingerprints were keyed holds its budgets under the unkeyed hash: renaming keeps their spend.)"""
        if old_fingerprint == new_fingerprint:
            return False
        with self._tx() as db:
            old = self._budget(db, old_fingerprint)
            new = self._budget(db, new_fingerprint)
            if old is None:
                return False
            if new is not None:
                raise ValueError(f"dataset {old_fingerprint[:12]}.. and {new_fingerprint[:12]}.. both hold a budget; "
                                 "refusing to rename one onto the other")
            # Pin the composition accountant the old row was read with (NULL resolves through its runs' order).
            db.execute("UPDATE datasets SET fingerprint=?, accountant=? WHERE fingerprint=?",
                       (new_fingerprint, old.accountant, old_fingerprint))
            db.execute("UPDATE runs SET fingerprint=? WHERE fingerprint=?", (new_fingerprint, old_fingerprint))
            return True

    def runs(self, fingerprint: str | None = None) -> list[dict[str, Any]]:
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT run_id, fingerprint, accountant, status, planned, certificate FROM runs "
                "WHERE ?1 IS NULL OR fingerprint=?1 ORDER BY rowid", (fingerprint,)).fetchall()
            return [self._run_record(db, row) for row in rows]

    @classmethod
    def _run_record(cls, db: sqlite3.Connection, row) -> dict[str, Any]:
        rid, fp, acc, status, plan, cert = row
        return {"run_id": rid, "fingerprint": fp, "accountant": acc, "status": status, "planned": _events(plan),
                "charged": cls._charged(db, rid), "certificate": None if cert is None else json.loads(cert)}

    def datasets(self, accountant: str | None = None) -> list[dict[str, Any]]:
        """Every dataset: its budget, its spend (as `spent`) and the accountant that composed it."""
        with self._tx(write=False) as db:
            rows = [(fp, Budget(*rest), self._dataset_charges(db, fp)) for fp, *rest
                    in db.execute(f"SELECT d.fingerprint, {_BUDGET_COLUMNS} FROM datasets d ORDER BY d.rowid").fetchall()]
        out = []
        for fp, b, ev in rows:
            rule = dataset_accountant(ev, accountant or b.accountant)
            out.append({"fingerprint": fp, "budget": b, "spent": epsilon(ev, b.delta, rule), "accountant": rule})
        return out

    @classmethod
    def _committed(cls, db: sqlite3.Connection, fingerprint: str, other_than: str | None = None) -> list[Event]:
        """What the dataset's budget already holds: closed runs' charges + open runs' plans (but `other_than`'s)."""
        committed: list[Event] = []
        for rid, status, plan in db.execute(
                "SELECT run_id, status, planned FROM runs WHERE fingerprint=? AND run_id IS NOT ? ORDER BY rowid",
                (fingerprint, other_than)).fetchall():
            committed += _events(plan) if status == "open" else cls._charged(db, rid)
        return committed

    @staticmethod
    def _budget(db: sqlite3.Connection, fingerprint: str) -> Budget | None:
        row = db.execute(f"SELECT {_BUDGET_COLUMNS} FROM datasets d WHERE d.fingerprint=?",
                         (fingerprint,)).fetchone()
        return None if row is None else Budget(*row)

    @staticmethod
    def _charged(db: sqlite3.Connection, run_id: str) -> tuple[Event, ...]:
        rows = db.execute("SELECT params, count FROM charges WHERE run_id=? ORDER BY rowid",
                          (run_id,)).fetchall()
        return tuple(from_dict({**json.loads(p), "count": n}) for p, n in rows)

    @staticmethod
    def _dataset_charges(db: sqlite3.Connection, fingerprint: str) -> tuple[Event, ...]:
        rows = db.execute(
            "SELECT c.params, c.count FROM charges c JOIN runs r USING (run_id) "
            "WHERE r.fingerprint=? ORDER BY r.rowid, c.rowid", (fingerprint,)).fetchall()
        return merge(from_dict({**json.loads(p), "count": n}) for p, n in rows)
