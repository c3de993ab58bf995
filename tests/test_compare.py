"""`dpsynth report RUN --compare OTHER`: a DP-LoRA run and an in-context run side by side at their certified budgets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpsynth.release import owner_path
from dpsynth.cli import main

CHEAP = ["classifiers=[tfidf_logreg]", "dp_baseline=false", "tuning=false", "mauve=false", "attack_examples=10"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def incontext(tmp_path: Path, tiny_job: list[str], name: str, eps: float) -> list[str]:
    # The same ledger as the DP-LoRA run: its owner key is what makes the two fingerprints one dataset's.
    data = [o for o in tiny_job if o.startswith(("data.", "model.", "privacy.ledger"))]
    return [*data, "privacy.dataset_epsilon=40", f"privacy.epsilon={eps}", "privacy.accountant=pld",
            "incontext.engine=transformers", "incontext.num_examples=8", "incontext.max_new_tokens=5", "incontext.groups=4",
            "incontext.examples_per_group=2", "sampling.label_proportions=uniform"]


@pytest.mark.slow
def test_report_compares_dp_lora_with_in_context_from_each_runs_own_files(tmp_path, tiny_job, capsys):
    lora = Path(dict(o.split("=", 1) for o in tiny_job)["output_dir"])
    code, _, err = cli(capsys, "train", "-q", *sets([*tiny_job, "privacy.dataset_epsilon=40"]))
    assert code == 0, err
    assert cli(capsys, "sample", str(lora), "-q")[0] == 0
    fewshot = tmp_path / "fewshot"
    code, _, err = cli(capsys, "generate", "-q", "-o", str(fewshot), *sets(incontext(tmp_path, tiny_job, "ic", 8.0)))
    assert code == 0, err
    assert cli(capsys, "evaluate", str(fewshot), "-q", *sets(CHEAP))[0] == 0
    saved = json.loads(owner_path(fewshot, "evaluation.json").read_text())
    saved_mtime = owner_path(fewshot, "evaluation.json").stat().st_mtime_ns

    code, out, err = cli(capsys, "report", str(lora), "--compare", str(fewshot), "-q", *sets(CHEAP))
    assert code == 0, err
    doc = json.loads(owner_path(lora, "report.json").read_text())
    cmp = doc["comparison"]
    a, b = cmp["runs"]
    cert_a = json.loads((lora / "certificate.json").read_text())
    cert_b = json.loads((fewshot / "certificate.json").read_text())
    # each column is that run's own certificate and evaluation
    assert (a["epsilon"], a["delta"], a["generator"]) == (cert_a["epsilon"], cert_a["delta"], "dp_lora")
    assert (b["epsilon"], b["delta"], b["generator"]) == (cert_b["epsilon"], cert_b["delta"], "in_context")
    assert a["utility"]["synthetic_accuracy"] == doc["synthetic"]["accuracy"] and a["evaluation"] == "this report"
    assert a["audit"]["mia_auc_generator_loss"] == doc["privacy"]["generator"]["loss"]["auc"]
    assert b["utility"]["synthetic_accuracy"] == saved["synthetic"]["accuracy"]
    assert b["utility"]["real_accuracy"] == saved["real"]["accuracy"]
    assert b["audit"]["mia_auc_corpus_nearest_neighbour"] == saved["privacy"]["corpus_nearest_neighbour"]["auc"]
    assert b["audit"]["mia_auc_generator_loss"] is None  # no adapter to attack
    assert b["fidelity"]["duplicate_rate"] == saved["fidelity"]["duplicates"]["duplicate_rate"]
    assert b["evaluation"] == "evaluation.json"
    assert owner_path(fewshot, "evaluation.json").stat().st_mtime_ns == saved_mtime  # reused, not recomputed
    assert cmp["same_budget"] and "same budget" in cmp["budget_note"]
    assert "DP-LoRA" in a["method"] and "in-context" in b["method"]
    assert "Comparison at the same epsilon" in owner_path(lora, "report.html").read_text()
    assert "same budget" in out and "test accuracy, trained on synthetic" in out

    # a run at another epsilon: compared, evaluated on the way (it has no evaluation.json), and flagged in the table
    other = tmp_path / "fewshot-eps2"
    assert cli(capsys, "generate", "-q", "-o", str(other), *sets(incontext(tmp_path, tiny_job, "eps2", 2.0)))[0] == 0
    code, out, err = cli(capsys, "report", str(lora), "--compare", str(other), "-q", *sets(CHEAP))
    assert code == 0, err
    cmp = json.loads(owner_path(lora, "report.json").read_text())["comparison"]
    assert not cmp["same_budget"] and "NOT the same budget" in cmp["budget_note"]
    assert cmp["runs"][1]["evaluation"] == "evaluated for this comparison" and owner_path(other, "evaluation.json").is_file()
    assert cmp["runs"][1]["epsilon"] == json.loads((other / "certificate.json").read_text())["epsilon"] <= 2.0
    assert "NOT the same budget" in out and "NOT the same budget" in owner_path(lora, "report.html").read_text()

    # another dataset: refused in one line
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(fewshot, elsewhere)
    cert = json.loads((elsewhere / "certificate.json").read_text())
    (elsewhere / "certificate.json").write_text(json.dumps({**cert, "dataset": {**cert["dataset"], "fingerprint": "0" * 32}}))
    code, _, err = cli(capsys, "report", str(lora), "--compare", str(elsewhere), "-q", *sets(CHEAP))
    assert code == 2 and err.count("error:") == 1 and "different datasets" in err
