"""The voters: every group's few-shot prompt plus the public prompt, scored in one batched step per token, on HF
transformers (KV cache) or vLLM (prefix caching); both return raw next-token logits, so votes and charges do not
depend on the engine."""

from __future__ import annotations

import logging
import math

import torch

from dpsynth.config import JobConfig
from dpsynth.data import Example, Splits, format_prefix
from dpsynth.errors import UserError

log = logging.getLogger(__name__)


# --- the voters: G group prompts + 1 public prompt, one batched step per token --------------------------

class _Rows:
    """The prompts both voters score: each group's few-shot prompt, then the public (example-free) prompt."""

    def __init__(self, tok, template: str, dataset: str, max_length: int, prefixes: dict[str, str] | None = None):
        self.tok, self.template, self.dataset, self.max_length = tok, template, dataset, max_length
        self.prefixes = prefixes  # each cell's prefix (prompts.plain_prefixes); None: format_prefix of the label
        self.newline = tok("\n", add_special_tokens=False).input_ids
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        self.stop_ids = sorted({tok.eos_token_id, *[i for i, t in enumerate(texts) if "\n" in t]})
        self._rows: list[list[int]] = []

    def prompts(self, label: str, groups: list[tuple[Example, ...]]) -> list[list[int]]:
        """Token ids of each group's prompt, then the public prompt (last row)."""
        text = self.prefixes[label] if self.prefixes is not None else format_prefix(self.template, self.dataset, label)
        prefix = self.tok(text, add_special_tokens=False).input_ids
        rows = []
        for group in groups:
            ids: list[int] = []
            for ex in group:
                ids += prefix + self.tok(ex.text, add_special_tokens=False).input_ids[: self.max_length] + self.newline
            rows.append(ids + prefix)
        return rows + [list(prefix)]

    def close(self) -> None:
        """Release the engine (a no-op on transformers)."""


def max_prompt_tokens(tok, template: str, dataset: str, max_length: int, labels, per_group: int,
                      prefixes: dict[str, str] | None = None) -> int:
    """Longest row any label's prompts can have (data-independent: texts are cut to max_length tokens)."""
    texts = [prefixes[lab] if prefixes is not None else format_prefix(template, dataset, lab) for lab in labels]
    prefix = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    return per_group * (prefix + max_length + len(tok("\n", add_special_tokens=False).input_ids)) + prefix


class GroupVoter(_Rows):
    """Next-token logits of every row on HF transformers.

    The rows share every generated token, so a step appends the same token to all rows and reuses the
    KV cache (left-padded rows, explicit position ids); ``cache=False`` recomputes from scratch (reference).
    """

    engine = "transformers"

    def __init__(self, model, tok, template: str, dataset: str, max_length: int, cache: bool = True,
                 prefixes: dict[str, str] | None = None):
        super().__init__(tok, template, dataset, max_length, prefixes)
        self.model, self.cache = model.eval(), cache

    @torch.inference_mode()
    def start(self, rows: list[list[int]]) -> torch.Tensor:
        self._rows = [list(r) for r in rows]
        return self._full() if not self.cache else self._prefill()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        for r in self._rows:
            r.append(token)
        if not self.cache:
            return self._full()
        ids = torch.full((len(self._rows), 1), token, dtype=torch.long, device=self._mask.device)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=self._next_pos[:, None],
                         past_key_values=self._past, use_cache=True)
        self._past, self._next_pos = out.past_key_values, self._next_pos + 1
        return out.logits[:, -1].float().cpu()

    def _padded(self):
        from dpsynth.sample.engines import left_pad

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        return left_pad(self._rows, pad, self.model.device)

    def _prefill(self) -> torch.Tensor:
        ids, mask, pos = self._padded()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self._past, self._mask, self._next_pos = out.past_key_values, mask, pos[:, -1] + 1
        return out.logits[:, -1].float().cpu()

    def _full(self) -> torch.Tensor:
        ids, mask, pos = self._padded()
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float().cpu()


