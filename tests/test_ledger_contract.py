"""The ledger's contract, run against every implementation: the SQLite ledger, the object-store ledger (a real S3
server on loopback) and the client of the central accountant (the Ray actor). What one of them does, all do."""

from __future__ import annotations

import itertools
import math
import multiprocessing
import sqlite3
import threading

import pytest

from conftest import kill_and_await_restart
from dpsynth.privacy import (Budget, BudgetExceeded, Gaussian, Laplace, Ledger, MirroredLedger, RepeatAndSelect,
                             SampledGaussian, epsilon, to_dict)
from dpsynth.privacy.accountants import dataset_epsilon
from dpsynth.privacy.service import LEDGER_API, LedgerClient

FP = "3f2a9c0e5d7b11aa"
DELTA = 1e-5
STEP = SampledGaussian(1.0, 0.01)
TRAIN = SampledGaussian(1.0, 0.01, 1000)  # rdp eps 2.10 at DELTA


class Impl:
    """One implementation: `ledger` is live; `restart()` returns the same ledger after its process restarted."""

    def __init__(self, kind: str, tmp_path, s3):
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "nested" / "ledger.sqlite"
            self.ledger = Ledger(self.path)
        elif kind == "object_store":
            self.path = s3(f"contract/{tmp_path.name}/ledger.sqlite")
            self.ledger = MirroredLedger(self.path)
        else:
            from dpsynth.runtime import ensure_ray

            ensure_ray(None)
            self.path = tmp_path / "ledger.sqlite"
            self.ledger = LedgerClient(self.path)

    def restart(self):
        if self.kind == "sqlite":
            self.ledger = Ledger(self.path)
        elif self.kind == "object_store":
            self.ledger = MirroredLedger(self.path)  # a fresh accountant: it has only what the object holds
        else:
            kill_and_await_restart(self.ledger.actor)
        return self.ledger

    def close(self):
        if self.kind == "actor":
            import ray

            ray.kill(self.ledger.actor, no_restart=True)


@pytest.fixture(params=["sqlite", "object_store", "actor"])
def impl(request, tmp_path):
    s3 = request.getfixturevalue("s3") if request.param == "object_store" else None
    made = Impl(request.param, tmp_path, s3)
    yield made
    made.close()


def certificate_for(ledger, run_id: str, accountant: str = "rdp", delta: float = DELTA) -> dict:
    charged = ledger.charged(run_id)
    return {"run_id": run_id, "delta": delta, "accountant": accountant, "events": [to_dict(e) for e in charged],
            "epsilon": epsilon(charged, delta, accountant)}


def test_every_implementation_offers_the_whole_api(impl):
    assert all(callable(getattr(impl.ledger, name)) for name in LEDGER_API)


def test_the_budget_is_fixed_once_set(impl):
    ledger = impl.ledger
    assert ledger.budget(FP) is None
    ledger.set_budget(FP, Budget(8.0, DELTA))
    ledger.set_budget(FP, Budget(8.0, DELTA))  # idempotent
    assert ledger.budget(FP) == Budget(8.0, DELTA)
    with pytest.raises(ValueError, match="refusing to change"):
        ledger.set_budget(FP, Budget(9.0, DELTA))


def test_admission_refuses_with_spent_requested_and_total(impl):
    ledger = impl.ledger
    with pytest.raises(ValueError, match="no budget"):
        ledger.open_run("r0", FP, [TRAIN], "rdp")
    ledger.set_budget(FP, Budget(2.0, DELTA, accountant="rdp"))
    with pytest.raises(BudgetExceeded) as exc:
        ledger.open_run("r1", FP, [TRAIN], "rdp")  # 2.10 > 2.0
    msg = str(exc.value)
    assert "spent eps=0.00" in msg and "requested +2.10" in msg and "total eps=2.00" in msg and FP[:8] in msg
    assert ledger.runs() == [] and ledger.run("r1") is None
    ledger.open_run("r2", FP, [SampledGaussian(1.0, 0.01, 800)], "rdp")  # ~1.93 fits
    assert ledger.run("r2")["status"] == "open"
    with pytest.raises(ValueError, match="already exists"):
        ledger.open_run("r2", FP, [STEP], "rdp")


