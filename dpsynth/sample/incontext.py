"""Training-free DP synthetic text: DP few-shot generation by noisy aggregation of in-context votes.

Method: Tang, Shin, Inan, Manoel, Mireshghallah, Lin, Gopi, Kulkarni, Sim, "Privacy-preserving in-context
learning with differentially private few-shot generation" (ICLR 2024); the rigorous form of SafeSynthDP's
"noise in generation" (arXiv 2412.20641). Mechanisms: Dwork & Roth 2014, "The Algorithmic Foundations of
Differential Privacy" (Laplace: Thm 3.6; Gaussian: Thm A.1 / App. A; post-processing: Prop 2.1).

How one synthetic example of label L is generated, token by token:

1. The train split's examples of label L are assigned to ``groups`` disjoint groups by a keyed hash of the
   record (never by position: inserting one record into a shuffled list would move every later record to
   another group). A group uses at most ``examples_per_group`` of its records (smallest hash first). The
   number of groups is fixed by the config, not by the data.
2. Each group prompts the public base model with its own examples (``prefix + text`` lines, the Prefix-LM
   prefix of Kurakin et al. 2023) followed by ``prefix + tokens so far``; all rows are scored in one batched
   step per token: one ``generate`` on vLLM (prefix caching) or one forward on transformers (KV cache).
   Both engines return the model's raw next-token logits, so the votes below do not depend on the engine.
3. Each group's vote is its next-token distribution at ``temperature`` restricted to the candidate set
   (the public model's top ``candidates`` tokens given only ``prefix + tokens so far``: no private data,
   Tang et al.'s "reduce vocabulary publicly"), optionally clipped to its top-k and renormalised, so every
   vote is a probability vector (L1 norm 1).
4. The votes are summed and Laplace (scale b) or Gaussian (std sigma) noise is added to every coordinate;
   the released token is the noisy argmax (post-processing of the noisy histogram).

Adjacency and sensitivity: add/remove one example. The record lands in exactly one group (its hash), and
can change only that group's prompt (it may displace one member of that group), so exactly one vote
changes, from one probability vector to another: L1 change <= 2, L2 change <= sqrt(2). The events are
normalised to sensitivity 1 (dpsynth.privacy.events): Laplace(noise_multiplier = b / 2),
Gaussian(noise_multiplier = sigma / sqrt(2)). The Gaussian is isotropic, so the 1-d pair at shift
sqrt(2) is exact for any L2 shift. For Laplace the PLD accounting treats the vector mechanism through the
1-d Laplace pair at shift Delta_1 (as dp_accounting's LaplaceDpEvent does); the certificate also records
the unconditional pure-DP bound (basic composition of Delta_1 / b per token) next to it.

Public fallback (optional): the count of groups whose top token equals the public model's top token has
sensitivity 1; it is released with its own noise and compared with a threshold, and when it passes the
public token is emitted instead of the noisy argmax. Both mechanisms are charged at every step, so the
fallback improves utility but never saves budget (sparse-vector-style savings are not claimed).

Accounting: every example is charged ``max_new_tokens`` token steps before its first token is computed,
whatever its length. An example that ends early (EOS or newline) is the post-processing (truncation) of
the fixed-length mechanism, so the number of charged mechanisms never depends on the data; a
data-dependent stop would need a privacy filter. The run's plan (num_examples x max_new_tokens steps, plus
the DP label histogram if any) is admitted by the ledger first; when the ledger refuses a charge,
generation stops and what was completed is kept. The certificate's epsilon comes from the charges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from dpsynth.config import InContextConfig, JobConfig
from dpsynth.data import Example, Splits, format_prefix, prepare
from dpsynth.errors import UserError
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.privacy import Budget, BudgetExceeded, Event, Gaussian, Laplace, epsilon, open_ledger
from dpsynth.privacy.certificate import FORMAT as CERTIFICATE_FORMAT
from dpsynth.privacy.certificate import code_version, now, read_certificate, write_certificate
from dpsynth.progress import progress_bar

from .corpus import label_counts, serialize

log = logging.getLogger(__name__)

SENSITIVITY_L1 = 2.0
"""L1 change of the summed votes when one group's probability vector is replaced by another."""
SENSITIVITY_L2 = math.sqrt(2.0)
"""L2 change of the same (the largest L2 distance between two probability vectors)."""
_NM_RANGE = (1e-3, 1e6)


