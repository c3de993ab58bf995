"""dpsynth's HTTP API: Ray Serve LLM's OpenAI ingress, with the corpus endpoint, auth and limits in front of it.

`DpsynthIngress` is `ray.serve.llm`'s `OpenAiIngress`: `/v1/completions` and `/v1/chat/completions` are Ray's
(vLLM's OpenAI server behind them), after our limits. dpsynth adds `/v1/corpus` (exact per-label counts, attribute
filters, JSONL/CSV), `/v1/models` with each adapter's certificate, `/healthz`, bearer-token auth, the
concurrent-request limit (429) and 4xx messages naming the field. Behind it, LLM deployments: Ray's `LLMServer`
(vLLM; a run merged into its base, or a base serving runs as LoRA `<base>:<name>-<sha12>`, which `routes` maps
each run's name to), or `TransformersServer`, which speaks the same protocol. Clients only ever name runs.

A corpus is a set of (label, index) jobs, each with its own seed. Jobs of one label go to the engine in chunks, one
request for n completions (a record of several fields: one completion per field and job); Serve spreads the
requests over the replicas. A request whose replica dies is asked again with the same seeds, so nothing is dropped,
duplicated or changed.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time

import ray.exceptions
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init  # Ray's app: its middleware stack
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from dpsynth.config import ServeConfig
from dpsynth.errors import UserError
from dpsynth.sample.adapters import load_certified
from dpsynth.sample.corpus import accepts, example_seed, jobs_for, label_counts, serialize_row, stream_jobs
from dpsynth.sample.engines import prompt_ids, stop_token_ids
from dpsynth.sample.fields import generate_fields

from .schemas import CorpusRequest

log = logging.getLogger("ray.serve")
app = init()
# Failures of a replica, not of the request: worth asking again elsewhere.
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ReplicaUnavailableError,
             DeploymentUnavailableError, BackPressureError)
ENDPOINTS = {name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")}
"""Ray's OpenAI routes that make sense for a generative adapter (no embeddings, scores or audio)."""
_ACTIVE: list = []  # this replica's ingress (one per replica process), for the middleware


def _register(ingress) -> None:
    # A module-level function is pickled by reference, so this runs against the real module in the replica
    # (the deployment class itself is pickled by value, together with a copy of `app`).
    _ACTIVE[:] = [ingress]


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


def named(response, model_id: str, name: str):
    """Ray's response with the engine's model id (`<base>:<suffix>` under multi-LoRA) back to the run's name."""
    if model_id == name:
        return response
    old, new = json.dumps(model_id).encode(), json.dumps(name).encode()
    if isinstance(response, StreamingResponse):
        async def renamed(chunks):
            async for chunk in chunks:  # one SSE event per chunk: the id never straddles two
                yield (chunk.encode() if isinstance(chunk, str) else chunk).replace(old, new)

        response.body_iterator = renamed(response.body_iterator)
        return response
    body = json.loads(response.body)
    if isinstance(body, dict) and body.get("model") == model_id:
        body["model"] = name
    return JSONResponse(body, status_code=response.status_code)


