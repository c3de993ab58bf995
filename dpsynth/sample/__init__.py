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
from dpsynth.errors import UserError
from dpsynth.interrupt import graceful_stop
from dpsynth.privacy.certificate import CorpusBlock, now, read_certificate
from dpsynth.records import RecordSchema
from dpsynth.release import Release, post_processing

from .corpus import generate_corpus, label_counts, load_run_config, resolve_proportions, serialize, serialize_bytes
from .engines import TransformersEngine, choose_engine
from .fields import FieldByField

__all__ = ["TransformersEngine", "generate_corpus", "label_counts", "load_run_config", "resolve_proportions", "sample",
           "serialize"]

log = logging.getLogger(__name__)

CANDIDATES = "synthetic.candidates.jsonl"
"""Every candidate label sharpening scored, kept or not (post-processing too): what the evaluation measures it by."""


def with_base(model_cfg, base: str, cert, key: str = "--base"):
    """model_cfg with `base` as the base model, refused unless its weights are the ones the certificate names."""
    from dpsynth.models import resolve_base, weights_digest

    digest = weights_digest(resolve_base(base))
    if cert.base_model.sha256 is not None and digest != cert.base_model.sha256:
        raise UserError(f"{key}: {base} is not the base model this adapter was trained on ('{cert.base_model.name}', "
                        "sha256 differs)")
    return model_cfg.model_copy(update={"base": base})


