"""Generation on a frozen model with and without a contiguous input to the output head, side by side.

torch 2.13 turns a linear on a strided 3-D input, with a weight that does not require grad, into a batched matmul
over a copy of the weight per row. generate's prefill hands the head such a slice (`hidden[:, -1:]`), so every
sampling batch on a loaded adapter (its base frozen) paid for it. The transformers engine now makes the head's input
contiguous (dpsynth.sample.engines.contiguous_head_input). This times, on the bundled model in its resolved dtype:
`F.linear` on the strided slice alone, then `--batch` rows x `--tokens` forced new tokens through `generate` for
the frozen base and the base with a LoRA adapter (random B: an adapter that changes the outputs), each without the
hook and with it, in `--rounds` interleaved rounds; it reports tokens/s (min / median / max).

    python bench/frozen_head.py --batch 128 --tokens 24 --rounds 3 --out bench/results/frozen-head.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from dpsynth.config import JobConfig
    from dpsynth.models import load_base, wrap_lora
    from dpsynth.sample.engines import contiguous_head_input

    torch.manual_seed(0)
    cfg = JobConfig()

    def load(adapter: bool):
        model, tok, _ = load_base(cfg.model, "cpu")
        if adapter:
            model = wrap_lora(model, cfg.lora)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
        return model.eval().requires_grad_(False), tok

    models = {"frozen base": load(False), "adapter (LoRA, unmerged)": load(True)}
    tok = models["frozen base"][1]
    head = models["frozen base"][0].get_output_embeddings().weight
    prompt = tok("<|im_start|>user\nWrite one text from SMS text messages, with label: ham.<|im_end|>\n",
                 add_special_tokens=False).input_ids
    strided = torch.randn(args.batch, len(prompt), head.shape[1], dtype=head.dtype)[:, -1:]
    linear = {}
    with torch.inference_mode():
        for name, x in (("strided", strided), ("contiguous", strided.contiguous())):
            torch.nn.functional.linear(x, head)
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, head)
            linear[name] = time.perf_counter() - t0
    print(f"F.linear on the head, batch {args.batch}: strided {linear['strided']:.3f} s, contiguous "
          f"{linear['contiguous']:.4f} s")

    def tokens_per_s(model) -> float:
        ids = torch.tensor([prompt] * args.batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                           min_new_tokens=args.tokens, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
        return args.batch * args.tokens / (time.perf_counter() - t0)

    timings: dict[str, list[float]] = {}
    for model, _ in models.values():
        tokens_per_s(model)  # warm-up
    for round_ in range(args.rounds):
        for hooked in (False, True):
            for name, (model, _) in models.items():
                if hooked:
                    contiguous_head_input(model)  # idempotent: the first hooked round adds it
                key = f"{name}, {'contiguous head input' if hooked else 'as generate hands it'}"
                timings.setdefault(key, []).append(tokens_per_s(model))
        # the hook stays once added: later rounds' "as generate hands it" need fresh models
        if round_ < args.rounds - 1:
            models = {"frozen base": load(False), "adapter (LoRA, unmerged)": load(True)}
    rows = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in timings.items()}
    for k, r in rows.items():
        print(f"{k:60s} {r['min']:7.0f} {r['median']:7.0f} {r['max']:7.0f} tokens/s")
    if args.out:
        args.out.write_text(json.dumps({
            "meta": {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                     "dtype": str(head.dtype)},
            "linear_s": linear, "tokens_per_s": rows, "runs": timings}, indent=1))


if __name__ == "__main__":
    main()
