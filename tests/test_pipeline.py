"""End to end through the real CLI: train -> certificate -> sample -> evaluate, and every bad-input path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpsynth.release import owner_path
from dpsynth.cli import main
from dpsynth.config import load_config
from dpsynth.data import prepare
from dpsynth.privacy.secret import ledger_secret
from dpsynth.privacy import Ledger, epsilon, from_dict
from dpsynth.privacy.certificate import Certificate

from conftest import TEST_SECRET, make_rows


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpsynth", *args], capture_output=True, text=True, timeout=900)


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def test_tiny_pipeline_end_to_end(tiny_job, tmp_path):
    res = cli("run", "--quiet", *sets(tiny_job))
    assert res.returncode == 0, res.stderr
    run_dir = Path(overrides_dict(tiny_job)["output_dir"])
    cert = json.loads((run_dir / "certificate.json").read_text())
    Certificate.model_validate(cert)  # the typed certificate: common fields plus one block per mechanism
    assert cert["mechanism"]["kind"] == "dp_sgd" and cert["mechanism"]["steps"] == 6
    assert cert["mechanism"]["max_grad_norm"] == 1.0 and cert["accountant"] == "prv"
    # near_duplicates: group (default) names the unit the same whether or not copies were found (no tell)
    assert cert["dataset"]["unit"] == "record+near-duplicates" and cert["label_histogram"]["budget_share"] == 0.05
    cfg = load_config(None, tiny_job)
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger))
    assert cert["dataset"]["fingerprint"] == splits.fingerprint
    assert cert["delta"] == pytest.approx(1 / splits.units**1.1)  # N counts units (near-duplicates grouped)
    # the certified epsilon is what the charged events cost, and within the target
    events = [from_dict(e) for e in cert["events"]]
    assert sum(getattr(e, "count", 1) for e in events if type(e).__name__ == "SampledGaussian") == 6
    assert any(type(e).__name__ == "Gaussian" for e in events)  # the DP label histogram is charged too
    assert 0 < cert["epsilon"] <= cfg.privacy.epsilon
    assert cert["epsilon"] == pytest.approx(epsilon(events, cert["delta"], "prv"), rel=1e-9)
    ledger = Ledger(cfg.privacy.ledger)
    assert ledger.spent(splits.fingerprint) == pytest.approx(cert["epsilon"], rel=1e-6)
    # adapter, corpus, corpus certificate, evaluation
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["label"] for r in rows} <= set(splits.labels) and all(r["text"] for r in rows)
    corpus_cert = json.loads((run_dir / "synthetic.jsonl.certificate.json").read_text())
    assert corpus_cert["epsilon"] == cert["epsilon"] and corpus_cert["corpus"]["examples"] == 12
    # the one-label shorthand is the shape it always was: `text`, `label` rows, no record schema, a plain histogram
    assert all(set(r) == {"text", "label"} for r in rows) and corpus_cert["corpus"]["records"] is None
    assert cert["label_histogram"]["over"] is None and json.loads((run_dir / "labels.json").read_text()) == list(splits.labels)
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    assert 0 <= ev["synthetic"]["accuracy"] <= 1 and ev["real"]["accuracy"] > 0.9  # the toy task is easy on real data
    assert "epsilon spent" in res.stdout and "test accuracy, trained on synthetic" in res.stdout
    # the honest summary: the synthetic accuracy next to the chance line and the zero-shot floor, and a verdict
    majority = max(sum(ex.label == lab for ex in splits.test) for lab in splits.labels) / len(splits.test)
    assert ev["baselines"]["majority_class"]["accuracy"] == pytest.approx(majority)
    assert 0 <= ev["baselines"]["zero_shot"]["accuracy"] <= 1 and ev["baselines"]["zero_shot"]["examples"] == 12
    assert ev["verdict"]["level"] in {"no_signal", "below_dp_direct", "competitive", "out_of_genre"} and ev["verdict"]["text"]
    assert {"share", "real_share", "threshold", "examples"} <= set(ev["fidelity"]["out_of_genre"]) and "out of genre" in res.stdout
    for row in ("majority class", "zero-shot floor", "verdict"):
        assert row in res.stdout, row
    # label sharpening (default keep rate 0.5): twice the candidates, every one of them kept for the evaluation
    candidates = (run_dir / "synthetic.candidates.jsonl").read_text().splitlines()
    assert len(candidates) == 24 and corpus_cert["corpus"]["sharpening"]["kept"] == 12
    assert ev["sharpening"]["candidates"] == 24 and "label_fidelity_gain" in ev["sharpening"]

    # idempotent: the same job again reuses the certified adapter and spends nothing more
    again = cli("run", "--quiet", *sets(tiny_job))
    assert again.returncode == 0, again.stderr
    assert ledger.spent(splits.fingerprint) == pytest.approx(cert["epsilon"], rel=1e-6)
    assert len(ledger.runs(splits.fingerprint)) == 1

    # sampling again is free and exact, in CSV with a user label mix
    res = cli("sample", str(run_dir), "-n", "7", "--set", "format=csv", "--set", "label_proportions={pos: 1, neg: 0}", "--quiet")
    assert res.returncode == 0, res.stderr
    import pandas as pd
    df = pd.read_csv(run_dir / "synthetic.csv", keep_default_na=False)
    assert len(df) == 7 and set(df["label"]) == {"pos"}
    assert len(ledger.runs(splits.fingerprint)) == 1


def test_second_run_over_the_dataset_budget_is_refused(tiny_job, tmp_path, capsys):
    first = run_in_process(capsys, "train", "--quiet", *sets(tiny_job))
    assert first[0] == 0, first[2]
    other = tmp_path / "second"
    code, out, err = run_in_process(capsys, "train", "--quiet", *sets(tiny_job), "--output", str(other))
    assert code == 2
    assert "budget exceeded" in err and "spent" in err and "requested" in err and "total" in err
    assert not (other / "certificate.json").exists() and not (other / "adapter").exists()

    # The certificate pins the adapter's bytes: swapped weights are refused, not sampled.
    weights = Path(overrides_dict(tiny_job)["output_dir"]) / "adapter" / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    code, _, err = run_in_process(capsys, "sample", str(weights.parent.parent))
    assert code == 2 and "does not match its certificate" in err


def test_training_sees_only_the_train_split(tiny_job, monkeypatch):
    """Everything the Ray Train workers receive is in their typed plan: its texts are the train split's."""
    import dataclasses

    import dpsynth.train.driver as driver

    shipped: list = []
    real_fit = driver.fit

    def spy(cfg, plan):
        shipped.append(plan)
        return real_fit(cfg, plan)

    monkeypatch.setattr(driver, "fit", spy)
    cfg = load_config(None, tiny_job)
    driver.train(cfg, show_progress=False)
    splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger))
    (plan,) = shipped
    seen = [text for unit in plan.units for text, _ in unit]
    assert sorted(seen) == sorted(ex.text for ex in splits.train)
    held_out = {ex.text for ex in splits.validation + splits.test}
    assert held_out and not set(seen) & held_out
    rest = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in ("units", "run")}
    assert not any(text in json.dumps(rest, default=str) for text in held_out)


