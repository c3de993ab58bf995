"""Language-model utility (Yue et al. 2023; CTCL): what a corpus is worth for training a language model on the
domain, the test for data without a label to classify.

A fresh LoRA (non-private: this is the *downstream user's* model) on the public base is fine-tuned for the same
steps on the synthetic corpus and on the real train split, and each, with the base model alone (the zero-shot
floor), is measured on the real test split: perplexity and next-token accuracy of the text tokens under the run's
own prompt. Owner-only, like all of the evaluation (it reads the real splits).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence

import torch

from dpsynth.config import LoraConfig, ModelConfig
from dpsynth.prefixlm import Batch, collate, encode

log = logging.getLogger(__name__)


def _batches(encoded, size: int, pad: int, device) -> list[Batch]:
    return [collate(encoded[i:i + size], pad, device) for i in range(0, len(encoded), size)]


@torch.inference_mode()
def measure(model, batches: Sequence[Batch]) -> dict:
    """Perplexity (exp of the mean token NLL) and next-token accuracy over every text token (and EOS)."""
    nll, right, tokens = 0.0, 0, 0
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
        target, mask = b.input_ids[:, 1:], b.loss_mask[:, 1:].bool()
        nll += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        right += int((logits.argmax(-1)[mask] == target[mask]).sum())
        tokens += int(mask.sum())
    return {"perplexity": math.exp(nll / max(tokens, 1)), "next_token_accuracy": right / max(tokens, 1), "tokens": tokens}


def fine_tune(model_cfg: ModelConfig, lora_cfg: LoraConfig, encoded, *, steps: int, batch_size: int, lr: float, seed: int,
              pad: int):
    """A fresh LoRA on the base, trained (plain AdamW, no DP) for `steps` batches drawn from `encoded`."""
    from dpsynth.models import load_base, wrap_lora

    torch.manual_seed(seed)
    base, _, _ = load_base(model_cfg)
    model = wrap_lora(base, lora_cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        b = collate(rng.sample(encoded, min(batch_size, len(encoded))), pad, device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
        mask = b.loss_mask[:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[mask], b.input_ids[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def lm_utility(model_cfg: ModelConfig, lora_cfg: LoraConfig, tok, synthetic: Sequence[tuple[str, str]],
               real: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]], *, steps: int, batch_size: int, lr: float,
               max_length: int, seed: int) -> dict:
    """{zero_shot, real, synthetic}: each model's perplexity and next-token accuracy on the real test texts; every
    corpus is (prompt, text) pairs, the prompt carrying no loss."""
    from dpsynth.models import load_base

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = {name: [encode(tok, prompt, t, max_length) for prompt, t in texts]
           for name, texts in (("synthetic", synthetic), ("real", real), ("test", test))}
    base, _, _ = load_base(model_cfg)
    device = next(base.parameters()).device
    test_batches = _batches(enc["test"], batch_size, pad, device)
    out = {"zero_shot": measure(base.eval(), test_batches)}
    del base
    for name in ("real", "synthetic"):
        model = fine_tune(model_cfg, lora_cfg, enc[name], steps=steps, batch_size=batch_size, lr=lr, seed=seed, pad=pad)
        out[name] = {**measure(model, test_batches), "train_texts": len(enc[name])}
        log.info("LM utility, trained on %s: perplexity %.2f, next-token accuracy %.3f", name, out[name]["perplexity"],
                 out[name]["next_token_accuracy"])
    out.update({"steps": steps, "batch_size": batch_size, "learning_rate": lr, "test_texts": len(test),
                "model": "the public base with a fresh LoRA, fine-tuned without DP (a downstream user's model)"})
    return out
