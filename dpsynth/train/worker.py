"""The Ray Train worker loop: every worker runs this, rank 0 talks to the ledger.

One step, on every worker:
  1. rank 0 checks for a stop request (SIGINT/SIGTERM to the driver) and charges the step's event, the one
     the DP step is about to release, to the ledger actor; the answers are broadcast, so all workers stop
     together: at a stop request (after a checkpoint), or once the admitted plan is used up (steps charged
     before a failure and lost count too);
  2. rank 0 draws the step's global Poisson batch (fresh OS entropy, see sampling.secure_generator) and broadcasts
     it; every worker takes its shard of that same batch;
  3. DPLoRAStep: per-example clipping, one noise draw (rank 0, from OS entropy), all-reduce, optimizer step.
No seed and no generator state of the mechanism is ever stored: a resumed run draws fresh batches for the steps it
still has to run, and fresh noise (the steps lost in between were never released and stay charged).
A checkpoint (adapter, optimizer, step, per-step history, ledger run id) goes to the run storage every
`scaling.checkpoint_every` steps; a restarted worker group (Ray Train FailureConfig), or a re-run
of the same job after the driver itself stopped or died, resumes from the latest one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dpsynth.config import JobConfig
from dpsynth.prompts import label_prompts
from dpsynth.models import load_base, wrap_lora
from dpsynth.prefixlm import collate, encode
from dpsynth.privacy import RepeatAndSelect
from dpsynth.privacy.run import PrivateRun
from dpsynth.privacy.sampling import poisson_batches
from dpsynth.storage import Storage
from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, auto_micro_batch_size, trainable

log = logging.getLogger(__name__)

STATE = "state.json"
LATEST = "LATEST"
STOP = "STOP"
"""Written into the job's storage by a driver asked to stop (SIGINT/SIGTERM): workers checkpoint and return."""
BATCHES = "batches-rank{}.json"
"""In each checkpoint, one per rank: [step, size, sum of unit indices] of the global batch that rank trained on at
each step, the owner's evidence that every worker used rank 0's batch (private scratch, like all of a checkpoint)."""
ESTIMATE = "estimate.json"
"""Rank 0's timing of one probe step, written before the first real step: the driver logs the duration estimate."""


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a Ray Train worker needs. The train split travels with it; validation and test never do."""

    cfg: dict
    """The job config (JSON form)."""
    units: tuple[tuple[tuple[str, str], ...], ...]
    """The train split by privacy unit: each unit's (text, label) records."""
    dataset_name: str
    run: PrivateRun | None
    """The ledger run each step is charged to; None only for the non-private benchmark reference."""
    sigma: float
    q: float
    steps: int
    scratch: str
    """This fit's private storage: checkpoints (and its Ray Train state)."""
    stop: str
    """The storage holding the STOP request (the job's storage; a search trial watches its search's)."""
    covered_by_search: bool = False
    """A search trial: its steps are covered by the search's RepeatAndSelect charge, already on record."""
    optimizer: str = "adamw"

    @property
    def private(self) -> bool:
        return self.run is not None


def latest_checkpoint(scratch: str | Path) -> Storage | None:
    """The newest complete checkpoint under a job's scratch dir (LATEST is written only once all ranks are done)."""
    ckpt = Storage(scratch).child("ckpt")
    name = ckpt.read_text(LATEST)
    return ckpt.child(name.strip()) if name else None


@contextmanager
def local_checkpoint(scratch: str | Path) -> Iterator[Path | None]:
    """The newest complete checkpoint as a local directory: in place on a path, downloaded (and removed
    afterwards) from an object store."""
    ckpt = latest_checkpoint(scratch)
    if ckpt is None:
        yield None
        return
    local, temporary = ckpt.fetch("")
    try:
        yield local
    finally:
        if temporary:
            shutil.rmtree(local, ignore_errors=True)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _broadcast_flag(flag: bool, device) -> bool:
    dist = _dist()
    if dist is None:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _sync_initial_weights(model) -> None:
    """Seeded LoRA init is already identical; broadcasting from rank 0 makes it a guarantee."""
    dist = _dist()
    if dist is not None:
        for p in trainable(model):
            dist.broadcast(p.data, src=0)


def deepspeed_config(cfg: JobConfig, world: int) -> dict | None:
    s = cfg.scaling
    if s.deepspeed_stage is None:
        return None
    return {"train_micro_batch_size_per_gpu": max(1, round(cfg.training.batch_size / world)),
            "gradient_accumulation_steps": 1, "zero_optimization": {"stage": s.deepspeed_stage},
            "bf16": {"enabled": s.bf16}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True}