@pytest.fixture()
def encoder_dir(tmp_path):
    """A DistilBERT config: an encoder with no causal-LM head in transformers."""
    from transformers import DistilBertConfig

    path = tmp_path / "distilbert"
    DistilBertConfig(vocab_size=100, dim=8, n_layers=1, n_heads=1, hidden_dim=8).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty", "undeclared_labels", "short_max_length", "epsilon", "delta", "not_causal_lm",
                                  "unknown_key", "batch_over_n"])
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(case, tiny_job, tmp_path, capsys, encoder_dir):
    ov = overrides_dict(tiny_job)
    run_dir = Path(ov["output_dir"])
    if case == "missing_file":
        ov["data.source"], want = str(tmp_path / "nope.csv"), "data.source: file not found"
    elif case == "missing_column":
        ov["data.text_column"], want = "body", "data.text_column: column 'body' not in"
    elif case == "empty":
        (tmp_path / "empty.csv").write_text("review,sentiment\n")
        ov["data.source"], want = str(tmp_path / "empty.csv"), "no usable"
    elif case == "undeclared_labels":  # a declared label set the data never uses: nothing is left to train on
        ov["data.labels"], want = "[meh,nah]", "with a label in data.labels"
    elif case == "short_max_length":  # refused before any worker starts, not as a Ray worker-group traceback
        ov["model.max_length"], want = "24", "model.max_length: 24 leaves no room for text after the"
    elif case == "epsilon":
        ov["privacy.epsilon"], want = "0", "privacy.epsilon"
    elif case == "delta":
        ov["privacy.delta"], want = "0.01", "privacy.delta: 0.01 is not below 1/N"
    elif case == "not_causal_lm":
        ov["model.base"], want = str(encoder_dir), "is not a causal LM"
    elif case == "unknown_key":
        ov["training.epocs"], want = "2", "training.epocs: unknown key"
    elif case == "batch_over_n":
        ov["training.batch_size"], want = "100000", "training.batch_size"
    code, out, err = run_in_process(capsys, "run", "--quiet", *sets([f"{k}={v}" for k, v in ov.items()]))
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and want in lines[0], err
    assert "Traceback" not in err
    assert not (run_dir / "certificate.json").exists() and not (run_dir / "adapter").exists()
    assert not list(run_dir.glob("synthetic.*"))


