"""The online (asyncio) transformers engine for serving: concurrent requests share its `generate` batches.

vLLM serving runs on Ray Serve LLM's own `LLMServer` (serve/app.py); this is the engine for machines where vLLM's
cannot run. It serves several certified adapters on one base at once, or one adapter merged into the base weights.
"""

from __future__ import annotations

import asyncio
import logging

from dpsynth.errors import UserError

from .adapters import CertifiedAdapter, same_base
from .engines import GenParams, Generation, TransformersEngine

log = logging.getLogger(__name__)


def _tokenizer(adapter: CertifiedAdapter):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter.adapter_dir)  # saved with the adapter by training
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class AsyncTransformersEngine:
    """Requests that arrive while a batch runs are gathered into the next one (same adapter and params)."""

    name = "transformers"

    def __init__(self, adapters: list[CertifiedAdapter], *, merged: bool = False, max_batch: int = 256):
        if merged and len(adapters) != 1:
            raise UserError(f"merged: the merged-weights mode serves exactly one adapter, not {len(adapters)}")
        from peft import PeftModel

        from dpsynth.models import load_base

        model, _, _ = load_base(same_base(adapters))
        self.tokenizer = _tokenizer(adapters[0])
        model = PeftModel.from_pretrained(model, str(adapters[0].adapter_dir), adapter_name=adapters[0].name)
        for a in adapters[1:]:
            model.load_adapter(str(a.adapter_dir), adapter_name=a.name)
        self.merged = merged
        if merged:
            model = model.merge_and_unload()
        self.engine = TransformersEngine(model.eval(), self.tokenizer)
        self.model, self.max_batch = model, max_batch
        self.pending: list[tuple[tuple, list[int], int | None, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        log.info("transformers engine: adapters %s%s", [a.name for a in adapters], " (merged)" if merged else "")

    async def generate(self, adapter: str, prompt_ids: list[int], params: GenParams, seed: int | None) -> Generation:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(((adapter, params), prompt_ids, seed, fut))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.ensure_future(self._drain())
        return await fut

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
        if self.worker is not None and self.worker.done() and not self.worker.cancelled() and self.worker.exception():
            raise self.worker.exception()  # the batching loop itself died: let Serve replace the replica
