"""One in-context generation run through the private-run path: plan, admit, generate (charging every example
before its tokens exist), certify. Every charge goes through the central accountant (the ledger actor), never the
ledger file. SIGINT/SIGTERM stop between examples; the same command resumes with the examples still missing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from dpsynth.config import JobConfig
from dpsynth.data import Splits, dataset_block, prepare
from dpsynth.data_releases import plan_releases, release
from dpsynth.models import load_tokenizer, model_context
from dpsynth.errors import UserError
from dpsynth.interrupt import Interrupted, graceful_stop
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.privacy import Event
from dpsynth.privacy.certificate import CorpusBlock, InContextBlock, now, read_certificate, write_certificate
from dpsynth.privacy.run import Plan, PrivateRun, resolve_delta
from dpsynth.sample.corpus import label_counts, resolve_proportions, serialize

from .mechanism import (SENSITIVITY_L1, SENSITIVITY_L2, assign_groups, calibrate_noise, generate_rows, noise_scale,
                        plan_events, pure_epsilon)

log = logging.getLogger(__name__)

ROWS_STATE = "incontext-rows.json"
STOP = "STOP"


def incontext_hash(cfg: JobConfig) -> str:
    keep = cfg.model_dump(mode="json", include={"data", "model", "privacy", "incontext"})
    keep["privacy"].pop("ledger")
    keep["incontext"].pop("engine")  # same votes and charges on either engine
    keep["label_proportions"] = cfg.sampling.label_proportions
    keep["label_budget_share"] = cfg.sampling.label_budget_share
    return "ic-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def example_charger(run: PrivateRun):
    """charge(events) -> bool: one example's events through the run (the central accountant), before its tokens
    exist; False as soon as the ledger refuses one (generation then stops)."""
    def charge(events: list[Event]) -> bool:
        return all(run.try_charge(e) for e in events)
    return charge


def _fresh_generator() -> torch.Generator:
    # DP noise must not be reproducible from a seed: fresh OS entropy every run.
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def generate(cfg: JobConfig, *, show_progress: bool = True, generator: torch.Generator | None = None) -> Path:
    """Training-free DP corpus into cfg.output_dir: synthetic.jsonl + certificates (see dpsynth.incontext)."""
    from dpsynth.privacy.service import LedgerClient
    from dpsynth.runtime import ensure_ray, job_storage, remove_job_storage

    from .voters import VLLMVoter, make_voter

    ic, acc = cfg.incontext, cfg.privacy.accountant
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if (run_dir / "certificate.json").exists():
        cert = read_certificate(run_dir / "certificate.json")
        if cert.config_hash != incontext_hash(cfg):
            raise UserError(f"output_dir: {run_dir} already holds a certified run with a different config; choose another output_dir")
        log.info("%s already holds a certified in-context corpus for this config (eps=%.3f); reusing it", run_dir, cert.epsilon)
        return run_dir
    if ic.mechanism == "laplace" and acc == "prv":
        raise UserError("privacy.accountant: 'prv' cannot account Laplace; use pld (or rdp) with incontext.mechanism=laplace")
    splits: Splits = prepare(cfg.data)
    dataset = dataset_block(splits)
    ensure_ray(cfg.scaling.address)
    ledger = LedgerClient(cfg.privacy.ledger)  # the central accountant, as for training and the search
    delta = resolve_delta(cfg.privacy, dataset, ledger.budget(dataset.fingerprint))
    releases = plan_releases(cfg, delta, acc, samples=False)  # its token count is incontext.max_new_tokens
    prior: tuple[Event, ...] = releases.events
    nm = ic.noise_multiplier or calibrate_noise(ic, cfg.privacy.epsilon, delta, acc, ic.num_examples, prior)
    plan = Plan(tuple(plan_events(ic, nm, ic.num_examples, list(prior))), acc, delta)
    if plan.epsilon > cfg.privacy.epsilon * (1 + 1e-9):
        raise UserError(f"incontext.noise_multiplier: {nm} spends eps={plan.epsilon:.3f} over {ic.num_examples} x "
                        f"{ic.max_new_tokens} tokens, above privacy.epsilon={cfg.privacy.epsilon}")
    storage = job_storage(cfg, run_dir, f"{run_dir.name}-incontext")
    run = PrivateRun.open(ledger, dataset=dataset, plan=plan, total_epsilon=cfg.privacy.dataset_epsilon or cfg.privacy.epsilon,
                          kind=f"{run_dir.name}-incontext", config_hash=incontext_hash(cfg), storage=storage)
    storage.delete(STOP)
    log.info("in-context DP generation: %s, noise multiplier %.4g (scale %.4g), %d groups x %d examples per label, "
             "plan eps=%.3f (%s, delta=%.3g)", ic.mechanism, nm, noise_scale(ic.mechanism, nm), ic.groups,
             ic.examples_per_group, plan.epsilon, acc, delta)

    charge = example_charger(run)

    voter = None
    with graceful_stop() as stop_signal:
        try:
            job = cfg
            cfg, label_dist, lengths = release(job, releases, run, splits, load_tokenizer(cfg.model), storage,
                                              model_context(cfg.model))
            t_engine = time.monotonic()
            voter, base = make_voter(cfg, splits)  # before any charge: an engine that fails to start costs nothing
            engine_start = time.monotonic() - t_engine
            if label_dist is not None:
                props = label_dist
            else:
                props = resolve_proportions(run_dir, splits.labels, cfg.sampling.label_proportions)
            counts = label_counts(splits.labels, props, ic.num_examples)
            groups = assign_groups(splits.train, splits.labels, ic.groups, ic.examples_per_group, ic.seed)
            sizes = {lab: sum(len(g) for g in gs) for lab, gs in groups.items()}
            saved = storage.read_text(ROWS_STATE)
            t0 = time.monotonic()
            state, finished = generate_rows(voter, groups, counts, ic, nm, charge, generator or _fresh_generator(),
                                            state=json.loads(saved) if saved else None,
                                            stop=lambda: stop_signal() is not None,
                                            save=lambda st: storage.write_text(ROWS_STATE, json.dumps(st)),
                                            show_progress=show_progress)
            wall = time.monotonic() - t0
            if not finished:
                raise Interrupted(stop_signal(), f"stopped after {state['jobs_done']} of {ic.num_examples} examples; "
                                                 f"ledger run {run.run_id} stays open with its charges (run the same "
                                                 f"command to resume it, or `dpsynth abandon {run.run_id}`)")
            rows, stats = state["rows"], state["stats"]
            charged = run.charged()
            certificate = run.certify(
                mechanism=InContextBlock(
                    mechanism=ic.mechanism, noise_multiplier=nm, noise_scale=noise_scale(ic.mechanism, nm),
                    sensitivity={"l1": SENSITIVITY_L1, "l2": SENSITIVITY_L2, "adjacency": f"add/remove one {dataset.unit}"},
                    token_steps=stats["token_steps_charged"], examples_charged=stats["examples_charged"],
                    planned_epsilon=plan.epsilon,
                    pure_dp_epsilon=pure_epsilon(charged) if ic.mechanism == "laplace" and not prior else None,
                    settings=ic.model_dump(mode="json"), examples_in_groups=sizes),
                base_model=base, config_hash=incontext_hash(job), label_histogram=releases.labels,
                length_histogram=releases.lengths, lengths={"max_length": cfg.model.max_length})
        finally:
            if voter is not None:
                voter.close()  # vLLM's engine process and KV cache, now rather than at exit
    if isinstance(voter, VLLMVoter):
        stats.update(prompt_tokens=voter.prompt_tokens, prefix_cache_hit_tokens=voter.cached_tokens)
    metrics = {**stats, "lengths": lengths.to_json(), "engine": voter.engine, "engine_start_s": round(engine_start, 3), "wall_s": round(wall, 3),
               "tokens_per_s": stats["tokens_released"] / wall if wall else None,
               "token_steps_per_s": stats["token_steps_computed"] / wall if wall else None, "label_counts": counts,
               "examples": len(rows)}
    body = serialize(rows, "jsonl")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    atomic_write_json(run_dir / "labels.json", list(splits.labels))
    if label_dist is not None:
        atomic_write_json(run_dir / "label_distribution.json", label_dist)
    atomic_write_json(run_dir / "metrics.json", {"incontext": metrics})
    atomic_write_text(run_dir / "synthetic.jsonl", body)
    write_certificate(run_dir / "synthetic.jsonl.certificate.json", certificate.with_corpus(CorpusBlock(
        file="synthetic.jsonl", sha256=hashlib.sha256(body.encode()).hexdigest(), examples=len(rows), label_counts=counts,
        engine=voter.engine, created=now())))
    write_certificate(run_dir / "certificate.json", certificate)  # last: its presence marks a complete run
    remove_job_storage(storage)
    return run_dir