def test_open_runs_reserve_their_plan_and_abandon_releases_the_unused_rest(impl):
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(2.7, DELTA, accountant="rdp"))
    ledger.open_run("a", FP, [TRAIN], "rdp")
    with pytest.raises(BudgetExceeded, match="charged \\+ reserved"):
        ledger.open_run("b", FP, [TRAIN], "rdp")  # 2000 steps: 2.87 > 2.7
    ledger.charge("a", SampledGaussian(1.0, 0.01, 500))
    ledger.abandon("a")  # 500 steps stay spent; the other 500 are released
    ledger.abandon("a")  # idempotent
    ledger.open_run("b", FP, [TRAIN], "rdp")  # 1500 steps: 2.50 <= 2.7
    assert {r["run_id"]: r["status"] for r in ledger.runs(FP)} == {"a": "closed", "b": "open"}
    assert ledger.spent(FP, "rdp") == pytest.approx(epsilon([SampledGaussian(1.0, 0.01, 500)], DELTA, "rdp"))
    with pytest.raises(ValueError, match="closed"):
        ledger.charge("a", STEP)


def test_a_run_is_charged_at_most_its_admitted_plan(impl):
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(8.0, DELTA))
    ledger.open_run("r", FP, [SampledGaussian(1.0, 0.01, 3), Gaussian(5.0)], "prv")
    for _ in range(3):
        ledger.charge("r", STEP)
    with pytest.raises(BudgetExceeded, match="admitted plan allows 3"):
        ledger.charge("r", STEP)
    assert ledger.try_charge("r", STEP) is False
    assert ledger.try_charge("r", SampledGaussian(0.9, 0.01)) is False  # never planned: less noise
    assert ledger.try_charge("r", Gaussian(5.0, 2)) is False  # more than planned in one go
    assert ledger.try_charge("r", Gaussian(5.0)) is True
    assert ledger.charged("r") == (SampledGaussian(1.0, 0.01, 3), Gaussian(5.0))
    with pytest.raises(ValueError, match="unknown"):
        ledger.charge("nope", STEP)


def test_concurrent_charges_are_neither_lost_nor_double_counted(impl):
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(1e6, DELTA))
    ledger.open_run("r", FP, [SampledGaussian(1.0, 0.01, 30)], "rdp")
    accepted = []
    barrier = threading.Barrier(6)

    def hammer():
        barrier.wait(timeout=60)
        accepted.append(sum(ledger.try_charge("r", STEP) for _ in range(8)))  # 48 attempts on a plan of 30

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(accepted) == 30
    assert ledger.charged("r") == (SampledGaussian(1.0, 0.01, 30),)


def test_every_charge_survives_a_restart(impl):
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(1e6, DELTA))
    ledger.open_run("r", FP, [SampledGaussian(1.0, 0.01, 10)], "rdp")
    for _ in range(4):
        ledger.charge("r", STEP)
    again = impl.restart()
    assert again.charged("r") == (SampledGaussian(1.0, 0.01, 4),)
    assert again.budget(FP) == Budget(1e6, DELTA)
    again.charge("r", SampledGaussian(1.0, 0.01, 6))
    assert again.try_charge("r", STEP) is False  # the plan's limit survived too


def test_certify_closes_the_run_only_with_what_was_charged(impl):
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(8.0, DELTA))
    ledger.open_run("r", FP, [SampledGaussian(1.0, 0.01, 100), Gaussian(5.0)], "rdp")
    ledger.charge("r", SampledGaussian(1.0, 0.01, 60))
    good = certificate_for(ledger, "r")
    planned = {**good, "events": [to_dict(SampledGaussian(1.0, 0.01, 100)), to_dict(Gaussian(5.0))]}
    planned["epsilon"] = epsilon([SampledGaussian(1.0, 0.01, 100), Gaussian(5.0)], DELTA, "rdp")
    with pytest.raises(ValueError, match="charged"):
        ledger.certify("r", planned)  # the plan is not what ran
    with pytest.raises(ValueError, match="spend eps="):
        ledger.certify("r", {**good, "epsilon": good["epsilon"] / 2})
    with pytest.raises(ValueError, match="accountant"):
        ledger.certify("r", {**good, "accountant": "prv"})
    assert ledger.run("r")["status"] == "open"
    ledger.certify("r", good)
    ledger.certify("r", good)  # the same certificate again: a no-op
    record = ledger.run("r")
    assert record["status"] == "closed" and record["certificate"] == good
    with pytest.raises(ValueError, match="closed"):
        ledger.charge("r", STEP)
    with pytest.raises(ValueError, match="another certificate"):
        ledger.certify("r", {**good, "run_id": "x"})


def _charge_worker(path, attempts: int, barrier, results) -> None:
    ledger, accepted = Ledger(path), 0
    barrier.wait(timeout=60)
    for _ in range(attempts):
        accepted += ledger.try_charge("r", STEP)
    results.put(accepted)


