"""Training-free DP few-shot generation (dpsynth/incontext/): sensitivity, noise, accounting, ledger, e2e."""

from __future__ import annotations

import json
import shutil
import math
import os
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import make_rows
from dpsynth.release import owner_path
from dpsynth.config import InContextConfig, load_config
from dpsynth.data import Example
from dpsynth.errors import UserError
from dpsynth.incontext.mechanism import (SENSITIVITY_L1, SENSITIVITY_L2, assign_groups, calibrate_noise, choose_token,
                                         clip_votes, example_events, generate_rows, noise_scale, plan_events, pure_epsilon,
                                         sample_noise)
from dpsynth.incontext.run import example_charger
from dpsynth.incontext.voters import GroupVoter
from dpsynth.privacy import Gaussian, Laplace, Ledger, epsilon
from dpsynth.privacy.certificate import DatasetBlock, InContextBlock
from dpsynth.privacy.run import Plan, PrivateRun

DATASET = DatasetBlock(name="reviews", fingerprint="fp", units=240, train_units=200)


def admitted(ledger, events, accountant: str, delta: float = 1e-5, budget: float = 100.0) -> PrivateRun:
    """A run admitted through the one private-run path."""
    return PrivateRun.open(ledger, dataset=DATASET, plan=Plan(tuple(events), accountant, delta), total_epsilon=budget,
                           kind="ic", config_hash="test")

LABELS = ("neg", "pos")


def examples(n: int, seed: int = 0) -> list[Example]:
    return [Example(r["review"], r["sentiment"]) for r in make_rows(n, seed)]


