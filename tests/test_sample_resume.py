"""Sampling keeps every finished batch in an owner-side scratch file: interrupted (Ctrl-C, SIGTERM, a stop callback),
the same sampling again continues where it stopped and makes the corpus an uninterrupted one would have."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpsynth.config import SamplingConfig
from dpsynth.interrupt import Interrupted
from dpsynth.sample.corpus import generate_corpus
from dpsynth.sample.engines import Generation


class Tok:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [len(text)]})()


class SeededEngine:
    """Texts that depend only on each request's seed (a few empty ones, to exercise the redraws); counts its calls."""

    name = "fake"

    def __init__(self):
        self.tok, self.calls = Tok(), 0

    def generate_ids(self, prompts, params, seeds=None):
        self.calls += 1
        return [Generation("" if s % 7 == 0 else f"text {s}", 3, "stop") for s in seeds]


PARAMS = SamplingConfig(num_examples=30, batch_size=4, max_new_tokens=8, seed=5)
PROMPTS, COUNTS = {"neg": "n: ", "pos": "p: "}, {"neg": 13, "pos": 17}


def test_an_interrupted_sampling_continues_and_makes_the_uninterrupted_corpus(tmp_path):
    whole = generate_corpus(SeededEngine(), PROMPTS, COUNTS, PARAMS, show_progress=False)
    assert [r["label"] for r in whole] == ["neg"] * 13 + ["pos"] * 17 and all(r["text"] for r in whole)
    partial = tmp_path / "owner" / "sampling" / "key.partial.jsonl"
    engine = SeededEngine()
    with pytest.raises(Interrupted) as stopped:
        generate_corpus(engine, PROMPTS, COUNTS, PARAMS, show_progress=False, partial=partial,
                        stop=lambda: signal.SIGINT if engine.calls >= 5 else None)
    assert stopped.value.exit_code == 130 and "run the same command again" in str(stopped.value)
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 0 < len(kept) < 30 and kept == whole[: len(kept)]  # every finished batch, nothing else
    again = SeededEngine()
    assert generate_corpus(again, PROMPTS, COUNTS, PARAMS, show_progress=False, partial=partial) == whole
    assert again.calls < SeededEngine().calls + 12 - 5 + 1  # it did not start over


def test_a_batch_cut_short_by_a_hard_kill_is_dropped(tmp_path):
    whole = generate_corpus(SeededEngine(), PROMPTS, COUNTS, PARAMS, show_progress=False)
    partial, engine = tmp_path / "p.partial.jsonl", SeededEngine()
    with pytest.raises(Interrupted):
        generate_corpus(engine, PROMPTS, COUNTS, PARAMS, show_progress=False, partial=partial,
                        stop=lambda: signal.SIGTERM if engine.calls >= 2 else None)
    with open(partial, "a") as f:
        f.write('{"text": "half a li')
    assert generate_corpus(SeededEngine(), PROMPTS, COUNTS, PARAMS, show_progress=False, partial=partial) == whole


def test_ctrl_c_during_dpsynth_sample_loses_nothing_and_the_same_command_resumes(tiny_job, tmp_path):
    from dpsynth.release import owner_path

    run = subprocess.run([sys.executable, "-m", "dpsynth", "train", "--quiet", *[a for o in tiny_job for a in ("--set", o)]],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    run_dir = Path(dict(o.split("=", 1) for o in tiny_job)["output_dir"])
    args = [sys.executable, "-m", "dpsynth", "sample", str(run_dir), "-n", "100", "--quiet",
            "--set", "batch_size=4", "--set", "keep_rate=1", "--set", "max_new_tokens=8", "--set", "format=jsonl"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scratch = owner_path(run_dir, "sampling")
    deadline = time.time() + 300
    while not any(p.stat().st_size for p in scratch.glob("*.partial.jsonl")) if scratch.is_dir() else True:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() < deadline, "sampling did not start"
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130, err[-2000:]
    assert "run the same command again" in err
    (partial,) = scratch.glob("*.partial.jsonl")
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 0 < len(kept) < 100 and not (run_dir / "synthetic.jsonl").exists()

    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and all(r["text"] for r in rows)
    by_label = {lab: [r for r in rows if r["label"] == lab] for lab in {r["label"] for r in rows}}
    for lab in by_label:  # the rows made before Ctrl-C open their label's part of the corpus
        before = [r for r in kept if r["label"] == lab]
        assert by_label[lab][: len(before)] == before
    assert not list(scratch.glob("*.partial.jsonl"))  # scratch deleted once the corpus is released
