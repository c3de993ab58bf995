"""Serving throughput, side by side in one run: the /v1/corpus endpoint vs the raw offline vLLM engine, the endpoint
on the merged run vs the same run as a LoRA adapter loaded from an object store (`lora_store`, multi-LoRA; a local
moto S3 server here), and the vLLM engine vs the transformers engine at batch 64 and 256.

Every phase runs in a fresh subprocess (one engine in memory at a time) on the same certified
adapter, merged into the base weights (the bulk-sampling mode), with the same sampling
parameters. Tokens are counted the same way everywhere: the returned texts re-tokenized.

    python bench/serve_throughput.py --run runs/demo --examples 256 --max-tokens 48 --json bench/results/serve_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def _adapter(run: str):
    from dpsynth.sample.adapters import load_certified

    return load_certified(run)


def _merged(run: str) -> str:
    from dpsynth.models import cache_dir
    from dpsynth.sample.adapters import merged_model_dir

    return str(merged_model_dir(_adapter(run), cache_dir()))


def _count(tok, texts: list[str]) -> int:
    return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)


def _jobs(adapter, n: int):
    from dpsynth.sample.corpus import jobs_for, label_counts

    return jobs_for(label_counts(adapter.labels, {lab: 1.0 for lab in adapter.labels}, n))


def phase_offline(args) -> dict:
    """The raw offline vLLM engine: the corpus jobs in one generate call (its best case), then fixed batches."""
    from transformers import AutoTokenizer

    from dpsynth.sample.corpus import example_seed
    from dpsynth.sample.engines import GenParams, VLLMEngine

    adapter, model_dir = _adapter(args.run), _merged(args.run)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    engine = VLLMEngine(model_dir, tok, dtype=adapter.model.dtype, max_model_len=512, max_num_seqs=256)
    startup = time.perf_counter() - t0
    params = GenParams(args.temperature, args.top_p, args.max_tokens)
    ids = {lab: tok(p, add_special_tokens=False).input_ids for lab, p in adapter.prompts.items()}
    jobs = _jobs(adapter, args.examples)
    engine.generate_ids([ids[jobs[0][0]]] * 8, params, [None] * 8)  # warm-up
    t0 = time.perf_counter()
    gens = engine.generate_ids([ids[lab] for lab, _ in jobs], params, [example_seed(args.seed, lab, i) for lab, i in jobs])
    corpus_s = time.perf_counter() - t0
    out = {"startup_s": startup, "corpus": {"examples": len(gens), "seconds": corpus_s,
                                             "tokens": _count(tok, [g.text.strip() for g in gens])}}
    prompt = ids[adapter.labels[0]]
    for b in args.batches:
        t0 = time.perf_counter()
        gens = engine.generate_ids([prompt] * b, params, [None] * b)
        out[f"batch_{b}"] = {"seconds": time.perf_counter() - t0, "tokens": _count(tok, [g.text.strip() for g in gens])}
    return out


def phase_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpsynth.sample.engines import GenParams, TransformersEngine

    adapter, model_dir = _adapter(args.run), _merged(args.run)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    from dpsynth.models import resolve_dtype

    dtype = resolve_dtype(adapter.model.dtype, "cpu")  # what `dpsynth sample` uses here (bf16 where the CPU has it)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    engine = TransformersEngine(model, tok)
    params = GenParams(args.temperature, args.top_p, args.max_tokens)
    prompt = tok(adapter.prompts[adapter.labels[0]], add_special_tokens=False).input_ids
    engine.generate_ids([prompt] * 4, GenParams(args.temperature, args.top_p, 4))  # warm-up
    out = {}
    for b in args.batches:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        gens = engine.generate_ids([prompt] * b, params)
        out[f"batch_{b}"] = {"seconds": time.perf_counter() - t0, "tokens": _count(tok, [g.text.strip() for g in gens])}
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_store() -> str:
    """A local S3 server (moto) with one bucket, as a dpsynth store URI; credentials for this process and Ray's."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true"})
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("bench")
    return f"s3://bench/lora?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


