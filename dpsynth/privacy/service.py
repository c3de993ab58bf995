"""The central accountant: one named Ray actor per ledger file per cluster.

Every training worker, run, tuning trial and DP label count charges the same actor, which
serialises the calls (one at a time) onto the durable SQLite `Ledger`. A ledger path is pinned
to the node that created the actor, because that is where the path is meaningful (put it on
shared storage for a cluster whose head may move); a ledger URI (s3://, gs://: `MirroredLedger`)
may restart on any node. A restarted actor simply reopens the ledger: every charge was durable
before the call returned.

Ray is imported lazily so that dpsynth.privacy itself needs no Ray.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .events import Event
from .ledger import Budget, BudgetExceeded
from .mirror import open_ledger

NAMESPACE = "dpsynth"


class LedgerActor:
    """Actor body: a thin, serialised front of `Ledger` that never raises across the wire for refusals."""

    def __init__(self, path: str) -> None:
        self.ledger = open_ledger(path)

    def path(self) -> str:
        return self.ledger.location

    def pid(self) -> int:
        return os.getpid()

    def call(self, method: str, *args, **kwargs) -> tuple[str, Any]:
        """("ok", result) or (exception class name, message): refusals must survive the trip intact."""
        if method not in LEDGER_API:
            return "ValueError", f"{method!r} is not part of the ledger API"
        try:
            return "ok", getattr(self.ledger, method)(*args, **kwargs)
        except (BudgetExceeded, ValueError) as e:
            return type(e).__name__, str(e)


def normalise(location: str | Path) -> str:
    """One spelling per ledger: an absolute path, or the URI as given."""
    from dpsynth.storage import is_uri

    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def actor_name(path: str | Path) -> str:
    return "ledger-" + hashlib.sha256(normalise(path).encode()).hexdigest()[:16]


def ledger_actor(path: str | Path):
    """Get or create the cluster's ledger actor for `path` (Ray must already be initialised)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dpsynth.storage import is_uri

    path = normalise(path)
    Actor = ray.remote(LedgerActor)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=is_uri(path))
    # num_cpus=0: the accountant must never wait behind training workers for a CPU.
    return Actor.options(name=actor_name(path), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                         num_cpus=0, max_restarts=-1, max_task_retries=0, scheduling_strategy=here).remote(path)


LEDGER_API = ("set_budget", "budget", "open_run", "charge", "try_charge", "charged", "certify", "abandon", "run",
              "spent", "runs", "datasets", "rename_dataset", "extend_run")
"""What every ledger offers (Ledger, MirroredLedger, LedgerClient): the contract tests/test_ledger_contract.py runs."""


class LedgerClient:
    """The `Ledger` interface, served by the cluster's ledger actor: how every writer reaches the ledger (training
    workers, the private search, in-context generation, label histograms). Picklable: ships to workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = normalise(path)
        self._actor = None

    @property
    def location(self) -> str:
        return self.path

    @property
    def actor(self):
        if self._actor is None:
            self._actor = ledger_actor(self.path)
        return self._actor

    def __getstate__(self) -> dict:
        return {"path": self.path, "_actor": None}

    def _call(self, method: str, *args, **kwargs):
        import ray

        status, value = ray.get(self.actor.call.remote(method, *args, **kwargs))
        if status == "ok":
            return value
        raise (BudgetExceeded if status == "BudgetExceeded" else ValueError)(value)

    def set_budget(self, fingerprint: str, budget: Budget) -> None:
        return self._call("set_budget", fingerprint, budget)

    def budget(self, fingerprint: str) -> Budget | None:
        return self._call("budget", fingerprint)

    def open_run(self, run_id: str, fingerprint: str, planned, accountant: str) -> None:
        return self._call("open_run", run_id, fingerprint, list(planned), accountant)

    def extend_run(self, run_id: str, events) -> None:
        return self._call("extend_run", run_id, list(events))

    def charge(self, run_id: str, event: Event) -> None:
        return self._call("charge", run_id, event)

    def try_charge(self, run_id: str, event: Event) -> bool:
        return self._call("try_charge", run_id, event)

    def charged(self, run_id: str) -> tuple[Event, ...]:
        return self._call("charged", run_id)

    def certify(self, run_id: str, certificate: dict) -> None:
        return self._call("certify", run_id, certificate)

    def abandon(self, run_id: str) -> None:
        return self._call("abandon", run_id)

    def run(self, run_id: str) -> dict[str, Any] | None:
        return self._call("run", run_id)

    def spent(self, fingerprint: str, accountant: str | None = None) -> float:
        return self._call("spent", fingerprint, accountant)

    def rename_dataset(self, old_fingerprint: str, new_fingerprint: str) -> bool:
        return self._call("rename_dataset", old_fingerprint, new_fingerprint)

    def runs(self, fingerprint: str | None = None) -> list[dict[str, Any]]:
        return self._call("runs", fingerprint)

    def datasets(self, accountant: str | None = None) -> list[dict[str, Any]]:
        return self._call("datasets", accountant)
