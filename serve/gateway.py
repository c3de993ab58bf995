"""The Gateway deployment: the HTTP API (FastAPI ingress), auth, limits, metrics, corpus orchestration.

A corpus request is split into chunks of (label, index) jobs spread over the sampler
replicas; rows stream back as they are generated. A chunk whose replica dies is retried for
its missing jobs only (each job has its own seed), so nothing is dropped or duplicated.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from dpsynth.config import ServeConfig
from dpsynth.errors import UserError
from dpsynth.sample.adapters import load_certified
from dpsynth.sample.corpus import jobs_for, label_counts, serialize_row

from .schemas import CompletionRequest, CorpusRequest

log = logging.getLogger("ray.serve")
app = FastAPI(title="dpsynth", description="DP synthetic text from certified adapters", docs_url=None, redoc_url=None)
# Failures of a replica, not of the request: worth retrying elsewhere.
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ReplicaUnavailableError,
             DeploymentUnavailableError, BackPressureError)
_DONE = object()
_ACTIVE: list = []  # this replica's Gateway (one per replica process), for the middleware


def _register(gateway) -> None:
    # A module-level function is pickled by reference, so this runs against the real module in the replica
    # (the deployment class itself is pickled by value, together with a copy of `app`).
    _ACTIVE[:] = [gateway]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error shape, so its client raises the right exception with our message."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    return error_response(e.status, e.message, e.kind)


@app.exception_handler(RequestValidationError)
async def _bad_body(_: Request, e: RequestValidationError):
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return error_response(400, f"body: invalid JSON ({err.get('ctx', {}).get('error', 'cannot parse')})")
    where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
    return error_response(400, f"{where}: {err['msg']}")


class Guard:
    """ASGI middleware: bearer-token auth and the concurrent-request limit, for the whole life of a (streamed) response."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        gw = _ACTIVE[0] if _ACTIVE else None
        if scope["type"] != "http" or gw is None:
            return await self.asgi(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an application under a route prefix
            path = path[len(root):]
        started, status = time.monotonic(), [500]
        if path != "/healthz" and gw.token is not None:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {gw.token}".encode()):
                gw.count(path, 401)
                resp = error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication_error")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return await resp(scope, receive, send)
        if path != "/healthz" and gw.inflight >= gw.cfg.limits.max_concurrent_requests:
            gw.count(path, 429)
            return await error_response(429, f"too many concurrent requests (limit {gw.cfg.limits.max_concurrent_requests})",
                                        "rate_limit_error")(scope, receive, send)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        gw.inflight += 1
        try:
            await self.asgi(scope, receive, send_status)
        finally:
            gw.inflight -= 1
            gw.count(path, status[0], time.monotonic() - started)


app.add_middleware(Guard)


@serve.deployment(name="Gateway", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    def __init__(self, sampler, cfg: dict):
        from transformers import AutoTokenizer

        cfg = dict(cfg)
        specs, on = cfg.pop("_adapters"), cfg.pop("_auth_on")
        self.sampler, self.cfg = sampler, ServeConfig.model_validate(cfg)
        self.token = self.cfg.token if on else None
        self.adapters = {name: load_certified(path, name, self.cfg.ledger) for name, path in specs}
        self.tokenizer = AutoTokenizer.from_pretrained(next(iter(self.adapters.values())).adapter_dir)
        self.inflight, self.created = 0, int(time.time())
        self.requests = metrics.Counter("dpsynth_requests", "HTTP requests by endpoint and status", ("endpoint", "status"))
        self.latency = metrics.Histogram("dpsynth_request_seconds", "Request wall time (to the last streamed byte)",
                                         [0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], ("endpoint",))
        self.tokens = metrics.Counter("dpsynth_generated_tokens", "Tokens generated", ("endpoint", "adapter"))
        self.examples = metrics.Counter("dpsynth_corpus_examples", "Corpus examples streamed", ("adapter",))
        self.retries = metrics.Counter("dpsynth_chunk_retries", "Corpus chunks retried after a replica failure")
        _register(self)

    def count(self, path: str, status: int, seconds: float | None = None) -> None:
        endpoint = path if path in ("/v1/corpus", "/v1/completions", "/v1/models", "/healthz") else "other"
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"endpoint": endpoint})

    def _adapter(self, name: str):
        if name not in self.adapters:
            raise ApiError(404, f"adapter '{name}' is not served (served: {', '.join(self.adapters)})", "not_found_error")
        return self.adapters[name]

    def _max_tokens(self, n: int) -> int:
        if n > self.cfg.limits.max_tokens:
            raise ApiError(400, f"max_tokens: {n} exceeds the limit {self.cfg.limits.max_tokens}")
        return n

    @app.get("/healthz")
    async def healthz(self):
        try:
            info = await asyncio.wait_for(self.sampler.healthy.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 -- any failure is "not healthy", reported as such
            return error_response(503, f"sampler unavailable: {type(e).__name__}", "unavailable")
        return {"status": "ok", **info, "adapters": list(self.adapters)}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "dpsynth",
                                            **a.public_info()} for name, a in self.adapters.items()]}

    @app.post("/v1/corpus")
    async def corpus(self, req: CorpusRequest):
        a = self._adapter(req.adapter)
        if req.num_examples > self.cfg.limits.max_examples_per_request:
            raise ApiError(400, f"num_examples: {req.num_examples} exceeds the limit {self.cfg.limits.max_examples_per_request}")
        params = {"temperature": req.temperature, "top_p": req.top_p,
                  "max_tokens": self._max_tokens(req.max_tokens or a.max_new_tokens)}
        mix = req.label_mix or ("dp" if a.dp_proportions else "uniform")
        try:
            proportions = a.proportions(mix)
            if req.attributes:
                proportions = a.schema.restrict(proportions, req.attributes)
            counts = label_counts(a.labels, proportions, req.num_examples)
        except UserError as e:
            raise ApiError(400, str(e).replace("sampling.label_proportions", "label_mix")) from None
        headers = {"X-DP-Epsilon": repr(a.certificate.epsilon), "X-DP-Delta": repr(a.certificate.delta),
                   "X-Label-Counts": json.dumps(counts)}
        media = "application/x-ndjson" if req.format == "jsonl" else "text/csv"
        return StreamingResponse(self._stream_corpus(a.name, jobs_for(counts), params, req.seed, req.format),
                                 media_type=media, headers=headers)

    async def _stream_corpus(self, adapter: str, jobs: list, params: dict, seed: int, fmt: str):
        schema = self.adapters[adapter].schema
        if fmt == "csv":
            yield ",".join(schema.output_columns) + "\r\n"
        queue: asyncio.Queue = asyncio.Queue()
        size = self.cfg.chunk_size
        chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        tasks = [asyncio.ensure_future(self._chunk(adapter, c, params, seed, queue)) for c in chunks]
        seen: set = set()
        try:
            open_chunks = len(chunks)
            while open_chunks:
                item = await queue.get()
                if item is _DONE:
                    open_chunks -= 1
                    continue
                if isinstance(item, BaseException):
                    # Headers are gone: break the stream so the client sees an error, not a short corpus.
                    log.error("corpus request failed: %r", item)
                    raise item
                key = (item["label"], item["index"])
                if key in seen:
                    continue
                seen.add(key)
                self.tokens.inc(item["tokens"], tags={"endpoint": "/v1/corpus", "adapter": adapter})
                self.examples.inc(tags={"adapter": adapter})
                yield serialize_row(item, fmt, schema=schema)
        finally:
            for t in tasks:
                t.cancel()

    async def _chunk(self, adapter: str, jobs: list, params: dict, seed: int, queue: asyncio.Queue) -> None:
        remaining = {(lab, i): None for lab, i in jobs}  # ordered set
        deadline, delay = time.monotonic() + self.cfg.retry_timeout_s, 0.5
        try:
            while remaining:
                try:
                    stream = self.sampler.options(stream=True).corpus.remote(adapter, list(remaining), params, seed)
                    async for row in stream:
                        key = (row["label"], row["index"])
                        if key in remaining:
                            del remaining[key]
                            await queue.put(row)
                except RETRYABLE as e:
                    if time.monotonic() > deadline:
                        raise
                    self.retries.inc()
                    log.warning("corpus chunk: %s; retrying %d jobs in %.1fs", type(e).__name__, len(remaining), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            await queue.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 -- handed to the streaming loop, which ends the response
            await queue.put(e)

    def _prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt: must not be empty")
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else list(p) for p in prompt]
        vocab = len(self.tokenizer)
        if any(not p for p in ids) or any(t < 0 or t >= vocab for p in ids for t in p):
            raise ApiError(400, "prompt: empty prompt or token id outside the vocabulary")
        return ids

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        a = self._adapter(req.model)
        if (why := req.unsupported()) is not None:
            raise ApiError(400, why)
        prompts = self._prompts(req.prompt)
        if len(prompts) * req.n > self.cfg.limits.max_prompts_per_request:
            raise ApiError(400, f"prompt x n: {len(prompts) * req.n} completions exceed the limit "
                                f"{self.cfg.limits.max_prompts_per_request}")
        max_tokens = self._max_tokens(req.max_tokens or 16)
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.cfg.max_model_len:
            raise ApiError(400, f"prompt: {longest} tokens + max_tokens {max_tokens} exceed the context {self.cfg.max_model_len}")
        params = {"temperature": req.temperature if req.temperature is not None else 1.0,  # 0 = greedy
                  "top_p": req.top_p or 1.0, "max_tokens": max_tokens}
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(self._stream_completion(a.name, prompts, params, req, rid, created),
                                     media_type="text/event-stream")
        choices = await self._retry(lambda: self.sampler.complete.remote(a.name, prompts, params, req.n, req.seed))
        used = sum(c["tokens"] for c in choices)
        self.tokens.inc(used, tags={"endpoint": "/v1/completions", "adapter": a.name})
        prompt_tokens = sum(len(p) for p in prompts) * req.n
        return {"id": rid, "object": "text_completion", "created": created, "model": a.name,
                "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
                            for c in choices],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}}

    async def _stream_completion(self, adapter, prompts, params, req, rid, created):
        total = {}
        async for c in self.sampler.options(stream=True).complete_stream.remote(adapter, prompts, params, req.n, req.seed):
            total[c["index"]] = c["tokens"]
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": adapter,
                     "choices": [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        self.tokens.inc(sum(total.values()), tags={"endpoint": "/v1/completions", "adapter": adapter})
        yield "data: [DONE]\n\n"

    async def _retry(self, call):
        deadline, delay = time.monotonic() + self.cfg.retry_timeout_s, 0.5
        while True:
            try:
                return await call()
            except RETRYABLE:
                if time.monotonic() > deadline:
                    raise ApiError(503, "no sampler replica is available", "unavailable") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