def test_sqlite_ledger_serialises_charges_from_several_processes(tmp_path):
    """The file itself is the lock: processes (not just threads) racing on one plan."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.set_budget(FP, Budget(100.0, DELTA))
    ledger.open_run("r", FP, [SampledGaussian(1.0, 0.01, 20)], "rdp")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_charge_worker, args=(path, 8, barrier, results)) for _ in range(4)]
    for w in workers:
        w.start()
    total = sum(results.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=30)
    assert total == 20 and ledger.charged("r") == (SampledGaussian(1.0, 0.01, 20),)
    assert math.isclose(ledger.spent(FP, "rdp"), epsilon([SampledGaussian(1.0, 0.01, 20)], DELTA, "rdp"))


# ------------------------------------------------------------------ one composition rule per dataset budget

# Three features on one dataset, each under its own accountant: DP-SGD training (PRV), a private search (RDP: only RDP
# accounts RepeatAndSelect) and Laplace in-context generation (PLD: PRV cannot account Laplace).
SEARCH = RepeatAndSelect((SampledGaussian(1.0, 0.01, 200), Gaussian(20.0)), 3.0, 1.0)  # rdp eps 2.07 alone
VOTES = Laplace(5.0, 10)  # pld eps 1.99 alone
FEATURES = {"train": ([TRAIN], "prv"), "search": ([SEARCH], "rdp"), "incontext": ([VOTES, Gaussian(30.0, purpose="histogram")], "pld")}


def _close(ledger, run_id: str, events, accountant: str) -> None:
    for e in events:
        ledger.charge(run_id, e)
    ledger.certify(run_id, certificate_for(ledger, run_id, accountant))


@pytest.mark.parametrize("order", list(itertools.permutations(FEATURES)), ids="-".join)
def test_runs_under_different_accountants_spend_one_dataset_budget(impl, order):
    """Any two fit (at most eps 3.3 together), all three do not (4.1 > 3.5, composed with RDP): in every order the
    first two are admitted, the third is refused by the budget, and the spend is always readable."""
    ledger = impl.ledger
    registered = FEATURES[order[0]][1]
    charged = []
    for i, name in enumerate(order):
        events, accountant = FEATURES[name]
        ledger.set_budget(FP, Budget(3.5, DELTA, accountant=accountant))  # another accountant does not refuse the run
        if i < 2:
            ledger.open_run(name, FP, events, accountant)
            _close(ledger, name, events, accountant)
            charged += events
        else:
            with pytest.raises(BudgetExceeded, match="composed with rdp"):
                ledger.open_run(name, FP, events, accountant)
        assert ledger.budget(FP) == Budget(3.5, DELTA, accountant=registered)  # fixed by the first registration
        want = dataset_epsilon(charged, DELTA, registered)
        assert ledger.spent(FP) == pytest.approx(want, rel=1e-6)
        (row,) = ledger.datasets()
        assert row["spent"] == pytest.approx(want, rel=1e-6) and row["budget"].accountant == registered
    assert [r["run_id"] for r in ledger.runs(FP)] == list(order[:2])
    assert all(r["status"] == "closed" and r["certificate"]["accountant"] == FEATURES[r["run_id"]][1]
               for r in ledger.runs(FP))


def test_admission_is_refused_when_the_fallback_composition_exceeds_the_budget(impl):
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(2.5, DELTA))  # prv
    ledger.open_run("train", FP, [TRAIN], "prv")
    _close(ledger, "train", [TRAIN], "prv")  # prv eps 1.83
    with pytest.raises(BudgetExceeded, match=r"total eps=2.50.*composed with pld"):
        ledger.open_run("votes", FP, [VOTES], "pld")  # 1.99 alone fits; with the training, PLD says 2.98
    with pytest.raises(BudgetExceeded, match="composed with rdp"):
        ledger.open_run("search", FP, [SEARCH], "rdp")  # 2.07 alone; with the training, RDP says 3.01
    assert ledger.run("votes") is None and ledger.run("search") is None
    assert ledger.spent(FP) == pytest.approx(epsilon([TRAIN], DELTA, "prv"), rel=1e-6)


def test_a_plan_over_the_total_under_its_own_accountant_is_refused(impl):
    """What the run's certificate will state must fit too, even when the dataset's tighter accountant would admit it."""
    ledger = impl.ledger
    ledger.set_budget(FP, Budget(2.0, DELTA))  # prv: TRAIN is 1.83 there, but 2.10 under rdp
    with pytest.raises(BudgetExceeded, match="under its accountant rdp"):
        ledger.open_run("r", FP, [TRAIN], "rdp")
    with pytest.raises(ValueError, match="cannot account"):
        ledger.open_run("r", FP, [SEARCH], "prv")
    ledger.open_run("r", FP, [TRAIN], "prv")


def test_rename_dataset_moves_the_budget_and_its_runs(impl):
    ledger = impl.ledger
    old, new, other = "a" * 64, "b" * 64, "c" * 64
    assert ledger.rename_dataset(old, new) is False  # nothing to move
    ledger.set_budget(old, Budget(8.0, DELTA, accountant="rdp"))
    ledger.open_run("r", old, [SampledGaussian(1.0, 0.01, 10)], "rdp")
    ledger.charge("r", SampledGaussian(1.0, 0.01, 4))
    spent = ledger.spent(old)
    assert ledger.rename_dataset(old, new) is True
    again = impl.restart()
    assert again.budget(old) is None and again.budget(new) == Budget(8.0, DELTA, accountant="rdp")
    assert [r["run_id"] for r in again.runs(new)] == ["r"] and again.runs(old) == []
    assert again.spent(new) == pytest.approx(spent)
    again.charge("r", SampledGaussian(1.0, 0.01, 6))  # the open run goes on under the new fingerprint
    assert again.rename_dataset(old, new) is False  # done already: a no-op
    again.set_budget(other, Budget(8.0, DELTA))
    with pytest.raises(ValueError, match="both hold a budget"):
        again.rename_dataset(new, other)
    assert again.budget(new) is not None and [r["run_id"] for r in again.runs(new)] == ["r"]


def test_an_open_run_is_extended_only_within_the_budget(impl):
    """A run sized by its own first release (steps from a DP length histogram) admits the rest later, by the same
    rule as a new run: refused when it would not fit, durable across a restart, and charged against like a plan."""
    from dpsynth.privacy import Gaussian

    ledger, fp = impl.ledger, "e" * 64
    ledger.set_budget(fp, Budget(3.0, DELTA, accountant="rdp"))
    ledger.open_run("r", fp, [Gaussian(20.0, purpose="histogram")], "rdp")
    ledger.charge("r", Gaussian(20.0, purpose="histogram"))
    with pytest.raises(BudgetExceeded):
        ledger.charge("r", SampledGaussian(1.0, 0.01, 1))  # not planned yet
    with pytest.raises(BudgetExceeded):
        ledger.extend_run("r", [SampledGaussian(0.5, 0.5, 1000)])  # far over the total
    assert [e for e in ledger.run("r")["planned"]] == [Gaussian(20.0, purpose="histogram")]
    ledger.extend_run("r", [SampledGaussian(1.0, 0.01, 100)])
    again = impl.restart()
    assert SampledGaussian(1.0, 0.01, 100) in again.run("r")["planned"]
    again.charge("r", SampledGaussian(1.0, 0.01, 100))
    with pytest.raises(BudgetExceeded):
        again.charge("r", SampledGaussian(1.0, 0.01, 1))  # the extension is used up
    # another run's admission counts the extension as reserved
    assert again.spent(fp) > epsilon([Gaussian(20.0)], DELTA, "rdp")
    again.certify("r", certificate_for(again, "r"))
    with pytest.raises(ValueError, match="closed"):
        again.extend_run("r", [SampledGaussian(1.0, 0.01, 1)])


def test_a_ledger_from_before_budgets_named_their_accountant(tmp_path):
    """The migration: a budget row without an accountant composes with its first run's, or PRV."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE datasets (fingerprint TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
                               unit TEXT NOT NULL DEFAULT 'record');
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL REFERENCES datasets,
                           accountant TEXT NOT NULL, planned TEXT NOT NULL, status TEXT NOT NULL, certificate TEXT);
        CREATE TABLE charges (run_id TEXT NOT NULL REFERENCES runs, params TEXT NOT NULL, count INTEGER NOT NULL,
                              PRIMARY KEY (run_id, params));
        INSERT INTO datasets VALUES ('tuned', 8.0, 1e-5, 'record'), ('fresh', 8.0, 1e-5, 'record');
        INSERT INTO runs VALUES ('t', 'tuned', 'rdp', '[]', 'closed', NULL);
    """)
    db.close()
    ledger = Ledger(path)
    assert ledger.budget("tuned") == Budget(8.0, 1e-5, accountant="rdp")
    assert ledger.budget("fresh") == Budget(8.0, 1e-5, accountant="prv")
    assert [d["accountant"] for d in ledger.datasets()] == ["rdp", "prv"]


def test_dpsynth_budget_lists_every_run_whatever_its_accountant(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dpsynth.cli import app

    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.set_budget(FP, Budget(8.0, DELTA))
    for name in ("train", "search", "incontext"):
        events, accountant = FEATURES[name]
        ledger.open_run(name + "-run", FP, events, accountant)
        for e in events:
            ledger.charge(name + "-run", e)
    ledger.certify("train-run", certificate_for(ledger, "train-run", "prv"))
    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(app, ["budget", "--ledger", str(path)])
    assert res.exit_code == 0, res.output
    assert all(f"{name}-run" in res.output for name in FEATURES)
    assert f"{dataset_epsilon([e for n in FEATURES for e in FEATURES[n][0]], DELTA, 'prv'):.3f}" in res.output
