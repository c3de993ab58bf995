"""A budget in time, not in epochs: `training.steps: auto` sizes a run to `training.time_budget`.

The whole run is planned before training starts: a probe measures, on PUBLIC dummy tokens of the planned shape (the
conditioning prompt and random token ids, as long as the DP length histogram says the texts are), one DP step's
forward/backward, a decode step at the sampler's batch and at a quarter of it, and the scoring speed, where a training
worker runs (a Ray task with a worker's resources). From those, sampling (each label's batches, each run to the cap
on new tokens, as a batch waits on its longest text), label sharpening and the evaluation are
estimated first, and training gets what is left, never fewer than `training.min_steps` steps (a small dataset gets
more epochs, not fewer steps). Nothing private is timed: a step time measured on the private batch would make the
number of steps a function of the data. When even the floor does not fit, the corpus is scaled down (and the log
says what was cut) before anything more is admitted.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from dpsynth.config import JobConfig

log = logging.getLogger(__name__)

FIXED_OVERHEAD_S = 110.0
"""What the run spends outside the steps, sampling and evaluation: Ray start, the data, the DP histograms and the
probe before the plan (56 s Rotten Tomatoes, 61 s SMS), the training worker's start, model load and checkpoints
(49 s, 50 s), and the certificate (2-core VM, 2026-12-03, bench/genres.py logs). 45 s, from the demo on a faster VM
and without the time before the plan, let a 15-minute SMS plan run 16.6 minutes."""
EVAL_FIXED_S = 60.0
"""Classifiers, MAUVE, the DP-SGD baseline and the corpus attacks of the default evaluation, the zero-shot corpus
aside: 47 s on Rotten Tomatoes, 40 s on SMS (2-core VM, 2026-12-01, evaluation.json timings_s), rounded up."""
EVAL_PER_REAL_TOKEN_S = 1.5e-4
"""The evaluation's classifiers trained on the real data (the TF-IDF tuning grid, the utility table) grow with the
real training texts: their tuning + utility seconds were about 45 + 1.2e-4 x (train texts x mean tokens, uncut) on
questions (45k tokens: 49-55 s), SMS (84k: 36-48 s), Rotten Tomatoes (250k: 37-56 s) and news (630k: 97-135 s)
(2-core VM, 2026-12-03/04, evaluation.json timings_s); rounded up. A news run that counted none of it ran 908 s on a
900 s plan."""
ATTACK_PASSES = 6
"""Forward passes per attack example in `dpsynth run`'s audit: the loss attack scores the records of attack_examples
member and as many non-member units, each with and without the adapter (4), and the corpus attacks embed them (~2).
Measured on SMS (2-core VM): 14.6 s for 128 + 128 units. (`dpsynth audit`'s canaries are not part of a run.)"""
STEP_OVERHEAD = 1.05
"""A real step over the probe's forward/backward scaled linearly to the expected batch (Poisson spread, clipping,
noise, the optimizer). Against the slowest of PROBE_REPEATS timings, real steps ran at 1.01 (Rotten Tomatoes), 0.81
(questions) and 0.84 (news at 64 tokens) of that scaling (2-core VM, 2026-12-03, metrics.json against the logged
probe); against one timing they had run at 0.77-1.15, and once 1.64 (news at 128 tokens). The budget is a bound,
so the plan takes the slowest ratio measured, rounded up."""
MIN_CORPUS = 100
MIN_ZERO_SHOT = 50
MIN_ATTACK = 32
"""Floors of what a tight budget may cut: the corpus, then the zero-shot floor's corpus and the attack examples."""
PROBE_REPEATS = 3
"""Timed repetitions of the probe's step after its warm-up; the plan takes the slowest. On the 2-core VM a single
timing read a news step at 0.59 of what training then took, and ten in a row ranged 1.09-4.11 s (bench/probe_noise.py,
2026-12-03): a budget is a bound, so the plan reads the machine on its slow side."""
PROBE_BATCH = 8
"""Examples the probe times (a step's cost grows linearly with its batch): long documents stay cheap to probe."""
GENERATE_PROBE_TOKENS = 16
"""Decode steps the probe times per batch: the prefill is spread over them (a bound: a real batch spreads it wider)."""
RUN_PLAN = "run_plan.json"
"""Where a run keeps its plan, so that a resume repeats it (its steps and what it cut)."""


@dataclass(frozen=True)
class Speeds:
    step_s: float
    """One DP step (expected batch) on a training worker."""
    generate_tokens_per_s: float
    """Rows a second that one more row of a generation batch costs: a decode step of n rows takes
    generate_step_fixed_s + n / generate_tokens_per_s."""
    score_tokens_per_s: float
    generate_step_fixed_s: float = 0.0
    """A decode step's cost whatever its rows (the weights read, the kernels' start)."""
    prompt_cached: bool = True
    """Whether scoring runs each prompt once (prefixlm.score_after_prefix: a lean, frozen head); else every scored
    text pays for its prompt too."""

    def decode_step_s(self, rows: int) -> float:
        return self.generate_step_fixed_s + rows / self.generate_tokens_per_s


@dataclass(frozen=True)
class RunPlan:
    steps: int
    num_examples: int
    estimates_s: dict[str, float]
    cut: str | None = None
    """What was cut to fit, in words (each key, from and to)."""
    zero_shot_examples: int | None = None
    attack_examples: int | None = None
    """The evaluation's sizes where they were cut (None: as configured)."""
    planned_from: dict | None = None
    """The configured sizes this plan cut from: a resume keeps a cut only where the command still asks for them."""

    SIZES = (("sampling", "num_examples"), ("evaluation", "zero_shot_examples"), ("evaluation", "attack_examples"))

    def summary(self, budget_s: float) -> str:
        parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.estimates_s.items())
        total = sum(self.estimates_s.values())
        return (f"run plan: {self.steps} DP steps; estimated {parts}; total {total / 60:.1f} min of "
                f"training.time_budget {budget_s / 60:.1f} min" + (f"; {self.cut}" if self.cut else ""))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RunPlan | None:
        """The kept plan, or None where it is not one this version wrote (then a resume keeps only its steps)."""
        try:
            return cls(**{f.name: d[f.name] for f in fields(cls)})
        except (KeyError, TypeError):
            return None

    def applied_to(self, cfg: JobConfig) -> JobConfig:
        """The config this plan runs: its steps, and the sizes it cut where cfg still has the ones it cut from."""
        planned = {"num_examples": self.num_examples, "zero_shot_examples": self.zero_shot_examples,
                   "attack_examples": self.attack_examples}
        update: dict[str, dict] = {"training": {"steps": self.steps}, "sampling": {}, "evaluation": {}}
        for section, key in self.SIZES:
            now = getattr(getattr(cfg, section), key)
            if planned[key] is not None and (self.planned_from is None or self.planned_from.get(key) == now):
                update[section][key] = planned[key]
            elif planned[key] is not None and planned[key] != self.planned_from.get(key):  # a cut it no longer asks for
                log.warning("%s.%s: the command now asks for %s; the kept plan had cut %s to %s", section, key, now,
                            self.planned_from.get(key), planned[key])
        return cfg.model_copy(update={name: getattr(cfg, name).model_copy(update=values)
                                      for name, values in update.items()})


