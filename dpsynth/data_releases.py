"""What a run releases about the data besides its generator: the DP label mix (`sampling.label_proportions: dp`)
and the DP length histogram (`auto` lengths). Every privacy-spending feature (training, the private search,
in-context generation) plans them into its run and releases them through it, the same way."""

from __future__ import annotations

from dataclasses import dataclass

from dpsynth.config import JobConfig
from dpsynth.data import Splits
from dpsynth.errors import UserError
from dpsynth.lengths import LENGTH_BINS, LENGTHS_STATE, Lengths, bin_of, needs_release, resolve, text_lengths
from dpsynth.privacy.calibration import CalibrationError
from dpsynth.privacy.certificate import HistogramBlock
from dpsynth.privacy.events import Event
from dpsynth.privacy.histogram import histogram_event, plan_histogram, release_once

LABELS_STATE = "label_distribution.json"
LENGTH_FLOOR = 4.5
"""Noisy length counts under 4.5 noise std are read as empty: the positive noise of some twenty empty bins must not
outweigh a small dataset's real lengths (an empty bin passes 4.5 std once in 10^4 releases of all bins)."""


@dataclass(frozen=True)
class DataReleases:
    labels: HistogramBlock | None
    lengths: HistogramBlock | None

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(histogram_event(b.noise_multiplier) for b in (self.labels, self.lengths) if b is not None)


def label_mix_released(cfg: JobConfig) -> bool:
    """Whether the run releases a DP label mix (the joint of its attributes): not for unlabelled data, whose one
    cell has nothing to mix."""
    from dpsynth.records import RecordSchema

    return cfg.sampling.label_proportions == "dp" and not RecordSchema.of(cfg.data).unlabelled


def label_mix_kind(cfg: JobConfig, labels) -> str | None:
    """What the DP label mix counts for several attributes: `joint` or `marginals` (sampling.attribute_mix); None
    for one attribute or none (a plain label histogram)."""
    from dpsynth.records import RecordSchema

    if len(RecordSchema.of(cfg.data).attribute_columns) < 2:
        return None
    mix = cfg.sampling.attribute_mix
    if mix == "auto":
        mix = "joint" if len(labels) <= cfg.sampling.joint_max_cells else "marginals"
    return mix


def label_histogram_block(ctx) -> HistogramBlock | None:
    """The certificate's label histogram block: as planned, with what it counted."""
    block = ctx.plan.releases.labels
    if block is None:
        return None
    return block.model_copy(update={"over": label_mix_kind(ctx.cfg, ctx.splits.labels)})


def plan_releases(cfg: JobConfig, delta: float, accountant: str, samples: bool = True) -> DataReleases:
    """Each histogram's noise, calibrated to its share of privacy.epsilon under the run's accountant (`samples`:
    whether the run's output is sampled with sampling.max_new_tokens, which `auto` then sizes too)."""
    def planned(share: float, key: str) -> HistogramBlock:
        try:
            return plan_histogram(share, cfg.privacy.epsilon, delta, accountant)
        except CalibrationError as e:
            raise UserError(f"{key}: {e}") from None

    labels = planned(cfg.sampling.label_budget_share, "sampling.label_budget_share") \
        if label_mix_released(cfg) else None
    lengths = planned(cfg.privacy.length_budget_share, "privacy.length_budget_share") if needs_release(cfg, samples) else None
    return DataReleases(labels, lengths)


def release(cfg: JobConfig, releases: DataReleases, run, splits: Splits, tokenizer, storage,
            context: int) -> tuple[JobConfig, dict[str, float] | None, dict[str, float] | None, Lengths]:
    """Charge and release the planned histograms through `run` (once per run: a resumed run reuses them), and
    resolve `auto` lengths. Returns (the config with numbers for `auto`, the DP label mix or None, the DP length
    distribution or None, the lengths and what they cut: the last is for the owner only)."""
    units = splits.train_units()  # each unit contributes its own distribution: sensitivity 1 per unit
    # Always in this order (labels, then lengths): the k-th histogram of one noise multiplier is the one the ledger
    # has charged k of, which is how a resumed run knows it was charged (see release_once).
    seen: dict[float, int] = {}

    def ordinal(block: HistogramBlock) -> int:
        seen[block.noise_multiplier] = seen.get(block.noise_multiplier, 0) + 1
        return seen[block.noise_multiplier]

    labels = None
    if releases.labels is not None:
        from dpsynth.records import RecordSchema

        marginals = label_mix_kind(cfg, splits.labels) == "marginals"
        labels = release_once(run, releases.labels, [[ex.label for ex in u] for u in units], splits.labels, storage,
                              LABELS_STATE, ordinal=ordinal(releases.labels),
                              attributes=RecordSchema.of(cfg.data).attributes if marginals else None)
    distribution = None
    if releases.lengths is not None:
        distribution = release_once(run, releases.lengths,
                                    [[bin_of(n) for n in text_lengths(tokenizer, [ex.text for ex in u])] for u in units],
                                    [str(b) for b in LENGTH_BINS], storage, LENGTHS_STATE, floor=LENGTH_FLOOR,
                                    ordinal=ordinal(releases.lengths))
    resolved, lengths = resolve_lengths(cfg, splits, tokenizer, distribution, context)
    return resolved, labels, distribution, lengths


def resolve_lengths(cfg: JobConfig, splits, tokenizer, distribution: dict[str, float] | None, context: int):
    """(the config with numbers for `auto` lengths, what they cut) from a length distribution over LENGTH_BINS."""
    from dpsynth.prompts import label_prompts

    prefix = max(len(tokenizer(p, add_special_tokens=False).input_ids)
                 for p in label_prompts(cfg, tokenizer, splits.name, splits.labels).values())
    return resolve(cfg, [ex.text for ex in splits.train], tokenizer, prefix, distribution, context)
