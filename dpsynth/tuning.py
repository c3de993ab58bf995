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
from dpsynth.data import dataset_block, format_prefix, group_by_unit, prepare
from dpsynth.errors import UserError
from dpsynth.interrupt import graceful_stop
from dpsynth.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dpsynth.data_releases import plan_releases, release
from dpsynth.models import adapter_digest, base_info, load_base, load_tokenizer, model_context
from dpsynth.privacy import RepeatAndSelect, epsilon
from dpsynth.privacy.certificate import SearchBlock, read_certificate
from dpsynth.privacy.run import Plan, PrivateRun, resolve_delta
from dpsynth.privacy.sampling import Schedule, fresh_seed, schedule
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
    """What every trial shares: the job, the search's ledger run (its cost already charged), the noise, storage."""

    cfg: dict
    run: PrivateRun
    sigma: float
    schedule: Schedule
    storage: str


def dp_score(cfg: JobConfig, adapter_dir: Path, units: list[tuple], dataset_name: str) -> float:
    """Mean validation loss over privacy units with Gaussian noise: each unit's mean loss over its records is clipped
    to [0, L], so one unit moves the sum by at most L; noise N(0, (score_noise_multiplier * L)^2) (Gaussian
    mechanism, Dwork & Roth 2014), fresh OS entropy."""
    from peft import PeftModel

    from dpsynth.prefixlm import score_texts

    model, tok, _ = load_base(cfg.model)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    records = [ex for unit in units for ex in unit]
    nll = score_texts(model, tok, [(format_prefix(cfg.model.prefix_template, dataset_name, ex.label), ex.text)
                                   for ex in records], cfg.model.max_length)
    clip, total, start = cfg.tune.score_loss_clip, 0.0, 0
    for unit in units:
        losses = [x.mean() for x in nll[start:start + len(unit)]]
        start += len(unit)
        total += min(max(float(np.mean(losses)), 0.0), clip)
    noise = np.random.default_rng().normal(0.0, cfg.tune.score_noise_multiplier * clip)
    return (total + noise) / len(units)


def trial(config: dict) -> dict:
    """One trial (runs inside a Ray Tune trial): DP-train with this (C, lr), then release a DP score. A trial
    stopped by a stop request returns no score (it released nothing) and is run again, freshly drawn, on resume."""
    from dpsynth.train.driver import fit, worker_plan

    plan: TrialPlan = config["plan"]
    cfg = load_config(None, [f"training.max_grad_norm={config['max_grad_norm']}",
                             f"training.learning_rate={config['learning_rate']}"], base=plan.cfg)
    splits = prepare(cfg.data)
    search_store = Storage(plan.storage)
    name = f"trial-{uuid.uuid4().hex[:8]}"
    scratch = search_store.child(name)
    fit(cfg, worker_plan(cfg, splits, plan.run, sigma=plan.sigma, sched=plan.schedule, sampler_seed=fresh_seed(),
                         noise_seed=fresh_seed(), scratch=scratch, stop=search_store, covered_by_search=True))
    with local_checkpoint(scratch) as ckpt:
        done = json.loads((ckpt / STATE).read_text())["step"] if ckpt is not None else 0
        if done < plan.schedule.steps:
            return {"score": None, "checkpoint": str(scratch), "stopped": True}
        rng = np.random.default_rng(cfg.data.seed)  # which validation units: data-independent given the split size
        val = group_by_unit(splits.validation)
        pick = rng.choice(len(val), size=min(cfg.tune.score_examples, len(val)), replace=False)
        score = dp_score(cfg, ckpt / "adapter", [val[i] for i in sorted(pick)], splits.name)
    result = {"max_grad_norm": config["max_grad_norm"], "learning_rate": config["learning_rate"], "score": score,
              "checkpoint": str(scratch)}
    search_store.child("trials").write_text(f"{name}.json", json.dumps(result))  # kept for a resumed search
    return result


def _finished_trials(storage: Storage) -> list[dict]:
    store = storage.child("trials")
    return [json.loads(store.read_text(n)) for n in sorted(store.listdir()) if n.endswith(".json")]


