"""The user's records as they are (dpsynth.records): several text fields, several attribute columns, no label."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpsynth.config import load_config
from dpsynth.data import DataError, prepare
from dpsynth.records import RecordSchema

SECRET = b"k" * 32
SCHEMA = RecordSchema(("subject", "body"), ("queue", "priority"))


def tickets(n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    queues, priorities = ["billing", "login", "shipping"], ["high", "low"]
    words = {"billing": ["invoice", "charge", "refund", "card"], "login": ["password", "account", "reset", "locked"],
             "shipping": ["parcel", "delivery", "late", "courier"]}
    rows = []
    for i in range(n):
        q, p = queues[i % 3], priorities[(i // 3) % 2]
        rows.append({"subject": f"{rng.choice(words[q])} issue {i}", "body": " ".join(rng.choices(words[q], k=6)) + f" #{i}",
                     "queue": q, "priority": p, "agent": f"a{i % 7}"})
    return rows


def write(tmp_path: Path, rows: list[dict], name: str = "tickets.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(path: Path, *extra: str):
    return load_config(None, [f"data.source={path}", "data.text_columns=[subject,body]",
                              "data.attribute_columns=[queue,priority]", *extra]).data


field_text = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(subject=field_text, body=field_text, queue=st.text(min_size=1, max_size=10), priority=st.text(min_size=1, max_size=10))
def test_a_record_renders_to_one_text_and_parses_back(subject, body, queue, priority):
    text, cell = SCHEMA.join([subject.strip(), body.strip()]), SCHEMA.cell([queue, priority])
    row = SCHEMA.record(text, cell)
    if not (subject.strip() or body.strip()):
        assert row is None  # a record with every text field empty is not a record
        return
    assert row == {"subject": subject.strip(), "body": body.strip(), "queue": queue, "priority": priority}
    assert SCHEMA.from_record(row) == (text, cell)


@pytest.mark.parametrize("text", ["just a body", "<body>b</body>\n<subject>s</subject>", "<subject>s</subject>",
                                  "<subject>s</subject>\n<body>b</body>\n<body>again</body>",
                                  "<subject>s <body>x</body></subject>\n<body>b</body>", "<subject> </subject><body></body>"])
def test_a_text_that_is_not_one_record_does_not_parse(text):
    assert SCHEMA.parse(text) is None


def test_the_one_label_shorthand_is_unchanged():
    cfg = load_config(None, ["data.text_column=review", "data.label_column=sentiment"]).data
    s = RecordSchema.of(cfg)
    assert s.shorthand and s.output_columns == ("text", "label") and s.conditions("pos") == {"label": "pos"}
    assert s.join(["a review"]) == "a review" and s.cell(["pos"]) == "pos"


@pytest.mark.parametrize("overrides, want", [
    (["data.text_columns=[subject,body]", "data.attribute_columns=[body]"], "data.attribute_columns: column 'body' is also a text column"),
    (["data.attribute_columns=[queue,priority]", "data.labels=[a,b]"], "data.labels: declares the one attribute's values"),
    (["data.attribute_columns=[queue]", "data.attribute_values={agent: [a]}"], "data.attribute_values: 'agent' is not an attribute column"),
    (["data.text_columns=[]"], "data.text_columns: needs at least one column"),
])
def test_a_schema_that_cannot_be_is_a_one_line_config_error(overrides, want):
    with pytest.raises(Exception) as e:
        load_config(None, overrides)
    assert want in str(e.value) and "\n" not in str(e.value)


def test_several_attributes_make_a_joint_of_cells_and_several_fields_one_text(tmp_path):
    splits = prepare(data_cfg(write(tmp_path, tickets())), SECRET)
    assert len(splits.labels) == 6  # 3 queues x 2 priorities: the product of the domains, the DP joint's cells
    assert {json.loads(c)["queue"] for c in splits.labels} == {"billing", "login", "shipping"}
    ex = splits.train[0]
    fields = SCHEMA.parse(ex.text)
    assert fields is not None and fields["subject"] and fields["body"]
    assert set(json.loads(ex.label)) == {"queue", "priority"}


def test_declared_attribute_values_drop_other_records_and_stay_the_domain(tmp_path):
    splits = prepare(data_cfg(write(tmp_path, tickets()), "data.attribute_values={queue: [billing, refunds]}",
                              "data.test_fraction=0.3"), SECRET)
    queues = {json.loads(c)["queue"] for c in splits.labels}
    assert queues == {"billing", "refunds"}  # declared (public), even a value no record has
    assert {json.loads(ex.label)["queue"] for ex in splits.train + splits.test} == {"billing"}


def test_unlabelled_data_has_one_empty_cell(tmp_path):
    path = write(tmp_path, tickets())
    cfg = load_config(None, [f"data.source={path}", "data.text_columns=[body]", "data.attribute_columns=[]"]).data
    splits = prepare(cfg, SECRET)
    assert splits.labels == ("",) and {ex.label for ex in splits.train} == {""}
    assert RecordSchema.of(cfg).record(splits.train[0].text, "") == {"body": splits.train[0].text}


def test_a_txt_source_is_unlabelled_unless_columns_are_named(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("first note\nsecond note\n")
    assert load_config(None, [f"data.source={notes}"]).data.attribute_columns == ()
    named = load_config(None, [f"data.source={notes}", "data.attribute_columns=[ward]"]).data
    assert named.attribute_columns == ("ward",)
    with pytest.raises(DataError, match="data.attribute_columns: column 'ward' not in"):
        prepare(named, SECRET)
    assert load_config(None, [f"data.source={tmp_path / 'notes.csv'}"]).data.attribute_columns is None


@pytest.mark.parametrize("case, want", [
    ("missing", "data.attribute_columns: column 'team' not in"),
    ("too_many", "data.attribute_columns: column 'agent' has 7 distinct values, over data.max_attribute_values 5"),
    ("empty_field", "data.text_columns: column 'subject' is empty in every record"),
    ("joint", "make 6 value combinations, over data.max_cells 4"),
])
def test_bad_records_get_a_one_line_error_naming_the_column(tmp_path, case, want):
    rows = tickets()
    extra = []
    if case == "missing":
        extra = ["data.attribute_columns=[queue,team]"]
    elif case == "too_many":
        extra = ["data.attribute_columns=[queue,agent]", "data.max_attribute_values=5"]
    elif case == "empty_field":
        rows = [{**r, "subject": ""} for r in rows]
    elif case == "joint":
        extra = ["data.max_cells=4"]
    with pytest.raises(DataError) as e:
        prepare(data_cfg(write(tmp_path, rows), *extra), SECRET)
    assert want in str(e.value) and "\n" not in str(e.value)


def test_records_with_every_text_field_empty_are_dropped(tmp_path, caplog):
    rows = tickets(60) + [{"subject": "", "body": " ", "queue": "login", "priority": "low", "agent": "a0"}] * 3
    with caplog.at_level("INFO", logger="dpsynth.data"):
        splits = prepare(data_cfg(write(tmp_path, rows)), SECRET)
    assert all(SCHEMA.parse(ex.text) for ex in splits.train + splits.validation + splits.test)
    assert "3 records with every text field empty were dropped" in caplog.text


class ScriptedEngine:
    """Hands out the given texts in order: generate_corpus's redraw logic is what is under test, and no real model
    can be told to emit a malformed record on cue. The tokenizer is the real one."""

    name = "scripted"

    def __init__(self, tok, texts):
        self.tok, self.texts = tok, list(texts)

    def generate_ids(self, prompts, params, seeds=None):
        from dpsynth.sample.engines import Generation

        return [Generation(self.texts.pop(0), 3, "stop") for _ in prompts]


def test_a_sample_that_does_not_parse_is_redrawn_and_counted(tiny_model_dir):
    from transformers import AutoTokenizer

    from dpsynth.config import SamplingConfig
    from dpsynth.sample.corpus import generate_corpus, serialize

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    good = "<subject>refund</subject>\n<body>please refund my card</body>"
    texts = ["no markers at all", good, "<subject>only a subject</subject>", good.replace("refund", "invoice")]
    cell = SCHEMA.cell(["billing", "high"])
    stats: dict = {}
    rows = generate_corpus(ScriptedEngine(tok, texts), {cell: "prompt"}, {cell: 2},
                           SamplingConfig(batch_size=2, max_new_tokens=8), show_progress=False, schema=SCHEMA, stats=stats)
    assert [r["text"] for r in rows] == [good, good.replace("refund", "invoice")]
    assert stats == {"drawn": 4, "rejected": 2}
    out = [json.loads(line) for line in serialize(rows, "jsonl", SCHEMA).splitlines()]
    assert out[0] == {"subject": "refund", "body": "please refund my card", "queue": "billing", "priority": "high"}
    assert serialize(rows, "csv", SCHEMA).splitlines()[0] == "subject,body,queue,priority"


def _run(tiny_job, tmp_path, source: Path, *schema: str, out: str) -> Path:
    import subprocess
    import sys

    keep = [o for o in tiny_job if not o.startswith(("data.", "output_dir="))]
    run_dir = tmp_path / out
    args = [f"data.source={source}", *schema, *keep, "evaluation.zero_shot_examples=0", f"output_dir={run_dir}"]
    res = subprocess.run([sys.executable, "-m", "dpsynth", "run", "--quiet", *[a for o in args for a in ("--set", o)]],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_attribute_columns_train_a_dp_joint_and_write_the_users_columns(tiny_job, tmp_path):
    """`dpsynth run` on tickets conditioned on queue x priority: the DP label mix is over the 6 cells (the joint; the
    marginals' release and choice are the unit tests below), the corpus keeps the user's column names, and the
    evaluation scores each attribute on its own."""
    from dpsynth.release import owner_path

    import pandas as pd

    source = tmp_path / "tickets.csv"
    pd.DataFrame(tickets()).to_csv(source, index=False)
    run_dir = _run(tiny_job, tmp_path, source, "data.text_columns=[subject,body]",
                   "data.attribute_columns=[queue,priority]", "sampling.format=parquet", "sampling.attribute_mix=auto",
                   out="tickets")

    cert = json.loads((run_dir / "certificate.json").read_text())
    histograms = [e for e in cert["events"] if e.get("purpose") == "histogram"]
    assert histograms and cert["label_histogram"]["noise_multiplier"] in [e["noise_multiplier"] for e in histograms]
    cells = json.loads((run_dir / "labels.json").read_text())
    assert len(cells) == 6 and set(json.loads((run_dir / "label_distribution.json").read_text())) == set(cells)
    rows = pd.read_parquet(run_dir / "synthetic.parquet").to_dict("records")
    assert len(rows) == 12 and all(set(r) == {"subject", "body", "queue", "priority"} for r in rows)
    assert all(r["subject"] or r["body"] for r in rows) and not any("<" + c in r["subject"] + r["body"]
                                                                    for r in rows for c in ("subject>", "body>", "/subject>", "/body>"))
    assert {r["queue"] for r in rows} <= {"billing", "login", "shipping"} and {r["priority"] for r in rows} <= {"high", "low"}
    cert = json.loads((run_dir / "synthetic.parquet.certificate.json").read_text())
    assert cert["corpus"]["sha256"] == __import__("hashlib").sha256((run_dir / "synthetic.parquet").read_bytes()).hexdigest()
    records = cert["corpus"]["records"]
    assert records["columns"] == ["subject", "body", "queue", "priority"] and records["drawn"] >= 24  # 12 kept of >= 24 candidates
    assert records["rejected"] == records["drawn"] - 24  # keep_rate 0.5: 24 candidates; the rest were redrawn
    assert cert["label_histogram"]["over"] == "joint"  # 6 cells: auto counts the joint
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    assert set(ev["attributes"]) == {"queue", "priority"}
    for a in ev["attributes"].values():
        assert {"real", "synthetic", "majority_class", "fidelity"} <= set(a)
    assert ev["records"]["parse_rate"] == (records["drawn"] - records["rejected"]) / records["drawn"]
    assert set(ev["records"]["fields"]) == {"subject", "body"}  # each field's length fidelity


def test_unlabelled_data_trains_on_the_dataset_prompt_alone(tiny_job, tmp_path):
    """A .txt source is unlabelled (data.attribute_columns: [] by default): no label histogram is charged or released, the corpus has only the text column,
    and the verdict is fidelity (MAUVE), not a classifier's."""
    from dpsynth.release import owner_path

    notes = tmp_path / "notes.txt"  # an unlabelled text file, one note per line
    notes.write_text("".join(r["body"] + "\n" for r in tickets()))
    run_dir = _run(tiny_job, tmp_path, notes, out="notes")
    assert json.loads((run_dir / "labels.json").read_text()) == [""]
    assert not (run_dir / "label_distribution.json").exists()
    cert = json.loads((run_dir / "certificate.json").read_text())
    assert cert.get("label_histogram") is None
    assert not [e for e in cert["events"] if e.get("purpose") == "histogram"]  # lengths are fixed here: none charged
    rows = [json.loads(line) for line in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(set(r) == {"text"} for r in rows)
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    assert "synthetic" not in ev and ev["verdict"]["level"] in ("unlabelled", "out_of_genre")
    mauve = ev["fidelity"]["mauve"]["synthetic_vs_test"]  # 12 texts: below MAUVE's fixed size, and flagged so
    # (the keyed split's test side has about 24 of the 240 notes, whatever the owner's key drew)
    assert mauve["p"] == 12 and mauve["texts"] == min(12, mauve["q"]) and mauve["comparable"] is False
    assert "all_texts" in mauve
    lm = ev["lm_utility"]  # a fresh LoRA trained on each corpus, measured on the real test texts, beside the base
    for name in ("zero_shot", "real", "synthetic"):
        assert lm[name]["perplexity"] > 1 and 0 <= lm[name]["next_token_accuracy"] <= 1 and lm[name]["tokens"] > 0
    assert lm["real"]["perplexity"] < lm["zero_shot"]["perplexity"]  # the real texts teach the random base something
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dpsynth", "report", str(run_dir), "--quiet"], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    html = owner_path(run_dir, "report.html").read_text()
    assert "Language-model utility" in html and "Unlabelled data: no classifier utility" in html


def test_a_corpus_can_be_restricted_to_attribute_values():
    from dpsynth.errors import UserError

    cells = SCHEMA.cells({"queue": ["billing", "login"], "priority": ["high", "low"]})
    mix = {c: 1.0 for c in cells}
    kept = SCHEMA.restrict(mix, {"queue": "billing"})
    assert sorted(json.loads(c)["priority"] for c in kept) == ["high", "low"]
    assert all(json.loads(c)["queue"] == "billing" for c in kept)
    with pytest.raises(UserError, match="attributes: 'team' is not an attribute column"):
        SCHEMA.restrict(mix, {"team": "x"})
    with pytest.raises(UserError, match=r"attributes.queue: 'refunds' is not one of its values \(billing, login\)"):
        SCHEMA.restrict(mix, {"queue": "refunds"})
    with pytest.raises(UserError, match="no weight is left"):
        SCHEMA.restrict({**mix, **{c: 0.0 for c in kept}}, {"queue": "billing"})


def test_a_corpus_can_be_written_as_parquet_in_the_users_columns(tmp_path):
    from dpsynth.evaluate.corpora import read_corpus
    from dpsynth.sample.corpus import serialize_bytes

    rows = [{"text": "<subject>refund</subject>\n<body>my card</body>", "label": SCHEMA.cell(["billing", "high"])}]
    path = tmp_path / "synthetic.parquet"
    path.write_bytes(serialize_bytes(rows, "parquet", SCHEMA))
    import pandas as pd

    df = pd.read_parquet(path)
    assert list(df.columns) == ["subject", "body", "queue", "priority"] and df.iloc[0]["body"] == "my card"
    back = read_corpus(path, SCHEMA)
    assert [(e.text, e.label) for e in back] == [(rows[0]["text"], rows[0]["label"])]


def test_marginals_carry_sqrt_k_noise_for_one_histograms_charge():
    """k stacked marginals have L2 sensitivity sqrt(k): each count gets noise std sigma * sqrt(k) (a joint's would
    get sigma). 3000 draws pin the std to within ~3 %; sigma alone (the wrong law) is 41 % off."""
    import numpy as np

    from dpsynth.privacy.histogram import noisy_marginals, release_marginals

    cells = SCHEMA.cells({"queue": ["billing", "login"], "priority": ["high", "low"]})
    units = [[c] for c in cells for _ in range(50)]
    rng = np.random.default_rng(0)
    draws = np.array([noisy_marginals(units, cells, SCHEMA.attributes, 2.0, rng)["queue"][1] for _ in range(3000)])
    assert np.allclose(draws.mean(0), [100, 100], atol=0.5)
    std = draws.std(0)
    assert np.all(np.abs(std / (2.0 * np.sqrt(2)) - 1) < 0.06) and np.all(np.abs(std / 2.0 - 1) > 0.3)
    # the cell mix is the product of the marginals (independent attributes), from almost noiseless counts here
    skewed = [[SCHEMA.cell(["billing", p])] for p in ["high"] * 60 + ["low"] * 20] + [[SCHEMA.cell(["login", "high"])]] * 20
    mix = release_marginals(skewed, cells, SCHEMA.attributes, 1e-6)
    assert abs(mix[SCHEMA.cell(["login", "low"])] - 0.2 * 0.2) < 1e-6 and abs(sum(mix.values()) - 1) < 1e-9


def test_auto_counts_the_joint_up_to_joint_max_cells_then_the_marginals():
    from dpsynth.data_releases import label_mix_kind

    cfg = load_config(None, ["data.attribute_columns=[queue,priority]", "sampling.joint_max_cells=6"])
    assert label_mix_kind(cfg, ["c"] * 6) == "joint" and label_mix_kind(cfg, ["c"] * 7) == "marginals"
    asked = load_config(None, ["data.attribute_columns=[queue,priority]", "sampling.attribute_mix=marginals"])
    assert label_mix_kind(asked, ["c"] * 6) == "marginals"  # asked for: the marginals even where the joint is small
    assert label_mix_kind(load_config(None, []), ["a", "b"]) is None  # one label: a plain histogram


def test_prompt_response_pairs_unlabelled_with_two_text_fields(tiny_job, tmp_path):
    """Instruction data: a JSONL of prompt/response pairs, no label. Every synthetic row is a pair in those columns."""
    from dpsynth.release import owner_path

    rng = random.Random(1)
    verbs, things = ["block", "renew", "activate", "replace", "freeze", "report"], ["card", "account", "pin", "loan", "app"]
    rows = [{"prompt": " ".join(rng.choices(verbs + things, k=6)) + "?", "response": " ".join(rng.choices(verbs + things, k=9))}
            for _ in range(240)]
    run_dir = _run(tiny_job, tmp_path, write(tmp_path, rows, "pairs.jsonl"), "data.text_columns=[prompt,response]",
                   "data.attribute_columns=[]", "evaluation.lm_utility=false", out="pairs")
    out = [json.loads(line) for line in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    assert len(out) == 12 and all(set(r) == {"prompt", "response"} for r in out)
    ev = json.loads(owner_path(run_dir, "evaluation.json").read_text())
    assert ev["records"]["columns"] == ["prompt", "response"] and 0 < ev["records"]["parse_rate"] <= 1
    assert "lm_utility" not in ev and ev["verdict"]["level"] in ("unlabelled", "out_of_genre")


def test_the_in_context_prefix_of_a_record_names_its_attributes(tiny_model_dir):
    """The training-free generator's plain few-shot prefix: the paper's in the shorthand, every attribute for a
    record, the unconditioned template for unlabelled data."""
    from transformers import AutoTokenizer

    from dpsynth.data import format_prefix
    from dpsynth.prompts import plain_prefixes

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    short = load_config(None, [])
    assert plain_prefixes(short, tok, "rt", ["fresh"]) == {"fresh": format_prefix(short.model.prefix_template, "rt", "fresh")}
    rec = load_config(None, ["data.attribute_columns=[queue,priority]"])
    cell = SCHEMA.cell(["billing", "high"])
    assert plain_prefixes(rec, tok, "tickets", [cell]) == {cell: "tickets text, label queue: billing, priority: high: "}
    assert plain_prefixes(load_config(None, ["data.attribute_columns=[]"]), tok, "notes", [""]) == {"": "notes text: "}


def test_an_unlabelled_audit_point_scores_no_classifier():
    """`dpsynth report --full`'s canary runs score each point's utility: unlabelled data has no class to score."""
    from dpsynth.audit_experiments import point_utility
    from dpsynth.config import EvaluationConfig
    from dpsynth.data import Example, Splits
    from dpsynth.evaluate.classifiers import Context

    texts = [Example(f"note number {i} about things", "", f"u{i}") for i in range(20)]
    splits = Splits("notes", tuple(texts[:10]), (), tuple(texts[10:]), ("",), "f" * 32, 20)
    out = point_utility(EvaluationConfig(mauve=False), Context(0, None, 1, 1), None, splits, texts[:5])
    assert out["classifier"] is None and out["synthetic"]["accuracy"] is None and out["real"]["accuracy"] is None


def test_the_training_free_generator_writes_records_in_the_users_columns(tmp_path, tiny_model_dir):
    """`dpsynth generate` on tickets conditioned on queue x priority: rows in the user's columns, one per cell
    asked for; several text fields are refused before anything is spent."""
    import subprocess
    import sys

    source = write(tmp_path, tickets())
    sets = [f"data.source={source}", "data.text_columns=[body]", "data.attribute_columns=[queue,priority]",
            f"model.base={tiny_model_dir}", f"privacy.ledger={tmp_path / 'ledger.sqlite'}", "privacy.epsilon=4",
            "privacy.accountant=pld", "incontext.mechanism=laplace", "incontext.num_examples=6",
            "incontext.max_new_tokens=4", "incontext.groups=2", "incontext.examples_per_group=1",
            "sampling.label_proportions=uniform", "incontext.engine=transformers", "model.max_length=32"]

    def generate(*extra):
        return subprocess.run([sys.executable, "-m", "dpsynth", "generate", "-q", "-o", str(tmp_path / "ic"),
                               *[a for s in [*sets, *extra] for a in ("--set", s)]], capture_output=True, text=True,
                              timeout=600)

    refused = generate("data.text_columns=[subject,body]")
    assert refused.returncode == 2 and "data.text_columns: the training-free generator" in refused.stderr
    assert not (tmp_path / "ic" / "certificate.json").exists()
    proc = generate()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ic" / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(set(r) == {"body", "queue", "priority"} for r in rows)
