"""The per-worker DP-LoRA training step: Prefix-LM loss, per-example clipping, Gaussian noise.

Plain torch + peft + opacus: no Ray, no vLLM, so a bare GPU box can run and benchmark it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer

# Opacus's backward hooks fire on module outputs when the frozen layers below need no input grads: expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


@dataclass(frozen=True)
class Encoded:
    """One training example: token ids and which of them carry loss (text + EOS, not the prefix)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    loss_mask: torch.Tensor  # (B, L) 1 on text and EOS tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode(tokenizer, prefix: str, text: str, max_length: int) -> Encoded:
    """prefix + text + EOS (Kurakin et al. 2023, Prefix-LM); the text is truncated, never the prefix.

    Prefix and text are tokenized separately so that sampling can prompt with exactly the
    prefix tokens seen in training.
    """
    p = tokenizer(prefix, add_special_tokens=False).input_ids
    room = max_length - len(p) - 1
    if room < 1:
        raise ValueError(f"model.max_length {max_length} leaves no room for text after the {len(p)}-token prefix")
    t = tokenizer(text, add_special_tokens=False).input_ids[:room]
    return Encoded(tuple(p + t + [tokenizer.eos_token_id]), (0,) * len(p) + (1,) * (len(t) + 1))


def collate(examples: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Pad to the batch's longest example (snippets are short: a fixed length wastes compute)."""
    width = max((len(e.input_ids) for e in examples), default=1)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.loss_mask)
    return Batch(ids.to(device), attn.to(device), mask.to(device))


def per_example_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token NLL over each example's own text + EOS tokens, shape (B,).

    Not the model's `labels=` loss, which averages over all tokens of the batch and so mixes
    examples (per-example clipping needs one loss per example).
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.input_ids[:, 1:]
    weight = batch.loss_mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    return (nll * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, name: str, learning_rate: float) -> torch.optim.Optimizer:
    if name == "sgd":  # tests compare updates exactly; AdamW's first step is scale-free (~lr*sign(g))
        return torch.optim.SGD(params, lr=learning_rate)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


class DPLoRAStep:
    """One DP-SGD step (Abadi et al. 2016) on the trainable (LoRA) parameters, on 1..W workers.

    Per-example gradients come from Opacus grad-sample hooks; DPOptimizer clips each example's
    gradient to `max_grad_norm` jointly over all trainable parameters ("flat" clipping), sums,
    adds N(0, sigma^2 C^2) once, and divides by the *expected* batch size (Poisson sampling makes
    the real size random; dividing by it would leak it).

    With W > 1 workers each holds a shard of the global Poisson batch. Opacus's
    DistributedDPOptimizer adds the noise on rank 0 only and all-reduces the sums, so the noise
    enters exactly once; each worker divides by the expected global batch / W and the all-reduce
    averages over W, which is (sum of clipped + noise) / expected global batch.

    Under DeepSpeed the same DP gradient is computed first (per-example backward through
    `torch.autograd.grad`, which fires Opacus's module hooks but not DeepSpeed's gradient hooks),
    then handed to the engine as the gradient of a surrogate loss sum(p * g): DeepSpeed averages
    it over workers and applies the optimizer, ZeRO-partitioned or not.
    """

    def __init__(self, model, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 learning_rate: float, grad_sample_mode: str = "hooks", noise_generator: torch.Generator | None = None,
                 optimizer: str = "adamw", deepspeed_config: dict | None = None):
        import torch.distributed as dist

        from opacus.optimizers import DistributedDPOptimizer

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        model.train()  # Opacus captures activations only in train mode
        self.module = prepare_module(model, grad_sample_mode, batch_first=True, loss_reduction="mean")
        self.params = trainable(model)
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

    def __call__(self, batch: Batch) -> float:
        if len(batch) == 0:  # an empty Poisson draw still takes a (pure-noise) step: skipping would change the mechanism
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            loss = float("nan")
        else:
            losses = per_example_loss(self.module, batch)
            if self.engine is None:
                losses.mean().backward()
            else:
                torch.autograd.grad(losses.mean(), self.params)  # fills p.grad_sample only
            loss = losses.detach().mean().item()
        if self.engine is None:
            self.optimizer.step()
        else:
            self.optimizer.pre_step()  # p.grad = (local clipped sum [+ noise on rank 0]) / (expected batch / W)
            grads = [p.grad.detach().clone() for p in self.params]
            self.optimizer.zero_grad(set_to_none=True)
            self.engine.backward(sum((p * g.to(p.dtype)).sum() for p, g in zip(self.params, grads)))
            self.engine.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class PlainLoRAStep:
    """The same step without privacy: the reference for tests and the DP-overhead benchmark."""

    def __init__(self, model, *, expected_batch_size: int, learning_rate: float, optimizer: str = "adamw"):
        model.train()
        self.model = model
        self.expected_batch_size = expected_batch_size
        self.optimizer = make_optimizer(trainable(model), optimizer, learning_rate)

    def __call__(self, batch: Batch) -> float:
        import torch.distributed as dist

        losses = per_example_loss(self.model, batch)
        (losses.sum() / self.expected_batch_size).backward()  # this shard's share of the global mean
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in trainable(self.model):
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach().mean().item()