# --- groups ------------------------------------------------------------------------------------------

def _record_hash(seed: int, ex: Example) -> bytes:
    return hashlib.sha256(f"{seed}\x00{ex.label}\x00{ex.text}".encode()).digest()


def assign_groups(train: tuple[Example, ...] | list[Example], labels: tuple[str, ...], groups: int, per_group: int,
                  seed: int) -> dict[str, list[tuple[Example, ...]]]:
    """Label-homogeneous disjoint groups of the TRAIN examples: label -> `groups` tuples of <= per_group examples.

    A record's group is a keyed hash of the record itself, so adding or removing one record changes the
    contents of at most one group (see the module docstring); the group count is fixed by the config.
    """
    buckets: dict[str, list[list[tuple[bytes, Example]]]] = {lab: [[] for _ in range(groups)] for lab in labels}
    for ex in train:
        h = _record_hash(seed, ex)
        buckets[ex.label][int.from_bytes(h[:8], "little") % groups].append((h[8:], ex))
    return {lab: [tuple(ex for _, ex in sorted(b, key=lambda t: t[0])[:per_group]) for b in bs]
            for lab, bs in buckets.items()}


# --- the mechanism -----------------------------------------------------------------------------------

def clip_votes(logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """Each row (one group's next-token logits over the candidate set) -> a probability vector, L1 norm 1."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        keep = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def noise_scale(mechanism: str, noise_multiplier: float, sensitivity: float | None = None) -> float:
    """Laplace scale b or Gaussian std sigma, in vote units, for a normalised noise multiplier."""
    if sensitivity is None:
        sensitivity = SENSITIVITY_L1 if mechanism == "laplace" else SENSITIVITY_L2
    return noise_multiplier * sensitivity


def sample_noise(shape, mechanism: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """i.i.d. Laplace(0, scale) (difference of two exponentials) or N(0, scale^2) noise, float64."""
    if mechanism == "laplace":
        e1 = torch.empty(shape, dtype=torch.float64).exponential_(generator=generator)
        e2 = torch.empty(shape, dtype=torch.float64).exponential_(generator=generator)
        return scale * (e1 - e2)
    if mechanism == "gaussian":
        return scale * torch.randn(shape, dtype=torch.float64, generator=generator)
    raise ValueError(f"unknown mechanism {mechanism!r}")


def token_event(mechanism: str, noise_multiplier: float, count: int = 1) -> Event:
    return (Laplace if mechanism == "laplace" else Gaussian)(noise_multiplier, count)


def example_events(ic: InContextConfig, noise_multiplier: float) -> list[Event]:
    """What one generated example is charged: max_new_tokens noisy argmaxes (+ as many fallback tests)."""
    events = [token_event(ic.mechanism, noise_multiplier, ic.max_new_tokens)]
    if ic.public_fallback:
        events.append(token_event(ic.mechanism, ic.fallback_noise_multiplier, ic.max_new_tokens))
    return events


def plan_events(ic: InContextConfig, noise_multiplier: float, examples: int, prior: list[Event] = ()) -> list[Event]:
    return list(prior) + [e.__class__(e.noise_multiplier, e.count * examples) for e in example_events(ic, noise_multiplier)]


def pure_epsilon(events) -> float:
    """Unconditional pure-DP bound by basic composition (Dwork & Roth Thm 3.16): sum of count / b over Laplace
    events; inf if any event is not pure (Gaussian)."""
    total = 0.0
    for e in events:
        if not isinstance(e, Laplace):
            return math.inf
        total += e.count / e.noise_multiplier
    return total


def calibrate(ic: InContextConfig, target: float, delta: float, accountant: str, examples: int,
              prior: list[Event] = (), rel_tol: float = 1e-3) -> float:
    """Smallest per-token noise multiplier whose whole plan meets `target` (bisection on log scale)."""
    def eps(nm: float) -> float:
        try:
            return epsilon(plan_events(ic, nm, examples, prior), delta, accountant)
        except (ArithmeticError, IndexError, ValueError):  # dp_accounting's PLD fails at absurdly small noise
            return math.inf

    hi = 1.0
    while eps(hi) > target:
        hi *= 4.0
        if hi > _NM_RANGE[1]:
            raise UserError(f"privacy.epsilon: {target} cannot be met by {examples} examples x {ic.max_new_tokens} "
                            "tokens (prior events or the fallback test alone spend more); lower incontext.num_examples")
    lo = hi / 4.0
    while eps(lo) <= target:
        hi, lo = lo, lo / 4.0
        if lo < _NM_RANGE[0]:
            return hi
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + rel_tol:
            break
    return hi


# --- the voters: G group prompts + 1 public prompt, one batched step per token --------------------------

class _Rows:
    """The prompts both voters score: each group's few-shot prompt, then the public (example-free) prompt."""

    def __init__(self, tok, template: str, dataset: str, max_length: int):
        self.tok, self.template, self.dataset, self.max_length = tok, template, dataset, max_length
        self.newline = tok("\n", add_special_tokens=False).input_ids
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        self.stop_ids = sorted({tok.eos_token_id, *[i for i, t in enumerate(texts) if "\n" in t]})
        self._rows: list[list[int]] = []

    def prompts(self, label: str, groups: list[tuple[Example, ...]]) -> list[list[int]]:
        """Token ids of each group's prompt, then the public prompt (last row)."""
        prefix = self.tok(format_prefix(self.template, self.dataset, label), add_special_tokens=False).input_ids
        rows = []
        for group in groups:
            ids: list[int] = []
            for ex in group:
                ids += prefix + self.tok(ex.text, add_special_tokens=False).input_ids[: self.max_length] + self.newline
            rows.append(ids + prefix)
        return rows + [list(prefix)]

    def close(self) -> None:
        """Release the engine (a no-op on transformers)."""


def max_prompt_tokens(tok, template: str, dataset: str, max_length: int, labels, per_group: int) -> int:
    """Longest row any label's prompts can have (data-independent: texts are cut to max_length tokens)."""
    prefix = max(len(tok(format_prefix(template, dataset, lab), add_special_tokens=False).input_ids) for lab in labels)
    return per_group * (prefix + max_length + len(tok("\n", add_special_tokens=False).input_ids)) + prefix


class GroupVoter(_Rows):
    """Next-token logits of every row on HF transformers.

    The rows share every generated token, so a step appends the same token to all rows and reuses the
    KV cache (left-padded rows, explicit position ids); ``cache=False`` recomputes from scratch (reference).
    """

    engine = "transformers"

    def __init__(self, model, tok, template: str, dataset: str, max_length: int, cache: bool = True):
        super().__init__(tok, template, dataset, max_length)
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
        ids = torch.full((len(self._rows), 1), token, dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=self._next_pos[:, None],
                         past_key_values=self._past, use_cache=True)
        self._past, self._next_pos = out.past_key_values, self._next_pos + 1
        return out.logits[:, -1].float()

    def _padded(self):
        width = max(len(r) for r in self._rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in self._rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in self._rows])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, pos

    def _prefill(self) -> torch.Tensor:
        ids, mask, pos = self._padded()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self._past, self._mask, self._next_pos = out.past_key_values, mask, pos[:, -1] + 1
        return out.logits[:, -1].float()

    def _full(self) -> torch.Tensor:
        ids, mask, pos = self._padded()
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()


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
                 max_num_seqs: int, dtype: str = "float32", block_size: int = 32, enforce_eager: bool = False):
        from .engines import require_vllm, vllm_engine_kwargs

        super().__init__(tok, template, dataset, max_length)
        vllm = require_vllm()
        kw = vllm_engine_kwargs(model_dir, dtype=dtype, lora_ranks=None, max_model_len=max_model_len,
                                max_num_seqs=max_num_seqs, enforce_eager=enforce_eager)
        self.llm = vllm.LLM(**kw, max_logprobs=-1, logprobs_mode="raw_logits", enable_prefix_caching=True,
                            block_size=block_size)
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
        self.llm.llm_engine.engine_core.shutdown()  # its engine process and KV cache, now rather than at exit


