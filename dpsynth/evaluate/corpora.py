"""Reading certified synthetic corpora, and the zero-shot corpus (baseline (d))."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from dpsynth.config import SamplingConfig
from dpsynth.data import Example
from dpsynth.errors import UserError
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.records import RecordSchema
from dpsynth.sample.corpus import CORPUS_FORMATS, SHORTHAND

log = logging.getLogger(__name__)


def read_corpus(path: Path, schema: RecordSchema | None = None) -> list[Example]:
    """A corpus file as (training text, cell) examples: `schema` names its columns (dpsynth.records; the one-label
    shorthand's `text`, `label` by default, which is also how candidate and zero-shot files are kept)."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".jsonl":
        df = pd.read_json(path, lines=True, dtype=False)
    else:
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    if len(df) == 0:
        return []
    schema = schema or SHORTHAND
    return [Example(*schema.from_record(row)) for row in df.to_dict("records")]


def find_corpus(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    for fmt in CORPUS_FORMATS:
        if (run_dir / f"synthetic.{fmt}.certificate.json").is_file():
            return run_dir / f"synthetic.{fmt}"
    raise UserError(f"{run_dir}: no certified synthetic corpus (run `dpsynth sample {run_dir}` first)")


def split_counts(labels: list[str], total: int) -> dict[str, int]:
    base, extra = divmod(total, len(labels))
    return {lab: base + (i < extra) for i, lab in enumerate(labels)}


def zero_shot_corpus(path: Path, model_cfg, dataset: str, labels: list[str], n: int, prompt: str | None,
                     params: SamplingConfig, show_progress: bool = False, description: str | None = None,
                     schema: RecordSchema | None = None, stop=None) -> list[Example]:
    """`n` texts (uniform over labels) from the public base model with no adapter (Kurakin et al. 2023's floor),
    through the same generation and label sharpening as the DP corpus, the base model doing the scoring. `prompt`:
    a template with {dataset} and {label}; None = the run's own Prefix-LM prefix. No private data is read, only
    the dataset name and label names (public, as for the generator). Cached at `path` with the settings that
    made it; while it is made, finished batches are kept beside it (keyed by those settings), so an interrupted
    evaluation continues it (`stop`: as generate_corpus's)."""
    from dpsynth.data import format_prefix
    from dpsynth.models import load_base
    from dpsynth.sample import TransformersEngine, generate_corpus
    from dpsynth.sample.sharpen import candidates_needed, sharpen

    from dpsynth.prompts import render

    template = prompt or model_cfg.model_dump(mode="json")
    meta = {"base": model_cfg.base, "dataset": dataset, "labels": labels, "n": n, "prompt": template, "description": description,
            "sampling": params.model_dump(mode="json")}
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return read_corpus(path)
    model, tok, _ = load_base(model_cfg)
    model.eval().requires_grad_(False)  # nothing here trains; a frozen head lets sharpening score from the prompt's cache
    torch.manual_seed(params.seed)
    prompts = {lab: format_prefix(prompt, dataset, lab) if prompt else  # the run's own conditioning prompt by default
               render(model_cfg, tok, dataset=dataset, conditions=(schema or SHORTHAND).conditions(lab),
                      description=description) for lab in labels}
    counts = split_counts(labels, n)
    log.info("zero-shot corpus: %d texts from the base model, no adapter", n)
    from dpsynth.sample.fields import FieldByField

    engine = TransformersEngine(model, tok) if schema is None else FieldByField(TransformersEngine(model, tok), schema)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    partial = path.with_name(f"{path.stem}.{key}.partial.jsonl")
    rows = generate_corpus(engine, prompts,
                           {lab: candidates_needed(c, params.keep_rate) for lab, c in counts.items()}, params, show_progress,
                           schema=schema, partial=partial, stop=stop)
    if params.keep_rate < 1:
        rows, _ = sharpen(model, tok, rows, counts, prompts, {lab: 1.0 for lab in labels}, model_cfg.max_length)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(meta_path, meta)
    for stale in path.parent.glob(f"{path.stem}.*.partial.jsonl"):  # this one, and any left by other settings
        stale.unlink(missing_ok=True)
    return [Example(r["text"], r["label"]) for r in rows]
