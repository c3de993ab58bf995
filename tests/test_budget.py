"""A budget in time: `training.steps: auto` plans the whole run to `training.time_budget` from a probe of public dummy
tokens, with a floor of steps, the corpus cut first when even the floor does not fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpsynth.config import load_config
from dpsynth.release import owner_path
from dpsynth.train.budget import Speeds, mean_text_tokens, plan_run


def test_durations_parse():
    assert load_config(None, ["training.time_budget=10m"]).training.time_budget == 600
    assert load_config(None, ["training.time_budget=1.5h"]).training.time_budget == 5400
    assert load_config(None, ["training.time_budget=90"]).training.time_budget == 90
    from dpsynth.errors import UserError

    with pytest.raises(UserError, match="training.time_budget"):
        load_config(None, ["training.time_budget=soon"])


def test_steps_fill_what_sampling_and_evaluation_leave():
    cfg = load_config(None, ["training.time_budget=600", "sampling.num_examples=200", "evaluation.zero_shot_examples=50"])
    fast = plan_run(cfg, Speeds(2.0, 200.0, 5000.0), prompt_tokens=40, text_tokens=30, labels=2, new_tokens=48)
    slow = plan_run(cfg, Speeds(4.0, 200.0, 5000.0), prompt_tokens=40, text_tokens=30, labels=2, new_tokens=48)
    assert fast.steps > slow.steps >= cfg.training.min_steps
    assert sum(fast.estimates_s.values()) <= 600 + fast.estimates_s["training"] / fast.steps  # fills, not overfills
    assert fast.cut is None and fast.num_examples == 200
    assert "run plan:" in fast.summary(600) and "sampling" in fast.summary(600)


def test_a_budget_too_small_keeps_the_floor_and_cuts_the_corpus_first():
    cfg = load_config(None, ["training.time_budget=400", "training.min_steps=40", "sampling.num_examples=2000"])
    plan = plan_run(cfg, Speeds(3.0, 1000.0, 20000.0), prompt_tokens=40, text_tokens=60, labels=3, new_tokens=64)
    assert plan.steps == 40  # a small budget (or dataset) gets the floor, not fewer steps
    assert plan.num_examples < 2000 and "sampling.num_examples cut from 2000" in plan.cut


def test_a_run_far_over_its_budget_is_refused_naming_the_key():
    from dpsynth.errors import UserError

    cfg = load_config(None, ["training.time_budget=15m"])
    # long documents on a CPU: a step of minutes, slow generation (the news corpus measured 288 min at the floor)
    with pytest.raises(UserError, match=r"training.time_budget: this run needs about [\d.]+ min"):
        plan_run(cfg, Speeds(190.0, 20.0, 500.0), prompt_tokens=40, text_tokens=600, labels=9, new_tokens=1536)
    # just over: the floor of steps alone (40 x 20 s) and the start-up leave no room; the budget is a bound, so this
    # is refused too (it used to run up to 1.5 x over, and a 15-minute news plan ran 24.8 minutes)
    just_over = dict(prompt_tokens=40, text_tokens=30, labels=2, new_tokens=48)
    with pytest.raises(UserError, match=r"over the 15.0 min budget, even at 40 steps .*training.time_budget=17m"):
        plan_run(cfg, Speeds(20.0, 1000.0, 50000.0), **just_over)
    fits = plan_run(cfg, Speeds(17.0, 1000.0, 50000.0), **just_over)
    assert fits.steps == 40 and sum(fits.estimates_s.values()) <= 900


def test_generation_is_costed_a_batch_at_a_time_to_the_cap():
    """The sampler batches each label apart and a batch runs until its longest text ends (about the cap in a batch
    of dozens): the SMS adapter ran at half the speed that the texts' mean length had planned."""
    from dpsynth.train.budget import generation_s

    sp = Speeds(1.0, 100.0, 1000.0, generate_step_fixed_s=0.5)
    # one label, 300 texts in batches of 128: 128 + 128 + 44 rows, three fixed costs, 64 decode steps each
    assert generation_s(sp, 300, (1.0,), 128, 64) == pytest.approx(64 * (3 * 0.5 + 300 / 100))
    # 0.9 / 0.1: 270 = 128 + 128 + 14 and 30, a fourth batch
    assert generation_s(sp, 300, (0.9, 0.1), 128, 64) == pytest.approx(64 * (4 * 0.5 + 300 / 100))
    assert generation_s(sp, 0, (0.5, 0.5), 128, 64) == 0
    cfg = load_config(None, ["training.time_budget=15m", "sampling.num_examples=200", "sampling.keep_rate=1"])
    short, long_ = (plan_run(cfg, sp, prompt_tokens=40, text_tokens=t, labels=2, new_tokens=64, label_shares=(0.8, 0.2))
                    for t in (20, 60))
    assert short.estimates_s["sampling"] == long_.estimates_s["sampling"]  # short texts in a batch still wait on the cap