def choose_token(group_logits: torch.Tensor, public_logits: torch.Tensor, ic: InContextConfig, noise_multiplier: float,
                 generator: torch.Generator, exclude: list[int] = ()) -> tuple[int, bool]:
    """One DP token: (token id, whether the public fallback supplied it)."""
    public = public_logits.double().clone()
    if exclude:
        public[list(exclude)] = -math.inf
    if ic.candidates and ic.candidates < public.numel():
        cand = public.topk(ic.candidates).indices
    else:
        cand = torch.nonzero(torch.isfinite(public)).flatten()
    votes = clip_votes(group_logits[:, cand], ic.temperature, ic.top_k)
    if ic.public_fallback:
        top = int(torch.argmax(public[cand]))
        agree = float((votes.argmax(-1) == top).sum())
        noisy = agree + float(sample_noise((), ic.mechanism, noise_scale(ic.mechanism, ic.fallback_noise_multiplier, 1.0),
                                           generator))
        if noisy >= ic.fallback_threshold * votes.shape[0]:
            return int(cand[top]), True
    noisy = votes.sum(0) + sample_noise(votes.shape[1], ic.mechanism, noise_scale(ic.mechanism, noise_multiplier),
                                        generator)
    return int(cand[int(torch.argmax(noisy))]), False


