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


def fresh_seed() -> int:
    """OS entropy: batch membership and noise are part of the mechanism and must not be reproducible from a config."""
    return int.from_bytes(os.urandom(7), "little")


def poisson_batches(population: int, q: float, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of unit indices, each unit included independently with probability q (Opacus'
    UniformWithReplacementSampler). The stream is a function of the seed, so a resumed run replays it."""
    import torch
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=population, sample_rate=q, steps=steps,
                                            generator=torch.Generator().manual_seed(seed))
    for batch in sampler:
        yield [int(i) for i in batch]