def coarse(speeds: Speeds) -> Speeds:
    """The probe's speeds on a grid of 2^(1/8) (about 9 %): what the plan (hence the released step count) reads of
    a wall-clock measurement is the machine's speed class; the few percent that the machine's state after reading
    the private data (caches, clocks) might move it changes the plan only across a grid line."""
    def q(x: float) -> float:
        return 2.0 ** (round(math.log2(max(x, 1e-9)) * 8) / 8)

    return Speeds(q(speeds.step_s), q(speeds.generate_tokens_per_s), q(speeds.score_tokens_per_s),
                  q(speeds.generate_step_fixed_s) if speeds.generate_step_fixed_s > 0 else 0.0, speeds.prompt_cached)


def dummy_rows(tok, head: list[int], tokens: int, batch: int) -> list:
    """`batch` examples of `tokens` tokens: the prompt `head` (no loss), then random ids (the loss positions). Public
    dummy inputs of the planned shape: nothing to protect."""
    import numpy as np

    from dpsynth.prefixlm import Encoded

    rng = np.random.default_rng(0)
    text = max(1, tokens - len(head))
    return [Encoded(tuple(head + rng.integers(0, len(tok), text).tolist()), (0,) * len(head) + (1,) * text)
            for _ in range(batch)]


def step_timings(step, rows: list, pad_token_id: int, device, repeats: int) -> list[float]:
    """Seconds of `repeats` forward/backward passes of the DP step over `rows`, after one untimed warm-up (kernels,
    allocators)."""
    from dpsynth.prefixlm import collate

    timings = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        step._per_example_grads(collate(rows, pad_token_id, device))
        step.optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - t0)
    return timings[1:]


