"""One DP-LoRA training run through the private-run path: plan, admit, fit on Ray Train, certify.

Order matters for privacy: the plan is admitted by the ledger before any private data is touched, each step is
charged (by rank 0, the step's own event) before its noisy update exists, and the certificate is issued from the
charged events. SIGINT/SIGTERM stop the run at a step boundary with a checkpoint and leave it open; the same
command resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from dpsynth.config import JobConfig
from dpsynth.data import Splits
from dpsynth.data_releases import label_histogram_block
from dpsynth.errors import UserError
from dpsynth.interrupt import Interrupted
from dpsynth.models import adapter_digest
from dpsynth.privacy import SampledGaussian
from dpsynth.privacy.certificate import Certificate, DpSgdBlock
from dpsynth.lengths import Lengths
from dpsynth.privacy.run import Plan, PrivateRun
from dpsynth.privacy.sampling import Schedule
from dpsynth.progress import progress_bar
from dpsynth.storage import Storage
from dpsynth.train.plan import TrainingPlan, plan_training  # noqa: F401 (TrainingPlan: part of this module's API)
from dpsynth.train.worker import ESTIMATE, STATE, WorkerPlan, latest_checkpoint, local_checkpoint

log = logging.getLogger(__name__)


def check_labels(splits: Splits, batch_size: int) -> None:
    """Warn the owner (their log only) about a label with few training examples. Never a refusal: Poisson batches
    need no per-label count, and a run refused by a private count would tell that count to whoever sees it fail."""
    counts = Counter(ex.label for ex in splits.train)
    for label in splits.labels:
        if counts[label] < batch_size:
            log.warning("data: label '%s' has fewer training examples than training.batch_size %d; its texts will be "
                        "rare in the batches (and in what the adapter learns)", label, batch_size)


def check_gpus(cfg: JobConfig) -> None:
    """`scaling.use_gpu` on a Ray without GPUs would wait forever for them: refuse on a local Ray, warn on a cluster
    (an autoscaler may still add GPU nodes)."""
    import ray

    if not cfg.scaling.use_gpu or ray.cluster_resources().get("GPU", 0) >= 1:
        return
    if (cfg.scaling.address or os.environ.get("RAY_ADDRESS")) is None:
        raise UserError("scaling.use_gpu: true, but this machine has no GPU Ray can use (the gpu preset needs one); "
                        "set scaling.use_gpu=false or use --preset cpu-demo")
    log.warning("scaling.use_gpu: the Ray cluster has no GPU yet; waiting for the autoscaler to add one")


def _scaling(cfg: JobConfig):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    s = cfg.scaling
    if s.deepspeed_stage == 3:
        # ZeRO-3 partitions the LoRA weights themselves; Opacus's per-example hooks and our surrogate
        # gradient would then see empty shards, so the clipping bound could not be enforced.
        raise UserError("scaling.deepspeed_stage: ZeRO stage 3 cannot keep the per-example clipping guarantee "
                        "for partitioned LoRA weights; use stage 0, 1 or 2 (the frozen base is not trained anyway)")
    if s.bf16 and s.deepspeed_stage is None:
        raise UserError("scaling.bf16: bf16 training runs under DeepSpeed; set scaling.deepspeed_stage too")
    backend = s.backend if s.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    resources = dict(s.resources_per_worker) if s.resources_per_worker else None
    return (ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
            TorchConfig(backend=backend))


def worker_plan(cfg: JobConfig, splits: Splits, run: PrivateRun | None, *, sigma: float, sched: Schedule,
                scratch: Storage, stop: Storage, **extra) -> WorkerPlan:
    """No seeds: the worker draws batches and noise from OS entropy and stores neither (a resume draws afresh)."""
    return WorkerPlan(cfg=cfg.model_dump(mode="json"),
                      units=tuple(tuple((ex.text, ex.label) for ex in unit) for unit in splits.train_units()),
                      dataset_name=splits.name, run=run, sigma=sigma, q=sched.q, steps=sched.steps,
                      scratch=str(scratch), stop=str(stop), **extra)


def fit(cfg: JobConfig, plan: WorkerPlan) -> Storage | None:
    """Run the worker loop as a Ray Train TorchTrainer; return where its final checkpoint is stored (None when it
    was stopped before its first checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from dpsynth.train.worker import train_loop

    scaling, torch_config = _scaling(cfg)
    fs, ray_path = Storage(plan.scratch).child("ray").filesystem()
    name = plan.run.run_id if plan.run is not None else "reference"
    trainer = TorchTrainer(
        train_loop, train_loop_config={"plan": plan}, scaling_config=scaling, torch_config=torch_config,
        run_config=RunConfig(name=name, storage_path=ray_path, storage_filesystem=fs,
                             # A search trial's steps are not charged one by one: a restarted trial would redo
                             # lost steps with fresh noise outside the accounting, so it fails (worst score) instead.
                             failure_config=FailureConfig(max_failures=0 if plan.covered_by_search
                                                          else cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    _fit_off_the_main_thread(trainer)
    return latest_checkpoint(plan.scratch)


def _fit_off_the_main_thread(trainer) -> None:
    """trainer.fit() in a helper thread. On the main thread Ray Train replaces the SIGINT handler with one that aborts
    the run at once (workers killed mid-step); off it, dpsynth's own handler stays and Ctrl-C stops at a step
    boundary like SIGTERM. Errors are re-raised here."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short joins: the main thread keeps running signal handlers
    if errors:
        raise errors[0]


def mean_tokens(splits: Splits, tok, cfg: JobConfig, lengths: Lengths) -> float:
    """Mean tokens per training example after the cut (the planned cost; for the owner's log)."""
    from dpsynth.lengths import text_lengths

    text = text_lengths(tok, [ex.text for ex in splits.train[:2000]])
    prefix = cfg.model.max_length - lengths.text_tokens
    return prefix + sum(min(n, lengths.text_tokens) for n in text) / max(1, len(text))


def interrupted(signum: int, run: PrivateRun, done: int, total: int) -> Interrupted:
    import signal

    return Interrupted(signum, f"{signal.Signals(signum).name}: stopped at step {done} of {total}; ledger run "
                               f"{run.run_id} stays open with its charges (run the same command to resume it, or "
                               f"`dpsynth abandon {run.run_id}` to close it; its spend stays spent)")


def release_adapter(release, ckpt: Path, mechanism_name: str) -> None:
    """The trained adapter (LoRA weights: the DP mechanism's output; its tokenizer files: the public base's), with
    the base model named as the certificate names it rather than by its local path on the owner's machine."""
    import shutil
    import tempfile

    from dpsynth.release import mechanism

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "adapter"
        shutil.copytree(ckpt / "adapter", src)
        (src / "README.md").unlink(missing_ok=True)  # peft's model card names the local base path
        conf = src / "adapter_config.json"
        doc = json.loads(conf.read_text())
        doc["base_model_name_or_path"] = release.cert.base_model.name
        conf.write_text(json.dumps(doc, indent=2))
        release.share_dir("adapter", src, mechanism(mechanism_name))


def adapter_certificate(ctx, ckpt: Path) -> dict:
    """What the certificate of a trained adapter states besides its mechanism (training and the search alike)."""
    return dict(base_model=ctx.base, config_hash=ctx.config_hash, label_histogram=label_histogram_block(ctx),
                length_histogram=ctx.plan.releases.lengths,
                lengths={"max_length": ctx.cfg.model.max_length, "max_new_tokens": ctx.cfg.sampling.max_new_tokens},
                artefacts={"adapter": adapter_digest(ckpt / "adapter")})


def training_metrics(ckpt: Path) -> dict:
    """The owner's record of a fit: per-step true batch sizes and losses, restarts, nodes. Never released."""
    final = json.loads((ckpt / STATE).read_text())
    return {"train": final["history"], "restarts": final["restarts"], "worker_nodes": final["worker_nodes"]}


class TrainJob:
    """DP-LoRA fine-tuning on Ray Train, plugged into the private-job skeleton (dpsynth.private_job)."""

    kind = "train"

    def config_hash(self, cfg: JobConfig) -> str:
        return cfg.training_hash()

    def check(self, cfg: JobConfig, splits: Splits, tokenizer) -> None:
        from dpsynth.prompts import check_prompts_fit

        check_prompts_fit(cfg, tokenizer, splits.name, splits.labels)
        check_labels(splits, cfg.training.batch_size)
        _scaling(cfg)  # refuse a configuration that cannot keep the guarantee before anything starts

    def plan(self, cfg: JobConfig, splits: Splits, delta: float):
        from dpsynth.private_job import JobPlan

        check_gpus(cfg)
        n = len(splits.train_units())
        if cfg.training.steps != "auto":
            self.tp = plan_training(cfg, n, delta)
            return JobPlan(self.tp.plan, self.tp.releases)
        # steps: auto. The steps come from the time budget once the DP length histogram says how long the texts
        # are (extend); only the histograms are admitted now. Refuse now what could not run even at the floor.
        floor = plan_training(cfg, n, delta, steps=cfg.training.min_steps)
        self.tp = None
        return JobPlan(Plan(floor.releases.events, cfg.privacy.accountant, delta), floor.releases)

    def extend(self, ctx) -> tuple:
        """steps: auto: probe (public dummy tokens), plan the run to training.time_budget, calibrate sigma to it."""
        from dpsynth.prompts import label_prompts
        from dpsynth.train.budget import (PROBE_BATCH, RUN_PLAN, STEP_OVERHEAD, RunPlan, coarse, mean_text_tokens, plan_run,
                                          probe_on_ray)

        if self.tp is not None:
            return ()
        cfg, n = ctx.cfg, len(ctx.splits.train_units())
        charged_plan = [e for e in ctx.run.planned() if isinstance(e, SampledGaussian)]
        saved = ctx.storage.read_text(RUN_PLAN)
        try:
            saved = RunPlan.from_json(json.loads(saved)) if saved is not None else None
        except ValueError:  # cut short by a kill mid-write: as if none was kept
            saved = None
        if charged_plan and saved is not None and saved.steps == charged_plan[0].count:  # a resumed run: the plan its first attempt made (and was admitted for)
            run_plan = saved
            log.info("resuming with the plan of the first attempt: %d steps, %d texts", run_plan.steps,
                     run_plan.num_examples)
        elif charged_plan:  # admitted by a version that kept no plan: its steps, the configured sizes
            run_plan = RunPlan(charged_plan[0].count, cfg.sampling.num_examples, {})
            log.info("resuming with the %d steps planned by the first attempt", run_plan.steps)
        else:
            prompts = label_prompts(cfg, ctx.tokenizer, ctx.splits.name, ctx.splits.labels)
            prompt = max(prompts.values(), key=len)
            prompt_tokens = len(ctx.tokenizer(prompt, add_special_tokens=False).input_ids)
            text = mean_text_tokens(ctx.length_distribution, ctx.lengths.text_tokens)
            # a batch is padded to its longest example, which in a batch of dozens is about max_length
            probe_batch = min(cfg.training.batch_size, PROBE_BATCH)
            speeds = probe_on_ray(cfg, prompt, int(cfg.model.max_length), probe_batch)
            scale = cfg.training.batch_size / probe_batch / cfg.scaling.num_workers
            speeds = coarse(dataclasses.replace(speeds, step_s=speeds.step_s * max(1.0, scale) * STEP_OVERHEAD))
            new_tokens = cfg.sampling.max_new_tokens if isinstance(cfg.sampling.max_new_tokens, int) else ctx.lengths.text_tokens
            spec = cfg.sampling.label_proportions  # the corpus's label mix: public (the DP histogram, or declared)
            mix = (ctx.label_distribution if spec == "dp" else None if spec == "uniform" else dict(spec)) or {}
            shares = [float(mix.get(label, 0.0)) for label in ctx.splits.labels] if mix else None
            try:
                run_plan = plan_run(cfg, speeds, prompt_tokens=prompt_tokens, text_tokens=text,
                                    labels=len(ctx.splits.labels), new_tokens=new_tokens, label_shares=shares,
                                    real_tokens=n * (mean_text_tokens(ctx.length_distribution, 1 << 30)
                                                     if ctx.length_distribution else text))
            except UserError as e:  # nothing trained: close the run (the histograms it released stay spent)
                ctx.run.abandon()
                raise UserError(f"{e}; the DP length histogram that measured this stays charged "
                                f"(ledger run {ctx.run.run_id}, closed)") from None
            log.info("%s (probe: a DP step %.1f s, generation %.0f tokens/s at %d rows a batch, scoring %.0f tokens/s)",
                     run_plan.summary(cfg.training.time_budget), speeds.step_s,
                     cfg.sampling.batch_size / speeds.decode_step_s(cfg.sampling.batch_size), cfg.sampling.batch_size,
                     speeds.score_tokens_per_s)
            if run_plan.cut:
                log.warning(run_plan.cut)
            # kept before the DP-SGD plan is admitted, so that a resume runs exactly this plan (public: it is made
            # from the DP length histogram and a probe of dummy tokens)
            ctx.storage.write_text(RUN_PLAN, json.dumps(run_plan.to_json()))
        steps = run_plan.steps
        ctx.cfg = run_plan.applied_to(cfg)
        self.tp = plan_training(ctx.cfg, n, ctx.delta, steps=steps, releases=ctx.plan.releases)
        if charged_plan and self.tp.plan.events[-1] != charged_plan[0]:
            raise RuntimeError(f"run {ctx.run.run_id}: its admitted DP-SGD plan {charged_plan[0]} is not what this "
                               f"config calibrates to ({self.tp.plan.events[-1]}); abandon it and start again")
        return () if charged_plan else (self.tp.plan.events[-1],)

    def execute(self, ctx) -> Path:
        cfg, tp, run, storage = ctx.cfg, self.tp, ctx.run, ctx.storage
        storage.delete(ESTIMATE)
        steps = tp.schedule.steps
        per_example = mean_tokens(ctx.splits, ctx.tokenizer, cfg, ctx.lengths)
        log.info("training %d steps on %d worker(s): q=%.5f sigma=%.4f C=%g delta=%.3g (N=%d); planned about %.0f tokens "
                 "per step (%d examples x %.0f tokens); %s", steps, cfg.scaling.num_workers, tp.schedule.q, tp.sigma,
                 cfg.training.max_grad_norm, ctx.delta, ctx.dataset.train_units, cfg.training.batch_size * per_example,
                 cfg.training.batch_size, per_example, ctx.lengths.summary())
        plan = worker_plan(cfg, ctx.splits, run, sigma=tp.sigma, sched=tp.schedule, scratch=storage, stop=storage)
        with _ledger_progress(run, steps, ctx.show_progress, storage):
            fit(cfg, plan)
        ckpt = ctx.resources.enter_context(local_checkpoint(storage))
        history = json.loads((ckpt / STATE).read_text())["history"] if ckpt is not None else []
        self.applied = history[-1]["step"] if history else 0
        if ctx.stop_signal() is not None and self.applied < steps:
            raise interrupted(ctx.stop_signal(), run, self.applied, steps)
        if ckpt is None:
            raise RuntimeError(f"training run {run.run_id} produced no checkpoint")
        return ckpt

    def certify(self, ctx, ckpt: Path) -> Certificate:
        cfg, tp = ctx.cfg, self.tp
        return ctx.run.certify(
            mechanism=DpSgdBlock(noise_multiplier=tp.sigma, sampling_rate=tp.schedule.q,
                                 steps=ctx.run.charged_count(SampledGaussian), steps_applied=self.applied,
                                 max_grad_norm=cfg.training.max_grad_norm, expected_batch_size=cfg.training.batch_size,
                                 workers=cfg.scaling.num_workers,
                                 max_records_per_unit=cfg.privacy.max_records_per_unit if ctx.dataset.unit != "record" else None,
                                 deepspeed_stage=cfg.scaling.deepspeed_stage, lora=cfg.lora.model_dump(mode="json")),
            **adapter_certificate(ctx, ckpt))

    def released_config(self, ctx, ckpt: Path) -> JobConfig:
        return ctx.cfg

    def write(self, release, ctx, ckpt: Path) -> dict:
        release_adapter(release, ckpt, "dp_sgd")
        return training_metrics(ckpt)


def train(cfg: JobConfig, *, show_progress: bool = True) -> Path:
    """DP-LoRA fine-tune on the train split with Ray Train; write adapter + certificate into cfg.output_dir."""
    from dpsynth.private_job import run_private_job

    return run_private_job(cfg, TrainJob(), show_progress=show_progress)


@contextmanager
def _ledger_progress(run: PrivateRun, steps: int, enabled: bool, storage: Storage):
    """Progress from the ledger itself: a step is counted the moment it is charged. The duration estimate (rank 0
    times one probe step before the first real one) is logged as soon as the worker has written it."""
    stop = threading.Event()

    def poll(advance):
        seen, estimated = 0, False
        while not stop.wait(1.0):
            if not estimated and (text := storage.read_text(ESTIMATE)) is not None:
                est = json.loads(text)
                log.info("estimated duration: about %.1f min for %d steps (one step of %d examples took %.1f s)",
                         est["eta_s"] / 60, est["steps_left"], est["examples"], est["probe_step_s"])
                estimated = True
            try:
                now_charged = run.charged_count(SampledGaussian)
            except Exception:  # the bar must never take training down
                continue
            if now_charged > seen:
                advance(f"step {now_charged}/{steps}", now_charged - seen)
                seen = now_charged

    with progress_bar("DP-LoRA training (Ray Train)", total=steps, enabled=enabled) as advance:
        t = threading.Thread(target=poll, args=(advance,), daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