def _broadcast_batch(idx: list[int] | None, device) -> list[int]:
    """Rank 0's global batch (unit indices) on every rank: its length, then the indices. Nothing else decides it."""
    dist = _dist()
    if dist is None:
        return idx
    root = dist.get_rank() == 0
    n = torch.tensor([len(idx) if root else 0], dtype=torch.int64, device=device)
    dist.broadcast(n, src=0)
    if n.item() == 0:
        return []
    t = (torch.tensor(idx, dtype=torch.int64, device=device) if root
         else torch.empty(int(n.item()), dtype=torch.int64, device=device))
    dist.broadcast(t, src=0)
    return t.tolist()


def unit_batch(encoded: list[list], units: list[int], per_record: bool, cap: int, pad_id: int, device, rng=None):
    """The rows of one step's sampled units: each unit's records (at most `cap`, picked by `rng`, by default a
    generator on fresh OS entropy: never stored, so a resumed run picks afresh), contiguous, with their unit index.
    Each unit is in exactly one rank's shard, so a rank-local generator needs no agreement across ranks."""
    if per_record:
        return collate([encoded[u][0] for u in units], pad_id, device)
    import numpy as np

    if rng is None:
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    rows, index = [], []
    for k, u in enumerate(units):
        records = encoded[u]
        pick = rng.choice(len(records), cap, replace=False) if len(records) > cap else range(len(records))
        rows += [records[j] for j in pick]
        index += [k] * len(pick)
    return collate(rows, pad_id, device, unit_index=index)


def _probe(step, encoded, tok, device, plan: WorkerPlan, world: int, start: int) -> dict:
    """Time one forward/backward of an expected-size shard, then drop its gradients: nothing is updated or released."""
    n = max(1, round(plan.q * len(encoded) / world))
    batch = collate([r for unit in encoded[:n] for r in unit], tok.pad_token_id, device)
    t0 = time.perf_counter()
    if isinstance(step, DPLoRAStep):
        step._per_example_grads(batch)
        step.optimizer.zero_grad(set_to_none=True)
    else:
        from dpsynth.prefixlm import per_example_loss

        per_example_loss(step.model, batch).sum().backward()
        step.optimizer.zero_grad(set_to_none=True)
    took = time.perf_counter() - t0
    return {"probe_step_s": took, "examples": len(batch), "steps_left": plan.steps - start,
            "eta_s": took * (plan.steps - start)}