@pytest.fixture(scope="module")
def voter(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return GroupVoter(model, tok, "[{dataset}][{label}]: ", "reviews", max_length=32, cache=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls: one thread is much faster than two on a shared, loaded 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- sensitivity ---------------------------------------------------------------------------------------

def changed_groups(a, b) -> list[tuple[str, int]]:
    return [(lab, g) for lab in LABELS for g in range(len(a[lab])) if a[lab][g] != b[lab][g]]


def test_one_example_changes_at_most_one_group():
    data = examples(200)
    base = assign_groups(data, LABELS, groups=8, per_group=30, seed=3)  # room for every record: the add shows up
    assert all(len({id(ex) for g in gs for ex in g}) == sum(map(len, gs)) for gs in base.values())  # disjoint
    assert all(ex.label == lab for lab, gs in base.items() for g in gs for ex in g)  # label-homogeneous
    added = Example("an entirely new and private review", "pos")
    assert len(changed_groups(base, assign_groups(data + [added], LABELS, 8, 30, 3))) == 1
    for i in (0, 57, 199):  # remove one
        assert len(changed_groups(base, assign_groups(data[:i] + data[i + 1:], LABELS, 8, 30, 3))) == 1
    # with a per-group cap an insertion may displace a member, still inside one group only
    capped = assign_groups(data, LABELS, 8, 3, 3)
    for k in range(20):
        other = assign_groups(data + [Example(f"new private text {k}", LABELS[k % 2])], LABELS, 8, 3, 3)
        assert len(changed_groups(capped, other)) <= 1


def test_neighbouring_datasets_change_one_vote_by_at_most_the_sensitivity(voter):
    data = examples(120)
    neighbour = data + [Example("awful dreadful messy plot, a private sentence", "neg")]
    votes = []
    for d in (data, neighbour):
        groups = assign_groups(d, LABELS, groups=12, per_group=8, seed=0)["neg"]
        logits = voter.start(voter.prompts("neg", groups))
        cand = logits[-1].topk(50).indices  # the public row: no private data
        votes.append((logits[-1], clip_votes(logits[:-1, cand], temperature=1.0), clip_votes(logits[:-1, cand], 1.0, top_k=5)))
    (pub_a, va, ka), (pub_b, vb, kb) = votes
    assert torch.equal(pub_a, pub_b)
    for x, y in ((va, vb), (ka, kb)):
        assert torch.allclose(x.sum(-1), torch.ones(len(x), dtype=x.dtype))  # each vote: L1 norm 1
        diff = [i for i in range(len(x)) if not torch.equal(x[i], y[i])]
        assert len(diff) == 1
        assert float((x - y).abs().sum()) <= SENSITIVITY_L1 + 1e-9
        assert float(torch.linalg.vector_norm(x.sum(0) - y.sum(0))) <= SENSITIVITY_L2 + 1e-9


def test_kv_cache_matches_recomputation(tiny_model_dir, voter):
    cached = GroupVoter(voter.model, voter.tok, voter.template, voter.dataset, voter.max_length, cache=True)
    rows = voter.prompts("pos", assign_groups(examples(60), LABELS, 4, 3, 0)["pos"])  # different lengths: left padding
    assert len({len(r) for r in rows}) > 1
    a, b = voter.start(rows), cached.start(rows)
    for token in (11, 532, 2010):
        assert torch.allclose(a, b, atol=1e-4)
        a, b = voter.step(token), cached.step(token)
    assert torch.allclose(a, b, atol=1e-4)


# --- noise ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism,nm", [("laplace", 0.5), ("laplace", 3.0), ("gaussian", 0.7), ("gaussian", 5.0)])
def test_noise_scale_matches_mechanism(mechanism, nm):
    scale = noise_scale(mechanism, nm)
    assert scale == pytest.approx(nm * (2.0 if mechanism == "laplace" else math.sqrt(2.0)))
    x = sample_noise(200_000, mechanism, scale, torch.Generator().manual_seed(1)).numpy()
    assert abs(x.mean()) < 0.02 * scale
    if mechanism == "laplace":  # Laplace(b): E|X| = b, std = sqrt(2) b
        assert np.abs(x).mean() == pytest.approx(scale, rel=0.01)
        assert x.std() == pytest.approx(math.sqrt(2) * scale, rel=0.01)
    else:
        assert x.std() == pytest.approx(scale, rel=0.01)
        assert np.abs(x).mean() == pytest.approx(scale * math.sqrt(2 / math.pi), rel=0.01)


@pytest.mark.parametrize("mechanism,accountant", [("laplace", "pld"), ("gaussian", "pld"), ("gaussian", "rdp")])
def test_calibrated_noise_meets_epsilon(mechanism, accountant):
    ic = InContextConfig(mechanism=mechanism, max_new_tokens=10)
    nm = calibrate_noise(ic, 3.0, 1e-5, accountant, 20)
    eps = epsilon(plan_events(ic, nm, 20), 1e-5, accountant)
    assert 0.99 * 3.0 <= eps <= 3.0
    assert epsilon(plan_events(ic, nm * 0.98, 20), 1e-5, accountant) > 3.0  # and it is the least such noise
    if mechanism == "laplace":
        assert eps <= pure_epsilon(plan_events(ic, nm, 20))  # (eps, delta) never above the pure-DP bound
        assert pure_epsilon([Laplace(0.5, 40)]) == pytest.approx(80.0)


def test_fallback_is_charged_every_token():
    ic = InContextConfig(public_fallback=True, fallback_noise_multiplier=4.0, max_new_tokens=7)
    assert example_events(ic, 2.0) == [Gaussian(2.0, 7), Gaussian(4.0, 7)]


# --- accounting against dp_accounting --------------------------------------------------------------------

def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact eps of a Gaussian mechanism with mu = sensitivity/sigma (Balle & Wang 2018, Thm 8)."""
    d = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_certificate_epsilon_matches_dp_accounting(tmp_path, mechanism):
    nm, steps, delta = (8.0 if mechanism == "laplace" else 6.0), 60, 1e-5
    ic = InContextConfig(mechanism=mechanism, max_new_tokens=6)
    run = admitted(Ledger(tmp_path / "ledger.sqlite"), plan_events(ic, nm, steps // 6), "pld", delta, budget=50.0)
    charge = example_charger(run)
    for _ in range(steps // 6):
        assert charge(example_events(ic, nm))
    cert = run.certify(mechanism=InContextBlock(mechanism=mechanism, noise_multiplier=nm, noise_scale=noise_scale(mechanism, nm),
                                                sensitivity={}, token_steps=steps, examples_charged=steps // 6,
                                                planned_epsilon=0.0),
                       base_model={"name": "tiny"}, config_hash="test").to_json()
    # the reference: every token as its own dp_accounting event, composed one by one
    one = dp_accounting.LaplaceDpEvent(nm) if mechanism == "laplace" else dp_accounting.GaussianDpEvent(nm)
    pld = dp_accounting.pld.PLDAccountant()
    rdp = dp_accounting.rdp.RdpAccountant()
    for _ in range(steps):
        pld.compose(one)
        rdp.compose(one)
    assert cert["epsilon"] == pytest.approx(pld.get_epsilon(delta), rel=1e-6)
    assert cert["epsilon"] <= rdp.get_epsilon(delta)
    if mechanism == "gaussian":  # N Gaussians at sigma = composed Gaussian at sigma/sqrt(N): closed form
        assert cert["epsilon"] == pytest.approx(analytic_gaussian_epsilon(math.sqrt(steps) / nm, delta), rel=0.01)
    else:
        assert cert["epsilon"] <= steps / nm  # the pure-DP basic-composition bound


# --- the ledger stops generation -------------------------------------------------------------------------

def test_ledger_stops_generation_when_the_plan_is_spent(tmp_path, voter):
    ic = InContextConfig(max_new_tokens=5, groups=3, examples_per_group=2, candidates=20)
    nm = 4.0
    run = admitted(Ledger(tmp_path / "ledger.sqlite"), plan_events(ic, nm, 3), "rdp")  # admitted for 3 examples
    groups = assign_groups(examples(60), LABELS, 3, 2, 0)
    state, finished = generate_rows(voter, groups, {"neg": 4, "pos": 4}, ic, nm, example_charger(run),
                                    torch.Generator().manual_seed(0))
    rows, stats = state["rows"], state["stats"]
    charged = sum(e.count for e in run.charged())
    assert finished
    assert stats["stopped_by_ledger"] and stats["examples_charged"] == 3
    assert charged == stats["token_steps_charged"] == 15
    assert stats["token_steps_computed"] <= charged and stats["tokens_released"] <= charged
    assert len(rows) + stats["empty"] == 3
    assert {r["label"] for r in rows} <= set(LABELS)


def test_public_fallback_picks_the_public_token_when_groups_agree():
    ic = InContextConfig(public_fallback=True, fallback_noise_multiplier=0.01, candidates=10)
    logits = torch.full((5, 100), -5.0)
    logits[:, 42] = 10.0  # every group and the public row agree on 42
    logits[-1, 42] = 9.0
    token, public = choose_token(logits[:-1], logits[-1], ic, 1.0, torch.Generator().manual_seed(0))
    assert (token, public) == (42, True)
    logits[-1, 7] = 12.0  # the public model now prefers 7, the groups still 42: the noisy argmax decides
    token, public = choose_token(logits[:-1], logits[-1], ic, 0.01, torch.Generator().manual_seed(0))
    assert (token, public) == (42, False)


# --- end to end ------------------------------------------------------------------------------------------

def test_cli_generate_then_evaluate(tmp_path, tiny_model_dir, jsonl_dataset):
    run = tmp_path / "fewshot"
    sets = [f"data.source={jsonl_dataset}", "data.text_column=review", "data.label_column=sentiment",
            f"model.base={tiny_model_dir}", f"privacy.ledger={tmp_path / 'ledger.sqlite'}", "privacy.epsilon=4",
            "privacy.accountant=pld", "incontext.mechanism=laplace", "incontext.num_examples=6",
            "incontext.max_new_tokens=6", "incontext.groups=4", "incontext.examples_per_group=2",
            "sampling.label_proportions=uniform", "incontext.engine=transformers",
            "model.max_length=32"]  # no DP length histogram (Gaussian): the run stays pure Laplace DP
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpsynth", "generate", "-q", "-o", str(run),
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cert = json.loads((run / "certificate.json").read_text())
    corpus_cert = json.loads((run / "synthetic.jsonl.certificate.json").read_text())
    m = cert["mechanism"]
    assert m["kind"] == "in_context" and m["mechanism"] == "laplace" and cert["accountant"] == "pld"
    assert 0 < cert["epsilon"] <= 4.0 and cert["epsilon"] <= m["pure_dp_epsilon"]
    assert m["token_steps"] == 36 and sum(e["count"] for e in cert["events"]) == 36
    assert corpus_cert["epsilon"] == cert["epsilon"] and corpus_cert["corpus"]["examples"] >= 1
    rows = [json.loads(line) for line in (run / "synthetic.jsonl").read_text().splitlines()]
    assert rows and {r["label"] for r in rows} <= {"pos", "neg"}
    for name in ("config.yaml", "labels.json", "MANIFEST.json"):
        assert (run / name).is_file()
    assert owner_path(run, "metrics.json").is_file() and not (run / "metrics.json").exists()
    assert "examples_in_groups" not in m and "examples_in_groups" in json.loads(owner_path(run, "metrics.json").read_text())["incontext"]
    # the same job again reuses the certified corpus instead of spending again
    again = subprocess.run([sys.executable, "-m", "dpsynth", "generate", "-q", "-o", str(run),
                            *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(Ledger(tmp_path / "ledger.sqlite").runs()) == 1

    # the evaluation package treats it like a DP-LoRA run (corpus attacks only: there is no adapter)
    from dpsynth.evaluate import evaluate

    ev = load_config(None, ["evaluation.classifiers=[tfidf_logreg]", "evaluation.dp_baseline=false", "evaluation.zero_shot_examples=0",
                            "evaluation.tuning=false", "evaluation.mauve=false", "evaluation.attack_examples=10"]).evaluation
    result = evaluate(run, ev)
    assert result["epsilon"] == cert["epsilon"] and result["privacy"]["generator"] == {}
    assert "corpus_nearest_neighbour" in result["privacy"]


# --- the vLLM engine -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_voters(vllm_tiny_model_dir):
    """A VLLMVoter and a transformers GroupVoter (KV cache) on the same tiny model (64-wide heads for vLLM's CPU attention)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpsynth.incontext.voters import VLLMVoter

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = AutoTokenizer.from_pretrained(vllm_tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model_dir, dtype=torch.float32)
    hf = GroupVoter(model, tok, "[{dataset}][{label}]: ", "reviews", max_length=32)
    vl = VLLMVoter(vllm_tiny_model_dir, tok, "[{dataset}][{label}]: ", "reviews", max_length=32, max_model_len=256,
                   max_num_seqs=8, enforce_eager=True)
    yield hf, vl
    vl.close()


def test_vllm_votes_match_transformers(vllm_voters):
    hf, vl = vllm_voters
    ic = InContextConfig(candidates=50, top_k=0)
    rows = hf.prompts("pos", assign_groups(examples(80), LABELS, 5, 3, 0)["pos"])
    assert len({len(r) for r in rows}) > 1 and max(len(r) for r in rows) > 64  # ragged, and over two KV blocks
    a, b = hf.start(rows), vl.start(rows)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in range(40):  # crosses KV block boundaries: cached prefix + recomputed tail
        assert a.shape == b.shape == (len(rows), hf.model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
        cand = a[-1].topk(ic.candidates).indices
        assert torch.equal(cand, b[-1].topk(ic.candidates).indices)  # the same public candidate set
        va, vb = clip_votes(a[:-1, cand], ic.temperature), clip_votes(b[:-1, cand], ic.temperature)
        assert torch.allclose(vb.sum(-1), torch.ones(len(vb), dtype=vb.dtype))  # each vLLM vote: L1 norm 1
        assert float((va - vb).abs().sum(-1).max()) < 1e-4
        ta, _ = choose_token(a[:-1], a[-1], ic, 2.0, gen_a)
        tb, _ = choose_token(b[:-1], b[-1], ic, 2.0, gen_b)
        assert ta == tb
        a, b = hf.step(ta), vl.step(ta)
    assert vl.cached_tokens > 0  # prefix caching is on: steps reuse the rows' full KV blocks
    before = vl.cached_tokens
    vl.start(rows)  # the next example of the same label: its group prompts come from the cache
    assert vl.cached_tokens - before >= sum(len(r) // 32 * 32 for r in rows[:-1])


def test_ledger_charges_are_the_same_on_vllm(tmp_path, vllm_voters):
    hf, vl = vllm_voters
    ic = InContextConfig(max_new_tokens=4, groups=3, examples_per_group=2, candidates=20)
    groups = assign_groups(examples(60), LABELS, 3, 2, 0)
    charged = []
    for voter in (hf, vl):
        run = admitted(Ledger(tmp_path / f"{voter.engine}.sqlite"), plan_events(ic, 4.0, 3), "rdp")
        state, _ = generate_rows(voter, groups, {"neg": 2, "pos": 2}, ic, 4.0, example_charger(run),
                                 torch.Generator().manual_seed(0))
        assert state["stats"]["stopped_by_ledger"] and state["stats"]["examples_charged"] == 3
        charged.append(run.charged())
    assert charged[0] == charged[1] == tuple(plan_events(ic, 4.0, 3))


def test_auto_engine_falls_back_to_transformers(monkeypatch, tiny_model_dir):
    import types

    from dpsynth.incontext import voters
    from dpsynth.sample.engines import choose_engine

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM
        assert choose_engine("auto", "incontext.engine") == "transformers"
        with pytest.raises(UserError, match="engine 'vllm' is not available"):
            choose_engine("vllm", "incontext.engine")

    def broken(*a, **kw):
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(voters, "VLLMVoter", broken)
    monkeypatch.setattr("dpsynth.sample.engines.vllm_importable", lambda: True)
    monkeypatch.setattr("dpsynth.sample.engines.require_vllm", lambda: None)
    splits = types.SimpleNamespace(name="reviews", labels=LABELS)
    cfg = load_config(None, [f"model.base={tiny_model_dir}", "incontext.engine=auto", "model.max_length=32"])
    voter, base = voters.make_voter(cfg, splits)
    assert isinstance(voter, GroupVoter) and voter.engine == "transformers" and base["name"] == tiny_model_dir
    cfg = load_config(None, [f"model.base={tiny_model_dir}", "incontext.engine=vllm", "model.max_length=32"])
    with pytest.raises(UserError, match="vLLM engine did not start"):
        voters.make_voter(cfg, splits)


@pytest.mark.slow
def test_cli_generate_on_vllm_certifies_the_same_charges(tmp_path, vllm_tiny_model_dir, jsonl_dataset):
    pytest.importorskip("vllm")
    sets = [f"data.source={jsonl_dataset}", "data.text_column=review", "data.label_column=sentiment",
            f"model.base={vllm_tiny_model_dir}", "model.max_length=32", "privacy.epsilon=4", "privacy.accountant=pld",
            "incontext.num_examples=6", "incontext.max_new_tokens=6", "incontext.groups=4", "incontext.examples_per_group=2",
            "sampling.label_proportions=dp", "incontext.enforce_eager=true"]  # no torch.compile: a minute less on CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    certs = {}
    for engine in ("vllm", "transformers"):
        run, ledger = tmp_path / engine, tmp_path / f"ledger-{engine}.sqlite"
        if certs:  # the same owner key beside both ledgers: keyed hashes (config, fingerprint) then agree
            shutil.copy(tmp_path / "ledger-vllm.sqlite.key", tmp_path / f"ledger-{engine}.sqlite.key")
        proc = subprocess.run([sys.executable, "-m", "dpsynth", "generate", "-q", "-o", str(run),
                               *[a for s in [*sets, f"privacy.ledger={ledger}", f"incontext.engine={engine}"] for a in ("--set", s)]],
                              capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        cert = json.loads((run / "certificate.json").read_text())
        corpus_cert = json.loads((run / "synthetic.jsonl.certificate.json").read_text())
        metrics = json.loads(owner_path(run, "metrics.json").read_text())["incontext"]
        assert corpus_cert["corpus"]["engine"] == metrics["engine"] == engine
        assert corpus_cert["epsilon"] == cert["epsilon"] and 0 < cert["epsilon"] <= 4.0
        assert cert["mechanism"]["token_steps"] == metrics["token_steps_charged"] == 36
        book = Ledger(ledger)
        (entry,) = book.runs()
        assert entry["certificate"]["epsilon"] == cert["epsilon"]  # the ledger's own record, from its charges
        assert cert["epsilon"] == pytest.approx(epsilon(book.charged(entry["run_id"]), cert["delta"], "pld"), rel=1e-9)
        rows = [json.loads(line) for line in (run / "synthetic.jsonl").read_text().splitlines()]
        assert len(rows) == corpus_cert["corpus"]["examples"] and {r["label"] for r in rows} <= {"pos", "neg"}
        certs[engine] = cert
    # the engine changes nothing the certificate states about privacy
    for key in ("epsilon", "delta", "events", "config_hash"):
        assert certs["vllm"][key] == certs["transformers"][key], key
    for key in ("noise_multiplier", "token_steps"):
        assert certs["vllm"]["mechanism"][key] == certs["transformers"]["mechanism"][key], key


def test_a_unit_with_many_records_votes_in_one_group_per_label():
    """Person-level DP: all of one unit's records land in one group (the same index for every label), so adding or
    removing the unit changes at most one vote for any generated token."""
    data = [Example(ex.text, ex.label, f"u{i}") for i, ex in enumerate(examples(200))]
    person = [Example(f"note {k} of one patient", LABELS[k % 2], "patient-7") for k in range(12)]
    base = assign_groups(data, LABELS, 8, 30, 3)
    changed = changed_groups(base, assign_groups(data + person, LABELS, 8, 30, 3))
    assert {lab for lab, _ in changed} == set(LABELS) and len(changed) == 2  # one group in each label
    assert len({g for _, g in changed}) == 1
