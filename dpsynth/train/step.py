"""The per-worker DP-LoRA training step: Prefix-LM loss, per-example clipping, Gaussian noise.

Plain torch + peft + opacus: no Ray, no vLLM, so a bare GPU box can run and benchmark it.
"""

from __future__ import annotations

import warnings

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer

from dpsynth.prefixlm import Batch, causal_lm, micro_batches, per_example_loss
from dpsynth.privacy.events import SampledGaussian
from dpsynth.privacy.sampling import secure_generator

# Opacus's backward hooks fire on module outputs when the frozen layers below need no input grads: expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, name: str, learning_rate: float) -> torch.optim.Optimizer:
    if name == "sgd":  # tests compare updates exactly; AdamW's first step is scale-free (~lr*sign(g))
        return torch.optim.SGD(params, lr=learning_rate)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


def auto_micro_batch_size(model, device: torch.device | str, tokens_per_example: int, logical_batch: int) -> int:
    """Largest power-of-two micro-batch (<= the logical batch) that fits in free memory, by a deliberately
    pessimistic estimate: ~34 x hidden activations per token per layer that backward goes through (Korthikanti et
    al. 2022), a transient hidden-sized row per token per frozen layer, and two float32 copies of every example's
    LoRA gradient. On a CPU, 32: throughput barely grows past it, and memory stays bounded."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(1, min(32, logical_batch))
    lm = causal_lm(model)
    hidden, layers = lm.config.hidden_size, lm.config.num_hidden_layers
    adapted = {int(part) for n, p in lm.named_parameters() if p.requires_grad for part in n.split(".") if part.isdigit()}
    backward_layers = layers - min(adapted) if adapted else layers  # backward stops below the lowest adapted block
    width = next(lm.parameters()).element_size()
    per_example = (tokens_per_example * hidden * width * (34 * backward_layers + 4 * layers)
                   + 8 * sum(p.numel() for p in lm.parameters() if p.requires_grad))
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(0.7 * free // max(1, per_example))
    size = 1 << max(0, fits.bit_length() - 1) if fits >= 1 else 1
    return max(1, min(size, logical_batch))


class DPLoRAStep:
    """One DP-SGD step (Abadi et al. 2016) on the trainable (LoRA) parameters, on 1..W workers.

    Per-example gradients come from Opacus grad-sample hooks; DPOptimizer clips each example's
    gradient to `max_grad_norm` jointly over all trainable parameters ("flat" clipping), sums,
    adds N(0, sigma^2 C^2) once, and divides by the *expected* batch size (Poisson sampling makes
    the real size random; dividing by it would leak it).

    One logical (Poisson) batch may be cut into physical micro-batches of `micro_batch_size`
    examples (Opacus' BatchMemoryManager idea): each micro-batch's per-example gradients are
    clipped and added to the running sum, then dropped, and the noise is added once, after the
    last one. Memory then depends on the micro-batch, not on the logical batch, and the update is
    the same as the one-shot update for the same noise draw.

    With W > 1 workers each holds a shard of the global Poisson batch. Opacus's
    DistributedDPOptimizer adds the noise on rank 0 only and all-reduces the sums, so the noise
    enters exactly once; each worker divides by the expected global batch / W and the all-reduce
    averages over W, which is (sum of clipped + noise) / expected global batch.

    The noise comes from `noise_generator`; None (production) means a fresh
    dpsynth.privacy.sampling.secure_generator() on rank 0, seeded from OS entropy and never stored (Opacus would
    otherwise draw from torch's global RNG, which the worker seeds from the config for the LoRA init). Ranks
    other than 0 never draw noise and get none. A caller-seeded generator is for tests that compare updates.

    Under DeepSpeed the same DP gradient is computed first (per-example backward through
    `torch.autograd.grad`, which fires Opacus's module hooks but not DeepSpeed's gradient hooks),
    then handed to the engine as the gradient of a surrogate loss sum(p * g): DeepSpeed averages
    it over workers and applies the optimizer, ZeRO-partitioned or not.
    """

    def __init__(self, model, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 learning_rate: float, sampling_rate: float | None = None, grad_sample_mode: str = "hooks",
                 noise_generator: torch.Generator | None = None, optimizer: str = "adamw",
                 deepspeed_config: dict | None = None, micro_batch_size: int | None = None):
        import torch.distributed as dist

        from opacus.optimizers import DistributedDPOptimizer

        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        self.noise_multiplier, self.sampling_rate = noise_multiplier, sampling_rate
        model.train()  # Opacus captures activations only in train mode
        self.module = prepare_module(model, grad_sample_mode, batch_first=True, loss_reduction="mean")
        self.params = trainable(model)
        if noise_generator is None and rank == 0:
            noise_generator = secure_generator(self.params[0].device)
        self.micro_batch_size = micro_batch_size
        self.engine = None
        if deepspeed_config is not None:
            import deepspeed

            self.engine, inner, _, _ = deepspeed.initialize(model=self.module, model_parameters=self.params,
                                                            optimizer=make_optimizer(self.params, optimizer, learning_rate),
                                                            config=deepspeed_config)
            inner_opt = torch.optim.SGD(self.params, lr=0.0)  # never stepped: DPOptimizer only clips and noises here
        else:
            inner_opt = make_optimizer(self.params, optimizer, learning_rate)
        dp_cls = DistributedDPOptimizer if world > 1 else DPOptimizer
        self.optimizer = dp_cls(inner_opt, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                expected_batch_size=expected_batch_size / world, loss_reduction="mean",
                                generator=noise_generator)

    @property
    def event(self) -> SampledGaussian:
        """What one call releases: the Poisson-subsampled Gaussian mechanism this step runs (charged before it runs)."""
        if self.sampling_rate is None:
            raise ValueError("DPLoRAStep(sampling_rate=...) is needed to state the step's privacy event")
        return SampledGaussian(self.noise_multiplier, self.sampling_rate)

    def _per_example_grads(self, batch: Batch) -> float:
        """Fill p.grad_sample (float32) for this micro-batch; return its summed loss."""
        if len(batch) == 0:  # an empty Poisson draw still takes a (pure-noise) step: skipping would change the mechanism
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=torch.float32, device=p.device)
            return 0.0
        losses = per_example_loss(self.module, batch)
        if self.engine is None:
            losses.mean().backward()
        else:
            torch.autograd.grad(losses.mean(), self.params)  # fills p.grad_sample only
        for p in self.params:
            # Norms and clipping in float32: a bf16 norm is off by up to 2^-8, which would let a clipped
            # gradient exceed C (the sensitivity the accountant assumes).
            if isinstance(p.grad_sample, list):
                p.grad_sample = [g.float() for g in p.grad_sample]
            elif p.grad_sample is not None:
                p.grad_sample = p.grad_sample.float()
        if batch.unit_index is not None:
            self._per_unit(batch)
        return losses.detach().sum().item()

    def _per_unit(self, batch: Batch) -> None:
        """One row per privacy unit: the mean of its records' gradients, so the optimizer clips each unit as one
        (a unit with 50 records moves the clipped sum no more than a unit with one)."""
        index = batch.unit_index
        weight = 1.0 / torch.bincount(index).to(torch.float32)[index]
        for p in self.params:
            g = p.grad_sample
            if isinstance(g, list):  # one backward per micro-batch: at most one entry here
                g = torch.cat(g)
            shaped = weight.view(-1, *([1] * (g.dim() - 1)))
            p.grad_sample = torch.zeros((batch.units, *g.shape[1:]), dtype=g.dtype, device=g.device).index_add_(
                0, index, g * shaped)

    def __call__(self, batch: Batch) -> float:
        parts = micro_batches(batch, self.micro_batch_size)
        total = 0.0
        for part in parts[:-1]:
            total += self._per_example_grads(part)
            self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.pre_step()  # clip this micro-batch and add it to p.summed_grad; no noise yet
            self.optimizer.zero_grad(set_to_none=True)  # drops grad_sample, keeps summed_grad
        total += self._per_example_grads(parts[-1])
        if self.engine is None:
            self.optimizer.step()  # clip the last micro-batch, add the noise once, normalise, update
        else:
            self.optimizer.pre_step()  # p.grad = (local clipped sum [+ noise on rank 0]) / (expected batch / W)
            grads = [p.grad.detach().clone() for p in self.params]
            self.optimizer.zero_grad(set_to_none=True)
            self.engine.backward(sum((p * g.to(p.dtype)).sum() for p, g in zip(self.params, grads)))
            self.engine.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batch) if len(batch) else float("nan")


class PlainLoRAStep:
    """The same step without privacy: the reference for tests and the DP-overhead benchmark."""

    def __init__(self, model, *, expected_batch_size: int, learning_rate: float, optimizer: str = "adamw",
                 micro_batch_size: int | None = None):
        model.train()
        self.model = model
        self.expected_batch_size = expected_batch_size
        self.micro_batch_size = micro_batch_size
        self.optimizer = make_optimizer(trainable(model), optimizer, learning_rate)

    def __call__(self, batch: Batch) -> float:
        import torch.distributed as dist

        total = 0.0
        for part in micro_batches(batch, self.micro_batch_size):
            if len(part):
                losses = per_example_loss(self.model, part)
                if part.unit_index is not None:  # each unit weighs as one: the mean of its records
                    losses = losses / torch.bincount(part.unit_index).to(losses.dtype)[part.unit_index]
                (losses.sum() / self.expected_batch_size).backward()  # this shard's share of the global mean
                total += losses.detach().sum().item()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in trainable(self.model):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(batch) if len(batch) else float("nan")
