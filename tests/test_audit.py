"""Privacy audit on known answers: a model trained to overfit vs a DP one, a planted canary, the DP-SGD
baseline classifier's privacy mechanics, and the audit runs + report end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsynth.release import owner_path
from dpsynth.config import load_config
from dpsynth.data import Example
from dpsynth.evaluate import attacks
from dpsynth.evaluate.audit import Canary, canary_exposures, make_canaries
from dpsynth.evaluate.classifiers import Context, dp_predict, metrics
from dpsynth.privacy import SampledGaussian, calibrate, epsilon

from conftest import make_rows

PREFIX = "[toy][{label}]: "


def _overfit(model_dir: str, records: list[Example], steps: int = 60, lr: float = 2e-2, batch: int = 16, prefix=PREFIX):
    """Fine-tune the tiny Llama's blocks on `records` (embeddings frozen: cheap), non-private, until it memorises them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enc = []
    for ex in records:
        p = tok(prefix.format(label=ex.label), add_special_tokens=False).input_ids
        t = tok(ex.text, add_special_tokens=False).input_ids
        enc.append((p + t + [tok.eos_token_id], len(p)))
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the 49k-row output layer
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        rows = [enc[i] for i in rng.choice(len(enc), min(batch, len(enc)), replace=False)]
        width = max(len(s) for s, _ in rows)
        ids = torch.full((len(rows), width), tok.eos_token_id)
        w = torch.zeros((len(rows), width - 1))
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (s, plen) in enumerate(rows):
            ids[r, : len(s)] = torch.tensor(s)
            attn[r, : len(s)] = 1
            w[r, plen - 1 : len(s) - 1] = 1
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        ((nll * w).sum(1) / w.sum(1)).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def toy(n: int, seed: int) -> list[Example]:
    return [Example(r["review"], r["sentiment"]) for r in make_rows(n, seed)]


@pytest.fixture(scope="module")
def overfit_model(tiny_model_dir):
    members, nonmembers = toy(32, seed=10), toy(32, seed=11)
    canaries = [Canary("4 8 1 5 9 2", 8, "pos"), Canary("7 0 3 3 6 1", 8, "neg"), Canary("2 2 9 0 4 7", 0, "pos")]
    records = members + [r for c in canaries for r in c.records()]
    model, tok = _overfit(tiny_model_dir, records)
    return model, tok, members, nonmembers, canaries


def test_loss_attack_separates_members_of_an_overfit_model(overfit_model):
    model, tok, members, nonmembers, _ = overfit_model
    items = [(PREFIX.format(label=e.label), e.text) for e in members + nonmembers]
    s = attacks.loss_attack_scores(model, tok, items)["loss"]
    rep = attacks.attack_report(s[:32], s[32:], delta=1e-5)
    assert rep["auc"] > 0.9
    assert rep["epsilon_lower_bound"] > 0.5  # an overfit model is far from private (16 + 16 held-out scores bound it)


def test_planted_canary_is_exposed_and_the_control_is_not(overfit_model):
    model, tok, _, _, canaries = overfit_model
    rows = canary_exposures(model, tok, lambda lab: PREFIX.format(label=lab), canaries, {c.secret: c.repetitions for c in canaries},
                            candidates=300, seed=0)
    by = {r["secret"]: r for r in rows}
    for c in canaries[:2]:
        assert by[c.secret]["sampled"] == pytest.approx(math.log2(301))  # beats every random candidate
        assert by[c.secret]["extrapolated"] > 10
    assert by[canaries[2].secret]["extrapolated"] < 6  # never inserted: an ordinary secret