def test_the_evaluation_on_long_real_texts_is_planned_before_the_steps():
    """The classifiers trained on the real data take longer on 900 news articles than on 3,500 questions: the plan
    counts the real training tokens (N and the DP length histogram, both public) and gives training less."""
    from dpsynth.train.budget import EVAL_PER_REAL_TOKEN_S

    cfg = load_config(None, ["training.time_budget=15m"])
    kw = dict(prompt_tokens=34, text_tokens=25, labels=9, new_tokens=25)
    questions, news = (plan_run(cfg, Speeds(5.0, 300.0, 1000.0), **kw, real_tokens=t) for t in (45_000, 630_000))
    assert news.estimates_s["evaluation"] - questions.estimates_s["evaluation"] == pytest.approx(
        EVAL_PER_REAL_TOKEN_S * 585_000)
    assert news.steps < questions.steps and sum(news.estimates_s.values()) <= 900


def test_sharpening_is_planned_by_what_scoring_runs():
    """Scoring from a prompt's cache costs the text's tokens; a model without that path pays the prompt per text.
    A declared label mix that names none of the labels is planned uniform (the sampler refuses it later)."""
    cfg = load_config(None, ["training.time_budget=1h", "sampling.num_examples=200", "sampling.keep_rate=0.5"])
    kw = dict(prompt_tokens=34, text_tokens=15, labels=6, new_tokens=24)
    cached, uncached = (plan_run(cfg, Speeds(5.0, 300.0, 1000.0, prompt_cached=c), **kw) for c in (True, False))
    # the corpus's 400 candidates x 6 labels, each also paying its 34 prompt tokens at 1000 tokens/s
    assert uncached.estimates_s["sampling"] - cached.estimates_s["sampling"] == pytest.approx(400 * 6 * 34 / 1000)
    odd = plan_run(cfg, Speeds(5.0, 300.0, 1000.0), **kw, label_shares=[0.0] * 6)
    assert odd.estimates_s == plan_run(cfg, Speeds(5.0, 300.0, 1000.0), **kw).estimates_s


def test_the_plan_reads_the_machine_speed_on_a_coarse_grid():
    from dpsynth.train.budget import coarse

    a, b = coarse(Speeds(5.20, 92.0, 2346.0)), coarse(Speeds(5.35, 94.0, 2400.0))
    assert a == b  # a few percent of timing noise within a grid cell moves no planned step
    assert coarse(Speeds(5.4, 92.0, 2346.0)).step_s == pytest.approx(5.4, rel=0.05)
    assert coarse(Speeds(10.8, 92.0, 2346.0)).step_s == pytest.approx(2 * a.step_s)  # a real difference stays


