"""Lengths from the data: `model.max_length: auto` and `sampling.max_new_tokens: auto`.

The token lengths of the private texts are themselves private, so `auto` reads them through a DP histogram: each
privacy unit contributes its distribution over a fixed grid of length bins, the counts get Gaussian noise
calibrated to `privacy.length_budget_share` of the run's epsilon (the same mechanism as the label histogram, and
charged to the same run through the one private-run path), and the lengths are the grid points covering
`model.length_percentile` % of the noisy mass, capped by the model's context. The grid is coarse, so the result
is the same for a given dataset except in the rare draw whose noise crosses a bin edge.

What is then cut is counted and reported to the data owner (log, run summary, metrics.json): a statistic of the
private data, like the rest of metrics.json, not part of the release.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

from dpsynth.config import JobConfig

log = logging.getLogger(__name__)

LENGTH_BINS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
               12288, 16384, 32768)
"""Upper edges (text tokens + EOS) of the length grid; longer texts fall in the last bin."""
LENGTHS_STATE = "length_distribution.json"


def needs_release(cfg: JobConfig, samples: bool = True) -> bool:
    """Whether a length is `auto` (`samples`: the run also samples texts, so max_new_tokens counts)."""
    return cfg.model.max_length == "auto" or (samples and cfg.sampling.max_new_tokens == "auto")


def bin_of(tokens: int) -> str:
    return str(LENGTH_BINS[min(bisect.bisect_left(LENGTH_BINS, tokens), len(LENGTH_BINS) - 1)])


def text_lengths(tokenizer, texts) -> list[int]:
    """Tokens of each text plus its EOS: what the Prefix-LM loss runs over."""
    return [len(ids) + 1 for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def covering_length(distribution: dict[str, float], percentile: float) -> int:
    """The smallest grid point whose cumulative (noisy) share reaches `percentile` %."""
    total = 0.0
    for edge in LENGTH_BINS:
        total += distribution.get(str(edge), 0.0)
        if total >= percentile / 100.0 - 1e-12:
            return edge
    return LENGTH_BINS[-1]


@dataclass(frozen=True)
class Lengths:
    """The resolved lengths of a run and what they cut (for the data owner)."""

    max_length: int
    """Tokens per training example: prefix + text + EOS."""
    max_new_tokens: int | str
    text_tokens: int
    """The text + EOS tokens max_length leaves after the longest prefix."""
    source: str
    """`dp histogram` (auto) or `config`."""
    truncated: int
    texts: int

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.texts if self.texts else 0.0

    def summary(self) -> str:
        if not self.truncated:
            return f"no text cut (max_length {self.max_length} tokens)"
        return f"{self.truncated_fraction:.0%} of texts cut to {self.text_tokens} tokens ({self.truncated} of {self.texts})"

    def to_json(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "max_new_tokens": self.max_new_tokens, "text_tokens": self.text_tokens,
                "source": self.source, "texts": self.texts, "truncated": self.truncated,
                "truncated_fraction": self.truncated_fraction}


def resolve(cfg: JobConfig, train_texts, tokenizer, prefix_tokens: int, distribution: dict[str, float] | None,
            context: int) -> tuple[JobConfig, Lengths]:
    """The job config with numbers in place of `auto`, and what they cut. `distribution` is the released DP length
    histogram (needed when anything is `auto`); `prefix_tokens` the longest Prefix-LM prefix."""
    model, sampling = cfg.model, cfg.sampling
    covering = covering_length(distribution, model.length_percentile) if distribution is not None else None
    if model.max_length == "auto":
        if covering is None:
            raise ValueError("model.max_length is auto: resolve it from a released length histogram")
        max_length = min(prefix_tokens + covering, context)
    else:
        max_length = model.max_length
        if max_length > context:
            from dpsynth.errors import UserError

            raise UserError(f"model.max_length: {max_length} exceeds the base model's context of {context} tokens")
    if sampling.max_new_tokens == "auto" and covering is not None:
        # never longer than the texts training saw: a text cut at max_length was trained without its end, so a
        # longer budget only lets the model run on (news at max_length 128 sampled to 1,536 tokens at 11 tokens/s)
        max_new_tokens = max(1, min(covering, context - prefix_tokens, max_length - prefix_tokens))
    else:
        max_new_tokens = sampling.max_new_tokens  # a number, or `auto` left for a run that samples nothing
    room = max_length - prefix_tokens
    lengths = text_lengths(tokenizer, train_texts)
    cut = sum(n > room for n in lengths)
    source = "dp histogram" if distribution is not None else "config"
    result = Lengths(max_length, max_new_tokens, room, source, cut, len(lengths))
    resolved = cfg.model_copy(update={"model": model.model_copy(update={"max_length": max_length}),
                                      "sampling": sampling.model_copy(update={"max_new_tokens": max_new_tokens})})
    log.info("lengths (%s): max_length %d (prefix %d + text %d), max_new_tokens %s; %s", source, max_length, prefix_tokens,
             room, max_new_tokens, result.summary())
    return resolved, result