def probe(cfg_json: dict, prompt: str, tokens: int, batch: int) -> Speeds:
    """Time the planned work on public dummy inputs (see the module docstring). Runs where a worker would."""
    import torch

    from dpsynth.models import load_base, wrap_lora
    from dpsynth.prefixlm import collate, lean_head
    from dpsynth.sample.engines import GenParams, TransformersEngine
    from dpsynth.train.step import DPLoRAStep

    cfg = JobConfig.model_validate(cfg_json)
    cpus = (cfg.scaling.resources_per_worker or {}).get("CPU") or os.cpu_count() or 1
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, tok, _ = load_base(cfg.model, device)
    model = wrap_lora(model, cfg.lora)
    head = tok(prompt, add_special_tokens=False).input_ids
    rows = dummy_rows(tok, head, tokens, batch)
    step = DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                      learning_rate=cfg.training.learning_rate, grad_sample_mode=cfg.training.grad_sample_mode,
                      micro_batch_size=None if cfg.training.micro_batch_size == "auto" else cfg.training.micro_batch_size)
    step_s = max(step_timings(step, rows, tok.pad_token_id, device, PROBE_REPEATS))
    model.eval()
    engine = TransformersEngine(model, tok)
    engine.generate_ids([head] * 4, GenParams(max_tokens=4))
    # a decode step at the sampler's batch and at a quarter of it: its fixed cost and its cost per row (a label's
    # last batch is smaller)
    big = cfg.sampling.batch_size
    small = max(1, big // 4)
    t_big, t_small = (decode_step_timing(engine, head, n, GENERATE_PROBE_TOKENS, cfg.sampling) for n in (big, small))
    per_row = (t_big - t_small) / (big - small) if big > small else 0.0
    if per_row <= 0:  # no cost per row to see (a GPU; timing noise): every batch, however small, costs a full one
        gen_tps, fixed = 1e12, max(t_big, t_small)
    else:
        gen_tps, fixed = 1.0 / per_row, max(0.0, t_big - big * per_row)
    with torch.inference_mode():
        batch_ids = collate(rows, tok.pad_token_id, device)
        t0 = time.perf_counter()
        model(input_ids=batch_ids.input_ids, attention_mask=batch_ids.attention_mask)
        score_tps = batch * tokens / (time.perf_counter() - t0)
    return Speeds(step_s, gen_tps, score_tps, fixed, lean_head(model) is not None)


def decode_step_timing(engine, head: list[int], rows: int, steps: int, sampling) -> float:
    """Seconds a decode step of `rows` copies of the prompt `head` takes in `engine` (prefill included, spread over
    `steps` forced steps: no row may stop early, an untrained model's EOS would shorten the batch), with the
    sampler's temperature and nucleus (top-p sorts the vocabulary of every row at every step)."""
    import torch

    ids = torch.tensor([head] * rows, device=engine.model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=True, top_k=0, temperature=max(sampling.temperature, 1e-3),
                              top_p=sampling.top_p, pad_token_id=engine.tok.pad_token_id)
    return (time.perf_counter() - t0) / steps


def probe_on_ray(cfg: JobConfig, prompt: str, tokens: int, batch: int) -> Speeds:
    """`probe` as a Ray task holding one training worker's resources (a GPU when training uses one)."""
    import ray

    resources = dict(cfg.scaling.resources_per_worker or {})
    task = ray.remote(num_cpus=resources.pop("CPU", 1), num_gpus=resources.pop("GPU", 1 if cfg.scaling.use_gpu else 0),
                      resources=resources or None, max_retries=0)(probe)
    return ray.get(task.remote(cfg.model_dump(mode="json"), prompt, tokens, batch))


def mean_text_tokens(length_distribution: dict[str, float] | None, text_tokens: int) -> float:
    """Expected text tokens per example from the DP length histogram (bin mid-points), capped by the cut."""
    from dpsynth.lengths import LENGTH_BINS

    if not length_distribution:
        return float(text_tokens)
    lower, mean = 0, 0.0
    for edge in LENGTH_BINS:
        mean += length_distribution.get(str(edge), 0.0) * (lower + edge) / 2
        lower = edge
    return min(float(text_tokens), max(1.0, mean))


def generation_s(speeds: Speeds, texts: int, label_shares: Sequence[float], batch: int, new_tokens: int,
                 keep_rate: float = 1.0) -> float:
    """Seconds to generate `texts` kept texts split over labels by `label_shares`, each label's ceil(count /
    keep_rate) candidates (as the sampler and the zero-shot corpus draw them). The sampler batches each label apart,
    `batch` rows at a time, and a batch runs until its longest text ends: taken at `new_tokens`, the cap (a bound;
    in a batch of dozens the longest text is about the cap: the SMS adapter's batches ran at half the speed that
    counting the texts' mean length had planned, 2026-12-03)."""
    from dpsynth.sample.corpus import label_counts
    from dpsynth.sample.sharpen import candidates_needed

    names = tuple(str(i) for i in range(len(label_shares)))
    counts = label_counts(names, dict(zip(names, label_shares)), texts).values() if texts else ()
    steps = 0.0
    for count in (candidates_needed(c, keep_rate) for c in counts):
        full, rest = divmod(count, batch)
        steps += full * speeds.decode_step_s(batch) + (speeds.decode_step_s(rest) if rest else 0.0)
    return new_tokens * steps


def plan_run(cfg: JobConfig, speeds: Speeds, *, prompt_tokens: int, text_tokens: float, labels: int,
             new_tokens: int, label_shares: Sequence[float] | None = None, real_tokens: float = 0.0) -> RunPlan:
    """Steps and corpus size that fit `training.time_budget` (see the module docstring). `label_shares`: each
    label's share of the corpus (public: the DP label histogram or uniform); uniform when None. `real_tokens`: the
    real training texts' tokens, uncut (public: the training units times the DP length histogram's mean)."""
    budget = cfg.training.time_budget
    s, ev = cfg.sampling, cfg.evaluation
    per_candidate = min(float(new_tokens), text_tokens)
    # no weight on any label (a declared mix naming none of them, refused later by the sampler): plan it uniform
    shares = tuple(label_shares) if label_shares and sum(label_shares) > 0 else (1.0,) * max(1, labels)

    def later(num_examples: int, zero_shot_examples: int, attack_examples: int) -> dict[str, float]:
        candidates = math.ceil(num_examples / s.keep_rate)
        zero_shot = math.ceil(zero_shot_examples / s.keep_rate) if zero_shot_examples else 0
        # every candidate scored under every label's prompt; a prompt runs once, its texts from its cache
        # (prefixlm.score_after_prefix): a text's tokens and its EOS (and the prompt, where the model has no cache path)
        scored = per_candidate + 1 + (0 if speeds.prompt_cached else prompt_tokens)
        sharpen_each = labels * scored / speeds.score_tokens_per_s if s.keep_rate < 1 else 0.0
        attacks = ATTACK_PASSES * attack_examples * (prompt_tokens + text_tokens) / speeds.score_tokens_per_s
        return {"sampling": generation_s(speeds, num_examples, shares, s.batch_size, new_tokens, s.keep_rate)
                + candidates * sharpen_each,
                # the zero-shot corpus splits its texts evenly over the labels (evaluate.corpora)
                "evaluation": EVAL_FIXED_S + EVAL_PER_REAL_TOKEN_S * real_tokens + attacks
                + generation_s(speeds, zero_shot_examples, (1.0,) * len(shares), s.batch_size, new_tokens, s.keep_rate)
                + zero_shot * sharpen_each}

    sizes = {"num_examples": s.num_examples, "zero_shot_examples": ev.zero_shot_examples,
             "attack_examples": ev.attack_examples}
    rest = later(**sizes)
    left = budget - FIXED_OVERHEAD_S - sum(rest.values())
    steps = max(cfg.training.min_steps, int(left // speeds.step_s)) if left > 0 else cfg.training.min_steps
    steps = min(steps, cfg.training.max_steps)
    cuts = []
    # The floor of steps does not fit: the corpus gives way first, then the evaluation's own corpus and attacks.
    for key, floor, section in (("num_examples", MIN_CORPUS, "sampling"), ("zero_shot_examples", MIN_ZERO_SHOT, "evaluation"),
                                ("attack_examples", MIN_ATTACK, "evaluation")):
        def fits(size: int) -> bool:
            return FIXED_OVERHEAD_S + steps * speeds.step_s + sum(later(**{**sizes, key: size}).values()) <= budget

        if fits(sizes[key]) or sizes[key] <= floor:
            continue
        lo, hi = floor, sizes[key]  # the largest size that fits, else the floor (time grows with the size)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        smaller = lo
        cuts.append(f"{section}.{key} cut from {sizes[key]} to {smaller}")
        sizes[key] = smaller
        rest = later(**sizes)
    cut = "; ".join(cuts) + " to fit training.time_budget" if cuts else None
    num_examples = sizes["num_examples"]
    estimates = {"training": steps * speeds.step_s, **rest, "start-up": FIXED_OVERHEAD_S}
    plan = RunPlan(steps, num_examples, estimates, cut,
                   zero_shot_examples=sizes["zero_shot_examples"] if sizes["zero_shot_examples"] != ev.zero_shot_examples else None,
                   attack_examples=sizes["attack_examples"] if sizes["attack_examples"] != ev.attack_examples else None,
                   planned_from={"num_examples": s.num_examples, "zero_shot_examples": ev.zero_shot_examples,
                                 "attack_examples": ev.attack_examples})
    needed = sum(estimates.values())
    if needed > budget:  # the budget bounds the run: a plan over it at every floor is refused, never run over
        from dpsynth.errors import UserError

        raise UserError(f"training.time_budget: this run needs about {needed / 60:.1f} min here, over the "
                        f"{budget / 60:.1f} min budget, even at {steps} steps (training.min_steps) and {num_examples} "
                        f"texts ({plan.summary(budget).split('; ', 1)[1]}); give it training.time_budget="
                        f"{math.ceil(needed / 60)}m, shorter texts (model.length_percentile, model.max_length), or a "
                        "GPU (--preset gpu)")
    return plan
