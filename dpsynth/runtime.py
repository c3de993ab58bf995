"""Where jobs run: Ray (joined or started in-process), and each job's private scratch on the run storage."""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from pathlib import Path

from dpsynth.config import JobConfig
from dpsynth.storage import Storage


def ensure_ray(address: str | None) -> None:
    """Join the configured cluster (or RAY_ADDRESS), else start Ray in-process: one code path everywhere."""
    import ray

    if ray.is_initialized():
        return
    # "local": a fresh in-process Ray; a bare ray.init() would silently join any `ray start` cluster on this host.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)


def job_storage(cfg: JobConfig, run_dir: Path, name: str) -> Storage:
    """A job's private scratch (checkpoints, seeds, resume state) on the run storage: never part of what is released."""
    return Storage(cfg.scaling.storage_path or run_dir / ".checkpoints").child(name)


def remove_job_storage(storage: Storage) -> None:
    storage.delete()
    if storage.is_local:
        with suppress(OSError):
            storage.local_path.parent.rmdir()  # the default root inside the run dir, if nothing else lives there
