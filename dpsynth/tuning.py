"""A private search over clipping norm C and learning rate, within one total privacy budget.

Papernot & Steinke (ICLR 2022): draw a secret random number K of trials; each trial draws (C, lr) at random
(log-uniform), trains with DP-SGD on the train split and releases a Gaussian-noised validation loss; only the
best trial is released. The search's cost (RepeatAndSelect under RDP, plus the DP label histogram) goes through
the one private-run path: admitted and charged to the ledger as one run *before* any trial starts, each trial's
noise calibrated (the one calibrator) so that it fits.

The Ray Tune layer (search space, Tuner, Optuna's random sampler) lives in tune/ and is handed in by the CLI as
`runner`: dpsynth never imports tune/. An interrupted search (SIGINT/SIGTERM) keeps its finished trials and its
secret K in private storage; the same command resumes it with the trials still missing (fresh i.i.d. draws; a
stopped trial released nothing).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsynth.config import JobConfig, load_config
from dpsynth.data import Splits, group_by_unit, keyed_subset
from dpsynth.data_releases import plan_releases
from dpsynth.errors import UserError
from dpsynth.models import load_base
from dpsynth.privacy import RepeatAndSelect, epsilon
from dpsynth.privacy.certificate import SearchBlock
from dpsynth.privacy.run import Plan, PrivateRun
from dpsynth.privacy.sampling import Schedule, schedule
from dpsynth.prompts import label_prompts
from dpsynth.privacy.tuning import ACCOUNTANT, calibrate_search, draw_num_trials, search_events, trial_events
from dpsynth.storage import Storage
from dpsynth.train.worker import STATE, STOP, local_checkpoint

log = logging.getLogger(__name__)

Runner = Callable[..., list[dict]]
"""`runner(trial, *, plan, space, num_trials, max_concurrent, storage) -> [{max_grad_norm, learning_rate, score,
checkpoint}]`: runs `num_trials` calls of `trial` (tune.search.run_trials does it with Ray Tune)."""


def _shape(cfg: JobConfig) -> float:
    return math.inf if cfg.tune.distribution == "poisson" else cfg.tune.shape


def search_hash(cfg: JobConfig) -> str:
    """Everything that determines the search and its spend (the trials' C and lr are drawn, not configured)."""
    keep = {"training": cfg.training_hash(), "tune": cfg.tune.model_dump(mode="json")}
    keep["tune"].pop("max_concurrent_trials")
    return "search-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def check_search(cfg: JobConfig) -> None:
    """Refuse what the accounting does not cover, before anything runs."""
    if cfg.tune.scheduler != "fifo":
        raise UserError(f"tune.scheduler: '{cfg.tune.scheduler}' stops trials early on private metrics, a cost this "
                        "search's accounting (Papernot & Steinke) does not cover; use fifo")
    if cfg.training.noise_multiplier is not None:
        raise UserError("training.noise_multiplier: a search calibrates each trial's noise to the total budget; unset it")


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares, in memory (nothing a trial needs is re-read from the private data or from disk): the
    job, the search's ledger run (its cost already charged), the noise, the train split and the validation units the
    DP score reads, and the search's private storage."""

    cfg: dict
    run: PrivateRun
    sigma: float
    schedule: Schedule
    storage: str
    splits: Splits
    """Train and validation only (test never travels)."""
    score_units: tuple
    """The validation units every trial is scored on (a keyed-hash subset: it moves by one unit only)."""


def dp_score(cfg: JobConfig, adapter_dir: Path, units, dataset_name: str) -> float:
    """Mean validation loss over privacy units with Gaussian noise: each unit's mean loss over its records is clipped
    to [0, L], so one unit moves the sum by at most L; noise N(0, (score_noise_multiplier * L)^2) (Gaussian
    mechanism, Dwork & Roth 2014), fresh OS entropy."""
    from peft import PeftModel

    from dpsynth.prefixlm import score_texts

    model, tok, _ = load_base(cfg.model)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    records = [ex for unit in units for ex in unit]
    prompts = label_prompts(cfg, tok, dataset_name, sorted({ex.label for ex in records}))
    nll = score_texts(model, tok, [(prompts[ex.label], ex.text) for ex in records], cfg.model.max_length)
    clip, total, start = cfg.tune.score_loss_clip, 0.0, 0
    for unit in units:
        losses = [x.mean() for x in nll[start:start + len(unit)]]
        start += len(unit)
        # a non-finite loss is clipped like any other: one unit must not be able to fail every trial
        total += float(np.clip(np.nan_to_num(np.mean(losses), nan=clip, posinf=clip, neginf=0.0), 0.0, clip))
    noise = np.random.default_rng().normal(0.0, cfg.tune.score_noise_multiplier * clip)
    # Divided by the configured count, not by how many units there were: that count would scale the noise by the data.
    return (total + noise) / cfg.tune.score_examples


WORST = math.inf
"""A failed or non-finite trial's score: it counts as a trial (the worst one), never re-drawn, so that which trials
count cannot depend on the data."""


def trial(config: dict) -> dict:
    """One trial (runs inside a Ray Tune trial): DP-train with this (C, lr), then release a DP score.

    The trial is recorded as started before it trains. A trial that fails (an error, a non-finite score, or a death
    that leaves no result) counts with the worst score; only a trial stopped by the owner's stop request (SIGINT /
    SIGTERM: independent of the data) releases nothing and is drawn afresh on resume."""
    from dpsynth.train.driver import fit, worker_plan

    plan: TrialPlan = config["plan"]
    cfg = load_config(None, [f"training.max_grad_norm={config['max_grad_norm']}",
                             f"training.learning_rate={config['learning_rate']}"], base=plan.cfg)
    search_store = Storage(plan.storage)
    records = search_store.child("trials")
    name = f"trial-{uuid.uuid4().hex[:8]}"
    scratch = search_store.child(name)
    result = {"trial": name, "max_grad_norm": config["max_grad_norm"], "learning_rate": config["learning_rate"],
              "checkpoint": str(scratch)}
    records.write_text(f"{name}.started.json", json.dumps(result))
    try:
        fit(cfg, worker_plan(cfg, plan.splits, plan.run, sigma=plan.sigma, sched=plan.schedule, scratch=scratch,
                             stop=search_store, covered_by_search=True))
        with local_checkpoint(scratch) as ckpt:
            done = json.loads((ckpt / STATE).read_text())["step"] if ckpt is not None else 0
            if done < plan.schedule.steps and search_store.exists(STOP):
                return {**result, "score": None, "status": "stopped"}  # nothing released; re-drawn on resume
            if done < plan.schedule.steps:
                raise RuntimeError(f"trained {done} of {plan.schedule.steps} steps")
            score = dp_score(cfg, ckpt / "adapter", plan.score_units, plan.splits.name)
        result.update(score=score, status="ok") if math.isfinite(score) else result.update(score=WORST, status="failed",
                                                                                             error="non-finite score")
    except Exception as e:  # noqa: BLE001 - a failed trial is a trial, with the worst score
        log.warning("trial %s failed (%s): counted with the worst score", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        result.update(score=WORST, status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    records.write_text(f"{name}.json", json.dumps(result))
    return result


def trial_records(storage: Storage) -> list[dict]:
    """Every trial that counts, in start order: finished (ok or failed), and started-but-never-finished as failed.
    Trials stopped by a stop request do not count (they are drawn afresh)."""
    store = storage.child("trials")
    names = sorted(store.listdir())
    out = []
    for n in names:
        if not n.endswith(".started.json"):
            continue
        trial_name = n[: -len(".started.json")]
        done = store.read_text(f"{trial_name}.json")
        record = json.loads(done) if done is not None else {**json.loads(store.read_text(n)), "score": WORST,
                                                            "status": "failed", "error": "no result"}
        if record["status"] != "stopped":
            out.append(record)
    return out


class SearchJob:
    """The private search, plugged into the private-job skeleton (dpsynth.private_job). Only the selected trial's
    settings, adapter and DP score are released; every other trial, the number of trials and the plots stay with
    the owner."""

    kind = "search"

    def __init__(self, runner: Runner, num_trials: int | None = None) -> None:
        self.runner, self.num_trials = runner, num_trials

    def config_hash(self, cfg: JobConfig) -> str:
        return search_hash(cfg)

    def check(self, cfg: JobConfig, splits: Splits, tokenizer) -> None:
        from dpsynth.prompts import check_prompts_fit
        from dpsynth.train.driver import _scaling, check_labels

        check_search(cfg)
        if not splits.validation:
            raise UserError("data.validation_fraction: a search scores trials on the validation split; it must not be 0")
        check_prompts_fit(cfg, tokenizer, splits.name, splits.labels)
        check_labels(splits, cfg.training.batch_size)
        _scaling(cfg)

    def plan(self, cfg: JobConfig, splits: Splits, delta: float):
        from dpsynth.private_job import JobPlan

        t = cfg.training
        if t.steps == "auto":
            log.info("search: training.steps auto sizes one run to a time budget; each trial trains training.epochs=%g",
                     t.epochs)
        self.sched = schedule(len(splits.train_units()), t.batch_size, epochs=t.epochs,
                              steps=None if t.steps == "auto" else t.steps)
        releases = plan_releases(cfg, delta, ACCOUNTANT)  # RDP, the search's accountant: shares counted as the search is
        common = {"score_sigma": cfg.tune.score_noise_multiplier, "mean": cfg.tune.mean_trials, "shape": _shape(cfg),
                  "prior": releases.events}
        try:
            self.sigma = calibrate_search(cfg.privacy.epsilon, delta, self.sched.q, self.sched.steps,
                                          max_sigma=cfg.tune.max_noise_multiplier, **common)
        except ValueError as e:
            raise UserError(f"tune: {e}") from None
        plan = Plan(tuple(search_events(self.sigma, self.sched.q, self.sched.steps, **common)), ACCOUNTANT, delta)
        k = self.num_trials if self.num_trials is not None else draw_num_trials(cfg.tune.mean_trials, _shape(cfg))
        return JobPlan(plan, releases, {"num_trials": k})  # K: secret, in the owner's private storage only

    def execute(self, ctx):
        from dpsynth.interrupt import Interrupted

        cfg, run, storage = ctx.cfg, ctx.run, ctx.storage
        # The whole search is charged before the first trial exists; trials then charge nothing per step.
        if not any(isinstance(e, RepeatAndSelect) for e in run.charged()):
            run.charge(ctx.plan.plan.events[-1])
        k = run.state["num_trials"]  # a resumed search keeps its secret K
        if not run.resumed:  # trials left by an abandoned search on this storage belong to another run
            storage.child("trials").delete()
        if k == 0:
            raise UserError("tune: the random number of trials came out 0 (Poisson); the search's budget is spent "
                            "and nothing is released")
        done = trial_records(storage)
        log.info("search: %s trials (secret draw, mean %g), %d counted before, %d steps each, q=%.5f, per-trial "
                 "sigma=%.4f, delta=%.3g", k, cfg.tune.mean_trials, len(done), self.sched.steps, self.sched.q,
                 self.sigma, ctx.delta)
        if len(done) < k:
            splits = dataclasses.replace(ctx.splits, test=())
            val = {u[0].unit: u for u in group_by_unit(splits.validation)}
            score_units = tuple(val[key] for key in keyed_subset(list(val.values()), cfg.tune.score_examples,
                                                                 ctx.secret, f"score:{cfg.data.seed}"))
            self.runner(trial, plan=TrialPlan(cfg.model_dump(mode="json"), run, self.sigma, self.sched, str(storage),
                                              splits, score_units),
                        space={"max_grad_norm": cfg.tune.max_grad_norm, "learning_rate": cfg.tune.learning_rate},
                        num_trials=k - len(done), max_concurrent=cfg.tune.max_concurrent_trials,
                        storage=str(storage.child("tune")))
        trials = trial_records(storage)[:k]
        if ctx.stop_signal() is not None and len(trials) < k:
            raise Interrupted(ctx.stop_signal(), f"search stopped with {len(trials)} of {k} trials counted; ledger run "
                                                 f"{run.run_id} stays open (run the same command to resume it, or "
                                                 f"`dpsynth abandon {run.run_id}`)")
        if len(trials) < k:
            raise RuntimeError(f"search {run.run_id}: only {len(trials)} of {k} trials ran; run the same command to run "
                               "the missing ones")
        best = min(trials, key=lambda r: r["score"])
        if not math.isfinite(best["score"]):
            raise RuntimeError(f"search {run.run_id}: every trial failed; its budget is spent and nothing is released "
                               f"(see {storage})")
        self.trials, self.best = trials, best
        self.selected = load_config(None, [f"training.max_grad_norm={best['max_grad_norm']}",
                                           f"training.learning_rate={best['learning_rate']}"],
                                    base=cfg.model_dump(mode="json"))
        return ctx.resources.enter_context(local_checkpoint(best["checkpoint"]))

    def certify(self, ctx, ckpt: Path):
        from dpsynth.train.driver import adapter_certificate

        cfg, best, shape = ctx.cfg, self.best, _shape(ctx.cfg)
        self.trial_eps = epsilon(trial_events(self.sigma, self.sched.q, self.sched.steps, cfg.tune.score_noise_multiplier),
                                 ctx.delta, ACCOUNTANT)
        return ctx.run.certify(
            mechanism=SearchBlock(noise_multiplier=self.sigma, sampling_rate=self.sched.q,
                                  steps_per_trial=self.sched.steps, expected_batch_size=cfg.training.batch_size,
                                  score_noise_multiplier=cfg.tune.score_noise_multiplier, mean_trials=cfg.tune.mean_trials,
                                  distribution=cfg.tune.distribution, shape=shape if math.isfinite(shape) else "inf",
                                  per_trial_epsilon_alone=self.trial_eps, lora=cfg.lora.model_dump(mode="json"),
                                  selected={"max_grad_norm": best["max_grad_norm"], "learning_rate": best["learning_rate"],
                                            "dp_validation_loss": best["score"]}),
            **adapter_certificate(ctx, ckpt))

    def released_config(self, ctx, ckpt: Path) -> JobConfig:
        return self.selected

    def write(self, release, ctx, ckpt: Path) -> dict:
        from dpsynth.train.driver import release_adapter, training_metrics

        release_adapter(release, ckpt, "private_search")
        write_trials(release, self.trials, self.best, self.trial_eps, release.cert.epsilon,
                     {"max_grad_norm": ctx.cfg.tune.max_grad_norm, "learning_rate": ctx.cfg.tune.learning_rate})
        return training_metrics(ckpt)


def search(cfg: JobConfig, *, runner: Runner, show_progress: bool = True, num_trials: int | None = None) -> Path:
    """Run the private search; write the selected adapter and its certificate into output_dir (the trial table and
    plot into its owner-only part). `num_trials` exists for tests only: it replaces the secret random draw of K."""
    from dpsynth.private_job import run_private_job

    return run_private_job(cfg, SearchJob(runner, num_trials), show_progress=show_progress)


def _log_axis(axis, lo: float, hi: float) -> None:
    """A readable log axis over the searched range: labels at 1-2-5 steps (fewer when the range is wide), no
    labelled minor ticks (matplotlib labels them on sub-decade ranges, and they run into each other)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo) if hi > lo else 0.0
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 0.7 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def write_trials(release, trials: list[dict], best: dict, trial_eps: float, total_eps: float,
                 space: dict[str, tuple[float, float]]) -> None:
    """trials.csv, trials.png and tuning.json, owner-only: every trial's C, lr, DP score (the worst, inf, for a failed
    one) and epsilon alone. Releasing them would need a charge the search does not make."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"trial": i, "max_grad_norm": r["max_grad_norm"], "learning_rate": r["learning_rate"],
             "dp_validation_loss": r.get("score"), "status": r.get("status", "ok"), "epsilon_trial_alone": trial_eps,
             "selected": r is best}
            for i, r in enumerate(trials)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    release.owner_text("trials.csv", buf.getvalue())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ok = [r for r in rows if r["dp_validation_loss"] is not None and math.isfinite(r["dp_validation_loss"])]
    sc = ax.scatter([r["max_grad_norm"] for r in ok], [r["learning_rate"] for r in ok],
                    c=[r["dp_validation_loss"] for r in ok], cmap="viridis_r", s=80)
    for r in ok:
        if r["selected"]:
            ax.scatter([r["max_grad_norm"]], [r["learning_rate"]], s=260, facecolors="none", edgecolors="red")
    ax.set(xscale="log", yscale="log", xlabel="clipping norm C", ylabel="learning rate",
           title=f"{len(rows)} trials, eps {trial_eps:.2f} each alone; search total eps {total_eps:.2f}")
    for axis, key, setter in ((ax.xaxis, "max_grad_norm", ax.set_xlim), (ax.yaxis, "learning_rate", ax.set_ylim)):
        lo, hi = space[key]
        lo, hi = (lo / 1.2, hi * 1.2) if hi > lo else (lo / 2, lo * 2)
        setter(lo, hi)
        _log_axis(axis, lo, hi)
    fig.colorbar(sc, label="DP validation loss")
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    release.owner_bytes("trials.png", out.getvalue())
    release.owner_json("tuning.json", {"trials": [{**r, "dp_validation_loss": r["dp_validation_loss"]
                                                   if math.isfinite(r["dp_validation_loss"]) else None} for r in rows]})
