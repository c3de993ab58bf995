"""Online (asyncio) engines for serving: many concurrent requests share the engine's batches.

`AsyncVLLMEngine` hands every request to vLLM's continuous batching; `AsyncTransformersEngine`
is the fallback where vLLM is absent: it gathers waiting requests into `generate` batches.
Both serve several certified adapters at once, or one adapter merged into the base weights.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from dpsynth.errors import UserError

from .adapters import CertifiedAdapter, merged_model_dir, same_base
from .engines import (GenParams, Generation, TransformersEngine, _finish, require_vllm, stop_token_ids, vllm_engine_kwargs,
                      vllm_params)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    merged: bool = False
    """Serve one adapter merged into the base weights (bulk sampling) instead of LoRA on the base."""
    max_model_len: int = 512
    max_num_seqs: int = 256
    """Continuous-batching width (vLLM) / largest generate batch (transformers)."""
    enforce_eager: bool = False
    cache_dir: str | None = None


def _tokenizer(adapter: CertifiedAdapter):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter.adapter_dir)  # saved with the adapter by training
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_merged(adapters: list[CertifiedAdapter], opts: EngineOptions) -> None:
    if opts.merged and len(adapters) != 1:
        raise UserError(f"merged: the merged-weights mode serves exactly one adapter, not {len(adapters)}")


class AsyncVLLMEngine:
    name = "vllm"

    def __init__(self, adapters: list[CertifiedAdapter], opts: EngineOptions):
        _check_merged(adapters, opts)
        vllm = require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        from dpsynth.models import cache_dir, resolve_base

        base = same_base(adapters)
        self.vllm, self.tokenizer = vllm, _tokenizer(adapters[0])
        self.stop_ids = stop_token_ids(self.tokenizer)
        if opts.merged:
            model_dir, ranks = str(merged_model_dir(adapters[0], Path(opts.cache_dir or cache_dir()))), None
            self.loras = {adapters[0].name: None}
        else:
            model_dir, ranks = resolve_base(base.base), [a.rank for a in adapters]
            self.loras = {a.name: LoRARequest(a.name, i + 1, str(a.adapter_dir)) for i, a in enumerate(adapters)}
        kw = vllm_engine_kwargs(model_dir, dtype=base.dtype, lora_ranks=ranks, max_model_len=opts.max_model_len,
                                max_num_seqs=opts.max_num_seqs, enforce_eager=opts.enforce_eager)
        log.info("vLLM engine: %s, adapters %s, %s", model_dir, list(self.loras),
                 "merged weights" if opts.merged else f"LoRA max_lora_rank={kw.get('max_lora_rank')}")
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))

    async def stream(self, adapter: str, prompt_ids: list[int], params: GenParams, seed: int | None) -> AsyncIterator[tuple[str, int, str | None]]:
        """(text delta, tokens so far, finish reason on the last item)."""
        from vllm.inputs import TokensPrompt

        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids),
                                              vllm_params(self.vllm, params, seed, delta=True, stop_ids=self.stop_ids),
                                              request_id=uuid.uuid4().hex, lora_request=self.loras[adapter]):
            o = out.outputs[0]
            yield o.text, len(o.token_ids), (_finish(o.finish_reason) if out.finished else None)

    async def generate(self, adapter: str, prompt_ids: list[int], params: GenParams, seed: int | None) -> Generation:
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), vllm_params(self.vllm, params, seed, stop_ids=self.stop_ids),
                                              request_id=uuid.uuid4().hex, lora_request=self.loras[adapter]):
            final = out
        o = final.outputs[0]
        return Generation(o.text, len(o.token_ids), _finish(o.finish_reason))

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()


class AsyncTransformersEngine:
    """Requests that arrive while a batch runs are gathered into the next one (same adapter and params)."""

    name = "transformers"

    def __init__(self, adapters: list[CertifiedAdapter], opts: EngineOptions):
        _check_merged(adapters, opts)
        from peft import PeftModel

        from dpsynth.models import load_base

        model, _, _ = load_base(same_base(adapters))
        self.tokenizer = _tokenizer(adapters[0])
        model = PeftModel.from_pretrained(model, str(adapters[0].adapter_dir), adapter_name=adapters[0].name)
        for a in adapters[1:]:
            model.load_adapter(str(a.adapter_dir), adapter_name=a.name)
        self.merged = opts.merged
        if opts.merged:
            model = model.merge_and_unload()
        self.engine = TransformersEngine(model.eval(), self.tokenizer)
        self.model, self.max_batch = model, opts.max_num_seqs
        self.pending: list[tuple[tuple, list[int], int | None, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        log.info("transformers engine: adapters %s%s", [a.name for a in adapters], " (merged)" if opts.merged else "")

    async def generate(self, adapter: str, prompt_ids: list[int], params: GenParams, seed: int | None) -> Generation:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(((adapter, params), prompt_ids, seed, fut))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.ensure_future(self._drain())
        return await fut

    async def stream(self, adapter: str, prompt_ids: list[int], params: GenParams, seed: int | None):
        g = await self.generate(adapter, prompt_ids, params, seed)
        yield g.text, g.completion_tokens, g.finish_reason

    async def _drain(self) -> None:
        while self.pending:
            await asyncio.sleep(0.005)  # let concurrent callers join this batch
            key = self.pending[0][0]
            batch = [p for p in self.pending if p[0] == key and not p[3].done()][: self.max_batch]
            taken = {id(p) for p in batch}
            self.pending = [p for p in self.pending if id(p) not in taken and not p[3].done()]
            if not batch:
                continue
            try:
                gens = await asyncio.to_thread(self._run, key, [p[1] for p in batch], batch[0][2])
            except Exception as e:  # noqa: BLE001 -- handed to every waiter, none is left hanging
                for p in batch:
                    if not p[3].done():
                        p[3].set_exception(e)
                continue
            for p, g in zip(batch, gens):
                if not p[3].done():
                    p[3].set_result(g)

    def _run(self, key: tuple, prompts: list[list[int]], seed: int | None) -> list[Generation]:
        adapter, params = key
        if not self.merged:
            self.model.set_adapter(adapter)
        return self.engine.generate_ids(prompts, params, [seed])  # one draw per batch: no per-request generator

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def build_online_engine(name: str, adapters: list[CertifiedAdapter], opts: EngineOptions):
    from .engines import choose_engine

    choose_engine(name, "serve.engine")
    return (AsyncVLLMEngine if name == "vllm" else AsyncTransformersEngine)(adapters, opts)
