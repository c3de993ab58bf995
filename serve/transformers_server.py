"""The transformers engine behind Ray Serve LLM's ingress, for machines where vLLM's engine cannot run.

`ray.serve.llm`'s `LLMServer` runs vLLM only. This deployment speaks the same protocol to the ingress
(`completions` / `chat` take vLLM's OpenAI request models and yield one response, or stream chunks), so the
ingress, the corpus path and the OpenAI routes are one code path whichever engine runs. It holds every
served adapter on one base (LoRA, switched per batch) or one adapter merged into it; no private data.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from ray import serve

from dpsynth.sample.adapters import load_certified
from dpsynth.sample.engines import GenParams
from dpsynth.sample.online import AsyncTransformersEngine


def _error(message: str, status: int = 400):
    from ray.serve.llm.openai_api_models import ErrorResponse

    return ErrorResponse(error={"message": message, "type": "BadRequestError", "code": status})


def _unsupported(req, stop_ids: list[int]) -> str | None:
    if req.stop or not set(req.stop_token_ids or ()) <= set(stop_ids):  # it always stops at the tokenizer's own
        return "stop sequences are not supported by the transformers engine (serve with --engine vllm)"
    if getattr(req, "echo", False) or getattr(req, "suffix", None) or req.logprobs or (getattr(req, "best_of", None) or 1) > 1:
        return "echo, logprobs, suffix and best_of are not supported by the transformers engine"
    if req.presence_penalty or req.frequency_penalty:
        return "presence_penalty and frequency_penalty are not supported by the transformers engine"
    return None


@serve.deployment(name="TransformersServer", max_ongoing_requests=512, health_check_period_s=10,
                  health_check_timeout_s=60, graceful_shutdown_timeout_s=5)
class TransformersServer:
    def __init__(self, adapters: list[tuple[str, str]], ledger: str | None, merged: bool, max_num_seqs: int):
        loaded = [load_certified(path, name, ledger) for name, path in adapters]  # checked again where they are loaded
        self.engine = AsyncTransformersEngine(loaded, merged=merged, max_batch=max_num_seqs)
        self.tokenizer = self.engine.tokenizer

    @staticmethod
    def _params(req, max_tokens: int | None) -> GenParams:
        temperature = 1.0 if req.temperature is None else req.temperature  # 0 = greedy, as in OpenAI's API
        return GenParams(temperature, req.top_p or 1.0, max_tokens or 16)

    async def _generate(self, model: str, prompts: list[list[int]], params: GenParams, n: int, seed: int | None):
        calls = [self.engine.generate(model, p, params, None if seed is None else seed + k * n + j)
                 for k, p in enumerate(prompts) for j in range(n)]
        return await asyncio.gather(*calls)

    async def completions(self, request, raw_request_info=None):
        from ray.serve.llm.openai_api_models import CompletionResponse, CompletionStreamResponse

        if (why := _unsupported(request, self.engine.engine.stop_ids)) is not None:
            yield _error(why)
            return
        prompt = request.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else list(p) for p in prompts]
        gens = await self._generate(request.model, ids, self._params(request, request.max_tokens), request.n, request.seed)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [{"index": i, "text": g.text, "finish_reason": g.finish_reason} for i, g in enumerate(gens)]
        used, prompt_tokens = sum(g.completion_tokens for g in gens), sum(len(p) for p in ids) * request.n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}
        if request.stream:  # the whole text as one chunk per choice: this engine does not generate token by token
            yield [CompletionStreamResponse(id=rid, created=created, model=request.model, choices=[c]) for c in choices]
            return
        yield CompletionResponse(id=rid, created=created, model=request.model, choices=choices, usage=usage)

    async def chat(self, request, raw_request_info=None):
        from ray.serve.llm.openai_api_models import ChatCompletionResponse, ChatCompletionStreamResponse

        if (why := _unsupported(request, self.engine.engine.stop_ids)) is not None:
            yield _error(why)
            return
        messages = [m if isinstance(m, dict) else m.model_dump() for m in request.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        params = self._params(request, request.max_completion_tokens or request.max_tokens)
        gens = await self._generate(request.model, [list(ids)], params, request.n, request.seed)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            yield [ChatCompletionStreamResponse(id=rid, created=created, model=request.model, choices=[
                {"index": i, "delta": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}])
                for i, g in enumerate(gens)]
            return
        used = sum(g.completion_tokens for g in gens)
        yield ChatCompletionResponse(id=rid, created=created, model=request.model, choices=[
            {"index": i, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
            for i, g in enumerate(gens)],
            usage={"prompt_tokens": len(ids) * request.n, "completion_tokens": used, "total_tokens": len(ids) * request.n + used})

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead engine gets the replica replaced."""
        await self.engine.check_health()