def test_expected_length_reads_the_dp_histogram():
    assert mean_text_tokens({"16": 0.5, "32": 0.5}, 100) == pytest.approx(0.5 * 12 + 0.5 * 28)
    assert mean_text_tokens({"1024": 1.0}, 200) == 200  # capped by what max_length leaves
    assert mean_text_tokens(None, 48) == 48


@pytest.mark.slow
def test_auto_steps_are_planned_charged_and_recorded(tiny_job, tmp_path):
    """Through the CLI: the plan is logged before training, the certificate's steps are the planned ones (admitted
    after the DP length histogram), and the owner's config records them so a resume or an audit repeats them."""
    # 10 minutes: the plan's start-up (110 s) and the evaluation's fixed 60 s are a real run's, and on two busy cores
    # the tiny model's sampling (nucleus over a 49k vocabulary, costed at the cap) read 72 s; 5 minutes was refused
    job = [o for o in tiny_job if not o.startswith(("training.steps", "model.max_length"))] + [
        "training.steps=auto", "training.time_budget=600", "training.min_steps=3", "training.max_steps=6", "model.max_length=auto",
        "sampling.max_new_tokens=auto"]
    res = subprocess.run([sys.executable, "-m", "dpsynth", "train", "--quiet", *[a for o in job for a in ("--set", o)]],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(dict(o.split("=", 1) for o in job)["output_dir"])
    cert = json.loads((run_dir / "certificate.json").read_text())
    steps = cert["mechanism"]["steps"]
    assert steps >= 3 and cert["length_histogram"] is not None
    owner_cfg = yaml.safe_load(owner_path(run_dir, "config.yaml").read_text())
    assert owner_cfg["training"]["steps"] == steps
    log = owner_path(run_dir, "dpsynth.log").read_text()
    assert "run plan:" in log and log.index("run plan:") < log.index("training ")


def test_a_tight_budget_cuts_the_evaluation_after_the_corpus_and_says_so():
    from dpsynth.train.budget import MIN_ZERO_SHOT, RunPlan

    cfg = load_config(None, ["training.time_budget=900", "sampling.num_examples=500", "evaluation.zero_shot_examples=200",
                             "evaluation.attack_examples=128"])
    # long texts on a slow CPU: sampling and the evaluation alone are over budget at the 40-step floor
    speeds = Speeds(5.0, 180.0, 2000.0)
    plan = plan_run(cfg, speeds, prompt_tokens=40, text_tokens=200, labels=5, new_tokens=192)
    assert plan.steps == cfg.training.min_steps
    assert (plan.num_examples, plan.zero_shot_examples) == (100, MIN_ZERO_SHOT)  # the corpus first, then the floor's
    assert 32 <= plan.attack_examples < 128  # then the attacks, only as far as needed
    assert plan.cut.startswith("sampling.num_examples cut from 500 to 100; evaluation.zero_shot_examples cut from 200 "
                               f"to 50; evaluation.attack_examples cut from 128 to {plan.attack_examples}")
    assert sum(plan.estimates_s.values()) <= 900 + 1  # fits, just
    ran = plan.applied_to(cfg)
    assert (ran.training.steps, ran.sampling.num_examples) == (plan.steps, 100)
    assert (ran.evaluation.zero_shot_examples, ran.evaluation.attack_examples) == (50, plan.attack_examples)
    assert RunPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan  # kept for a resume, as it was
    assert RunPlan.from_json({"steps": 40}) is None  # not a plan this version wrote: the resume keeps its steps only
    # resumed with a bigger corpus asked for: the steps stay (they were admitted), that size is the command's now
    asked = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"num_examples": 2000})})
    resumed = plan.applied_to(asked)
    assert (resumed.training.steps, resumed.sampling.num_examples) == (plan.steps, 2000)
    assert resumed.evaluation.zero_shot_examples == 50  # what it still asks for keeps the cut
    roomy = plan_run(load_config(None, ["training.time_budget=5h"]), speeds, prompt_tokens=40, text_tokens=200, labels=5,
                     new_tokens=192)
    assert roomy.cut is None and roomy.applied_to(cfg).evaluation == cfg.evaluation  # nothing cut where it fits