def phase_serve(args, lora: bool = False) -> dict:
    """The /v1/corpus endpoint on a local Ray Serve LLM app (one LLMServer replica: vLLM on the merged run, or with
    `lora` on the base with the run as a LoRA adapter from the store), timed by an HTTP client."""
    import httpx
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from serve.app import build_app

    adapter = _adapter(args.run)
    _merged(args.run)  # cached before the clock starts, as for the offline phase
    tok = AutoTokenizer.from_pretrained(adapter.adapter_dir)
    port = _free_port()
    store = {"lora_store": _moto_store()} if lora else {}
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app({"adapters": [args.run], "engine": "vllm", "max_model_len": 512, **store,
                             "max_num_seqs": 256, "limits": {"max_examples_per_request": args.examples}}), name="dpsynth")
        startup = time.perf_counter() - t0
        body = {"adapter": adapter.name, "label_mix": "uniform", "temperature": args.temperature, "top_p": args.top_p,
                "max_tokens": args.max_tokens, "seed": args.seed}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1800) as c:
            c.post("/v1/corpus", json={**body, "num_examples": 8}).raise_for_status()  # warm-up
            t0 = time.perf_counter()
            resp = c.post("/v1/corpus", json={**body, "num_examples": args.examples})
            seconds = time.perf_counter() - t0
        resp.raise_for_status()
        rows = [json.loads(line) for line in resp.text.splitlines()]
        assert len(rows) == args.examples
        return {"startup_s": startup, "corpus": {"examples": len(rows), "seconds": seconds,
                                                  "tokens": _count(tok, [r["text"] for r in rows])}}
    finally:
        serve.shutdown()
        ray.shutdown()


PHASES = {"offline": phase_offline, "transformers": phase_transformers, "serve": phase_serve,
          "serve_lora": lambda args: phase_serve(args, lora=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a certified run directory (make demo writes runs/demo)")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # engines log to stdout too, so the result goes to a file
        result = PHASES[args.phase](args)
        with open(args.phase_out, "w") as fh:
            json.dump(result, fh)
        return
    _merged(args.run)  # merge once, outside every timed phase
    results = {}
    for phase in ("offline", "serve", "serve_lora", "transformers"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--phase-out", out.name]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"phase {phase} failed:\n{proc.stderr[-4000:]}")
            results[phase] = json.loads(Path(out.name).read_text())
        print(f"{phase}: {json.dumps(results[phase])}", file=sys.stderr)

    def tps(x: dict) -> float:
        return x["tokens"] / x["seconds"]

    endpoint, raw = tps(results["serve"]["corpus"]), tps(results["offline"]["corpus"])
    rows = [{"what": f"corpus of {args.examples}", "vllm_offline_tok_s": round(raw, 1), "endpoint_tok_s": round(endpoint, 1),
             "endpoint_over_offline": round(endpoint / raw, 3)}]
    lora = tps(results["serve_lora"]["corpus"])
    rows.append({"what": f"corpus of {args.examples}, endpoint", "merged_tok_s": round(endpoint, 1),
                 "lora_store_tok_s": round(lora, 1), "lora_over_merged": round(lora / endpoint, 3)})
    for b in args.batches:
        v, t = tps(results["offline"][f"batch_{b}"]), tps(results["transformers"][f"batch_{b}"])
        rows.append({"what": f"batch {b}", "vllm_tok_s": round(v, 1), "transformers_tok_s": round(t, 1),
                     "vllm_over_transformers": round(v / t, 3)})
    import torch

    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "device": "cuda" if torch.cuda.is_available() else "cpu", "run": args.run, "examples": args.examples,
            "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "threads": args.threads,
            "weights": "adapter merged into the base (serve_lora: LoRA on the base)", "command": "python " + " ".join(sys.argv)}
    print("| comparison | A tok/s | B tok/s | B/A |")
    print("|---|---|---|---|")
    print(f"| corpus: offline vLLM (A) vs /v1/corpus (B) | {rows[0]['vllm_offline_tok_s']} | {rows[0]['endpoint_tok_s']} | "
          f"{rows[0]['endpoint_over_offline']} |")
    print(f"| corpus: /v1/corpus merged (A) vs LoRA from lora_store (B) | {rows[1]['merged_tok_s']} | "
          f"{rows[1]['lora_store_tok_s']} | {rows[1]['lora_over_merged']} |")
    for r in rows[2:]:
        print(f"| {r['what']}: transformers (A) vs vLLM (B) | {r['transformers_tok_s']} | {r['vllm_tok_s']} | "
              f"{r['vllm_over_transformers']} |")
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "phases": results}, fh, indent=2)


if __name__ == "__main__":
    main()