def generate_rows(voter: GroupVoter | VLLMVoter, groups: dict[str, list[tuple[Example, ...]]], counts: dict[str, int],
                  ic: InContextConfig, noise_multiplier: float, charge: Callable[[list[Event]], bool],
                  generator: torch.Generator, show_progress: bool = False) -> tuple[list[dict], dict]:
    """Generate counts[label] examples (labels interleaved); stop at the first refused charge.

    `charge(events)` must durably charge one example's events and return False when the ledger refuses.
    """
    jobs = sorted(((i, lab) for lab, n in counts.items() for i in range(n)))
    stats = {"examples_charged": 0, "token_steps_charged": 0, "tokens_released": 0, "token_steps_computed": 0,
             "fallback_tokens": 0, "empty": 0, "stopped_by_ledger": False}
    rows: list[dict] = []
    per_example = example_events(ic, noise_multiplier)
    with progress_bar("in-context DP generation", total=len(jobs), enabled=show_progress) as advance:
        for _, label in jobs:
            if not charge(per_example):  # before any of its tokens exist
                stats["stopped_by_ledger"] = True
                log.info("ledger refused the next example: stopping with %d examples", len(rows))
                break
            stats["examples_charged"] += 1
            stats["token_steps_charged"] += ic.max_new_tokens
            logits = voter.start(voter.prompts(label, groups[label]))
            out: list[int] = []
            for t in range(ic.max_new_tokens):
                stats["token_steps_computed"] += 1
                token, public = choose_token(logits[:-1], logits[-1], ic, noise_multiplier, generator,
                                             exclude=voter.stop_ids if t == 0 else ())
                stats["fallback_tokens"] += public
                if token in voter.stop_ids:
                    break
                out.append(token)
                if t + 1 < ic.max_new_tokens:
                    logits = voter.step(token)
            stats["tokens_released"] += len(out)
            text = voter.tok.decode(out, skip_special_tokens=True).strip()
            if text:
                rows.append({"text": text, "label": label})
            else:
                stats["empty"] += 1
            advance(label)
    return rows, stats


# --- the run: plan, admit, generate, certify ---------------------------------------------------------

