"""The in-context DP mechanism: disjoint groups, clipped votes, Laplace or Gaussian noise, noisy argmax, and
what each generated example is charged (see dpsynth.incontext for the method and its accounting)."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable

import torch

from dpsynth.config import InContextConfig
from dpsynth.data import Example
from dpsynth.errors import UserError
from dpsynth.privacy import CalibrationError, Event, Gaussian, Laplace, calibrate
from dpsynth.progress import progress_bar

log = logging.getLogger(__name__)

SENSITIVITY_L1 = 2.0
"""L1 change of the summed votes when one group's probability vector is replaced by another."""
SENSITIVITY_L2 = math.sqrt(2.0)
"""L2 change of the same (the largest L2 distance between two probability vectors)."""
NOISE_BOUNDS = (1e-3, 1e6)


# --- groups ------------------------------------------------------------------------------------------

def _record_hash(seed: int, ex: Example) -> bytes:
    return hashlib.sha256(f"{seed}\x00{ex.label}\x00{ex.text}".encode()).digest()


def _unit_hash(seed: int, ex: Example) -> bytes:
    """The group key: the record's privacy unit (all of a unit's records vote in one group), else the record."""
    return hashlib.sha256(f"{seed}\x00unit\x00{ex.unit}".encode()).digest() if ex.unit else _record_hash(seed, ex)


def assign_groups(train: tuple[Example, ...] | list[Example], labels: tuple[str, ...], groups: int, per_group: int,
                  seed: int) -> dict[str, list[tuple[Example, ...]]]:
    """Label-homogeneous disjoint groups of the TRAIN examples: label -> `groups` tuples of <= per_group examples.

    A record's group is a hash of its privacy unit's key (of the record itself when it is its own unit); a prepared
    unit's key is a keyed hash of that unit's own content or unit-column value (dpsynth.data.prepare), never a
    position, so adding or removing one unit changes the contents of at most one group per label, and every vote for
    an example of one label comes from that label's groups (see dpsynth.incontext); the group count is fixed by the
    config. The per_group cap keeps the records with the smallest hashes of their own (label, text): a neighbour
    can only change the cap's choice inside the one group its unit falls in.
    """
    buckets: dict[str, list[list[tuple[bytes, Example]]]] = {lab: [[] for _ in range(groups)] for lab in labels}
    for ex in train:
        group = int.from_bytes(_unit_hash(seed, ex)[:8], "little") % groups
        buckets[ex.label][group].append((_record_hash(seed, ex)[8:], ex))
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


def calibrate_noise(ic: InContextConfig, target: float, delta: float, accountant: str, examples: int,
                    prior: tuple[Event, ...] = ()) -> float:
    """Smallest per-token noise multiplier whose whole plan meets `target` (the one calibrator)."""
    try:
        return calibrate(lambda nm: plan_events(ic, nm, examples, prior), target, delta, accountant=accountant,
                         bounds=NOISE_BOUNDS)
    except CalibrationError as e:
        raise UserError(f"privacy.epsilon: {e} ({examples} examples x {ic.max_new_tokens} tokens; lower "
                        "incontext.num_examples or incontext.max_new_tokens)") from None


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


def generate_rows(voter, groups: dict[str, list[tuple[Example, ...]]], counts: dict[str, int], ic: InContextConfig,
                  noise_multiplier: float, charge: Callable[[list[Event]], bool], generator: torch.Generator, *,
                  state: dict | None = None, stop: Callable[[], bool] = lambda: False,
                  save: Callable[[dict], None] = lambda state: None, show_progress: bool = False) -> tuple[dict, bool]:
    """Generate counts[label] examples (labels interleaved); stop at the first refused charge, or at a stop request.

    `charge(events)` must durably charge one example's events and return False when the ledger refuses. `state`
    ({"jobs_done", "rows", "stats"}) resumes an earlier attempt and is handed to `save` after every example.
    Returns (state, finished): finished is False only when `stop()` asked to stop before the last job.
    """
    jobs = sorted(((i, lab) for lab, n in counts.items() for i in range(n)))
    state = state or {"jobs_done": 0, "rows": [], "stats": {
        "examples_charged": 0, "token_steps_charged": 0, "tokens_released": 0, "token_steps_computed": 0,
        "fallback_tokens": 0, "empty": 0, "stopped_by_ledger": False}}
    stats, rows = state["stats"], state["rows"]
    per_example = example_events(ic, noise_multiplier)
    with progress_bar("in-context DP generation", total=len(jobs), enabled=show_progress) as advance:
        advance("resumed", state["jobs_done"])
        for _, label in jobs[state["jobs_done"]:]:
            if stop():
                save(state)
                return state, False
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
            state["jobs_done"] += 1
            save(state)
            advance(label)
    return state, True
