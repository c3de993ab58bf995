"""The one private-job skeleton: every job that spends privacy (DP-LoRA training, the private search, in-context
generation) is this function with a `PrivateJob` plugged in. The skeleton, not the job, does everything the
guarantee rests on:

  reuse a certified release of the same job, or
  splits  = prepare(data, owner's secret)       # units and splits that move by one unit only
  plan    = job.plan(...)                       # the events to admit, and the DP histograms
  run     = PrivateRun.open(ledger, plan)       # admitted, or refused before anything runs
  with graceful_stop():                         # Ctrl-C / SIGTERM: stop at a step, stay open, resume
      histograms released through the run       # charged before they exist
      result = job.execute(ctx)                 # charges each event before its output exists
      cert   = job.certify(ctx, result)         # epsilon of what was charged
      release = Release(run_dir, cert)          # the shareable part: every file names its provenance
      job.write(release, ctx, result)           # owner-only files through release.owner_*
      release.commit()                          # MANIFEST.json, then the certificate last

A job never opens files in the run directory itself: what it releases goes through `Release`, which refuses a file
whose provenance the certificate does not back; the skeleton releases the label set, the DP histograms and the
config without local paths, and keeps the full config, the log and the metrics with the owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dpsynth.config import JobConfig
from dpsynth.data import Splits, dataset_block, prepare
from dpsynth.errors import UserError
from dpsynth.interrupt import graceful_stop
from dpsynth.privacy.certificate import Certificate, read_certificate
from dpsynth.privacy.run import Plan, PrivateRun, resolve_delta
from dpsynth.storage import Storage

log = logging.getLogger(__name__)

STOP = "STOP"
"""Written into the job's storage by a driver asked to stop (SIGINT/SIGTERM): workers and trials watch it."""


@dataclass(frozen=True)
class JobPlan:
    """What a job asks the ledger to admit: its events (histograms included), the histograms' noise, and the
    job's own resume state (kept in private storage, e.g. a search's secret K; never a noise or batch seed)."""

    plan: Plan
    releases: Any
    """dpsynth.data_releases.DataReleases: the DP label mix and length histogram this run releases."""
    state: dict = field(default_factory=dict)


@dataclass
class JobContext:
    """What `execute`, `certify` and `write` see. `cfg` has `auto` lengths resolved from the DP length histogram;
    `job_cfg` is the config as given (its hash names the job)."""

    cfg: JobConfig
    job_cfg: JobConfig
    splits: Splits
    dataset: Any
    run: PrivateRun
    storage: Storage
    run_dir: Path
    delta: float
    plan: JobPlan
    tokenizer: Any
    base: dict
    label_distribution: dict | None
    length_distribution: dict | None
    lengths: Any
    stop_signal: Callable[[], int | None]
    show_progress: bool
    config_hash: str
    """The job's config hash, keyed: what its certificate records and a second run of the same job matches."""
    secret: bytes
    """The owner's key (dpsynth.privacy.secret): for keyed-hash subsets; stays in the driver's memory."""
    resources: ExitStack
    """Closed after the release is committed (e.g. a downloaded checkpoint the release copies from)."""


class PrivateJob(Protocol):
    kind: str
    """`train`, `search`, `incontext`: names the ledger run and the job's private storage."""

    def config_hash(self, cfg: JobConfig) -> str: ...

    def check(self, cfg: JobConfig, splits: Splits, tokenizer) -> None:
        """Refuse, with a one-line UserError, what the job cannot run or account, before anything starts."""

    def plan(self, cfg: JobConfig, splits: Splits, delta: float) -> JobPlan: ...

    def extend(self, ctx: JobContext) -> tuple:
        """Optional: events to admit once the histograms are released (nothing for a job planned in full up front).
        May update ctx.cfg with what it decided."""

    def execute(self, ctx: JobContext) -> Any:
        """Run the mechanism, charging through ctx.run before each output exists; raise Interrupted on a stop."""

    def certify(self, ctx: JobContext, result: Any) -> Certificate: ...

    def released_config(self, ctx: JobContext, result: Any) -> JobConfig:
        """The config the release describes (the search's selected C and lr; else ctx.cfg)."""

    def write(self, release, ctx: JobContext, result: Any) -> dict:
        """Release the job's own artefacts; return its owner-only metrics (metrics.json)."""


def reuse_existing(run_dir: Path, config_hash: str) -> bool:
    """True when run_dir already holds the certified release of this very job (a second `make demo` spends nothing);
    a certified run of another config there is refused."""
    path = run_dir / "certificate.json"
    if not path.exists():
        return False
    cert = read_certificate(path)
    if cert.config_hash != config_hash:
        raise UserError(f"output_dir: {run_dir} already holds a certified run with a different config; choose another "
                        "output_dir")
    log.info("%s already holds the certified result of this job (eps=%.3f); reusing it", run_dir, cert.epsilon)
    return True


