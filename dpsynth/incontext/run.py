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
from dpsynth.data import Splits
from dpsynth.data_releases import label_histogram_block, plan_releases
from dpsynth.errors import UserError
from dpsynth.interrupt import Interrupted
from dpsynth.privacy import Event
from dpsynth.privacy.certificate import CorpusBlock, InContextBlock, now
from dpsynth.privacy.run import Plan, PrivateRun
from dpsynth.records import RecordSchema
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


class InContextJob:
    """Training-free DP generation, plugged into the private-job skeleton (dpsynth.private_job)."""

    kind = "incontext"

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def config_hash(self, cfg: JobConfig) -> str:
        return incontext_hash(cfg)

    def check(self, cfg: JobConfig, splits: Splits, tokenizer) -> None:
        if len(RecordSchema.of(cfg.data).text_columns) > 1:
            raise UserError("data.text_columns: the training-free generator writes one text per example, token by "
                            "token under DP, and cannot write several fields; use `dpsynth train` (or one text column)")
        if cfg.incontext.mechanism == "laplace" and cfg.privacy.accountant == "prv":
            raise UserError("privacy.accountant: 'prv' cannot account Laplace; use pld (or rdp) with "
                            "incontext.mechanism=laplace")

    def plan(self, cfg: JobConfig, splits: Splits, delta: float):
        from dpsynth.private_job import JobPlan

        ic, acc = cfg.incontext, cfg.privacy.accountant
        releases = plan_releases(cfg, delta, acc, samples=False)  # its token count is incontext.max_new_tokens
        prior: tuple[Event, ...] = releases.events
        self.nm = ic.noise_multiplier or calibrate_noise(ic, cfg.privacy.epsilon, delta, acc, ic.num_examples, prior)
        plan = Plan(tuple(plan_events(ic, self.nm, ic.num_examples, list(prior))), acc, delta)
        if plan.epsilon > cfg.privacy.epsilon * (1 + 1e-9):
            raise UserError(f"incontext.noise_multiplier: {self.nm} spends eps={plan.epsilon:.3f} over {ic.num_examples} "
                            f"x {ic.max_new_tokens} tokens, above privacy.epsilon={cfg.privacy.epsilon}")
        self.prior = prior
        log.info("in-context DP generation: %s, noise multiplier %.4g (scale %.4g), %d groups x %d examples per label, "
                 "plan eps=%.3f (%s, delta=%.3g)", ic.mechanism, self.nm, noise_scale(ic.mechanism, self.nm), ic.groups,
                 ic.examples_per_group, plan.epsilon, acc, delta)
        return JobPlan(plan, releases)

    def execute(self, ctx) -> dict:
        from .voters import VLLMVoter, make_voter

        cfg, ic, run, storage = ctx.cfg, ctx.cfg.incontext, ctx.run, ctx.storage
        voter = None
        try:
            t_engine = time.monotonic()
            voter, self.base = make_voter(cfg, ctx.splits)  # before any charge: an engine that fails to start costs nothing
            engine_start = time.monotonic() - t_engine
            props = ctx.label_distribution if ctx.label_distribution is not None else \
                resolve_proportions(ctx.run_dir, ctx.splits.labels, cfg.sampling.label_proportions)
            counts = label_counts(ctx.splits.labels, props, ic.num_examples)
            groups = assign_groups(ctx.splits.train, ctx.splits.labels, ic.groups, ic.examples_per_group, ic.seed)
            sizes = {lab: sum(len(g) for g in gs) for lab, gs in groups.items()}
            saved = storage.read_text(ROWS_STATE)
            t0 = time.monotonic()
            state, finished = generate_rows(voter, groups, counts, ic, self.nm, example_charger(run),
                                            self.generator or _fresh_generator(),
                                            state=json.loads(saved) if saved else None,
                                            stop=lambda: ctx.stop_signal() is not None,
                                            save=lambda st: storage.write_text(ROWS_STATE, json.dumps(st)),
                                            show_progress=ctx.show_progress)
            wall = time.monotonic() - t0
            if not finished:
                raise Interrupted(ctx.stop_signal(), f"stopped after {state['jobs_done']} of {ic.num_examples} examples; "
                                                     f"ledger run {run.run_id} stays open with its charges (run the "
                                                     f"same command to resume it, or `dpsynth abandon {run.run_id}`)")
        finally:
            if voter is not None:
                voter.close()  # vLLM's engine process and KV cache, now rather than at exit
        stats = dict(state["stats"])
        if isinstance(voter, VLLMVoter):
            stats.update(prompt_tokens=voter.prompt_tokens, prefix_cache_hit_tokens=voter.cached_tokens)
        metrics = {**stats, "engine": voter.engine, "engine_start_s": round(engine_start, 3), "wall_s": round(wall, 3),
                   "tokens_per_s": stats["tokens_released"] / wall if wall else None,
                   "token_steps_per_s": stats["token_steps_computed"] / wall if wall else None, "label_counts": counts,
                   "examples": len(state["rows"]), "examples_in_groups": sizes}  # exact counts: owner-only
        return {"rows": state["rows"], "stats": state["stats"], "counts": counts, "engine": voter.engine,
                "metrics": metrics}

    def certify(self, ctx, result: dict):
        ic, stats = ctx.cfg.incontext, result["stats"]
        charged = ctx.run.charged()
        return ctx.run.certify(
            mechanism=InContextBlock(
                mechanism=ic.mechanism, noise_multiplier=self.nm, noise_scale=noise_scale(ic.mechanism, self.nm),
                sensitivity={"l1": SENSITIVITY_L1, "l2": SENSITIVITY_L2, "adjacency": f"add/remove one {ctx.dataset.unit}"},
                token_steps=stats["token_steps_charged"], examples_charged=stats["examples_charged"],
                planned_epsilon=ctx.plan.plan.epsilon,
                pure_dp_epsilon=pure_epsilon(charged) if ic.mechanism == "laplace" and not self.prior else None,
                settings=ic.model_dump(mode="json")),
            base_model=self.base, config_hash=ctx.config_hash, label_histogram=label_histogram_block(ctx),
            length_histogram=ctx.plan.releases.lengths, lengths={"max_length": ctx.cfg.model.max_length})

    def released_config(self, ctx, result: dict) -> JobConfig:
        return ctx.cfg

    def write(self, release, ctx, result: dict) -> dict:
        from dpsynth.release import mechanism

        body = serialize(result["rows"], "jsonl", RecordSchema.of(ctx.cfg.data))
        release.share_text("synthetic.jsonl", body, mechanism("in_context"))
        release.share_certificate("synthetic.jsonl.certificate.json", release.cert.with_corpus(CorpusBlock(
            file="synthetic.jsonl", sha256=hashlib.sha256(body.encode()).hexdigest(), examples=len(result["rows"]),
            label_counts=result["counts"], engine=result["engine"], created=now())))
        return {"incontext": result["metrics"]}


def generate(cfg: JobConfig, *, show_progress: bool = True, generator: torch.Generator | None = None) -> Path:
    """Training-free DP corpus into cfg.output_dir: synthetic.jsonl + certificates (see dpsynth.incontext)."""
    from dpsynth.private_job import run_private_job

    return run_private_job(cfg, InContextJob(generator), show_progress=show_progress)
