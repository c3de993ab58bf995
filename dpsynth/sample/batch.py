"""Bulk sampling as a Ray Data batch job: vLLM engine actors in `map_batches`, across the cluster.

Each (label, index) job carries its own seed, so the corpus does not depend on how Ray
splits the jobs into batches or over how many engine actors.
"""

from __future__ import annotations

import logging
import os
import time

from dpsynth.config import SamplingConfig

from .adapters import CertifiedAdapter, merged_model_dir
from .corpus import accepts, example_seed, jobs_for
from .engines import GenParams, prompt_ids

log = logging.getLogger(__name__)


class VLLMBatchSampler:
    """A Ray Data actor holding one offline vLLM engine; turns batches of jobs into rows."""

    def __init__(self, model_dir: str, tokenizer_dir: str, lora: tuple[str, str, int] | None, prompts: dict[str, str],
                 params: GenParams, seed: int, dtype: str, max_model_len: int, max_num_seqs: int, max_attempts: int = 20,
                 schema=None):
        from transformers import AutoTokenizer

        from .engines import VLLMEngine

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        from .fields import FieldByField

        engine = VLLMEngine(model_dir, tok, lora=lora, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
        self.engine = FieldByField(engine, schema) if schema is not None else engine
        self.prompt_ids = {lab: prompt_ids(tok, p) for lab, p in prompts.items()}
        self.params, self.seed, self.max_attempts, self.schema = params, seed, max_attempts, schema

    def __call__(self, batch: dict) -> dict:
        labels, index = [str(x) for x in batch["label"]], [int(x) for x in batch["index"]]
        texts, tokens, drawn = [""] * len(labels), [0] * len(labels), [0] * len(labels)
        todo = list(range(len(labels)))
        for attempt in range(self.max_attempts):
            gens = self.engine.generate_ids([self.prompt_ids[labels[i]] for i in todo], self.params,
                                            [example_seed(self.seed, labels[i], index[i], attempt) for i in todo])
            for i, g in zip(todo, gens):
                texts[i], tokens[i], drawn[i] = g.text.strip(), tokens[i] + g.completion_tokens, drawn[i] + 1
            todo = [i for i in todo if not accepts(self.schema, texts[i])]
            if not todo:
                return {"label": labels, "index": index, "text": texts, "tokens": tokens, "drawn": drawn}
        raise RuntimeError(f"{len(todo)} jobs gave {self.max_attempts} unusable generations in a row (empty, or not "
                           "parsing into the record's fields); the adapter may be broken")


def _init_ray():
    import ray

    if ray.is_initialized():
        return False
    # "local" unless a cluster is named: never join some other Ray instance on this machine by accident.
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    return True


def sample_ray_data(adapter: CertifiedAdapter, counts: dict[str, int], params: SamplingConfig, *,
                    show_progress: bool = True, schema=None, stats: dict | None = None) -> list[dict]:
    """Exactly counts[label] rows per label, ordered by label then index."""
    import ray

    from dpsynth.models import cache_dir, resolve_base

    if params.merge_lora:
        model_dir, lora = str(merged_model_dir(adapter, cache_dir())), None
    else:
        model_dir, lora = resolve_base(adapter.model.base), (adapter.name, str(adapter.adapter_dir), adapter.rank)
    started = _init_ray()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = show_progress
        gpus = 1 if ray.cluster_resources().get("GPU") else 0
        jobs = jobs_for(counts)
        fields = len(schema.text_columns) if schema is not None else 1  # written field by field (fields.py)
        ds = ray.data.from_items([{"label": lab, "index": i} for lab, i in jobs])
        kwargs = dict(model_dir=model_dir, tokenizer_dir=str(adapter.adapter_dir), lora=lora, prompts=adapter.prompts,
                      params=GenParams.of(params), seed=params.seed, dtype=adapter.model.dtype,
                      max_model_len=adapter.model.max_length + params.max_new_tokens * fields + 16, max_num_seqs=params.batch_size,
                      schema=schema)
        log.info("Ray Data batch job: %d jobs, %d vLLM engine actor(s), %s", len(jobs), params.replicas,
                 "merged weights" if lora is None else "LoRA")
        out = ds.map_batches(VLLMBatchSampler, fn_constructor_kwargs=kwargs, batch_size=params.batch_size,
                             concurrency=params.replicas, num_cpus=1, num_gpus=gpus)
        t0 = time.monotonic()
        rows = out.take_all()
        took = time.monotonic() - t0
        log.info("Ray Data batch job: %d rows, %d tokens in %.0f s (%.0f tokens/s, engine start-up included)", len(rows),
                 sum(int(r["tokens"]) for r in rows), took, sum(int(r["tokens"]) for r in rows) / max(took, 1e-9))
    finally:
        if started:
            ray.shutdown()
    if stats is not None:
        stats["drawn"] = sum(int(r["drawn"]) for r in rows)
        stats["rejected"] = stats["drawn"] - len(rows)
    order = {lab: k for k, lab in enumerate(counts)}
    rows.sort(key=lambda r: (order[r["label"]], r["index"]))
    return [{"text": r["text"], "label": r["label"]} for r in rows]
