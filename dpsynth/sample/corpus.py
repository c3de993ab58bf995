"""Corpus bookkeeping shared by every engine: label counts, prompts, seeds, exact generation, serialisation.

Everything here is post-processing of the DP adapter (and the DP label histogram), so it
spends no privacy. It never reads the private data.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import yaml

from dpsynth.config import JobConfig, SamplingConfig
from dpsynth.errors import UserError
from dpsynth.interrupt import Interrupted
from dpsynth.io import atomic_write_text
from dpsynth.progress import progress_bar
from dpsynth.records import RecordSchema

from .engines import Engine, GenParams, prompt_ids

log = logging.getLogger(__name__)


def load_run_config(run_dir: Path) -> JobConfig:
    """The run's config: the owner's full copy when this is the owner's run directory, else the released one
    (local paths taken out: enough to sample and serve, which read nothing private)."""
    from dpsynth.release import owner_path

    path = owner_path(run_dir, "config.yaml")
    if not path.is_file():
        path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a dpsynth run directory (no config.yaml)")
    return JobConfig.model_validate(yaml.safe_load(path.read_text()))


def label_counts(labels: tuple[str, ...], proportions: dict[str, float], total: int) -> dict[str, int]:
    """Split `total` across labels by proportion, exactly (largest remainder)."""
    unknown = sorted(set(proportions) - set(labels))
    if unknown:
        raise UserError(f"sampling.label_proportions: unknown label(s) {', '.join(unknown)} (labels: {', '.join(labels)})")
    weights = {lab: float(proportions.get(lab, 0.0)) for lab in labels}
    norm = sum(weights.values())
    exact = {lab: total * w / norm for lab, w in weights.items()}
    counts = {lab: int(x) for lab, x in exact.items()}
    for lab in sorted(labels, key=lambda lab: exact[lab] - counts[lab], reverse=True)[: total - sum(counts.values())]:
        counts[lab] += 1
    return counts


def resolve_proportions(run_dir: Path, labels: tuple[str, ...], spec) -> dict[str, float]:
    if spec == "uniform":
        return {lab: 1.0 for lab in labels}
    if spec == "dp":
        path = Path(run_dir) / "label_distribution.json"
        if not path.is_file() and len(labels) == 1:  # unlabelled data: one cell, no mix was released
            return {labels[0]: 1.0}
        if not path.is_file():
            raise UserError(f"sampling.label_proportions: 'dp' needs {path}, written only by a run trained with label_proportions: dp")
        return json.loads(path.read_text())
    return dict(spec)


def jobs_for(counts: dict[str, int]) -> list[tuple[str, int]]:
    """One (label, index) job per example: the unit that is generated, retried and de-duplicated."""
    return [(label, i) for label, n in counts.items() for i in range(n)]


def example_seed(seed: int, label: str, index: int, attempt: int = 0) -> int:
    """Per-example sampling seed: the corpus depends on (seed, label, index), not on batching or replicas."""
    digest = hashlib.sha256(f"{seed}\x00{label}\x00{index}\x00{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _kept(row: dict) -> dict:
    """What a scratch row keeps: the text and label, and the job's index where the job has one (Ray Data)."""
    return {"text": row["text"], "label": row["label"], **({"index": int(row["index"])} if "index" in row else {})}


