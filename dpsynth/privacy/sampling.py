"""Poisson subsampling: the one place that turns a batch size and epochs (or steps) into q and a step count, and
the one sampler that draws the batches (the accountant's SampledGaussian assumes exactly this sampling).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from dpsynth.errors import UserError


@dataclass(frozen=True)
class Schedule:
    """`steps` Poisson batches over `population` privacy units, each unit included with probability `q`."""

    population: int
    expected_batch: int
    q: float
    steps: int


def schedule(population: int, expected_batch: int, *, epochs: float | None = None, steps: int | None = None) -> Schedule:
    """q = expected_batch / population; steps as given, else ceil(epochs / q) (at least one)."""
    if population < 1:
        raise UserError("data: no training units")
    if expected_batch > population:
        raise UserError(f"training.batch_size: {expected_batch} exceeds the {population} training units (lower it, or "
                        "use a preset made for less data: --preset cpu-demo)")
    q = expected_batch / population
    if steps is None:
        if epochs is None:
            raise ValueError("give epochs or steps")
        steps = max(1, math.ceil(epochs / q))
    return Schedule(population, expected_batch, q, int(steps))


def secure_generator(device=None):
    """A torch.Generator seeded with 64 bits of OS entropy (os.urandom) and never written anywhere: the batch
    membership and the noise it draws cannot be replayed from a config, a checkpoint or the ledger, and a resumed
    run (a new generator) draws afresh.

    Why not a true CSPRNG stream: Opacus' secure_mode RNG needs torchcsprng, whose last release (0.2.1, 2021) is
    built for torch 1.8 and does not install beside torch 2.x. torch's own generators (Mersenne Twister on CPU,
    Philox on CUDA) are not cryptographic, but their raw outputs are never released (batch membership stays in
    the worker; the noise only ever leaves added to the clipped gradient sum), so what keeps them unpredictable
    is the unstored 64-bit seed."""
    import torch

    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def poisson_batches(population: int, q: float, steps: int, generator=None) -> Iterator[list[int]]:
    """`steps` batches of unit indices, each unit included independently with probability q (Opacus'
    UniformWithReplacementSampler). `generator`: None (production) draws from a fresh `secure_generator()`, so
    no two calls, and no resumed run, draw the same batches; a caller-seeded torch.Generator is for benchmarks
    that replay batches, never for the private mechanism."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=population, sample_rate=q, steps=steps,
                                            generator=generator if generator is not None else secure_generator())
    for batch in sampler:
        yield [int(i) for i in batch]
