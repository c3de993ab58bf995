"""Label-conditioned sampling of a synthetic corpus from a certified adapter.

Everything here is post-processing of the DP adapter (and the DP label histogram), so it
spends no privacy. It never reads the private data. Engines: `transformers` (everywhere)
or `vllm` (a Ray Data batch job of vLLM engine actors); the choice is explicit and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from dpsynth.config import SamplingConfig
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.privacy.certificate import now, read_certificate

from .corpus import generate_corpus, label_counts, load_run_config, resolve_proportions, serialize
from .engines import TransformersEngine, choose_engine

__all__ = ["TransformersEngine", "generate_corpus", "label_counts", "load_run_config", "resolve_proportions", "sample",
           "serialize"]

log = logging.getLogger(__name__)


def sample(run_dir: Path, params: SamplingConfig | None = None, *, show_progress: bool = True) -> Path:
    """Write `synthetic.{jsonl,csv}` and its certificate into run_dir; return the corpus path."""
    run_dir = Path(run_dir)
    cert = read_certificate(run_dir / "certificate.json")  # only certified adapters are sampled
    if cert.get("generator") == "in_context":
        from dpsynth.errors import UserError

        raise UserError(f"{run_dir}: an in-context (training-free) run has no adapter to sample for free; every new "
                        "example costs privacy: run `dpsynth generate` again with a new output directory")
    cfg = load_run_config(run_dir)
    params = params or cfg.sampling
    labels = tuple(sorted(json.loads((run_dir / "labels.json").read_text())))
    counts = label_counts(labels, resolve_proportions(run_dir, labels, params.label_proportions), params.num_examples)
    engine = choose_engine(params.engine)
    log.info("sampling %d examples with the %s engine: %s", params.num_examples, engine, counts)
    if engine == "vllm":
        from .adapters import read_adapter
        from .batch import sample_ray_data

        rows = sample_ray_data(read_adapter(run_dir), counts, params, show_progress=show_progress)
    else:
        from dpsynth.data import format_prefix
        from dpsynth.models import load_adapter

        torch.manual_seed(params.seed)
        model, tok = load_adapter(run_dir, cfg.model)
        prompts = {lab: format_prefix(cfg.model.prefix_template, cert["dataset"]["name"], lab) for lab in labels}
        rows = generate_corpus(TransformersEngine(model, tok), prompts, counts, params, show_progress)
    body = serialize(rows, params.format)
    corpus = run_dir / f"synthetic.{params.format}"
    atomic_write_text(corpus, body)
    atomic_write_json(run_dir / f"synthetic.{params.format}.certificate.json", {
        **cert, "corpus": {"file": corpus.name, "sha256": hashlib.sha256(body.encode()).hexdigest(), "examples": len(rows),
                           "label_counts": counts, "engine": engine, "sampling": params.model_dump(mode="json"),
                           "created": now()},
    })
    return corpus
