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
    with pytest.raises(UserError, match=r"training.time_budget: this run needs about \d+ min"):
        plan_run(cfg, Speeds(190.0, 20.0, 500.0), prompt_tokens=40, text_tokens=600, labels=9, new_tokens=1536)


def test_expected_length_reads_the_dp_histogram():
    assert mean_text_tokens({"16": 0.5, "32": 0.5}, 100) == pytest.approx(0.5 * 12 + 0.5 * 28)
    assert mean_text_tokens({"1024": 1.0}, 200) == 200  # capped by what max_length leaves
    assert mean_text_tokens(None, 48) == 48


@pytest.mark.slow
def test_auto_steps_are_planned_charged_and_recorded(tiny_job, tmp_path):
    """Through the CLI: the plan is logged before training, the certificate's steps are the planned ones (admitted
    after the DP length histogram), and the owner's config records them so a resume or an audit repeats them."""
    job = [o for o in tiny_job if not o.startswith(("training.steps", "model.max_length"))] + [
        "training.steps=auto", "training.time_budget=300", "training.min_steps=3", "training.max_steps=6", "model.max_length=auto",
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
