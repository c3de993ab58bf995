"""The Ray Train worker loop: every worker runs this, rank 0 talks to the ledger.

One step, on every worker:
  1. rank 0 charges the step to the ledger actor; the answer is broadcast (all stop together
     once the admitted plan is used up: steps charged before a failure and lost count too);
  2. all workers draw the same global Poisson batch from a shared seed and take their shard;
  3. DPLoRAStep: per-example clipping, one noise draw (rank 0), all-reduce, optimizer step.
A checkpoint (adapter, optimizer, step, RNG state, ledger run id) goes to the run storage every
`scaling.checkpoint_every` steps; a restarted worker group (Ray Train FailureConfig), or a re-run
of the same job after the driver itself died, resumes from the latest one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dpsynth.config import JobConfig
from dpsynth.data import format_prefix
from dpsynth.models import load_base, wrap_lora
from dpsynth.privacy import RepeatAndSelect, SampledGaussian
from dpsynth.storage import Storage
from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, collate, encode, trainable

log = logging.getLogger(__name__)

STATE = "state.json"
LATEST = "LATEST"


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


def train_loop(config: dict) -> None:
    """Body of the TorchTrainer; `config` is built by dpsynth.train.driver.worker_config."""
    import ray
    import ray.train
    import ray.train.torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from dpsynth.privacy.service import LedgerClient

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = JobConfig.model_validate(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray pins OMP_NUM_THREADS to the worker's CPU reservation (default 1); unless the user reserved
        # CPUs explicitly, share this node's cores among its workers so one local worker uses them all.
        cpus = (cfg.scaling.resources_per_worker or {}).get("CPU") or (os.cpu_count() or 1) / ctx.get_local_world_size()
        torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(cfg.training.seed)  # LoRA init only; batches and noise come from the seeds below
    model, tok, _ = load_base(cfg.model)
    model = wrap_lora(model.to(device), cfg.lora)  # on its device before wrapping (opacus issue 820)
    _sync_initial_weights(model)
    encoded = [encode(tok, format_prefix(cfg.model.prefix_template, config["dataset_name"], label), text, cfg.model.max_length)
               for text, label in config["examples"]]
    sigma, q, steps, run_id = config["sigma"], config["q"], config["steps"], config["run_id"]

    ds_cfg = deepspeed_config(cfg, world)
    noise = torch.Generator(device=device).manual_seed(config["noise_seed"] + rank)
    optimizer = config.get("optimizer", "adamw")
    if config.get("private", True):
        step = DPLoRAStep(model, noise_multiplier=sigma, max_grad_norm=cfg.training.max_grad_norm,
                          expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                          grad_sample_mode=cfg.training.grad_sample_mode, noise_generator=noise, optimizer=optimizer,
                          deepspeed_config=ds_cfg)
        inner = step.engine if step.engine is not None else step.optimizer.original_optimizer
    else:  # benchmark reference only: never reachable from the CLI
        step = PlainLoRAStep(model, expected_batch_size=cfg.training.batch_size, learning_rate=cfg.training.learning_rate,
                             optimizer=optimizer)
        inner = step.optimizer

    start, history, restarts = 0, [], 0
    nodes = [None] * world
    if _dist() is not None:
        _dist().all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    else:
        nodes = [ray.get_runtime_context().get_node_id()]
    # Our own checkpoints on the run storage, not Ray's registry: a worker can die before the
    # controller has registered its last report, and a resumed run must not start over.
    with local_checkpoint(config["scratch"]) as ckpt:
        if ckpt is not None:
            state = json.loads((ckpt / STATE).read_text())
            if state["run_id"] != run_id:
                raise RuntimeError(f"checkpoint {ckpt} belongs to ledger run {state['run_id']}, not {run_id}")
            set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors"), device=str(device)))
            if ds_cfg is not None:
                inner.load_checkpoint(str(ckpt / "deepspeed"), tag="dp", load_module_strict=False)
            else:
                inner.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
            noise.set_state(torch.load(ckpt / f"noise_rng_{rank}.pt", weights_only=True))
            start, history, restarts = state["step"], state["history"], state["restarts"] + 1
            log.info("rank %d resumed from step %d of run %s", rank, start, run_id)

    ledger = LedgerClient(config["ledger"]) if config.get("private", True) else None
    if ledger is not None and config.get("covered_by"):
        # A search trial: its steps are covered by the search's RepeatAndSelect charge, which must
        # already be on record; then it charges nothing per step.
        if rank == 0 and not any(isinstance(e, RepeatAndSelect) for e in ledger.charged(config["covered_by"])):
            raise RuntimeError(f"trial of search {config['covered_by']}: the search's cost is not charged; refusing to train")
        ledger = None

    store = Storage(config["scratch"]).child("ckpt")

    def save(i: int) -> None:
        # Written straight to a path, or built locally and uploaded to an object store; LATEST, one small
        # atomic write after every rank is done, is what makes the checkpoint exist.
        name = f"step-{i:08d}"
        with store.writing_dir(name) as d:
            if ds_cfg is not None:  # collective: every rank writes its optimizer partition
                inner.save_checkpoint(str(d / "deepspeed"), tag="dp")
            torch.save(noise.get_state(), d / f"noise_rng_{rank}.pt")
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

    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=len(encoded), sample_rate=q, steps=steps,
                                            generator=torch.Generator().manual_seed(config["sampler_seed"]))
    last_saved = start
    for i, idx in enumerate(sampler, start=1):
        if i <= start:
            continue  # the batch stream is replayed from its seed so a resumed run draws the same batches
        t0 = time.perf_counter()
        allowed = ledger.try_charge(run_id, SampledGaussian(sigma, q)) if (ledger and rank == 0) else True
        if not _broadcast_flag(allowed, device):  # before any noisy update of step i exists
            log.warning("ledger: run %s has no admitted steps left at step %d (steps charged before a failure)", run_id, i)
            break
        shard = [encoded[j] for j in idx[rank::world]]
        loss = step(collate(shard, tok.pad_token_id, device))
        history.append({"step": i, "batch_size": len(idx), "loss": loss, "seconds": time.perf_counter() - t0})
        if i % cfg.training.log_every == 0 and rank == 0:
            log.info("step %d/%d loss %.4f batch %d", i, steps, loss, len(idx))
        if i % cfg.scaling.checkpoint_every == 0 or i == steps:
            save(i)
            last_saved = i
    if history and history[-1]["step"] != last_saved:
        save(history[-1]["step"])