def incontext_hash(cfg: JobConfig) -> str:
    keep = cfg.model_dump(mode="json", include={"data", "model", "privacy", "incontext"})
    keep["privacy"].pop("ledger")
    keep["incontext"].pop("engine")  # same votes and charges on either engine
    keep["label_proportions"] = cfg.sampling.label_proportions
    keep["label_noise_multiplier"] = cfg.sampling.label_noise_multiplier
    return "ic-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def make_voter(cfg: JobConfig, splits: Splits) -> tuple[GroupVoter | VLLMVoter, dict]:
    """The voter on the engine `incontext.engine` names (auto: vLLM when importable; if its engine then fails to
    start, transformers), and the base model's certificate entry."""
    from dpsynth.models import load_base, load_tokenizer, resolve_base, weights_digest

    from .engines import choose_engine

    ic, mc = cfg.incontext, cfg.model
    if choose_engine(ic.engine, "incontext.engine") == "vllm":
        tok, where = load_tokenizer(mc), resolve_base(mc.base)
        longest = max_prompt_tokens(tok, mc.prefix_template, splits.name, mc.max_length, splits.labels, ic.examples_per_group)
        try:
            voter = VLLMVoter(where, tok, mc.prefix_template, splits.name, mc.max_length, dtype=mc.dtype,
                              max_model_len=longest + ic.max_new_tokens + 8, max_num_seqs=ic.groups + 1)
            return voter, {"name": mc.base, "sha256": weights_digest(where)}
        except Exception as e:  # vLLM raises bare RuntimeErrors from its engine process
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if ic.engine == "vllm":
                raise UserError(f"incontext.engine: the vLLM engine did not start ({why}); see the log above, "
                                "or use incontext.engine=transformers") from None
            log.warning("vLLM engine did not start (%s); falling back to transformers", why)
    model, tok, base = load_base(mc)
    return GroupVoter(model, tok, mc.prefix_template, splits.name, mc.max_length), base