def search(cfg: JobConfig, *, runner: Runner, show_progress: bool = True, num_trials: int | None = None) -> Path:
    """Run the private search; write the selected adapter, its certificate and the trial table into output_dir.

    `num_trials` exists for tests only: it replaces the secret random draw of K.
    """
    from dpsynth.interrupt import Interrupted
    from dpsynth.privacy.service import LedgerClient
    from dpsynth.runtime import ensure_ray, job_storage, remove_job_storage
    from dpsynth.train.driver import _scaling, check_labels, write_release

    check_search(cfg)
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if (run_dir / "certificate.json").exists():
        cert = read_certificate(run_dir / "certificate.json")
        if cert.config_hash != search_hash(cfg) and cert.mechanism.kind == "private_search":
            raise UserError(f"output_dir: {run_dir} already holds a certified search with a different config; "
                            "choose another output_dir")
        if cert.mechanism.kind != "private_search":
            raise UserError(f"output_dir: {run_dir} already holds a certified run; choose another output_dir")
        log.info("%s already holds the certified result of this search (eps=%.3f); reusing it", run_dir, cert.epsilon)
        return run_dir
    splits = prepare(cfg.data)
    if not splits.validation:
        raise UserError("data.validation_fraction: a search scores trials on the validation split; it must not be 0")
    dataset = dataset_block(splits)
    base = base_info(cfg.model)
    tok = load_tokenizer(cfg.model)
    check_labels(splits, cfg.training.batch_size)
    _scaling(cfg)
    ensure_ray(cfg.scaling.address)
    ledger = LedgerClient(cfg.privacy.ledger)
    delta = resolve_delta(cfg.privacy, dataset, ledger.budget(dataset.fingerprint))
    t = cfg.training
    sched = schedule(dataset.train_units, t.batch_size, epochs=t.epochs, steps=t.steps)
    releases = plan_releases(cfg, delta, ACCOUNTANT)  # RDP, the search's accountant: shares counted as the search is
    common = {"score_sigma": cfg.tune.score_noise_multiplier, "mean": cfg.tune.mean_trials, "shape": _shape(cfg),
              "prior": releases.events}
    try:
        sigma = calibrate_search(cfg.privacy.epsilon, delta, sched.q, sched.steps, max_sigma=cfg.tune.max_noise_multiplier,
                                 **common)
    except ValueError as e:
        raise UserError(f"tune: {e}") from None
    plan = Plan(tuple(search_events(sigma, sched.q, sched.steps, **common)), ACCOUNTANT, delta)
    name = f"{run_dir.name}-search"
    storage = job_storage(cfg, run_dir, name)
    k = num_trials if num_trials is not None else draw_num_trials(cfg.tune.mean_trials, _shape(cfg))
    run = PrivateRun.open(ledger, dataset=dataset, plan=plan, total_epsilon=cfg.privacy.dataset_epsilon or cfg.privacy.epsilon,
                          kind=name, config_hash=search_hash(cfg), storage=storage, state={"num_trials": k})
    k = run.state["num_trials"]  # a resumed search keeps its secret K
    storage.delete(STOP)
    with graceful_stop(lambda signum: storage.write_text(STOP, str(signum))) as stop_signal:
        # The whole search is charged before the first trial exists; trials then charge nothing per step.
        search_event = plan.events[-1]
        if not any(isinstance(e, RepeatAndSelect) for e in run.charged()):
            run.charge(search_event)
        job = cfg
        cfg, label_dist, lengths = release(job, releases, run, splits, tok, storage, model_context(job.model))
        if k == 0:
            raise UserError("tune: the random number of trials came out 0 (Poisson); the search's budget is spent "
                            "and nothing is released")
        done = [r for r in _finished_trials(storage) if r.get("score") is not None]
        log.info("search: %s trials (secret draw, mean %g), %d finished before, %d steps each, q=%.5f, per-trial "
                 "sigma=%.4f, delta=%.3g", k, cfg.tune.mean_trials, len(done), sched.steps, sched.q, sigma, delta)
        if len(done) < k:
            runner(trial, plan=TrialPlan(cfg.model_dump(mode="json"), run, sigma, sched, str(storage)),
                   space={"max_grad_norm": cfg.tune.max_grad_norm, "learning_rate": cfg.tune.learning_rate},
                   num_trials=k - len(done), max_concurrent=cfg.tune.max_concurrent_trials,
                   storage=str(storage.child("tune")))
        trials = [r for r in _finished_trials(storage) if r.get("score") is not None and math.isfinite(r["score"])][:k]
        if stop_signal() is not None and len(trials) < k:
            raise Interrupted(stop_signal(), f"search stopped with {len(trials)} of {k} trials finished; ledger run "
                                             f"{run.run_id} stays open (run the same command to resume it, or "
                                             f"`dpsynth abandon {run.run_id}`)")
        if not trials:
            raise RuntimeError(f"search {run.run_id}: no trial finished")
        if len(trials) < k:
            raise RuntimeError(f"search {run.run_id}: only {len(trials)} of {k} trials finished; run the same command "
                               "to run the missing ones")
        best = min(trials, key=lambda r: r["score"])
        selected = load_config(None, [f"training.max_grad_norm={best['max_grad_norm']}",
                                      f"training.learning_rate={best['learning_rate']}"], base=cfg.model_dump(mode="json"))
        trial_eps = epsilon(trial_events(sigma, sched.q, sched.steps, cfg.tune.score_noise_multiplier), delta, ACCOUNTANT)
        shape = _shape(cfg)
        with local_checkpoint(best["checkpoint"]) as ckpt:
            certificate = run.certify(
                mechanism=SearchBlock(noise_multiplier=sigma, sampling_rate=sched.q, steps_per_trial=sched.steps,
                                      expected_batch_size=t.batch_size, score_noise_multiplier=cfg.tune.score_noise_multiplier,
                                      mean_trials=cfg.tune.mean_trials, distribution=cfg.tune.distribution,
                                      shape=shape if math.isfinite(shape) else "inf", trials_run=len(trials),
                                      per_trial_epsilon_alone=trial_eps, lora=cfg.lora.model_dump(mode="json"),
                                      selected={"max_grad_norm": best["max_grad_norm"], "learning_rate": best["learning_rate"],
                                                "dp_validation_loss": best["score"]}),
                base_model=base, config_hash=search_hash(job), label_histogram=releases.labels,
                length_histogram=releases.lengths,
                lengths={"max_length": cfg.model.max_length, "max_new_tokens": cfg.sampling.max_new_tokens},
                artefacts={"adapter": adapter_digest(ckpt / "adapter")})
            write_release(run_dir, selected, ckpt, splits, label_dist, certificate, lengths)
        _write_trials(run_dir, trials, best, trial_eps, certificate.epsilon,
                      {"max_grad_norm": cfg.tune.max_grad_norm, "learning_rate": cfg.tune.learning_rate})
    remove_job_storage(storage)  # unselected trials' adapters are never released
    return run_dir


def _log_axis(axis, lo: float, hi: float) -> None:
    """A readable log axis over the searched range: labels at 1-2-5 steps (fewer when the range is wide), no
    labelled minor ticks (matplotlib labels them on sub-decade ranges, and they run into each other)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo) if hi > lo else 0.0
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 0.7 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def _write_trials(run_dir: Path, trials: list[dict], best: dict, trial_eps: float, total_eps: float,
                  space: dict[str, tuple[float, float]]) -> None:
    """trials.csv and trials.png: every trial's C, lr, DP score and epsilon (alone; the search total is certified)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"trial": i, "max_grad_norm": r["max_grad_norm"], "learning_rate": r["learning_rate"],
             "dp_validation_loss": r.get("score"), "epsilon_trial_alone": trial_eps, "selected": r is best}
            for i, r in enumerate(trials)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "trials.csv", buf.getvalue())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ok = [r for r in rows if r["dp_validation_loss"] is not None]
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
    atomic_write_bytes(run_dir / "trials.png", out.getvalue())
    atomic_write_json(run_dir / "tuning.json", {"trials": rows})