@pytest.mark.slow
def test_a_resumed_auto_run_repeats_the_plan_of_its_first_attempt(tiny_job, tmp_path):
    """kill -9 mid-training; the same command resumes with the first attempt's plan (its steps and the sizes it
    cut), not a new probe's: the admitted DP-SGD plan and the corpus are the ones planned, and every step charged
    (those lost with the killed process included) is certified."""
    import signal
    import time

    from dpsynth.privacy import Ledger, SampledGaussian
    from dpsynth.train.budget import RUN_PLAN

    job = [o for o in tiny_job if not o.startswith(("training.steps", "model.max_length"))] + [
        "training.steps=auto", "training.time_budget=600", "training.min_steps=40", "training.max_steps=40",
        "training.batch_size=16", "scaling.checkpoint_every=4", "model.max_length=48"]
    args = [sys.executable, "-m", "dpsynth", "train", "--quiet", *[a for o in job for a in ("--set", o)]]
    cfg = load_config(None, job)
    ledger_path, run_dir = Path(cfg.privacy.ledger), Path(cfg.output_dir)

    def charged() -> int:
        if not ledger_path.exists():
            return 0
        return sum(e.count for r in Ledger(ledger_path).runs() for e in r["charged"] if isinstance(e, SampledGaussian))

    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while charged() < 8:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    _, err = first.communicate(timeout=600)
    assert first.returncode == -signal.SIGKILL, err[-2000:]
    assert not (run_dir / "certificate.json").exists()
    (saved,) = list(run_dir.rglob(RUN_PLAN))
    plan = json.loads(saved.read_text())
    assert plan["steps"] == 40
    # as if the first attempt had cut the corpus: the resume must run that, whatever a new probe would say
    saved.write_text(json.dumps({**plan, "num_examples": 7, "cut": "sampling.num_examples cut from 12 to 7"}))
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    owner_cfg = yaml.safe_load(owner_path(run_dir, "config.yaml").read_text())
    assert owner_cfg["training"]["steps"] == 40 and owner_cfg["sampling"]["num_examples"] == 7
    assert json.loads((run_dir / "certificate.json").read_text())["mechanism"]["steps"] == 40 == charged()
    assert "resuming with the plan of the first attempt" in owner_path(run_dir, "dpsynth.log").read_text()


def test_the_probe_reads_the_slowest_of_its_timed_steps(tiny_job, monkeypatch):
    """The budget is a bound, so the plan reads the machine on its slow side: one slow repetition among the probe's
    timed steps (after the warm-up) sets the step time. The probe runs for real on the tiny model; only a delay is
    added to one of its calls."""
    import time

    from dpsynth.train import step as step_module
    from dpsynth.train.budget import PROBE_REPEATS, probe

    real = step_module.DPLoRAStep._per_example_grads
    calls = []

    def timed(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:  # the second timed repetition (neither the first nor the last): a slow moment
            time.sleep(0.5)
        return real(self, batch)

    monkeypatch.setattr(step_module.DPLoRAStep, "_per_example_grads", timed)
    cfg = load_config(None, tiny_job)
    speeds = probe(cfg.model_dump(mode="json"), "sms text, label ham: ", 24, 4)
    assert calls == [4] * (1 + PROBE_REPEATS)  # a warm-up, then the timed repetitions
    assert PROBE_REPEATS >= 3 and speeds.step_s >= 0.5  # the slow one, not the first or the last
    # generation was timed at the sampler's batch and a quarter of it: a decode step of more rows costs more
    batch = cfg.sampling.batch_size
    assert speeds.generate_tokens_per_s > 0 and speeds.generate_step_fixed_s >= 0
    assert speeds.decode_step_s(batch) > speeds.decode_step_s(batch // 4) > 0