def _fresh_generator() -> torch.Generator:
    # DP noise must not be reproducible from a seed: fresh OS entropy every run.
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def generate(cfg: JobConfig, *, show_progress: bool = True, generator: torch.Generator | None = None) -> Path:
    """Training-free DP corpus into cfg.output_dir: synthetic.jsonl + certificates (see module docstring)."""
    from dpsynth.train.driver import dp_label_histogram, resolve_delta

    from .corpus import resolve_proportions

    ic, acc = cfg.incontext, cfg.privacy.accountant
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if (run_dir / "certificate.json").exists():
        cert = read_certificate(run_dir / "certificate.json")
        if cert.get("config_hash") != incontext_hash(cfg):
            raise UserError(f"output_dir: {run_dir} already holds a certified run with a different config; choose another output_dir")
        log.info("%s already holds a certified in-context corpus for this config (eps=%.3f); reusing it", run_dir, cert["epsilon"])
        return run_dir
    if ic.mechanism == "laplace" and acc == "prv":
        raise UserError("privacy.accountant: 'prv' cannot account Laplace; use pld (or rdp) with incontext.mechanism=laplace")
    splits: Splits = prepare(cfg.data)
    ledger = open_ledger(cfg.privacy.ledger)
    delta = resolve_delta(cfg, splits, ledger.budget(splits.fingerprint))
    dp_labels = cfg.sampling.label_proportions == "dp"
    prior = [Gaussian(cfg.sampling.label_noise_multiplier)] if dp_labels else []
    nm = ic.noise_multiplier or calibrate(ic, cfg.privacy.epsilon, delta, acc, ic.num_examples, prior)
    plan = plan_events(ic, nm, ic.num_examples, prior)
    planned_eps = epsilon(plan, delta, acc)
    if planned_eps > cfg.privacy.epsilon * (1 + 1e-9):
        raise UserError(f"incontext.noise_multiplier: {nm} spends eps={planned_eps:.3f} over {ic.num_examples} x "
                        f"{ic.max_new_tokens} tokens, above privacy.epsilon={cfg.privacy.epsilon}")
    try:
        ledger.set_budget(splits.fingerprint, Budget(cfg.privacy.dataset_epsilon or cfg.privacy.epsilon, delta))
    except ValueError as e:
        raise UserError(f"privacy: {e}") from None
    run_id = f"{run_dir.name}-incontext-{uuid.uuid4().hex[:8]}"
    ledger.open_run(run_id, splits.fingerprint, plan, acc)
    log.info("in-context DP generation: %s, noise multiplier %.4g (scale %.4g), %d groups x %d examples per label, "
             "plan eps=%.3f (%s, delta=%.3g)", ic.mechanism, nm, noise_scale(ic.mechanism, nm), ic.groups,
             ic.examples_per_group, planned_eps, acc, delta)

    def charge(events: list[Event]) -> bool:
        try:
            for e in events:
                ledger.charge(run_id, e)
        except BudgetExceeded:
            return False
        return True

    certificate, voter = None, None
    try:
        t_engine = time.monotonic()
        voter, base = make_voter(cfg, splits)  # before any charge: an engine that fails to start costs nothing
        engine_start = time.monotonic() - t_engine
        label_dist = None
        if dp_labels:
            ledger.charge(run_id, prior[0])
            label_dist = dp_label_histogram([ex.label for ex in splits.train], splits.labels, cfg.sampling.label_noise_multiplier)
            props = label_dist
        else:
            props = resolve_proportions(run_dir, splits.labels, cfg.sampling.label_proportions)
        counts = label_counts(splits.labels, props, ic.num_examples)
        groups = assign_groups(splits.train, splits.labels, ic.groups, ic.examples_per_group, ic.seed)
        sizes = {lab: sum(len(g) for g in gs) for lab, gs in groups.items()}
        t0 = time.monotonic()
        rows, stats = generate_rows(voter, groups, counts, ic, nm, charge, generator or _fresh_generator(), show_progress)
        wall = time.monotonic() - t0
        charged = ledger.charged(run_id)
        certificate = ledger.certify(run_id, delta, {
            "format": CERTIFICATE_FORMAT, "created": now(), "config_hash": incontext_hash(cfg), "generator": "in_context",
            "mechanism": ic.mechanism, "noise_multiplier": nm, "noise_scale": noise_scale(ic.mechanism, nm),
            "sensitivity": {"l1": SENSITIVITY_L1, "l2": SENSITIVITY_L2, "adjacency": "add/remove one example"},
            "sampling_rate": 1.0, "max_grad_norm": None, "token_steps": stats["token_steps_charged"],
            "examples_charged": stats["examples_charged"], "planned_epsilon": planned_eps,
            "pure_dp_epsilon": pure_epsilon(charged) if ic.mechanism == "laplace" and not dp_labels else None,
            "incontext": ic.model_dump(mode="json"), "examples_in_groups": sizes,
            "label_histogram_noise_multiplier": cfg.sampling.label_noise_multiplier if dp_labels else None,
            "dataset_fingerprint": splits.fingerprint, "dataset": {"name": splits.name, "train_examples": len(splits.train)},
            "base_model": base, "code_version": code_version(),
        })
    finally:
        if voter is not None:
            voter.close()  # vLLM's engine process and KV cache, now rather than at exit
        if certificate is None:
            ledger.close_run(run_id, None)  # an exception ends the run; its charges stay spent
    if isinstance(voter, VLLMVoter):
        stats.update(prompt_tokens=voter.prompt_tokens, prefix_cache_hit_tokens=voter.cached_tokens)
    metrics = {**stats, "engine": voter.engine, "engine_start_s": round(engine_start, 3), "wall_s": round(wall, 3), "tokens_per_s": stats["tokens_released"] / wall if wall else None,
               "token_steps_per_s": stats["token_steps_computed"] / wall if wall else None, "label_counts": counts,
               "examples": len(rows)}
    body = serialize(rows, "jsonl")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    atomic_write_json(run_dir / "labels.json", list(splits.labels))
    if label_dist is not None:
        atomic_write_json(run_dir / "label_distribution.json", label_dist)
    atomic_write_json(run_dir / "metrics.json", {"incontext": metrics})
    atomic_write_text(run_dir / "synthetic.jsonl", body)
    write_certificate(run_dir / "synthetic.jsonl.certificate.json", {
        **certificate, "corpus": {"file": "synthetic.jsonl", "sha256": hashlib.sha256(body.encode()).hexdigest(),
                                  "examples": len(rows), "label_counts": counts, "engine": voter.engine,
                                  "generator": "in_context", "created": now()}})
    write_certificate(run_dir / "certificate.json", certificate)  # last: its presence marks a complete run
    return run_dir