def _dp_lora(model_dir: str, records: list[Example], sigma: float, *, q: float, steps: int, clip: float, lr: float):
    """The production DP-LoRA trainer (DPLoRAStep on batches from poisson_batches) on the tiny Llama: only sigma varies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpsynth.config import LoraConfig
    from dpsynth.models import wrap_lora
    from dpsynth.prefixlm import collate, encode
    from dpsynth.privacy.sampling import poisson_batches
    from dpsynth.train.step import DPLoRAStep

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the same initial adapter for every sigma
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = wrap_lora(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "up_proj", "down_proj")))
    enc = [encode(tok, PREFIX.format(label=e.label), e.text, 32) for e in records]
    step = DPLoRAStep(model, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=q * len(enc),
                      learning_rate=lr, micro_batch_size=64)
    for idx in poisson_batches(len(enc), q, steps):
        step(collate([enc[j] for j in idx], tok.pad_token_id))
    step.module._close()
    return model.eval(), tok


def test_dp_generator_resists_the_loss_attack(tiny_model_dir):
    """One schedule (25 epochs over 64 members), trained twice: with sigma calibrated to epsilon=1 the loss attack
    stays at chance and within the certified epsilon; with sigma=1e-3 (no privacy) the same attack catches the
    members. A test that passed with any sigma would not be testing the noise."""
    rows = toy(128, seed=30)
    order = np.random.default_rng(30).permutation(len(rows))  # members by a seeded draw, not by id (#0-#63 vs #64-)
    mem, non = [rows[i] for i in order[:64]], [rows[i] for i in order[64:]]
    q, steps, delta = 0.25, 100, 1e-5
    sigma = calibrate(lambda s: (SampledGaussian(s, q, steps),), 1.0, delta, accountant="prv")
    eps = epsilon([SampledGaussian(sigma, q, steps)], delta, "prv")
    items = [(PREFIX.format(label=e.label), e.text) for e in mem + non]
    auc = {}
    for name, s in (("dp", sigma), ("no_noise", 1e-3)):
        model, tok = _dp_lora(tiny_model_dir, mem, s, q=q, steps=steps, clip=10.0, lr=0.01)
        scores = attacks.loss_attack_scores(model, tok, items, reference=model.disable_adapter)
        reps = {k: attacks.attack_report(sc[: len(mem)], sc[len(mem):], delta) for k, sc in scores.items()}
        auc[name] = reps["loss"]["auc"]
        if name == "dp":
            for k, rep in reps.items():
                assert 0.3 < rep["auc"] < 0.7, (k, rep)  # chance: an AUC's sd on 64 vs 64 is about 0.05
                assert rep["epsilon_lower_bound"] <= eps, (k, rep)
    assert sigma > 5  # a real privacy noise level...
    assert auc["no_noise"] > 0.7 and auc["no_noise"] > auc["dp"] + 0.15, auc  # ...that is what stops the attack


def test_canaries_have_distinct_records_and_controls():
    cs = make_canaries((1, 4), 2, ["a", "b"], seed=0)
    assert [c.repetitions for c in cs] == [0, 0, 1, 1, 4, 4]
    assert len({c.secret for c in cs}) == 6 and all(re.fullmatch(r"(\d ){5}\d", c.secret) for c in cs)
    texts = [r.text for c in cs for r in c.records()]
    assert len(texts) == 10 and len(set(texts)) == 10  # survive dedupe
    assert make_canaries((1, 4), 2, ["a", "b"], seed=0) == cs


# --- baseline (c): DP-SGD on the real data -------------------------------------------------------

def test_dp_sgd_baseline_is_calibrated_poisson_and_noisy():
    train, test = toy(600, seed=20), toy(200, seed=21)
    truth = [e.label for e in test]
    eps, delta = 2.0, 1e-4
    pred, info = dp_predict("tfidf_logreg", train, [e.text for e in test], target_epsilon=eps, delta=delta, accountant="prv",
                            ctx=Context(seed=0), epochs=8, batch_size=60)
    # accounting: the calibrated sigma, and the epsilon of the steps that ran, within the target
    q, steps = 60 / 600, math.ceil(8 / 0.1)
    assert info.sampling_rate == q and info.steps == steps and len(info.batch_sizes) == steps
    assert info.noise_multiplier == pytest.approx(calibrate(lambda s: (SampledGaussian(s, q, steps),), eps, delta, accountant="prv"))
    assert info.epsilon == pytest.approx(epsilon([SampledGaussian(info.noise_multiplier, q, steps)], delta, "prv"))
    assert 0.9 * eps < info.epsilon <= eps
    # Poisson sampling: batch sizes vary around q N (Binomial(600, 0.1): sd 7.3)
    sizes = np.array(info.batch_sizes)
    assert sizes.std() > 3 and abs(sizes.mean() - 60) < 4
    assert metrics(truth, pred)["accuracy"] > 0.8  # the easy toy task survives eps=2
    # fresh noise each time: two runs from the same initialisation differ
    pred2, _ = dp_predict("tfidf_logreg", train, [e.text for e in test], target_epsilon=0.05, delta=delta, accountant="prv",
                          ctx=Context(seed=0), epochs=1, batch_size=60)
    pred3, _ = dp_predict("tfidf_logreg", train, [e.text for e in test], target_epsilon=0.05, delta=delta, accountant="prv",
                          ctx=Context(seed=0), epochs=1, batch_size=60)
    assert pred2 != pred3  # at eps=0.05 the noise dominates


def test_dp_sgd_clips_each_example():
    """An example with a huge input moves plain SGD by at most lr * (C + noise) / B per step."""
    from dpsynth.evaluate.dp_sgd import dp_sgd_train

    n, d, B, lr = 200, 8, 50, 1.0
    X = torch.zeros((n, d))
    X[0] = 1e6  # unclipped, its gradient would move the weights by ~1e6 * lr / B
    y = torch.zeros(n, dtype=torch.long)
    module = torch.nn.Linear(d, 2)
    torch.nn.init.zeros_(module.weight), torch.nn.init.zeros_(module.bias)
    info = dp_sgd_train(module, n, lambda idx: (X[torch.from_numpy(idx)],), y, target_epsilon=50.0, delta=1e-5,
                        accountant="rdp", epochs=1, batch_size=B, max_grad_norm=1.0, learning_rate=lr, optimizer="sgd")
    assert info.steps == 4
    clipped = info.steps * lr * 1.0 / B
    noise_sd = math.sqrt(info.steps) * lr * info.noise_multiplier / B
    assert module.weight.abs().max().item() <= clipped + 6 * noise_sd


# --- end to end: canary runs over epsilon, report --------------------------------------------------

@pytest.mark.slow
def test_report_with_canary_runs_end_to_end(tiny_job, tmp_path, capsys):
    from dpsynth.cli import main
    from dpsynth.privacy import Ledger

    args = [a for o in tiny_job + ["sampling.label_proportions=uniform"] for a in ("--set", o)]
    with pytest.raises(SystemExit) as ex:
        main(["run", "--quiet", *args])
    assert ex.value.code == 0, capsys.readouterr().err
    cfg = load_config(None, tiny_job)
    run_dir = Path(cfg.output_dir)
    real_fp = json.loads((run_dir / "certificate.json").read_text())["dataset"]["fingerprint"]
    ledger = Ledger(cfg.privacy.ledger)
    spent_before = ledger.spent(real_fp)

    corpus = run_dir / "synthetic.jsonl"  # a hostile text must come out escaped in the page
    hostile = json.dumps({"text": "<script>alert(1)</script> & co", "label": json.loads(corpus.read_text().splitlines()[0])["label"]})
    corpus.write_text(hostile + "\n" + corpus.read_text())

    sets = ["audit_epsilons=[1, inf]", "canary_repetitions=[2]", "canaries_per_repetition=2", "canary_candidates=50",
            "attack_examples=40", "audit_overrides=[training.steps=4]", "samples_per_label=3", "classifiers=[tfidf_logreg]"]
    with pytest.raises(SystemExit) as ex:
        main(["report", str(run_dir), "--quiet", *[a for s in sets for a in ("--set", s)]])
    out, err = capsys.readouterr()
    assert ex.value.code == 0, err
    assert "empirical epsilon lower bound" in out and "membership inference AUC" in out

    rep = json.loads(owner_path(run_dir, "report.json").read_text())
    points = {p["target_epsilon"]: p for p in rep["audit"]["points"]}
    assert set(points) == {"1", "inf"}
    assert 0 < points["1"]["certified_epsilon"] <= 1.0
    assert points["inf"]["noise_multiplier"] == 0.01 and points["inf"]["certified_epsilon"] > 1000
    for p in points.values():
        assert p["dataset_fingerprint"] != real_fp  # canary-augmented data: a different dataset
        assert Path(p["ledger"]).is_file() and Path(p["ledger"]).parent == owner_path(run_dir, "evaluation") / "audit" / "ledgers"
        by = {r["in_train"]: r for r in p["privacy"]["canaries"]["by_count"]}
        assert sum(r["canaries"] for r in by.values()) == 4 and set(by) <= {0, 1, 2}
        for r in p["privacy"]["canaries"]["each"]:
            assert r["in_train"] <= r["inserted"] and 0 <= r["extrapolated"] <= math.log2(1e6)
        assert 0 <= p["privacy"]["empirical_epsilon"]["lower_bound"]
    assert ledger.spent(real_fp) == pytest.approx(spent_before)  # the real dataset's budget is untouched
    assert len(ledger.runs(real_fp)) == 1

    # the report: one self-contained page with inline PNGs and escaped text
    page = owner_path(run_dir, "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count('src="data:image/png;base64,') >= 5
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script" not in page.lower() and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    for label, texts in rep["samples"].items():
        assert 1 <= len(texts) <= 3
    assert rep["certificate"]["epsilon"] == rep["epsilon"]

    # running it again reuses the audit runs (no new ledger runs)
    ledgers = {p: len(Ledger(Path(points[p]["ledger"])).runs(points[p]["dataset_fingerprint"])) for p in points}
    with pytest.raises(SystemExit) as ex:
        main(["report", str(run_dir), "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert ex.value.code == 0
    assert ledgers == {p: len(Ledger(Path(points[p]["ledger"])).runs(points[p]["dataset_fingerprint"])) for p in points} == {"1": 1, "inf": 1}


def test_transformer_classifier_fine_tunes_and_dp_fine_tunes_with_opacus():
    """MiniLM with its top blocks + head: learns the toy task plainly and under DP-SGD (only those blocks get
    per-example gradients), at the calibrated epsilon."""
    from dpsynth.evaluate.classifiers import predict

    train, test = toy(200, seed=1), toy(60, seed=2)
    truth, texts = [e.label for e in test], [e.text for e in test]
    ctx = Context(seed=0, transformer_epochs=2)
    assert metrics(truth, predict("transformer", train, texts, ctx))["accuracy"] > 0.9
    pred, info = dp_predict("transformer", train, texts, target_epsilon=8.0, delta=1e-4, accountant="prv", ctx=ctx,
                            epochs=3, batch_size=50)
    assert 7.5 < info.epsilon <= 8.0 and info.steps == 12 and info.sampling_rate == 0.25
    assert metrics(truth, pred)["accuracy"] > 0.8


def test_zero_shot_corpus_from_the_base_model_is_uniform_and_cached(tiny_model_dir, tmp_path):
    from dpsynth.config import SamplingConfig
    from dpsynth.evaluate.corpora import zero_shot_corpus

    from dpsynth.config import ModelConfig

    params = SamplingConfig(max_new_tokens=6, batch_size=5)
    base = ModelConfig(base=tiny_model_dir, max_length=64)  # room for the 36-token chat prompt
    rows = zero_shot_corpus(tmp_path / "zs.jsonl", base, "toy", ["neg", "pos"], 7, "A {label} text from {dataset}:\n", params)
    assert len(rows) == 7 and [e.label for e in rows].count("neg") == 4 and all(e.text for e in rows)
    meta = json.loads((tmp_path / "zs.meta.json").read_text())
    assert meta["prompt"] == "A {label} text from {dataset}:\n" and meta["base"] == tiny_model_dir
    assert zero_shot_corpus(tmp_path / "zs.jsonl", base, "toy", ["neg", "pos"], 7, "A {label} text from {dataset}:\n",
                            params) == rows  # cached
    # by default the floor uses the run's own conditioning prompt, and the same label sharpening as the corpus
    floor = zero_shot_corpus(tmp_path / "zs2.jsonl", base, "toy", ["neg", "pos"], 6, None, SamplingConfig(
        max_new_tokens=6, batch_size=6, keep_rate=0.5))
    assert len(floor) == 6 and json.loads((tmp_path / "zs2.meta.json").read_text())["prompt"] == base.model_dump(mode="json")


def test_an_interrupted_zero_shot_corpus_continues_from_its_finished_batches(tiny_model_dir, tmp_path):
    import signal

    from dpsynth.config import ModelConfig, SamplingConfig
    from dpsynth.evaluate.corpora import zero_shot_corpus
    from dpsynth.interrupt import Interrupted

    params = SamplingConfig(max_new_tokens=6, batch_size=2, keep_rate=1.0)
    base = ModelConfig(base=tiny_model_dir, max_length=64)
    args = (base, "toy", ["neg", "pos"], 8, "A {label} text from {dataset}:\n", params)
    whole = zero_shot_corpus(tmp_path / "whole.jsonl", *args)
    calls = [0]

    def stop():
        calls[0] += 1
        return signal.SIGTERM if calls[0] > 3 else None

    with pytest.raises(Interrupted):
        zero_shot_corpus(tmp_path / "zs.jsonl", *args, stop=stop)
    (partial,) = tmp_path.glob("zs.*.partial.jsonl")
    assert 0 < len(partial.read_text().splitlines()) < 8 and not (tmp_path / "zs.jsonl").exists()
    assert zero_shot_corpus(tmp_path / "zs.jsonl", *args) == whole  # continued: the uninterrupted corpus
    assert not list(tmp_path.glob("zs.*.partial.jsonl"))
