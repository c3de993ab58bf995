"""Data loading: bundled corpora, user files, dedupe, seeded splits, fingerprints, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dpsynth.config import DataConfig
from dpsynth.data import DataError, Example, dedupe, fingerprint, format_prefix, prepare

from conftest import make_rows


def test_bundled_rotten_tomatoes_drops_plot_and_splits_disjointly():
    s = prepare(DataConfig())
    assert s.labels == ("fresh", "rotten")
    total = len(s.train) + len(s.validation) + len(s.test)
    assert total == s.dataset_size and 12_000 < total <= 12_808
    texts = [set(ex.text for ex in part) for part in (s.train, s.validation, s.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert abs(len(s.test) - 0.1 * total) <= 1


def test_bundled_tweets_have_three_labels():
    s = prepare(DataConfig(source="tweets", max_examples=3000))
    assert s.labels == ("negative", "neutral", "positive")
    assert len(s.train) + len(s.validation) + len(s.test) == 3000
    assert s.dataset_size > 30_000  # fingerprint and delta refer to the whole dataset, not the subset


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_user_files_in_every_format(tmp_path, fmt):
    df = pd.DataFrame(make_rows(50))
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    s = prepare(DataConfig(source=str(path), text_column="review", label_column="sentiment"))
    assert s.name == "d" and s.labels == ("neg", "pos") and s.dataset_size == 50


def test_split_is_seeded_and_fingerprint_is_content_only(jsonl_dataset):
    cfg = DataConfig(source=str(jsonl_dataset), text_column="review", label_column="sentiment")
    a, b = prepare(cfg), prepare(cfg)
    c = prepare(cfg.model_copy(update={"seed": 1}))
    assert a.train == b.train and a.train != c.train
    assert a.fingerprint == c.fingerprint  # reseeding the split does not make a new dataset (one budget)
    assert prepare(cfg.model_copy(update={"max_examples": 100})).fingerprint == a.fingerprint
    shuffled = list(reversed(a.train + a.validation + a.test))
    assert fingerprint(shuffled) == a.fingerprint
    assert fingerprint(shuffled[1:]) != a.fingerprint
    assert fingerprint([Example("x", "pos")]) != fingerprint([Example("x", "neg")])


def test_dedupe_keeps_first_occurrence():
    rows = [Example("a", "pos"), Example("b", "neg"), Example("a", "neg")]
    assert dedupe(rows) == [Example("a", "pos"), Example("b", "neg")]


def test_missing_file_column_and_empty(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        prepare(DataConfig(source=str(tmp_path / "nope.csv")))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"review": "x", "sentiment": "pos"}) + "\n")
    with pytest.raises(DataError, match=r"data\.text_column: column 'text' not in .*columns: review, sentiment"):
        prepare(DataConfig(source=str(path)))
    with pytest.raises(DataError, match=r"data\.label_column"):
        prepare(DataConfig(source=str(path), text_column="review", label_column="stars"))
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n  ,pos\n")
    with pytest.raises(DataError, match="no usable"):
        prepare(DataConfig(source=str(empty)))
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match=r"\.csv, \.jsonl or \.parquet"):
        prepare(DataConfig(source=str(txt)))


def test_prefix_names_dataset_and_label():
    assert format_prefix("[{dataset}][{label}]: ", "rotten_tomatoes", "fresh") == "[rotten_tomatoes][fresh]: "