def as_json_body(scope: dict) -> dict:
    """Every body this API takes is JSON: a POST sent as `curl -d` (form-encoded) or with no content type is read as
    JSON, instead of FastAPI answering "Input should be a valid dictionary" to a body that is valid JSON."""
    if scope["method"] != "POST":
        return scope
    kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
    if kind not in (b"", b"application/x-www-form-urlencoded"):
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class Guard:
    """ASGI middleware: bearer-token auth and the concurrent-request limit, for the whole life of a (streamed) response.
    Ray's ingress turns Serve's own back-pressure off (max_ongoing_requests 1e9), so the limit lives here."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        gw = _ACTIVE[0] if _ACTIVE else None
        if scope["type"] != "http" or gw is None:
            return await self.asgi(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # an application under a route prefix
            path = path[len(root):]
        scope = as_json_body(scope)
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


app.add_middleware(Guard)  # added last, so it runs first: nothing of Ray's sees a request we refuse


class DpsynthIngress(OpenAiIngress):
    def __init__(self, llm_deployments: dict, model_cards: dict, cfg: dict):
        super().__init__(llm_deployments, model_cards)
        from transformers import AutoTokenizer

        cfg = dict(cfg)
        specs, self.routes, on = cfg.pop("_adapters"), cfg.pop("_routes"), cfg.pop("_auth_on")
        self.cfg = ServeConfig.model_validate(cfg)
        self.token = self.cfg.token if on else None
        self.adapters = {name: load_certified(path, name, self.cfg.ledger) for name, path in specs}
        self.tokenizer = AutoTokenizer.from_pretrained(next(iter(self.adapters.values())).adapter_dir)  # one base
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.prompt_ids = {name: {lab: prompt_ids(self.tokenizer, p) for lab, p in a.prompts.items()}
                           for name, a in self.adapters.items()}
        self.inflight, self.created = 0, int(time.time())
        self.requests = metrics.Counter("dpsynth_requests", "HTTP requests by endpoint and status", ("endpoint", "status"))
        self.latency = metrics.Histogram("dpsynth_request_seconds", "Request wall time (to the last streamed byte)",
                                         [0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300], ("endpoint",))
        self.tokens = metrics.Counter("dpsynth_generated_tokens", "Tokens generated for corpora", ("adapter",))
        self.examples = metrics.Counter("dpsynth_corpus_examples", "Corpus examples streamed", ("adapter",))
        self.retries = metrics.Counter("dpsynth_job_retries", "Corpus engine requests asked again after a replica failure")
        _register(self)

    def count(self, path: str, status: int, seconds: float | None = None) -> None:
        known = ("/v1/corpus", "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz")
        endpoint = path if path in known else "other"
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"endpoint": endpoint})

    def _adapter(self, name: str | None):
        if name not in self.adapters:
            raise ApiError(404, f"adapter '{name}' is not served (served: {', '.join(self.adapters)})", "not_found_error")
        return self.adapters[name]

    def _max_tokens(self, n: int) -> int:
        if n > self.cfg.limits.max_tokens:
            raise ApiError(400, f"max_tokens: {n} exceeds the limit {self.cfg.limits.max_tokens}")
        return n

    # --- dpsynth's own routes ---------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self):
        try:
            for handle in self._default_serve_handles.values():
                await asyncio.wait_for(handle.check_health.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 -- any failure is "not healthy", reported as such
            return error_response(503, f"engine unavailable: {type(e).__name__}", "unavailable")
        return {"status": "ok", "engine": self.cfg.engine, "adapters": list(self.adapters)}

    @app.post("/v1/corpus")
    async def corpus(self, req: CorpusRequest):
        a = self._adapter(req.adapter)
        if req.num_examples > self.cfg.limits.max_examples_per_request:
            raise ApiError(400, f"num_examples: {req.num_examples} exceeds the limit {self.cfg.limits.max_examples_per_request}")
        max_tokens = self._max_tokens(req.max_tokens or a.max_new_tokens)
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
        body = {"temperature": req.temperature, "top_p": req.top_p, "max_tokens": max_tokens}
        jobs = jobs_for(counts)
        rows = (self._records if len(a.schema.text_columns) > 1 else self._texts)(a.name, jobs, body, req.seed)
        try:  # the first row before the headers: a corpus that cannot start is an HTTP error, not an empty 200
            first = await anext(rows)
        except ApiError:
            await rows.aclose()
            raise
        except Exception as e:  # noqa: BLE001 -- the engine's failure, reported to the client as such
            await rows.aclose()
            log.error("corpus request failed before its first row: %r", e)
            raise ApiError(503, f"engine unavailable: {type(e).__name__}", "unavailable") from None
        return StreamingResponse(self._stream_corpus(a.name, first, rows, req.format), media_type=media, headers=headers)

    async def _stream_corpus(self, adapter: str, first: dict, rows, fmt: str):
        schema = self.adapters[adapter].schema
        if fmt == "csv":
            yield ",".join(schema.output_columns) + "\r\n"
        self.examples.inc(tags={"adapter": adapter})
        yield serialize_row(first, fmt, schema=schema)
        try:
            async for row in rows:
                self.examples.inc(tags={"adapter": adapter})
                yield serialize_row(row, fmt, schema=schema)
        except Exception as e:
            # Headers are gone: break the stream so the client sees an error, not a short corpus.
            log.error("corpus request failed: %r", e)
            raise

    async def _texts(self, adapter: str, jobs: list, body: dict, seed: int):
        """One text per job. A chunk of one label's consecutive jobs is one engine request for n completions, which vLLM
        seeds base + j: job (label, i) is seeded example_seed(seed, label, 0) + i, whatever the chunking or replica.
        An empty text is redrawn by stream_jobs from attempt 1 on, one completion per job with its own attempt seeds."""
        schema, size = self.adapters[adapter].schema, self.cfg.chunk_size
        chunks = []
        for label, group in itertools.groupby(jobs, key=lambda job: job[0]):
            indices = [int(i) for _, i in group]
            chunks += [(label, indices[k:k + size]) for k in range(0, len(indices), size)]

        async def draw(label: str, job_seed: int) -> tuple[str, int]:
            return await self._one(adapter, self.prompt_ids[adapter][label], body, job_seed)

        async def chunk(label: str, indices: list[int]) -> list[dict]:
            texts = await self._complete(adapter, self.prompt_ids[adapter][label], body,
                                         example_seed(seed, label, 0) + indices[0], n=len(indices))
            kept = [{"text": t.strip(), "label": label, "index": i} for i, t in zip(indices, texts) if accepts(schema, t)]
            empty = [(label, i) for i, t in zip(indices, texts) if not accepts(schema, t)]
            return kept + [row async for row in stream_jobs(draw, empty, seed, first_attempt=1, schema=schema)]

        tasks = [asyncio.ensure_future(chunk(label, indices)) for label, indices in chunks]
        try:
            for done in asyncio.as_completed(tasks):
                for row in await done:
                    yield row
        finally:
            for t in tasks:
                t.cancel()  # a client that went away stops its generations (the engine aborts them)

    async def _records(self, adapter: str, jobs: list, body: dict, seed: int):
        """Records of several text fields: each job written field by field (fields.py), one completion per field."""
        schema = self.adapters[adapter].schema

        async def one(prompt: list[int], job_seed: int) -> tuple[str, int]:
            return await self._one(adapter, prompt, body, job_seed)

        async def generate(label: str, job_seed: int) -> tuple[str, int]:
            return await generate_fields(schema, self.tokenizer, one, self.prompt_ids[adapter][label], job_seed)

        async for row in stream_jobs(generate, [(lab, int(i)) for lab, i in jobs], seed, schema=schema):
            yield row

    async def _one(self, adapter: str, prompt: list[int], body: dict, seed: int) -> tuple[str, int]:
        (text,) = await self._complete(adapter, prompt, body, seed)
        return text, 0  # tokens are counted per engine request, in _complete

    async def _complete(self, adapter: str, prompt: list[int], body: dict, seed: int, n: int = 1) -> list[str]:
        """n seeded completions (seeds seed .. seed + n - 1) in one engine request, asked again if its replica dies."""
        model = self.routes[adapter]
        request = CompletionRequest(model=model, prompt=prompt, seed=seed, n=n, stop_token_ids=self.stop_ids,
                                    skip_special_tokens=True, **body)
        deadline, delay = time.monotonic() + self.cfg.retry_timeout_s, 0.5
        while True:
            try:
                async for out in self._get_configured_serve_handle(model).completions.remote(request, None):
                    # vLLM's own ErrorResponse, not Ray's subclass of it: told apart by its `error`. E.g. max_tokens
                    # past the engine's context, the client's to fix.
                    if getattr(out, "error", None) is not None:
                        code = out.error.code if 400 <= out.error.code < 500 else 502
                        raise ApiError(code, f"engine refused a corpus job: {out.error.message}", out.error.type)
                    self.tokens.inc(out.usage.completion_tokens, tags={"adapter": adapter})
                    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]
                raise RuntimeError("engine returned no completion")
            except RETRYABLE as e:
                if time.monotonic() > deadline:
                    raise
                self.retries.inc()
                log.warning("corpus request: %s; asking again in %.1fs", type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- Ray's OpenAI routes, behind our checks ---------------------------------------------------------------

    async def models(self):
        return JSONResponse({"object": "list", "data": [self._card(name) for name in self.adapters]})

    async def model_data(self, model: str):
        self._adapter(model)
        return JSONResponse(self._card(model))

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "dpsynth",
                **self.adapters[name].public_info()}

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

    def _check_count(self, completions: int) -> None:
        if completions > self.cfg.limits.max_prompts_per_request:
            raise ApiError(400, f"prompt x n: {completions} completions exceed the limit "
                                f"{self.cfg.limits.max_prompts_per_request}")

    async def completions(self, body: CompletionRequest, request: Request):
        self._adapter(body.model)
        prompts = self._prompts(body.prompt)
        self._check_count(len(prompts) * (body.n or 1))
        max_tokens = self._max_tokens(body.max_tokens or 16)
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.cfg.max_model_len:
            raise ApiError(400, f"prompt: {longest} tokens + max_tokens {max_tokens} exceed the context {self.cfg.max_model_len}")
        routed = body.model_copy(update={"max_tokens": max_tokens, "model": self.routes[body.model]})
        return named(await super().completions(routed, request), routed.model, body.model)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._adapter(body.model)
        self._check_count(body.n or 1)
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens or 16)
        routed = body.model_copy(update={"max_tokens": max_tokens, "max_completion_tokens": None, "model": self.routes[body.model]})
        return named(await super().chat(routed, request), routed.model, body.model)


Ingress = make_fastapi_ingress(DpsynthIngress, endpoint_map=ENDPOINTS, app=app)
