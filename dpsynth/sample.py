"""Label-conditioned sampling of a synthetic corpus from a certified adapter.

Everything here is post-processing of the DP adapter (and the DP label histogram), so it
spends no privacy. It never reads the private data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

import torch
import yaml

from dpsynth.config import JobConfig, SamplingConfig
from dpsynth.data import format_prefix
from dpsynth.errors import UserError
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.models import load_adapter
from dpsynth.privacy.certificate import now, read_certificate
from dpsynth.progress import progress_bar

log = logging.getLogger(__name__)


def load_run_config(run_dir: Path) -> JobConfig:
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
        if not path.is_file():
            raise UserError(f"sampling.label_proportions: 'dp' needs {path}, written only by a run trained with label_proportions: dp")
        return json.loads(path.read_text())
    return dict(spec)


class TransformersEngine:
    """Batched `generate` with HF transformers: the engine that runs everywhere."""

    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer

    @torch.inference_mode()
    def generate(self, prompt: str, n: int, params: SamplingConfig) -> list[str]:
        ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids.repeat(n, 1)
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=params.temperature,
            top_p=params.top_p, max_new_tokens=params.max_new_tokens, pad_token_id=self.tok.pad_token_id,
            eos_token_id=self.tok.eos_token_id,
        )
        return [t.strip() for t in self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def generate_corpus(engine, prompts: dict[str, str], counts: dict[str, int], params: SamplingConfig,
                    show_progress: bool = True, max_rounds: int = 20) -> list[dict]:
    """Exactly counts[label] non-empty examples per label; empty generations are redrawn."""
    rows: list[dict] = []
    with progress_bar("sampling", total=sum(counts.values()), enabled=show_progress) as advance:
        for label, want in counts.items():
            got, rounds = 0, 0
            while got < want:
                rounds += 1
                if rounds > max_rounds * (1 + want // params.batch_size):
                    raise RuntimeError(f"label '{label}': only {got}/{want} non-empty generations; the adapter may be broken")
                texts = [t for t in engine.generate(prompts[label], min(params.batch_size, want - got), params) if t]
                rows.extend({"text": t, "label": label} for t in texts)
                got += len(texts)
                advance(label, len(texts))
    return rows


def serialize(rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["text", "label"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def sample(run_dir: Path, params: SamplingConfig | None = None, *, show_progress: bool = True) -> Path:
    """Write `synthetic.{jsonl,csv}` and its certificate into run_dir; return the corpus path."""
    run_dir = Path(run_dir)
    cert = read_certificate(run_dir / "certificate.json")  # only certified adapters are sampled
    cfg = load_run_config(run_dir)
    params = params or cfg.sampling
    labels = tuple(sorted(json.loads((run_dir / "labels.json").read_text())))
    counts = label_counts(labels, resolve_proportions(run_dir, labels, params.label_proportions), params.num_examples)
    torch.manual_seed(params.seed)
    model, tok = load_adapter(run_dir, cfg.model)
    engine = TransformersEngine(model, tok)
    log.info("sampling %d examples with the %s engine: %s", params.num_examples, engine.name, counts)
    prompts = {lab: format_prefix(cfg.model.prefix_template, cert["dataset"]["name"], lab) for lab in labels}
    rows = generate_corpus(engine, prompts, counts, params, show_progress)
    body = serialize(rows, params.format)
    corpus = run_dir / f"synthetic.{params.format}"
    atomic_write_text(corpus, body)
    atomic_write_json(run_dir / f"synthetic.{params.format}.certificate.json", {
        **cert, "corpus": {"file": corpus.name, "sha256": hashlib.sha256(body.encode()).hexdigest(), "examples": len(rows),
                           "label_counts": counts, "engine": engine.name, "sampling": params.model_dump(mode="json"),
                           "created": now()},
    })
    return corpus
