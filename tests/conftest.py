"""Shared fixtures: a tiny random causal LM (real tokenizer) and small labelled datasets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module", autouse=True)
def _fresh_ray_per_module():
    """Each test module starts without a Ray of an earlier module (modules init Ray their own way)."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def bundled_model_dir() -> str:
    """The bundled SmolLM2 dequantized once into the dpsynth cache (the real code path)."""
    from dpsynth.models import BUNDLED_MODEL, resolve_base

    return resolve_base(BUNDLED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_model_dir) -> str:
    """A 2-layer random Llama with the bundled tokenizer, saved as a plain HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def vllm_tiny_model_dir(tmp_path_factory, bundled_model_dir) -> str:
    """Like tiny_model_dir but with 64-wide attention heads, the smallest vLLM's CPU attention accepts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama-vllm")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


WORDS = {
    "pos": "great wonderful superb moving delightful brilliant charming joyful".split(),
    "neg": "awful boring dull tedious clumsy dreadful lifeless messy".split(),
}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(WORDS[label], k=rng.randint(4, 9)) + rng.choices(["film", "plot", "cast", "story"], k=2)
        rng.shuffle(words)
        rows.append({"review": " ".join(words) + f" #{i}", "sentiment": label})
    return rows


@pytest.fixture()
def jsonl_dataset(tmp_path) -> Path:
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(240)))
    return path


@pytest.fixture()
def tiny_job(tmp_path, tiny_model_dir, jsonl_dataset):
    """Config overrides for a fast end-to-end job on the tiny model and a small JSONL dataset."""
    return [
        f"data.source={jsonl_dataset}", "data.text_column=review", "data.label_column=sentiment",
        f"model.base={tiny_model_dir}", "model.max_length=32", "lora.r=2",
        "training.batch_size=16", "training.steps=6", "training.learning_rate=0.01",
        "sampling.num_examples=12", "sampling.batch_size=6", "sampling.max_new_tokens=8",
        f"privacy.ledger={tmp_path / 'ledger.sqlite'}", f"output_dir={tmp_path / 'run'}",
    ]
