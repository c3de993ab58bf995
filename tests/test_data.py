"""Data loading: bundled corpora, user files, dedupe, seeded splits, fingerprints, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dpsynth.config import DataConfig
from dpsynth.data import DataError, Example, dedupe, fingerprint, format_prefix, prepare

from conftest import TEST_SECRET, make_rows


def test_bundled_rotten_tomatoes_drops_plot_and_splits_disjointly():
    s = prepare(DataConfig(), TEST_SECRET)
    assert s.labels == ("fresh", "rotten")
    total = len(s.train) + len(s.validation) + len(s.test)
    assert total == s.dataset_size and 12_000 < total <= 12_808
    texts = [set(ex.text for ex in part) for part in (s.train, s.validation, s.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert abs(len(s.test) - 0.1 * total) <= 0.02 * total  # each unit's split is its own keyed draw


def test_bundled_tweets_have_three_labels():
    s = prepare(DataConfig(source="tweets", subset_fraction=0.08), TEST_SECRET)
    assert s.labels == ("negative", "neutral", "positive")
    assert abs(len(s.train) + len(s.validation) + len(s.test) - 0.08 * s.dataset_size) <= 300  # keyed Bernoulli subset
    assert s.dataset_size > 30_000  # fingerprint and delta refer to the whole dataset, not the subset


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_user_files_in_every_format(tmp_path, fmt):
    df = pd.DataFrame(make_rows(50))
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    s = prepare(DataConfig(source=str(path), text_column="review", label_column="sentiment"), TEST_SECRET)
    assert s.name == "d" and s.labels == ("neg", "pos") and s.dataset_size == 50


def test_split_is_seeded_and_fingerprint_is_content_only(jsonl_dataset):
    cfg = DataConfig(source=str(jsonl_dataset), text_column="review", label_column="sentiment")
    a, b = prepare(cfg, TEST_SECRET), prepare(cfg, TEST_SECRET)
    c = prepare(cfg.model_copy(update={"seed": 1}), TEST_SECRET)
    assert a.train == b.train and a.train != c.train
    assert a.fingerprint == c.fingerprint  # reseeding the split does not make a new dataset (one budget)
    assert prepare(cfg.model_copy(update={"subset_fraction": 0.5}), TEST_SECRET).fingerprint == a.fingerprint
    assert prepare(cfg, b"o" * 32).fingerprint != a.fingerprint  # keyed by the owner's secret
    shuffled = list(reversed(a.train + a.validation + a.test))
    assert fingerprint(shuffled, TEST_SECRET) == a.fingerprint
    assert fingerprint(shuffled[1:], TEST_SECRET) != a.fingerprint
    assert fingerprint([Example("x", "pos")], TEST_SECRET) != fingerprint([Example("x", "neg")], TEST_SECRET)


def test_dedupe_drops_repeated_records_but_keeps_a_text_under_each_label():
    """An added record can never flip another's label: a text under two labels stays twice (one unit, its text's)."""
    rows = [Example("a", "pos"), Example("b", "neg"), Example("a", "neg"), Example("a", "pos")]
    assert dedupe(rows) == [Example("a", "pos"), Example("b", "neg"), Example("a", "neg")]


def test_a_text_under_two_labels_is_one_unit_and_declared_labels_filter(tmp_path, secret):
    path = tmp_path / "d.jsonl"
    rows = [{"t": f"text number {i} here", "y": "pos" if i % 2 else "neg"} for i in range(60)]
    rows += [{"t": "text number 3 here", "y": "neg"}, {"t": "a secret one", "y": "rare"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = DataConfig(source=str(path), text_column="t", label_column="y", near_duplicates="keep", test_fraction=0.2)
    s = prepare(base, secret)
    both = [ex for ex in s.train + s.validation + s.test if ex.text == "text number 3 here"]
    assert sorted(ex.label for ex in both) == ["neg", "pos"] and len({ex.unit for ex in both}) == 1
    assert "rare" in s.labels  # undeclared: the labels found are the label set
    declared = prepare(base.model_copy(update={"labels": ("neg", "pos")}), secret)
    assert declared.labels == ("neg", "pos") and all(ex.label != "rare" for ex in declared.train + declared.test)
    assert declared.fingerprint == s.fingerprint  # one dataset, one budget, whatever label set is declared


def test_missing_file_column_and_empty(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        prepare(DataConfig(source=str(tmp_path / "nope.csv")), TEST_SECRET)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"review": "x", "sentiment": "pos"}) + "\n")
    with pytest.raises(DataError, match=r"data\.text_column: column 'text' not in .*columns: review, sentiment"):
        prepare(DataConfig(source=str(path)), TEST_SECRET)
    with pytest.raises(DataError, match=r"data\.label_column"):
        prepare(DataConfig(source=str(path), text_column="review", label_column="stars"), TEST_SECRET)
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n  ,pos\n")
    with pytest.raises(DataError, match="no usable"):
        prepare(DataConfig(source=str(empty)), TEST_SECRET)
    doc = tmp_path / "d.docx"
    doc.write_text("hello")
    with pytest.raises(DataError, match=r"must be \.csv, \.jsonl, \.parquet or \.txt"):
        prepare(DataConfig(source=str(doc)), TEST_SECRET)


def test_prefix_names_dataset_and_label():
    assert format_prefix("[{dataset}][{label}]: ", "rotten_tomatoes", "fresh") == "[rotten_tomatoes][fresh]: "


# ---------------------------------------------------------------- privacy units and near-duplicates


def _people(tmp_path, people: int = 40, per_person: int = 5):
    rows = [{"note": f"visit {k} for patient {p}: " + " ".join(r["review"].split()[:6]), "dx": r["sentiment"],
             "patient_id": f"p{p}"}
            for p in range(people) for k, r in enumerate(make_rows(per_person, seed=p))]
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(source=str(path), text_column="note", label_column="dx", unit_column="patient_id")


def test_no_unit_appears_in_two_splits(tmp_path):
    s = prepare(_people(tmp_path), TEST_SECRET)
    assert s.unit == "patient_id" and s.units == 40 and s.dataset_size == 200
    parts = [{ex.unit for ex in part} for part in (s.train, s.validation, s.test)]
    assert parts[0] and parts[1] and parts[2]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert all(len(u) == 5 for u in s.train_units())  # every record of a unit stays with it
    assert sum(map(len, parts)) == 40


def test_the_accountants_n_is_the_number_of_units(tmp_path):
    from dpsynth.data import dataset_block
    from dpsynth.config import PrivacyConfig
    from dpsynth.errors import UserError
    from dpsynth.privacy.ledger import Budget
    from dpsynth.privacy.run import default_delta, resolve_delta

    s = prepare(_people(tmp_path), TEST_SECRET)
    block = dataset_block(s)
    assert block.unit == "patient_id" and block.units == 40 and s.dataset_size == 200
    assert not {"records", "train_records"} & set(block.model_dump())  # exact record counts stay with the owner
    assert block.train_units == len({ex.unit for ex in s.train}) < len(s.train)
    assert resolve_delta(PrivacyConfig(), block, None) == default_delta(40)
    with pytest.raises(UserError, match="held per record"):  # a person-level run on a record-level budget
        resolve_delta(PrivacyConfig(), block, Budget(8.0, 1e-5, "record"))


def test_a_missing_unit_column_is_named(tmp_path):
    cfg = _people(tmp_path).model_copy(update={"unit_column": "person"})
    with pytest.raises(DataError, match=r"data\.unit_column: column 'person' not in"):
        prepare(cfg, TEST_SECRET)


def test_near_duplicates_are_found_where_exact_dedupe_misses_them(tmp_path):
    from dpsynth.near_duplicates import clusters

    story = ("the city council voted on tuesday to approve a new budget for the public library after months of "
             "debate about opening hours staff numbers and the cost of repairs to the old building downtown")
    edited = story.replace("tuesday", "wednesday").replace("months", "weeks").replace("old", "historic")
    others = [" ".join(r["review"].split()) for r in make_rows(30, seed=3)]
    texts = [story, *others, edited]
    assert dedupe([Example(t, "news") for t in texts]) == [Example(t, "news") for t in texts]  # exact dedupe keeps both
    assert clusters(texts, 0.5) == [[0, len(texts) - 1]]
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": "a" if i % 2 else "b"}) + "\n" for i, t in enumerate(texts)))
    from dpsynth.near_duplicates import band_key, band_rows

    # A record's key is its own first MinHash (band_rows(0.5) == 1): this pair (Jaccard ~0.56) shares it with
    # probability ~0.56; under data.seed 1 it does
    assert band_rows(0.5) == 1 and band_key(story, 1, seed=1) == band_key(edited, 1, seed=1)
    grouped = prepare(DataConfig(source=str(path), near_duplicate_threshold=0.5, test_fraction=0.2, seed=1), TEST_SECRET)
    units = {ex.text: ex.unit for part in (grouped.train, grouped.validation, grouped.test) for ex in part}
    assert units[story] == units[edited] and grouped.unit == "record+near-duplicates"
    assert grouped.units < len(texts) and grouped.near_duplicates["clusters"] >= 1
    in_test = {ex.text for ex in grouped.test}
    assert (story in in_test) == (edited in in_test)  # a copy never lands on the other side of the split
    dropped = prepare(DataConfig(source=str(path), near_duplicate_threshold=0.5, near_duplicates="drop", seed=1),
                      TEST_SECRET)
    kept_texts = {ex.text for part in (dropped.train, dropped.validation, dropped.test) for ex in part}
    assert dropped.units == len(kept_texts) == len(texts) - dropped.near_duplicates["dropped"] < len(texts)
    assert (story in kept_texts) != (edited in kept_texts)
    kept = prepare(DataConfig(source=str(path), near_duplicate_threshold=0.5, near_duplicates="keep", seed=1),
                   TEST_SECRET)
    assert kept.units == len(texts) and kept.unit == "record"
