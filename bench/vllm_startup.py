"""`sampling.enforce_eager`: one small `ray.data.llm` sampling job (dpsynth.sample.batch.sample_ray_data) with and
without torch.compile, side by side in one run, alternating, each in a fresh subprocess (its own Ray, one engine).

The compiled job is timed twice: with an empty vLLM compile cache (a fresh machine, or CI) and with the cache the
first compiled job left (vLLM keeps compiled graphs under VLLM_CACHE_ROOT). The job is small on purpose: start-up
is what differs, and a record schema starts the engines again for every text field and redraw pass.

    python bench/vllm_startup.py --run runs/demo --examples 16 --json bench/results/vllm_startup.json
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


def _job(run: str, examples: int, eager: bool) -> None:
    from dpsynth.config import SamplingConfig
    from dpsynth.sample.adapters import read_adapter
    from dpsynth.sample.batch import sample_ray_data
    from dpsynth.sample.corpus import label_counts

    adapter = read_adapter(run)
    labels = tuple(sorted(adapter.prompts))
    counts = label_counts(labels, dict.fromkeys(labels, 1.0), examples)  # uniform, exactly `examples`
    params = SamplingConfig(engine="vllm", num_examples=examples, max_new_tokens=16, batch_size=8, enforce_eager=eager)
    rows = sample_ray_data(adapter, counts, params, show_progress=False)
    assert len(rows) == examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a certified run directory")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--_phase", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._phase:
        _job(a.run, a.examples, a._phase == "eager")
        return
    cache = tempfile.mkdtemp(prefix="vllm-cache-")  # empty: the first compiled job compiles from scratch
    env = {**os.environ, "VLLM_CACHE_ROOT": cache}
    phases = [("eager", "eager"), ("compiled", "compiled, empty compile cache"), ("eager", "eager, again"),
              ("compiled", "compiled, warm compile cache")]
    results = []
    for phase, label in phases:
        t0 = time.monotonic()
        subprocess.run([sys.executable, __file__, "--run", a.run, "--examples", str(a.examples), "--_phase", phase],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.monotonic() - t0
        results.append({"phase": label, "seconds": round(seconds, 1)})
        print(f"{label:32s} {seconds:7.1f} s", flush=True)
    out = {"date": date.today().isoformat(), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
           "command": " ".join(sys.argv), "examples": a.examples, "max_new_tokens": 16, "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