def run_private_job(cfg: JobConfig, job: PrivateJob, *, show_progress: bool = True) -> Path:
    """Run `job` on cfg's data under the ledger's accounting; return the run directory (see the module docstring)."""
    from dpsynth.data_releases import release as release_histograms
    from dpsynth.models import base_info, load_tokenizer, model_context
    from dpsynth.privacy.secret import ledger_secret
    from dpsynth.privacy.service import LedgerClient
    from dpsynth.release import Release, mechanism, public, shareable_config
    from dpsynth.runtime import ensure_ray, job_storage, remove_job_storage

    from dpsynth.privacy.secret import keyed_hash

    run_dir = Path(cfg.output_dir).expanduser().resolve()
    secret = ledger_secret(cfg.privacy.ledger)
    # Keyed: the config names local paths (the data file); a plain hash would let a guessed path be confirmed.
    config_hash = keyed_hash(secret, "config", job.config_hash(cfg)).hex()[:16]
    if reuse_existing(run_dir, config_hash):
        return run_dir
    splits = prepare(cfg.data, secret)
    dataset = dataset_block(splits)
    from dpsynth.records import RecordSchema

    schema = RecordSchema.of(cfg.data)
    undeclared = [c for c in schema.attribute_columns if c not in (cfg.data.attribute_values or {})]
    if schema.shorthand and not cfg.data.labels:
        log.warning("data.labels is not set: the %d labels found in the data are released as the public label set "
                    "(set data.labels to declare it yourself)", len(splits.labels))
    elif not schema.shorthand and undeclared:
        log.warning("data.attribute_values does not declare %s: the values found in the data are released as public "
                    "(labels.json; set it to declare them yourself)", ", ".join(undeclared))
    base = base_info(cfg.model)
    tokenizer = load_tokenizer(cfg.model)  # a bad model fails here, in one line, before any worker starts
    job.check(cfg, splits, tokenizer)
    ensure_ray(cfg.scaling.address)
    ledger = LedgerClient(cfg.privacy.ledger)
    if splits.legacy_fingerprint != splits.fingerprint:  # a ledger from before keyed fingerprints keeps its spend
        try:
            ledger.rename_dataset(splits.legacy_fingerprint, splits.fingerprint)
        except ValueError as e:
            raise UserError(f"privacy.ledger: {e}") from None
    delta = resolve_delta(cfg.privacy, dataset, ledger.budget(dataset.fingerprint))
    jp = job.plan(cfg, splits, delta)
    name = f"{run_dir.name}-{job.kind}"
    storage = job_storage(cfg, run_dir, name)
    run = PrivateRun.open(ledger, dataset=dataset, plan=jp.plan,
                          total_epsilon=cfg.privacy.dataset_epsilon or cfg.privacy.epsilon, kind=name,
                          config_hash=config_hash, storage=storage, state=jp.state)
    storage.delete(STOP)  # a resumed run: the stop request that ended its last attempt is served
    with graceful_stop(lambda signum: storage.write_text(STOP, str(signum))) as stop_signal, ExitStack() as resources:
        resolved, label_dist, length_dist, lengths = release_histograms(cfg, jp.releases, run, splits, tokenizer,
                                                                        storage, model_context(cfg.model))
        ctx = JobContext(cfg=resolved, job_cfg=cfg, splits=splits, dataset=dataset, run=run, storage=storage,
                         run_dir=run_dir, delta=delta, plan=jp, tokenizer=tokenizer, base=base,
                         label_distribution=label_dist, length_distribution=length_dist, lengths=lengths,
                         stop_signal=stop_signal, show_progress=show_progress, secret=secret, config_hash=config_hash,
                         resources=resources)
        extension = job.extend(ctx) if hasattr(job, "extend") else ()
        if extension:  # events sized by what the histograms released (e.g. steps from the DP lengths)
            run.extend(extension)
        result = job.execute(ctx)
        cert = job.certify(ctx, result)
        rel = Release(run_dir, cert)
        rel.share_json("labels.json", list(splits.labels), public())
        if label_dist is not None:
            rel.share_json("label_distribution.json", label_dist, mechanism("label_histogram"))
        if length_dist is not None:
            rel.share_json("length_distribution.json", length_dist, mechanism("length_histogram"))
        released = job.released_config(ctx, result)
        rel.share_text("config.yaml", shareable_config(released), public())
        rel.owner_text("config.yaml", released.to_yaml())
        metrics = job.write(rel, ctx, result)
        rel.owner_json("metrics.json", {**metrics, "lengths": lengths.to_json()})
        rel.commit()
    remove_job_storage(storage)
    return run_dir