class PartialCorpus:
    """Owner-side scratch file of the candidates finished so far (JSONL), appended per batch with flush + fsync, so
    an interrupted sampling loses at most the batch it was in; the same sampling again continues from it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a batch cut short by a hard kill: drop it and everything after
                self.rows.append(_kept(row))
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))

    def append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(_kept(r), ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def accepts(schema: RecordSchema | None, text: str) -> bool:
    """Whether a generation is one record: non-empty, and with several text fields, one that parses into them
    (dpsynth.records). Anything else is redrawn (post-processing: it costs nothing)."""
    text = text.strip()
    return bool(text) and (schema is None or schema.parse(text) is not None)


def generate_corpus(engine: Engine, prompts: dict[str, str], counts: dict[str, int], params: SamplingConfig,
                    show_progress: bool = True, max_rounds: int = 20, *, partial: Path | None = None,
                    stop: Callable[[], int | None] | None = None, schema: RecordSchema | None = None,
                    stats: dict | None = None) -> list[dict]:
    """Exactly counts[label] examples per label; empty generations, and with `schema` ones that do not parse into
    its text fields, are redrawn (`stats`, when given, gets the `drawn` and `rejected` counts of this call).

    Each batch draws from its own seeds, `example_seed(params.seed, label, rows of that label so far, ...)`, so
    the corpus depends on the seed and the batch size only. With `partial` (an owner-side scratch path), finished
    batches are kept there and a second call with the same arguments continues after them: the same seeds, the same
    corpus as one uninterrupted call. `stop()` (e.g. graceful_stop's) is read between batches: a signal number stops
    the sampling there (`Interrupted`), with every finished batch kept.
    """
    scratch = PartialCorpus(partial) if partial is not None else None
    done: dict[str, list[dict]] = {lab: [] for lab in counts}
    for r in scratch.rows if scratch else []:
        if r["label"] in done and len(done[r["label"]]) < counts[r["label"]]:
            done[r["label"]].append(r)
    resumed, total = sum(len(v) for v in done.values()), sum(counts.values())
    if resumed:
        log.info("sampling resumes: %d of %d examples were kept in %s", resumed, total, partial)
    with progress_bar("sampling", total=total, enabled=show_progress, unit="tokens", completed=resumed,
                      log_every=30.0) as advance:
        for label, want in counts.items():
            rows, rounds, attempt = done[label], 0, 0
            ids = prompt_ids(engine.tok, prompts[label])
            while len(rows) < want:
                if stop is not None and (signum := stop()):
                    raise Interrupted(signum, f"sampling stopped after {sum(len(v) for v in done.values())} of {total} "
                                      "examples" + (f"; they are kept ({partial}): run the same command again to continue"
                                                    if scratch else ""))
                rounds += 1
                if rounds > max_rounds * (1 + want // params.batch_size):
                    raise RuntimeError(f"label '{label}': only {len(rows)}/{want} usable generations (non-empty"
                                       + (", parsing into the record's fields" if schema else "") + "); the adapter may be broken")
                n, got = min(params.batch_size, want - len(rows)), len(rows)
                gens = engine.generate_ids([ids] * n, GenParams.of(params),
                                           [example_seed(params.seed, label, got, attempt * params.batch_size + j) for j in range(n)])
                new = [{"text": g.text.strip(), "label": label} for g in gens if accepts(schema, g.text)]
                if stats is not None:
                    stats["drawn"] = stats.get("drawn", 0) + len(gens)
                    stats["rejected"] = stats.get("rejected", 0) + len(gens) - len(new)
                attempt = 0 if new else attempt + 1
                if scratch and new:
                    scratch.append(new)
                rows.extend(new)
                advance(label, len(new), sum(g.completion_tokens for g in gens))
    return [r for label in counts for r in done[label]]


async def stream_jobs(generate: Callable[[str, int], Awaitable[tuple[str, int]]], jobs: list[tuple[str, int]], seed: int,
                      *, max_attempts: int = 20, max_in_flight: int = 256, first_attempt: int = 0,
                      schema: RecordSchema | None = None) -> AsyncIterator[dict]:
    """Run every job concurrently (the engine batches them) and yield rows as they finish.

    `generate(label, seed) -> (text, completion_tokens)`. Empty texts are redrawn with the
    next attempt's seed, so each job yields exactly one non-empty row. `first_attempt`: the
    jobs' earlier attempts were drawn elsewhere (the server's chunked requests).
    """
    gate = asyncio.Semaphore(max_in_flight)

    async def run(label: str, index: int) -> dict:
        async with gate:
            tokens = 0
            for attempt in range(first_attempt, max_attempts):
                text, used = await generate(label, example_seed(seed, label, index, attempt))
                tokens += used
                if accepts(schema, text):
                    return {"text": text.strip(), "label": label, "index": index, "tokens": tokens}
        raise RuntimeError(f"label '{label}': {max_attempts} empty generations in a row; the adapter may be broken")

    tasks = [asyncio.ensure_future(run(label, index)) for label, index in jobs]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for t in tasks:
            t.cancel()  # a client that went away stops its generations (the engine aborts them)


SHORTHAND = RecordSchema(("text",), ("label",), shorthand=True)
CORPUS_FORMATS = ("jsonl", "csv", "parquet")


def serialize_bytes(rows: list[dict], fmt: str, schema: RecordSchema | None = None) -> bytes:
    """The corpus file's bytes: JSONL or CSV text (`serialize`), or Parquet with one string column per output column."""
    if fmt != "parquet":
        return serialize(rows, fmt, schema).encode()
    import pandas as pd

    schema = schema or SHORTHAND
    records = [schema.record(r["text"], r["label"]) for r in rows]
    if any(r is None for r in records):
        raise ValueError(f"a corpus row does not parse into the fields {', '.join(schema.text_columns)}")
    buf = io.BytesIO()
    pd.DataFrame(records, columns=list(schema.output_columns), dtype="string").to_parquet(buf, index=False)
    return buf.getvalue()


def serialize_row(row: dict, fmt: str, header: bool = False, schema: RecordSchema | None = None) -> str:
    """One corpus row as a JSONL line or CSV record (with the CSV header first when asked), in the record schema's
    columns (the user's own; `text`, `label` in the one-label shorthand)."""
    schema = schema or SHORTHAND
    record = schema.record(row["text"], row["label"])
    if record is None:
        raise ValueError(f"a corpus row does not parse into the fields {', '.join(schema.text_columns)}")
    if fmt == "jsonl":
        return json.dumps(record, ensure_ascii=False) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(schema.output_columns), extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerow(record)
    return buf.getvalue()


def serialize(rows: list[dict], fmt: str, schema: RecordSchema | None = None) -> str:
    schema = schema or SHORTHAND
    if fmt == "jsonl":
        return "".join(serialize_row(r, fmt, schema=schema) for r in rows)
    if not rows:
        return ",".join(schema.output_columns) + "\r\n"
    return "".join(serialize_row(r, fmt, header=i == 0, schema=schema) for i, r in enumerate(rows))
