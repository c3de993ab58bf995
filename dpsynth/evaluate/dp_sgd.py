"""DP-SGD for the downstream classifiers of baseline (c): the real data, DP-trained directly.

Kurakin et al. 2023 compare DP synthetic data against classifiers trained with DP-SGD directly on
the private data at the same (epsilon, delta). This is DP-SGD (Abadi et al. 2016) with Opacus:
each step includes every example independently with probability q (Poisson sampling, what the
accountant assumes), clips each example's gradient to C jointly over all trainable parameters,
adds N(0, sigma^2 C^2) once, and divides by the expected batch size. sigma is the smallest noise
meeting the target under dpsynth's accountant (dpsynth.privacy.calibrate, the one calibrator), and the
returned epsilon is recomputed from the events that ran. Batch membership and noise use fresh OS
entropy; `seed` fixes only the initialisation.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpsynth.privacy import SampledGaussian, calibrate, epsilon as account
from dpsynth.privacy.sampling import poisson_batches, schedule

_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"


@dataclass
class DPTrainResult:
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sampling_rate: float
    steps: int
    max_grad_norm: float
    expected_batch_size: int
    batch_sizes: list[int] = field(default_factory=list)

    def certificate(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "batch_sizes"}


def _entropy_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def dp_sgd_train(module: torch.nn.Module, n: int, get_batch: Callable[[np.ndarray], tuple], labels: torch.Tensor, *,
                 target_epsilon: float, delta: float, accountant: str = "prv", epochs: float = 5.0,
                 batch_size: int = 256, max_grad_norm: float = 1.0, learning_rate: float = 0.05,
                 optimizer: str = "adam") -> DPTrainResult:
    """Train `module` in place with DP-SGD; `get_batch(indices)` returns the forward inputs of those rows.

    The loss is cross-entropy of `module(*inputs)` against `labels[indices]`. The optimizer (Adam or
    SGD) only post-processes the noisy gradient.
    """
    sched = schedule(n, min(batch_size, n), epochs=epochs)
    batch_size, q, steps = sched.expected_batch, sched.q, sched.steps
    sigma = calibrate(lambda s: (SampledGaussian(s, q, steps),), target_epsilon, delta, accountant=accountant)
    module.train()
    gs = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    params = [p for p in module.parameters() if p.requires_grad]
    inner = torch.optim.Adam(params, lr=learning_rate) if optimizer == "adam" else torch.optim.SGD(params, lr=learning_rate)
    optimizer = DPOptimizer(inner, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                            expected_batch_size=batch_size, loss_reduction="mean", generator=_entropy_generator())
    result = DPTrainResult(0.0, delta, accountant, sigma, q, steps, max_grad_norm, batch_size)
    for idx in poisson_batches(n, q, steps):  # a fresh secure generator
        idx = np.asarray(idx, dtype=np.int64)
        result.batch_sizes.append(len(idx))
        if len(idx) == 0:  # an empty Poisson draw is still a (pure-noise) step
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            logits = gs(*get_batch(idx))
            with warnings.catch_warnings():  # Opacus hooks on a first layer whose inputs need no grad: expected
                warnings.filterwarnings("ignore", message=_HOOK_WARNING)
                torch.nn.functional.cross_entropy(logits, labels[torch.from_numpy(idx)]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gs.remove_hooks()  # the trained module is used plainly from here on
    module.eval()
    result.epsilon = account([SampledGaussian(sigma, q, len(result.batch_sizes))], delta, accountant)
    return result
