"""The Sampler deployment: one generation engine (vLLM, or the transformers fallback) per replica.

Every call is handed straight to the engine, so concurrent requests share its batches
(continuous batching in vLLM). It holds only certified adapters; no private data.
"""

from __future__ import annotations

import logging

from ray import serve

from dpsynth.sample.adapters import load_certified
from dpsynth.sample.corpus import stream_jobs
from dpsynth.sample.engines import GenParams, prompt_ids
from dpsynth.sample.online import EngineOptions, build_online_engine

log = logging.getLogger("ray.serve")


@serve.deployment(name="Sampler", max_ongoing_requests=512, health_check_period_s=10, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=5)
class Sampler:
    def __init__(self, adapters: list[tuple[str, str]], ledger: str | None, engine: str, options: dict):
        loaded = [load_certified(path, name, ledger) for name, path in adapters]  # checked again where they are loaded
        self.engine = build_online_engine(engine, loaded, EngineOptions(**options))
        tok = self.engine.tokenizer
        self.prompt_ids = {a.name: {lab: prompt_ids(tok, p) for lab, p in a.prompts.items()} for a in loaded}
        self.schemas = {a.name: a.schema for a in loaded}

    async def corpus(self, adapter: str, jobs: list[tuple[str, int]], params: dict, seed: int):
        """Stream one row per (label, index) job: {text, label, index, tokens}."""
        from dpsynth.sample.fields import generate_fields

        gp, prompts, schema = GenParams(**params), self.prompt_ids[adapter], self.schemas[adapter]

        async def one(prompt: list[int], seed: int) -> tuple[str, int]:
            g = await self.engine.generate(adapter, prompt, gp, seed)
            return g.text, g.completion_tokens

        async def generate(label: str, example_seed: int) -> tuple[str, int]:  # a record field by field (fields.py)
            return await generate_fields(schema, self.engine.tokenizer, one, prompts[label], example_seed)

        async for row in stream_jobs(generate, [(lab, int(i)) for lab, i in jobs], seed, schema=self.schemas[adapter]):
            yield row

    async def complete(self, adapter: str, prompts: list[list[int]], params: dict, n: int, seed: int | None) -> list[dict]:
        import asyncio

        gp = GenParams(**params)
        calls = [self.engine.generate(adapter, p, gp, None if seed is None else seed + k * n + j)
                 for k, p in enumerate(prompts) for j in range(n)]
        gens = await asyncio.gather(*calls)
        return [{"index": i, "text": g.text, "finish_reason": g.finish_reason, "tokens": g.completion_tokens}
                for i, g in enumerate(gens)]

    async def complete_stream(self, adapter: str, prompts: list[list[int]], params: dict, n: int, seed: int | None):
        """Text deltas of every choice, interleaved as they are generated."""
        import asyncio

        gp = GenParams(**params)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, p: list[int], s: int | None) -> None:
            try:
                async for text, tokens, finish in self.engine.stream(adapter, p, gp, s):
                    await queue.put({"index": i, "text": text, "finish_reason": finish, "tokens": tokens})
            except Exception as e:  # noqa: BLE001 -- re-raised below, in the caller's stream
                await queue.put(e)
            await queue.put(None)

        jobs = [(k * n + j, p) for k, p in enumerate(prompts) for j in range(n)]
        tasks = [asyncio.ensure_future(pump(i, p, None if seed is None else seed + i)) for i, p in jobs]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def healthy(self) -> dict:
        import os

        await self.engine.check_health()
        return {"engine": self.engine.name, "replica_pid": os.getpid()}

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead engine gets the replica replaced."""
        await self.engine.check_health()
