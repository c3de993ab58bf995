"""Bulk sampling on Ray's own LLM batch API: `ray.data.llm` (`vLLMEngineProcessorConfig` + `build_processor`).

Ray Data runs vLLM engine actors across the cluster; we hand it rows of (label, index, token-id prompt, sampling
params with the job's own seed), so the corpus depends on neither how Ray splits the rows into batches nor over
how many engine actors. Rows stream back as they finish and are kept in the owner-side scratch file (`partial`):
an interrupted job continues where it stopped. A generation that is empty, or does not parse into the record's
fields, is redrawn in a next pass with the next attempt's seed; a record of several text fields is written field by
field, one pass per field (dpsynth.sample.fields). All of it is post-processing of the certified adapter.

On a machine without GPUs the engine actors are placed on CPU bundles (Ray's default asks for a GPU and would
never schedule); the prompts are sent as token ids with Ray's chat-template, tokenize and detokenize stages off,
so the engine sees exactly the prefix training saw.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from dpsynth.config import SamplingConfig
from dpsynth.interrupt import Interrupted
from dpsynth.progress import progress_bar

from .adapters import CertifiedAdapter, merged_model_dir
from .corpus import PartialCorpus, accepts, example_seed, jobs_for
from .engines import prompt_ids, stop_token_ids, vllm_engine_kwargs
from .fields import cut, field_seed, opener

log = logging.getLogger(__name__)

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "VLLM_NO_USAGE_STATS": "1",
              "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
"""The engine actors' environment: vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) and refuses to
guess; several engines on one node must not pin the same cores."""


def processor_config(adapter: CertifiedAdapter, params: SamplingConfig, *, model_source: str, lora: bool, gpus: int,
                     max_model_len: int):
    """The `vLLMEngineProcessorConfig` of one sampling job."""
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = vllm_engine_kwargs(model_source, dtype=adapter.model.dtype, lora_ranks=[adapter.rank] if lora else None,
                                max_model_len=max_model_len, max_num_seqs=params.batch_size,
                                enforce_eager=params.enforce_eager)
    kwargs.pop("model")  # Ray's model_source
    return vLLMEngineProcessorConfig(
        model_source=model_source, engine_kwargs=kwargs, batch_size=params.batch_size, concurrency=params.replicas,
        placement_group_config={"bundle_per_worker": {"GPU": 1} if gpus else {"CPU": 1}},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, log_engine_metrics=False,
        runtime_env={"env_vars": ENGINE_ENV})


def _init_ray() -> bool:
    import ray

    if ray.is_initialized():
        return False
    # "local" unless a cluster is named: never join some other Ray instance on this machine by accident.
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False, log_to_driver=False)
    return True


def sample_ray_data(adapter: CertifiedAdapter, counts: dict[str, int], params: SamplingConfig, *,
                    show_progress: bool = True, schema=None, stats: dict | None = None, partial: Path | None = None,
                    stop: Callable[[], int | None] | None = None, max_attempts: int = 20) -> list[dict]:
    """Exactly counts[label] rows per label, ordered by label then index (see the module docstring)."""
    import ray
    from ray.data.llm import build_processor

    from dpsynth.models import cache_dir, resolve_base

    from .online import _tokenizer

    lora = not params.merge_lora
    model_source = str(resolve_base(adapter.model.base)) if lora else str(merged_model_dir(adapter, cache_dir()))
    tok = _tokenizer(adapter)
    heads = {lab: prompt_ids(tok, p) for lab, p in adapter.prompts.items()}
    fields = len(schema.text_columns) if schema is not None else 1
    sampling = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens,
                "stop_token_ids": stop_token_ids(tok)}
    scratch = PartialCorpus(partial) if partial is not None else None
    done = {(r["label"], r["index"]): r for r in (scratch.rows if scratch else []) if "index" in r}
    jobs = jobs_for(counts)
    todo, resumed = [j for j in jobs if j not in done], len(done)
    if done:
        log.info("sampling resumes: %d of %d examples were kept in %s", len(done), len(jobs), partial)
    def interrupted(signum: int) -> Interrupted:
        return Interrupted(signum, f"sampling stopped after {len(done)} of {len(jobs)} examples" + (
            f"; they are kept ({partial}): run the same command again to continue" if scratch else ""))

    started = _init_ray()
    drawn = 0
    try:
        ray.data.DataContext.get_current().enable_progress_bars = show_progress
        gpus = 1 if ray.cluster_resources().get("GPU") else 0
        config = processor_config(adapter, params, model_source=model_source, lora=lora, gpus=gpus,
                                  max_model_len=adapter.model.max_length + params.max_new_tokens * fields + 16)
        processor = build_processor(config)
        log.info("Ray Data LLM batch job: %d jobs, %d vLLM engine actor(s) on %s, %s", len(todo), params.replicas,
                 "GPU" if gpus else "CPU", "LoRA" if lora else "merged weights")
        t0, tokens = time.monotonic(), 0
        with progress_bar("sampling", total=len(jobs), enabled=show_progress, unit="tokens", completed=len(done),
                          log_every=30.0) as advance:
            for attempt in range(max_attempts):
                if not todo:
                    break
                written: dict[tuple[str, int], str] = {j: "" for j in todo}
                for k in range(fields):
                    last = k == fields - 1
                    if fields > 1:
                        written = {j: w + opener(schema, k) for j, w in written.items()}
                    rows = []
                    for lab, i in todo:
                        seed = example_seed(params.seed, lab, i, attempt)
                        head = heads[lab] + (tok(written[(lab, i)], add_special_tokens=False).input_ids if fields > 1 else [])
                        rows.append({"label": lab, "index": i, "tokenized_prompt": head,
                                     "sampling_params": {**sampling, "seed": field_seed(seed, k) if fields > 1 else seed},
                                     **({"model": str(adapter.adapter_dir)} if lora else {})})
                    kept: list[dict] = []
                    for out in processor(ray.data.from_items(rows)).iter_rows():
                        job, text, used = (str(out["label"]), int(out["index"])), out["generated_text"] or "", int(out["num_generated_tokens"])
                        written[job] = written[job] + (cut(schema, k, text) if fields > 1 else text)
                        tokens += used
                        if stop is not None and not last and (signum := stop()):
                            raise interrupted(signum)
                        if not last:
                            continue
                        drawn += 1
                        if accepts(schema, written[job]):
                            row = {"text": written[job].strip(), "label": job[0], "index": job[1]}
                            done[job] = row
                            kept.append(row)
                            advance(job[0], 1, used)
                        if scratch and len(kept) >= 32:
                            scratch.append(kept)
                            kept = []
                        if stop is not None and (signum := stop()):
                            if scratch and kept:
                                scratch.append(kept)
                            raise interrupted(signum)
                    if scratch and kept:
                        scratch.append(kept)
                todo = [j for j in todo if j not in done]
            if todo:
                raise RuntimeError(f"{len(todo)} jobs gave {max_attempts} unusable generations in a row (empty, or not "
                                   "parsing into the record's fields); the adapter may be broken")
        took = time.monotonic() - t0
        log.info("Ray Data LLM batch job: %d rows, %d tokens in %.0f s (%.0f tokens/s, engine start-up included)",
                 len(jobs), tokens, took, tokens / max(took, 1e-9))
    finally:
        if started:
            ray.shutdown()
    if stats is not None:  # this call's draws, and how many of them were redrawn
        stats["drawn"], stats["rejected"] = drawn, drawn - (len(done) - resumed)
    return [{"text": done[j]["text"], "label": j[0]} for j in jobs]