class VLLMVoter(_Rows):
    """Next-token logits of every row on vLLM: a step is one ``llm.generate`` of all rows (max_tokens=1).

    The engine returns every row's whole-vocabulary logits (``logprobs=-1``, ``max_logprobs=-1``) in
    ``logprobs_mode="raw_logits"``: the model's output before temperature, penalties or top-k/top-p, i.e. the
    same numbers GroupVoter returns (the ``processed_*`` modes would fold vLLM's own sampling settings into
    the votes). The vote is then formed exactly as on transformers (choose_token / clip_votes). Prefix
    caching keeps each row's KV blocks between steps and between examples of one label, so a step recomputes
    only the rows' last partial block (``block_size`` tokens; vLLM's CPU backend needs a multiple of 32).
    """

    engine = "vllm"

    def __init__(self, model_dir: str, tok, template: str, dataset: str, max_length: int, *, max_model_len: int,
                 max_num_seqs: int, dtype: str = "float32", block_size: int = 32, enforce_eager: bool = False,
                 prefixes: dict[str, str] | None = None):
        from dpsynth.sample.engines import VLLMEngine

        super().__init__(tok, template, dataset, max_length, prefixes)
        self.offline = VLLMEngine(model_dir, tok, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                  enforce_eager=enforce_eager, extra=dict(max_logprobs=-1, logprobs_mode="raw_logits",
                                                                          enable_prefix_caching=True, block_size=block_size))
        self.llm, vllm = self.offline.llm, self.offline.vllm
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self._params = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, flat_logprobs=True,
                                           detokenize=False)
        self.prompt_tokens = self.cached_tokens = 0  # prefix-cache hits, for the benchmark

    def start(self, rows: list[list[int]]) -> torch.Tensor:
        self._rows = [list(r) for r in rows]
        return self._logits()

    def step(self, token: int) -> torch.Tensor:
        for r in self._rows:
            r.append(token)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in self._rows], self._params, use_tqdm=False)
        logits = torch.full((len(outs), self.vocab), -math.inf)
        for i, o in enumerate(outs):
            lp = o.outputs[0].logprobs  # FlatLogprobs, one position: the sampled token first, then the vocabulary
            a, b = lp.start_indices[0], lp.end_indices[0]
            logits[i, torch.tensor(lp.token_ids[a:b])] = torch.tensor(lp.logprobs[a:b], dtype=torch.float32)
            self.prompt_tokens += len(o.prompt_token_ids)
            self.cached_tokens += o.num_cached_tokens or 0
        if not torch.isfinite(logits).all():
            raise RuntimeError("vLLM returned logits for part of the vocabulary only")
        return logits

    def close(self) -> None:
        self.offline.close()  # its engine process and KV cache, now rather than at exit


def make_voter(cfg: JobConfig, splits: Splits) -> tuple[GroupVoter | VLLMVoter, dict]:
    """The voter on the engine `incontext.engine` names (auto: vLLM when importable; if its engine then fails to
    start, transformers), and the base model's certificate entry."""
    from dpsynth.models import load_base, load_tokenizer, resolve_base, weights_digest

    from dpsynth.sample.engines import choose_engine

    from dpsynth.prompts import plain_prefixes

    ic, mc = cfg.incontext, cfg.model
    if choose_engine(ic.engine, "incontext.engine") == "vllm":
        tok, where = load_tokenizer(mc), resolve_base(mc.base)
        prefixes = plain_prefixes(cfg, tok, splits.name, splits.labels)
        longest = max_prompt_tokens(tok, mc.prefix_template, splits.name, mc.max_length, splits.labels, ic.examples_per_group,
                                    prefixes)
        try:
            voter = VLLMVoter(where, tok, mc.prefix_template, splits.name, mc.max_length, dtype=mc.dtype,
                              max_model_len=longest + ic.max_new_tokens + 8, max_num_seqs=ic.groups + 1, prefixes=prefixes,
                              enforce_eager=ic.enforce_eager)
            return voter, {"name": mc.base, "sha256": weights_digest(where)}
        except Exception as e:  # vLLM raises bare RuntimeErrors from its engine process
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if ic.engine == "vllm":
                raise UserError(f"incontext.engine: the vLLM engine did not start ({why}); see the log above, "
                                "or use incontext.engine=transformers") from None
            log.warning("vLLM engine did not start (%s); falling back to transformers", why)
    model, tok, base = load_base(mc)
    return GroupVoter(model, tok, mc.prefix_template, splits.name, mc.max_length,
                      prefixes=plain_prefixes(cfg, tok, splits.name, splits.labels)), base


