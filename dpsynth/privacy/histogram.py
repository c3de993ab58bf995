"""DP histograms of the private data: the label mix a synthetic corpus is drawn with, and the text lengths
`auto` sizes a run by; both released by the Gaussian mechanism.

Each privacy unit contributes its own distribution over the categories (a probability vector: one-hot for a
one-record unit), so adding or removing a unit moves the summed counts by at most 1 in L2 (Dwork & Roth 2014,
Thm A.1). The noise is calibrated to a stated share of the run's epsilon (the histogram alone spends that share),
so a 500-unit dataset gets noise in proportion to its size instead of a fixed number of counts that would swamp it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from .calibration import calibrate
from .events import Gaussian


HISTOGRAM = "histogram"
"""The `purpose` of a histogram's Gaussian event: the ledger keeps its charges apart from any other Gaussian a run
releases (an in-context token's, a search's score), so a run's histogram charges can be counted exactly."""


def histogram_event(noise_multiplier: float) -> Gaussian:
    return Gaussian(noise_multiplier, purpose=HISTOGRAM)


def calibrate_histogram(share: float, total_epsilon: float, delta: float, accountant: str) -> float:
    """Noise multiplier of a histogram that alone spends `share` x total_epsilon at `delta`."""
    return calibrate(lambda s: (histogram_event(s),), share * total_epsilon, delta, accountant=accountant,
                     bounds=(0.05, 1e5))


def unit_totals(unit_labels: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """The summed per-unit distributions over `classes` (each unit adds a probability vector: sensitivity 1)."""
    totals = np.zeros(len(classes))
    index = {c: i for i, c in enumerate(classes)}
    for labels in unit_labels:
        for label, k in Counter(labels).items():
            totals[index[label]] += k / len(labels)
    return totals


def release(unit_labels: Sequence[Sequence[str]], classes: Sequence[str], noise_multiplier: float,
            rng: np.random.Generator | None = None, floor: float = 0.0) -> dict[str, float]:
    """Category proportions from Gaussian-noised per-unit distributions, clipped at 0 and normalised.

    `floor` (in units of the noise's std): noisy counts below it are taken as 0 (post-processing), so that many
    empty categories' positive noise does not add up to a mass of its own; if nothing passes, the largest count
    alone is kept. Fresh OS entropy unless `rng` is given (tests): DP noise must not be reproducible from a seed.
    """
    rng = rng or np.random.default_rng()
    noisy = unit_totals(unit_labels, classes) + rng.normal(0.0, noise_multiplier, len(classes))
    if floor:
        kept = np.where(noisy >= floor * noise_multiplier, noisy, 0.0)
        noisy = kept if kept.sum() > 0 else np.where(np.arange(len(noisy)) == noisy.argmax(), 1.0, 0.0)
    noisy = noisy.clip(min=0.0)
    if noisy.sum() <= 0:
        noisy = np.ones(len(classes))
    return dict(zip(classes, (noisy / noisy.sum()).tolist()))


def noisy_marginals(unit_cells: Sequence[Sequence[str]], cells: Sequence[str], attributes, noise_multiplier: float,
                    rng: np.random.Generator | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    """Each attribute's (values, noisy summed per-unit distribution), noise std noise_multiplier * sqrt(attributes)."""
    rng = rng or np.random.default_rng()
    columns = list(attributes(cells[0]))
    scale = noise_multiplier * np.sqrt(len(columns))
    out = {}
    for c in columns:
        values = sorted({attributes(cell)[c] for cell in cells})
        totals = unit_totals([[attributes(x)[c] for x in unit] for unit in unit_cells], values)
        out[c] = (values, totals + rng.normal(0.0, scale, len(values)))
    return out


def release_marginals(unit_cells: Sequence[Sequence[str]], cells: Sequence[str], attributes, noise_multiplier: float,
                      rng: np.random.Generator | None = None) -> dict[str, float]:
    """Cell proportions as the product of each attribute's DP marginal. A unit's k marginal distributions stacked
    have L2 norm at most sqrt(k), so Gaussian noise of std noise_multiplier * sqrt(k) on every marginal count is one
    Gaussian mechanism of multiplier `noise_multiplier` (the same charge as one histogram). `attributes(cell)` ->
    {column: value}."""
    noisy = noisy_marginals(unit_cells, cells, attributes, noise_multiplier, rng)
    marginals = {}
    for c, (values, counts) in noisy.items():
        counts = counts.clip(min=0.0)
        marginals[c] = dict(zip(values, (counts / counts.sum() if counts.sum() > 0 else np.ones(len(values)) / len(values))))
    weights = {cell: float(np.prod([marginals[c][v] for c, v in attributes(cell).items()])) for cell in cells}
    total = sum(weights.values())
    return {cell: w / total for cell, w in weights.items()} if total > 0 else {cell: 1 / len(cells) for cell in cells}


def plan_histogram(share: float, total_epsilon: float, delta: float, accountant: str):
    """A histogram's certificate block: noise calibrated to `share` of the run's epsilon."""
    from .certificate import HistogramBlock

    return HistogramBlock(noise_multiplier=calibrate_histogram(share, total_epsilon, delta, accountant), budget_share=share)


def release_once(run, block, unit_categories: Sequence[Sequence[str]], categories: Sequence[str], storage,
                 state: str, floor: float = 0.0, *, ordinal: int, attributes=None) -> dict[str, float]:
    """Charge the histogram to `run` and release it, once per run: a resumed run gets what it released before (kept
    in its private `storage` under `state`).

    Whether it was charged already is the ledger's record, never a file: this is the run's `ordinal`-th histogram
    (1, 2, ..., in the fixed order the caller releases them) with this noise multiplier, so it was charged iff the
    run's charges hold at least `ordinal` histogram events of that noise (they merge in the ledger under one key).
    If a crash came between the charge and keeping the result, the lost draw was never released, so one fresh draw
    under that same charge is still one release."""
    import json

    if isinstance(ordinal, bool) or not isinstance(ordinal, int) or ordinal < 1:
        raise ValueError(f"ordinal must be an integer >= 1, got {ordinal!r}")
    saved = storage.read_text(state) if storage is not None else None
    if saved is not None:
        return json.loads(saved)
    event = histogram_event(block.noise_multiplier)
    if charged_histograms(run, block.noise_multiplier) < ordinal:
        run.charge(event)  # BudgetExceeded past the admitted plan
    if attributes is not None:  # the marginals of the categories' attributes (release_marginals), same charge
        proportions = release_marginals(unit_categories, categories, attributes, block.noise_multiplier)
    else:
        proportions = release(unit_categories, categories, block.noise_multiplier, floor=floor)
    if storage is not None:
        storage.write_text(state, json.dumps(proportions))
    return proportions


def charged_histograms(run, noise_multiplier: float) -> int:
    """How many histograms of this noise multiplier the ledger has charged to `run` (a PrivateRun)."""
    event = histogram_event(noise_multiplier)
    return sum(e.count for e in run.charged() if isinstance(e, Gaussian) and e.purpose == event.purpose
               and e.noise_multiplier == event.noise_multiplier)