def sample(run_dir: Path, params: SamplingConfig | None = None, *, show_progress: bool = True,
           base: str | None = None) -> Path:
    """Write `synthetic.{jsonl,csv}` and its certificate into run_dir; return the corpus path.

    With `keep_rate` < 1, ceil(n / keep_rate) candidates are generated per label and the n the adapter itself
    reads most clearly as their label are kept (label sharpening, sharpen.py); every candidate, with its
    margin, goes to `synthetic.candidates.jsonl` so the evaluation can measure what sharpening bought.

    The transformers engine shows tokens/s and an ETA, and keeps every finished batch in an owner-side scratch file
    (`owner/sampling/<key>.partial.jsonl`, `partial_path`): after Ctrl-C (or SIGTERM, or a crash) the same command
    continues where it stopped, with the seeds an uninterrupted run would have used (each batch's seed derives from
    `seed`, the label and the rows already made), and the scratch file is deleted once the corpus is released.
    """
    from dpsynth.models import load_adapter, load_tokenizer
    from dpsynth.prompts import label_prompts

    from .sharpen import candidates_needed, sharpen

    run_dir = Path(run_dir)
    cert = read_certificate(run_dir / "certificate.json")  # only certified adapters are sampled
    if cert.generator == "in_context":
        raise UserError(f"{run_dir}: an in-context (training-free) run has no adapter to sample for free; every new "
                        "example costs privacy: run `dpsynth generate` again with a new output directory")
    cfg = load_run_config(run_dir)
    if base is not None:  # an exported run names a local base model by its name only: say where it is here
        cfg = cfg.model_copy(update={"model": with_base(cfg.model, base, cert)})
    params = params or cfg.sampling
    if params.max_new_tokens == "auto":  # the run resolved it from its DP length histogram (config.yaml)
        if cfg.sampling.max_new_tokens == "auto":
            raise UserError(f"sampling.max_new_tokens: run {run_dir} resolved no lengths from its data; give a number")
        params = params.model_copy(update={"max_new_tokens": cfg.sampling.max_new_tokens})
    labels = tuple(sorted(json.loads((run_dir / "labels.json").read_text())))
    if len(labels) == 1 and params.keep_rate < 1:  # unlabelled data: one prompt, no label to sharpen
        params = params.model_copy(update={"keep_rate": 1.0})
    proportions = resolve_proportions(run_dir, labels, params.label_proportions)
    # Sampling reads only released files: the adapter (and the DP label mix), so the corpus is post-processing.
    release = Release(run_dir, cert)
    mixed = params.label_proportions == "dp" and (run_dir / "label_distribution.json").is_file()
    made_from = post_processing("adapter", *(["label_distribution.json"] if mixed else []))
    counts = label_counts(labels, proportions, params.num_examples)
    wanted = {lab: candidates_needed(n, params.keep_rate) for lab, n in counts.items()}
    prompts = label_prompts(cfg, load_tokenizer(cfg.model), cert.dataset.name, labels)
    schema = RecordSchema.of(cfg.data)
    stats: dict = {}
    engine = choose_engine(params.engine)
    log.info("sampling %d examples with the %s engine: %s%s", params.num_examples, engine, counts,
             f" (label sharpening: {sum(wanted.values())} candidates, keep rate {params.keep_rate:g})"
             if params.keep_rate < 1 else "")
    model = tok = None
    partial = partial_path(run_dir, cfg, prompts, wanted, params)  # its key names the engine too
    if engine == "vllm":
        import dataclasses

        from .adapters import read_adapter
        from .batch import sample_ray_data

        adapter = dataclasses.replace(read_adapter(run_dir), model=cfg.model)  # with --base where it was given
        with graceful_stop() as stopped:  # Ctrl-C / SIGTERM: stop there, keep what is finished
            rows = sample_ray_data(adapter, wanted, params, show_progress=show_progress, schema=schema, stats=stats,
                                   partial=partial, stop=stopped)
    else:
        torch.manual_seed(params.seed)
        model, tok = load_adapter(run_dir, cfg.model)
        with graceful_stop() as stopped:  # Ctrl-C / SIGTERM: stop after the batch, keep what is finished
            rows = generate_corpus(FieldByField(TransformersEngine(model, tok), schema), prompts, wanted, params, show_progress,
                                   partial=partial, stop=stopped, schema=schema, stats=stats)
    sharpening = None
    if params.keep_rate < 1:
        if model is None:
            model, tok = load_adapter(run_dir, cfg.model)
        candidates = rows
        rows, sharpening = sharpen(model, tok, candidates, counts, prompts, proportions, cfg.model.max_length)
        release.share_text(CANDIDATES, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in candidates), made_from)
        log.info("label sharpening kept %d of %d candidates; the adapter agreed with %.0f%% of the labels",
                 len(rows), len(candidates), 100 * sharpening["adapter_agrees"])
    records = None
    if not schema.shorthand:  # a record schema: every row parsed into the user's columns; what was redrawn
        drawn = stats.get("drawn", 0)
        records = {"columns": list(schema.output_columns), "drawn": drawn, "rejected": stats.get("rejected", 0),
                   "rejection_rate": stats.get("rejected", 0) / drawn if drawn else 0.0}
        log.info("records: %d of %d generations did not parse into %s and were redrawn", records["rejected"], drawn,
                 ", ".join(schema.text_columns))
    body = serialize_bytes(rows, params.format, schema)
    corpus = release.share_bytes(f"synthetic.{params.format}", body, made_from)
    release.share_certificate(f"synthetic.{params.format}.certificate.json", cert.with_corpus(CorpusBlock(
        file=corpus.name, sha256=hashlib.sha256(body).hexdigest(), examples=len(rows), label_counts=counts,
        engine=engine, sampling=params.model_dump(mode="json"), sharpening=sharpening, created=now(),
        candidates_file=CANDIDATES if sharpening is not None else None, records=records)))
    release.commit(with_certificate=False)  # the manifest now lists the corpus; the run's certificate is unchanged
    partial.unlink(missing_ok=True)  # the scratch of finished batches: the corpus is released, it is done
    return corpus


def partial_path(run_dir: Path, cfg, prompts: dict[str, str], wanted: dict[str, int], params: SamplingConfig) -> Path:
    """The owner-side scratch file of an unfinished sampling (`generate_corpus(partial=...)`), named by everything
    the candidates depend on: the certificate (hence the adapter), the base, the prompts, the counts and the sampling
    settings. The same `dpsynth sample` / `dpsynth run` again continues from it; other settings start afresh."""
    from dpsynth.release import owner_path

    key = json.dumps({"certificate": hashlib.sha256((Path(run_dir) / "certificate.json").read_bytes()).hexdigest(),
                      "base": cfg.model.base, "prompts": prompts, "wanted": wanted,
                      "sampling": params.model_dump(mode="json", exclude={"format"})}, sort_keys=True)
    return owner_path(run_dir, f"sampling/{hashlib.sha256(key.encode()).hexdigest()[:16]}.partial.jsonl")