def test_cli_error_exit_code_in_a_real_process(tmp_path):
    res = cli("train", "--set", f"data.source={tmp_path / 'missing.csv'}", "--set", f"privacy.ledger={tmp_path / 'l.sqlite'}",
              "--output", str(tmp_path / "r"))
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "file not found" in res.stderr
    res = cli("sample", str(tmp_path))
    assert res.returncode == 2 and "not a dpsynth run directory" in res.stderr


def test_help_covers_every_verb(capsys):
    from dpsynth.cli import app

    verbs = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"train", "generate", "sample", "evaluate", "report", "run", "serve", "tune", "budget", "abandon", "config",
            "presets"} <= set(verbs)
    res = cli("--help")  # in a real process; each verb's own help in this one (a process start each is ~3 s)
    assert res.returncode == 0
    for verb in verbs:
        assert verb in res.stdout, verb
        code, out, _ = run_in_process(capsys, verb, "--help")
        assert code == 0 and "Usage:" in out and len(out.splitlines()) > 3, verb


def test_uncertified_run_cannot_be_sampled(tiny_job, capsys):
    run_dir = Path(overrides_dict(tiny_job)["output_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(load_config(None, tiny_job).model_dump(mode="json")))
    code, _, err = run_in_process(capsys, "sample", str(run_dir))
    assert code == 2 and "no certificate.json" in err


@pytest.mark.slow
def test_real_bundled_model_and_data(tmp_path):
    run_dir = tmp_path / "real"
    # a quarter of the reviews: the real-data classifier's test accuracy then clears the majority rate by
    # 0.11 +- 0.02 over random owner keys (40 keys, 2026-12-04); at 0.0627 (~80 test reviews) it fell below 0.5 in
    # 3 % of keys, and CI met one
    overrides = ["data.subset_fraction=0.25", "training.batch_size=16", "training.steps=4", "sampling.num_examples=16",
                 "sampling.batch_size=8", "sampling.max_new_tokens=24", f"privacy.ledger={tmp_path / 'ledger.sqlite'}",
                 # the evaluation's own corpora kept small: the real model generates at ~10 tokens/s on a CPU
                 "evaluation.zero_shot_examples=16", "evaluation.attack_examples=32"]
    res = cli("run", "--quiet", "--output", str(run_dir), *sets(overrides))
    assert res.returncode == 0, res.stderr[-3000:]
    cert = json.loads((run_dir / "certificate.json").read_text())
    assert cert["base_model"]["name"] == "smollm2-135m-instruct" and len(cert["base_model"]["sha256"]) == 64
    assert cert["dataset"]["name"] == "rotten_tomatoes" and cert["mechanism"]["steps"] == 4 and 0 < cert["epsilon"] <= 8.0
    rows = [json.loads(line) for line in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["label"] for r in rows} <= {"fresh", "rotten"}
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    # ~2,900 reviews kept at this rate, ~320 of them in the test split; a keyed subset's size is binomial (sd ~17)
    majority = ev["baselines"]["majority_class"]["accuracy"]
    assert ev["real"]["accuracy"] >= majority + 0.03 and 240 <= ev["test_examples"] <= 400


def test_single_label_synthetic_scores_as_a_constant_classifier():
    from dpsynth.data import Example
    from dpsynth.evaluate import score

    test = [Example("good", "pos")] * 3 + [Example("bad", "neg")]
    res = score([Example("anything", "pos"), Example("else", "pos")], test)
    assert res["accuracy"] == 0.75 and abs(res["macro_f1"] - (6 / 7 + 0) / 2) < 1e-9


def _people_job(tiny_job, tmp_path, people: int = 60, per_person: int = 4) -> list[str]:
    rows = [{"note": r["review"] + f" visit {k}", "dx": r["sentiment"], "patient_id": f"p{p}"}
            for p in range(people) for k, r in enumerate(make_rows(per_person, seed=100 + p))]
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = overrides_dict(tiny_job)
    ov.update({"data.source": str(path), "data.text_column": "note", "data.label_column": "dx",
               "data.unit_column": "patient_id", "training.batch_size": "8", "evaluation.attack_examples": "10"})
    return [f"{k}={v}" for k, v in ov.items()]


def test_a_person_level_run_end_to_end(tiny_job, tmp_path):
    """data.unit_column: the certificate, the ledger and the summary all speak of patients, not records."""
    job = _people_job(tiny_job, tmp_path)
    res = cli("run", "--quiet", *sets(job))
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(overrides_dict(job)["output_dir"])
    cert = json.loads((run_dir / "certificate.json").read_text())
    job_cfg = load_config(None, job)
    splits = prepare(job_cfg.data, ledger_secret(job_cfg.privacy.ledger))
    assert cert["dataset"]["unit"] == "patient_id" and cert["dataset"]["units"] == 60 == splits.units
    assert cert["dataset"].get("records") is None and splits.dataset_size == 240  # record counts stay with the owner
    assert cert["dataset"]["train_units"] == len({ex.unit for ex in splits.train})
    assert cert["delta"] == pytest.approx(1 / 60**1.1)  # N is the number of patients
    assert cert["mechanism"]["max_records_per_unit"] == 16
    assert cert["mechanism"]["sampling_rate"] == pytest.approx(8 / cert["dataset"]["train_units"])
    (record,) = Ledger(load_config(None, job).privacy.ledger).datasets()
    assert record["budget"].unit == "patient_id"
    assert "each patient_id" in res.stdout and "protected at eps=" in res.stdout
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    assert ev["privacy_unit"] == "patient_id" and ev["privacy"]["unit"] == "patient_id"
    assert ev["privacy"]["members"] <= 10 and ev["privacy"]["member_records"] >= ev["privacy"]["members"]


def test_a_record_level_run_cannot_spend_a_person_level_budget(tiny_job, tmp_path, capsys):
    job = _people_job(tiny_job, tmp_path)
    assert run_in_process(capsys, "train", "--quiet", *sets(job))[0] == 0
    records = [o for o in job if not o.startswith("data.unit_column")] + ["data.unit_column=null",
                                                                           f"output_dir={tmp_path / 'records'}"]
    code, _, err = run_in_process(capsys, "train", "--quiet", *sets(records))
    assert code == 2 and "budget is held per patient_id" in err


def _flat(table: str) -> str:
    """The summary table's text without its borders and cell wrapping."""
    return " ".join(table.replace("│", " ").split())


def test_long_documents_keep_their_length_and_cuts_are_reported(tiny_job, tmp_path):
    """model.max_length / sampling.max_new_tokens auto: lengths come from the data (a DP length histogram), well past
    64 tokens; what is cut is counted and reported, and nothing is when nothing is cut."""
    rng = np.random.default_rng(0)
    vocab = "great awful story cast plot film scene actor music camera dialogue ending".split()
    rows = [{"review": " ".join(rng.choice(vocab, size=int(n))), "sentiment": "pos" if i % 2 else "neg"}
            for i, n in enumerate(rng.integers(140, 180, size=160))]
    path = tmp_path / "long.jsonl"
    ov = overrides_dict(tiny_job)
    for key in ("model.max_length", "sampling.max_new_tokens"):
        ov.pop(key)
    # a length budget share other than the default 0.02: the certificate must report the one that ran
    ov.update({"data.source": str(path), "sampling.num_examples": "6", "privacy.epsilon": "8",
               "privacy.length_budget_share": "0.1", "evaluation.zero_shot_examples": "0", "evaluation.attack_examples": "10"})
    job = [f"{k}={v}" for k, v in ov.items()]
    rows[0]["review"] = " ".join(["epilogue"] * 400)  # one text far past the 95th percentile
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The split is a keyed hash under the owner's key: pinned, so the outlier is in train and the test split is not
    # empty whatever the draw; the lengths' DP noise is what varies.
    Path(f"{ov['privacy.ledger']}.key").write_bytes(TEST_SECRET)
    assert any(ex.text.startswith("epilogue") for ex in prepare(load_config(None, job).data, TEST_SECRET).train)
    res = cli("run", "--quiet", *sets(job))
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(ov["output_dir"])
    cert = json.loads((run_dir / "certificate.json").read_text())
    released = load_config(run_dir / "config.yaml")
    assert released.model.max_length > 128 and released.sampling.max_new_tokens >= 128  # from the data, not 64
    assert cert["lengths"] == {"max_length": released.model.max_length, "max_new_tokens": released.sampling.max_new_tokens}
    assert cert["length_histogram"]["budget_share"] == 0.1
    lengths = json.loads(owner_path(run_dir, "metrics.json").read_text())["lengths"]
    assert lengths["source"] == "dp histogram" and lengths["truncated"] >= 1  # the outlier was cut, and counted
    assert f"cut to {lengths['text_tokens']} tokens" in _flat(res.stdout)
    texts = [json.loads(x)["text"] for x in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    assert max(len(t.split()) for t in texts) > 64  # synthetic texts as long as the real ones can be
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    assert ev["fidelity"]["lengths"]["ks"] is not None and ev["fidelity"]["lengths"]["real_words_mean"] > 64

    # without the outlier (another ledger): nothing cut, nothing reported
    short = tmp_path / "no-outlier.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    whole = [o for o in job if not o.startswith(("output_dir", "privacy.ledger", "data.source"))] + [
        f"output_dir={tmp_path / 'whole'}", f"privacy.ledger={tmp_path / 'ledger3.sqlite'}", f"data.source={short}",
        "model.max_length=256", "data.near_duplicates=keep"]  # 159 units: these 12-word texts group into ~35, and
    # with test_fraction 0.1 a key then leaves the test split empty 2.5 % of the time
    res = cli("train", "--quiet", *sets(whole))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(owner_path(tmp_path / "whole", "metrics.json").read_text())["lengths"]["truncated"] == 0
    assert "no text cut" in _flat(res.stdout)
