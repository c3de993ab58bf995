"""The release boundary: only manifest files leave the owner, each with a provenance the certificate backs, and an
export of a real run carries no private fact (per-step losses, true batch sizes, an unkeyed hash, noise state)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpsynth.release import (MANIFEST, PUBLIC, Release, ReleaseError, certificate, export, mechanism, owner_path,
                             post_processing, public)


def _cert(tmp_path, kind="dp_sgd", labels=True):
    """A certificate of the given mechanism, as the ledger would have issued it (fields only; not in any ledger)."""
    from dpsynth.privacy.certificate import (BaseModelBlock, Certificate, DatasetBlock, DpSgdBlock, HistogramBlock,
                                             InContextBlock)

    block = DpSgdBlock(noise_multiplier=1.0, sampling_rate=0.1, steps=3, steps_applied=3, max_grad_norm=1.0,
                       expected_batch_size=8) if kind == "dp_sgd" else InContextBlock(
        mechanism="gaussian", noise_multiplier=1.0, noise_scale=1.4, sensitivity={}, token_steps=1, examples_charged=1,
        planned_epsilon=1.0)
    return Certificate(run_id="r1", created="now", code_version="x", config_hash="h", epsilon=1.0, delta=1e-5,
                       accountant="prv", events=(), dataset=DatasetBlock(name="d", fingerprint="f", units=10,
                                                                          train_units=8),
                       base_model=BaseModelBlock(name="m"), mechanism=block,
                       label_histogram=HistogramBlock(noise_multiplier=5.0) if labels else None)


def test_a_release_refuses_what_its_certificate_does_not_back(tmp_path):
    rel = Release(tmp_path, _cert(tmp_path, labels=False))
    with pytest.raises(ReleaseError, match="has no provenance"):
        rel.share_text("notes.txt", "x", None)
    with pytest.raises(ReleaseError, match="label_histogram, which the certificate does not certify"):
        rel.share_json("label_distribution.json", {"a": 1.0}, mechanism("label_histogram"))
    with pytest.raises(ReleaseError, match="in_context"):
        rel.share_text("synthetic.jsonl", "{}", mechanism("in_context"))
    with pytest.raises(ReleaseError, match="post-processing of adapter, which is not released"):
        rel.share_text("synthetic.jsonl", "{}", post_processing("adapter"))
    with pytest.raises(ReleaseError, match="not a declared-public fact"):
        rel.share_json("counts.json", {"pos": 120}, public())
    for bad in ("owner/metrics.json", "../x", "/tmp/x", MANIFEST):
        with pytest.raises(ReleaseError, match="not a name in the shareable part"):
            rel.share_text(bad, "x", public())
    assert set(PUBLIC) == {"labels.json", "config.yaml"}
    assert not any(tmp_path.iterdir())  # nothing refused was written


def test_the_manifest_lists_every_shared_file_with_why_and_export_copies_exactly_those(tmp_path):
    run = tmp_path / "run"
    adapter = tmp_path / "ckpt"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "tokenizer.json").write_text("{}")
    rel = Release(run, _cert(tmp_path))
    rel.share_dir("adapter", adapter, mechanism("dp_sgd"))
    rel.share_json("label_distribution.json", {"pos": 0.5, "neg": 0.5}, mechanism("label_histogram"))
    rel.share_json("labels.json", ["neg", "pos"], public())
    rel.share_text("synthetic.jsonl", '{"text": "t", "label": "pos"}\n', post_processing("adapter", "label_distribution.json"))
    rel.owner_json("metrics.json", {"train": [{"step": 1, "batch_size": 7, "loss": 3.14159265}]})
    (run / "stray.txt").write_text("not released")  # a file nobody released
    rel.commit()
    manifest = json.loads((run / MANIFEST).read_text())["files"]
    assert set(manifest) == {"adapter/adapter_model.safetensors", "adapter/tokenizer.json", "label_distribution.json",
                             "labels.json", "synthetic.jsonl", "certificate.json"}
    assert manifest["synthetic.jsonl"]["kind"] == "post-processing"
    assert manifest["synthetic.jsonl"]["source"] == ["adapter", "label_distribution.json"]
    assert manifest["adapter/adapter_model.safetensors"]["why"].startswith("output of the charged mechanism dp_sgd")
    assert manifest["certificate.json"]["kind"] == "certificate"
    assert all(e["sha256"] == hashlib.sha256((run / f).read_bytes()).hexdigest() for f, e in manifest.items())

    dest = tmp_path / "shared"
    written = export(run, dest)
    on_disk = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert on_disk == written == sorted([*manifest, MANIFEST])  # nothing else: no stray file, no owner part
    assert not (dest / "owner").exists() and not (dest / "stray.txt").exists()

    with pytest.raises(ReleaseError, match="is not empty"):
        export(run, dest)
    (run / "labels.json").write_text('["neg", "pos", "secret-label"]')  # altered after release
    with pytest.raises(ReleaseError, match="labels.json changed since it was released"):
        export(run, tmp_path / "again")
    (run / "labels.json").unlink()
    with pytest.raises(ReleaseError, match="labels.json is listed in the manifest but missing"):
        export(run, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_a_reopened_release_keeps_earlier_files_and_the_certificate(tmp_path):
    cert = _cert(tmp_path)
    Release(tmp_path, cert).commit()
    cert_bytes = (tmp_path / "certificate.json").read_bytes()
    rel = Release(tmp_path, cert)
    rel.share_certificate("synthetic.jsonl.certificate.json", cert)
    rel.commit(with_certificate=False)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert set(files) == {"certificate.json", "synthetic.jsonl.certificate.json"}
    assert (tmp_path / "certificate.json").read_bytes() == cert_bytes
    assert certificate().kind == "certificate"


def _strings(path: Path) -> str:
    data = path.read_bytes()
    return data.decode("utf-8", errors="replace")


@pytest.mark.slow
def test_an_exported_run_holds_no_private_fact(tiny_job, tmp_path):
    """Train for real, sample, export: the export is exactly the manifest; the owner's per-step losses and true batch
    sizes, the unkeyed hash of the data, noise state and seeds are nowhere in it; sampling works from the export."""
    from dpsynth.config import load_config
    from dpsynth.data import fingerprint as keyed_fingerprint, load_examples, dedupe  # noqa: F401

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dpsynth", *args], capture_output=True, text=True, timeout=900)

    sets = [a for o in tiny_job for a in ("--set", o)]
    cfg = load_config(None, tiny_job)
    run_dir = Path(cfg.output_dir)
    res = cli("train", "--quiet", *sets)
    assert res.returncode == 0, res.stderr
    res = cli("sample", str(run_dir), "-n", "6", "--quiet")
    assert res.returncode == 0, res.stderr
    # the owner part holds the private facts we look for
    metrics = json.loads(owner_path(run_dir, "metrics.json").read_text())
    history = metrics["train"]
    assert history and all("loss" in h and "batch_size" in h for h in history)
    assert owner_path(run_dir, "dpsynth.log").is_file() and owner_path(run_dir, "config.yaml").is_file()

    dest = tmp_path / "shared"
    res = cli("export", str(run_dir), str(dest))
    assert res.returncode == 0, res.stderr
    manifest = json.loads((dest / MANIFEST).read_text())["files"]
    exported = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert exported == sorted([*manifest, MANIFEST])
    assert {"certificate.json", "config.yaml", "labels.json", "label_distribution.json", "synthetic.jsonl",
            "synthetic.jsonl.certificate.json", "adapter/adapter_model.safetensors"} <= set(manifest)
    for owner_only in ("metrics.json", "dpsynth.log", "evaluation.json", "trials.csv", "owner", ".checkpoints"):
        assert not (dest / owner_only).exists(), owner_only

    text = "\n".join(_strings(dest / f) for f in exported if not f.endswith(".safetensors"))
    # per-step facts: the losses (as the owner's metrics print them) and the sequence of true batch sizes
    for h in history:
        assert repr(h["loss"]) not in text and f"{h['loss']:.6f}" not in text
    sizes = [h["batch_size"] for h in history]
    # (a key named exactly batch_size: the certificate's expected_batch_size is the public rate, not a drawn size)
    assert json.dumps(sizes) not in text and not re.search(rf'(?<![\w])"batch_size": {sizes[0]}\b', text)
    # the unkeyed sha256 of the records (what the fingerprint used to be), and any noise state or seed
    _, examples = load_examples(cfg.data)
    h = hashlib.sha256()
    for label, t in sorted((ex.label, ex.text) for ex in dedupe(examples)):
        h.update(label.encode() + b"\x1f" + t.encode() + b"\x1e")
    assert h.hexdigest()[:32] not in text and h.hexdigest()[:16] not in text
    assert not re.search(r"noise_rng|sampler_seed|noise_seed", text)
    assert str(tmp_path) not in text  # no local path (data file, ledger, output dir)
    # sampling needs nothing from the owner part
    res = cli("sample", str(dest), "-n", "4", "--quiet")  # the base is named, not located: where is it here?
    assert res.returncode == 2 and "model.base" in res.stderr
    res = cli("sample", str(dest), "-n", "4", "--quiet", "--base", cfg.model.base)
    assert res.returncode == 0, res.stderr
    assert len((dest / "synthetic.jsonl").read_text().splitlines()) == 4


def test_export_rechecks_a_hand_edited_manifest(tmp_path):
    """The manifest is a file: an entry naming owner/, a path outside the run, a link, or an unbacked provenance is
    refused, and nothing is written."""
    run = tmp_path / "run"
    rel = Release(run, _cert(tmp_path))
    rel.share_json("labels.json", ["neg", "pos"], public())
    rel.owner_json("metrics.json", {"train": [{"loss": 1.0}]})
    rel.commit()
    doc = json.loads((run / MANIFEST).read_text())
    secret = tmp_path / "private.csv"
    secret.write_text("secret")
    (run / "leak.json").symlink_to(owner_path(run, "metrics.json"))
    digest = hashlib.sha256(owner_path(run, "metrics.json").read_bytes()).hexdigest()
    for name, entry in [("owner/metrics.json", {"kind": "public"}), ("../private.csv", {"kind": "public"}),
                        ("leak.json", {"kind": "post-processing", "source": ["labels.json"]}),
                        ("labels.json", {"kind": "mechanism", "source": ["in_context"]})]:
        files = {**doc["files"], name: {"sha256": digest, "source": [], "why": "", **entry}}
        (run / MANIFEST).write_text(json.dumps({**doc, "files": files}))
        with pytest.raises(ReleaseError):
            export(run, tmp_path / "out")
        assert not (tmp_path / "out").exists()