def train_loop(config: dict) -> None:
    """Body of the TorchTrainer; config["plan"] is the WorkerPlan built by dpsynth.train.driver."""
    import ray
    import ray.train
    import ray.train.torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    plan: WorkerPlan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = JobConfig.model_validate(plan.cfg)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray pins OMP_NUM_THREADS to the worker's CPU reservation (default 1); unless the user reserved
        # CPUs explicitly, share this node's cores among its workers so one local worker uses them all.
        cpus = (cfg.scaling.resources_per_worker or {}).get("CPU") or (os.cpu_count() or 1) / ctx.get_local_world_size()
        torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(cfg.training.seed)  # LoRA init only; batches, record picks and noise come from OS entropy
    model, tok, _ = load_base(cfg.model, device)
    model = wrap_lora(model, cfg.lora)  # on its device before wrapping (opacus issue 820)
    _sync_initial_weights(model)
    prompts = label_prompts(cfg, tok, plan.dataset_name, sorted({label for unit in plan.units for _, label in unit}))
    encoded = [[encode(tok, prompts[label], text, cfg.model.max_length) for text, label in unit] for unit in plan.units]
    per_record = all(len(u) == 1 for u in encoded)
    run_id = plan.run.run_id if plan.run is not None else "reference"

    ds_cfg = deepspeed_config(cfg, world)
    micro = cfg.training.micro_batch_size
    if micro == "auto":
        micro = auto_micro_batch_size(model, device, cfg.model.max_length, math.ceil(cfg.training.batch_size / world))
    if plan.private:
        step = DPLoRAStep(model, noise_multiplier=plan.sigma, sampling_rate=plan.q, max_grad_norm=cfg.training.max_grad_norm,
                          expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                          grad_sample_mode=cfg.training.grad_sample_mode, optimizer=plan.optimizer,  # noise: OS entropy
                          deepspeed_config=ds_cfg, micro_batch_size=micro)
        inner = step.engine if step.engine is not None else step.optimizer.original_optimizer
    else:  # benchmark reference only: never reachable from the CLI
        step = PlainLoRAStep(model, expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                             optimizer=plan.optimizer, micro_batch_size=micro)
        inner = step.optimizer

    start, history, restarts, seen = 0, [], 0, []
    nodes = [None] * world
    if _dist() is not None:
        _dist().all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    else:
        nodes = [ray.get_runtime_context().get_node_id()]
    # Our own checkpoints on the run storage, not Ray's registry: a worker can die before the
    # controller has registered its last report, and a resumed run must not start over.
    with local_checkpoint(plan.scratch) as ckpt:
        if ckpt is not None:
            state = json.loads((ckpt / STATE).read_text())
            if state["run_id"] != run_id:
                raise RuntimeError(f"checkpoint {ckpt} belongs to ledger run {state['run_id']}, not {run_id}")
            set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors"), device=str(device)))
            if ds_cfg is not None:
                inner.load_checkpoint(str(ckpt / "deepspeed"), tag="dp", load_module_strict=False)
            else:
                inner.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
            start, history, restarts = state["step"], state["history"], state["restarts"] + 1
            if (ckpt / BATCHES.format(rank)).exists():
                seen = json.loads((ckpt / BATCHES.format(rank)).read_text())
            log.info("rank %d resumed from step %d of run %s", rank, start, run_id)

    charging = plan.private and not plan.covered_by_search
    if plan.covered_by_search and rank == 0 and not any(isinstance(e, RepeatAndSelect) for e in plan.run.charged()):
        raise RuntimeError(f"trial of search {run_id}: the search's cost is not charged; refusing to train")

    store, stop_store = Storage(plan.scratch).child("ckpt"), Storage(plan.stop)

    def save(i: int) -> None:
        # Written straight to a path, or built locally and uploaded to an object store; LATEST, one small
        # atomic write after every rank is done, is what makes the checkpoint exist.
        name = f"step-{i:08d}"
        with store.writing_dir(name) as d:
            if ds_cfg is not None:  # collective: every rank writes its optimizer partition
                inner.save_checkpoint(str(d / "deepspeed"), tag="dp")
            (d / BATCHES.format(rank)).write_text(json.dumps(seen))
            if rank == 0:
                model.save_pretrained(d / "adapter")  # peft format: the driver certifies it as is
                tok.save_pretrained(d / "adapter")
                if ds_cfg is None:
                    torch.save(inner.state_dict(), d / "optimizer.pt")
                (d / STATE).write_text(json.dumps({"run_id": run_id, "step": i, "history": history,
                                                   "worker_nodes": nodes, "restarts": restarts}))
        if _dist() is not None:
            _dist().barrier()  # every rank's files are stored before LATEST points at them
        if rank == 0:
            store.write_text(LATEST, name)
            for old in [n for n in store.listdir() if n.startswith("step-")][:-2]:
                store.delete(old)
        ray.train.report({"step": i, "loss": history[-1]["loss"] if history else float("nan")})

    if rank == 0 and start < plan.steps and ds_cfg is None:
        Storage(plan.stop).write_text(ESTIMATE, json.dumps(_probe(step, encoded, tok, device, plan, world, start)))

    last_saved = start
    # Rank 0's sampler for the steps still to run, on a fresh secure generator (a resumed run draws new batches).
    batches = poisson_batches(len(encoded), plan.q, plan.steps - start) if rank == 0 else None
    picks = None
    if not per_record:
        import numpy as np

        picks = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))  # this rank's record picks
    for i in range(start + 1, plan.steps + 1):
        t0 = time.perf_counter()
        if _broadcast_flag(rank == 0 and stop_store.exists(STOP), device):
            log.warning("stop requested: run %s stops before step %d (checkpointed; the same command resumes it)", run_id, i)
            break
        allowed = plan.run.try_charge(step.event) if (charging and rank == 0) else True
        if not _broadcast_flag(allowed, device):  # before any noisy update of step i exists
            log.warning("ledger: run %s has no admitted steps left at step %d (steps charged before a failure)", run_id, i)
            break
        idx = _broadcast_batch(next(batches) if rank == 0 else None, device)  # the same global batch on every rank
        loss = step(unit_batch(encoded, idx[rank::world], per_record, cfg.privacy.max_records_per_unit,
                               tok.pad_token_id, device, picks))
        history.append({"step": i, "batch_size": len(idx), "loss": loss, "seconds": time.perf_counter() - t0})
        seen.append([i, len(idx), sum(idx)])
        if i % cfg.training.log_every == 0 and rank == 0:
            log.info("step %d/%d loss %.4f batch %d", i, plan.steps, loss, len(idx))
        if i % cfg.scaling.checkpoint_every == 0 or i == plan.steps:
            save(i)
            last_saved = i
    if history and history[-1]["step"] != last_saved:
        save(history[-1]["step"])
