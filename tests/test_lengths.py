"""Lengths from the data: the DP length histogram, `auto` lengths, and what a length cuts."""

from __future__ import annotations

import numpy as np
import pytest

from dpsynth.config import load_config
from dpsynth.data_releases import LENGTH_FLOOR
from dpsynth.lengths import LENGTH_BINS, bin_of, covering_length, resolve
from dpsynth.privacy.histogram import calibrate_histogram, release


def test_bins_cover_every_length():
    assert bin_of(1) == "8" and bin_of(8) == "8" and bin_of(9) == "16" and bin_of(10**9) == str(LENGTH_BINS[-1])


def test_covering_length_is_the_first_bin_reaching_the_percentile():
    dist = {"64": 0.5, "128": 0.44, "256": 0.06}
    assert covering_length(dist, 50) == 64 and covering_length(dist, 94) == 128 and covering_length(dist, 95) == 256


def test_the_dp_length_histogram_is_stable_for_a_small_dataset():
    """128 units, the 2 % share of eps=8: twenty-two empty bins' noise must not drag the 95th percentile up (the
    floor), so `auto` gives the same length run after run."""
    sigma = calibrate_histogram(0.02, 8.0, 1e-5, "prv")
    units = [[bin_of(int(n))] for n in np.random.default_rng(0).integers(130, 190, size=128)]
    cats = [str(b) for b in LENGTH_BINS]
    rng = np.random.default_rng(1)  # seeded: a rare draw (about 1e-4 per release) may cross a bin edge
    found = {covering_length(release(units, cats, sigma, rng=rng, floor=LENGTH_FLOOR), 95) for _ in range(200)}
    assert found == {192}
    # without the floor the same noise would wander off
    loose = {covering_length(release(units, cats, sigma, rng=rng), 95) for _ in range(50)}
    assert max(loose) > 192


class _Tok:
    """A whitespace tokenizer: one token per word."""

    def __call__(self, texts, add_special_tokens=False):
        class Out:
            pass

        out = Out()
        out.input_ids = [t.split() for t in texts] if isinstance(texts, list) else texts.split()
        return out


def test_what_a_length_cuts_is_counted_and_absent_when_nothing_is():
    texts = ["w " * 10, "w " * 30, "w " * 200]
    cfg = load_config(None, ["model.max_length=auto", "sampling.max_new_tokens=auto"])
    resolved, lengths = resolve(cfg, texts, _Tok(), prefix_tokens=6, distribution={"16": 0.4, "32": 0.5, "256": 0.1},
                                context=4096)
    assert resolved.model.max_length == 6 + 256 and resolved.sampling.max_new_tokens == 256  # 90 % at 32 < 95 %
    assert lengths.truncated == 0 and lengths.summary().startswith("no text cut")
    cfg = load_config(None, ["model.max_length=auto", "sampling.max_new_tokens=auto", "model.length_percentile=90"])
    resolved, lengths = resolve(cfg, texts, _Tok(), prefix_tokens=6, distribution={"16": 0.4, "32": 0.5, "256": 0.1},
                                context=4096)
    assert resolved.model.max_length == 38 and lengths.truncated == 1 and lengths.texts == 3
    assert lengths.summary() == "33% of texts cut to 32 tokens (1 of 3)"
    whole = load_config(None, ["model.max_length=4096", "sampling.max_new_tokens=40"])
    resolved, lengths = resolve(whole, texts, _Tok(), prefix_tokens=6, distribution=None, context=4096)
    assert lengths.truncated == 0 and lengths.summary().startswith("no text cut") and lengths.source == "config"


def test_auto_lengths_are_capped_by_the_model_context():
    cfg = load_config(None, ["model.max_length=auto", "sampling.max_new_tokens=auto"])
    resolved, _ = resolve(cfg, ["w"], _Tok(), prefix_tokens=6, distribution={"4096": 1.0}, context=512)
    assert resolved.model.max_length == 512 and resolved.sampling.max_new_tokens == 506


def test_auto_new_tokens_never_exceed_the_texts_a_fixed_max_length_trained_on():
    # long documents cut to 128 tokens: the model never saw their ends, so sampling stops where training did
    cfg = load_config(None, ["model.max_length=128", "sampling.max_new_tokens=auto"])
    resolved, lengths = resolve(cfg, ["w " * 600], _Tok(), prefix_tokens=39, distribution={"2048": 1.0}, context=8192)
    assert resolved.model.max_length == 128 and resolved.sampling.max_new_tokens == 128 - 39 == lengths.text_tokens
    roomy = load_config(None, ["model.max_length=4096", "sampling.max_new_tokens=auto"])
    resolved, _ = resolve(roomy, ["w " * 10], _Tok(), prefix_tokens=39, distribution={"32": 1.0}, context=8192)
    assert resolved.sampling.max_new_tokens == 32  # the DP covering length where the cut is longer


def test_auto_needs_a_released_histogram():
    with pytest.raises(ValueError, match="released length histogram"):
        resolve(load_config(None, ["model.max_length=auto"]), ["w"], _Tok(), 6, None, 512)
