"""Generation stops at every special and role token of the tokenizer, so no chat-template debris
(`<|im_start|>assistant\n ...`) reaches a corpus: a tiny model is made to draw `<|im_start|>` after a few tokens."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dpsynth.config import SamplingConfig
from dpsynth.sample.corpus import generate_corpus
from dpsynth.sample.engines import GenParams, TransformersEngine, cut_at_stop, prompt_ids, stop_token_ids

DEBRIS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "user\n", "system\n")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def plant(model, token_id: int, logit: float) -> None:
    """Raise `token_id`'s logit by about `logit` at every position, through the weights alone (Llama has no lm_head
    bias): dimension 0 of every embedding is made to dominate the residual stream, so after the final RMSNorm it is
    about sqrt(hidden); the tied output row of `token_id` gets logit / sqrt(hidden) more on it than every other row."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, 0] = 30.0
        emb[token_id, 0] += logit / math.sqrt(emb.shape[1])


@pytest.fixture(scope="module")
def role_engine(tiny_model_dir, tok):
    """The tiny model drawing `<|im_start|>` with probability ~0.3 per token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    plant(model, im_start, math.log(0.45 * len(tok)))
    return TransformersEngine(model, tok)


def test_stop_ids_of_the_bundled_tokenizer_name_every_special_and_role_token(tok):
    ids = stop_token_ids(tok)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<jupyter_code>"):
        assert tok.convert_tokens_to_ids(t) in ids
    assert {tok.eos_token_id, tok.pad_token_id, *tok.all_special_ids} <= set(ids)
    assert {i for i, a in tok.added_tokens_decoder.items() if a.special} <= set(ids)


def test_added_tokens_that_look_like_markers_stop_even_when_not_special():
    added = {7: SimpleNamespace(content="<|user|>", special=False), 8: SimpleNamespace(content="<think>", special=False),
             9: SimpleNamespace(content="hello", special=False), 10: SimpleNamespace(content="a < b >", special=False)}
    tok = SimpleNamespace(eos_token_id=3, pad_token_id=None, all_special_ids=[3, 4], added_tokens_decoder=added)
    assert stop_token_ids(tok) == [3, 4, 7, 8]


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 1, 7, 2], {1, 2}) == ([5, 6], True)
    assert cut_at_stop([5, 6], {1, 2}) == ([5, 6], False)


def test_generation_ends_at_a_planted_role_token(role_engine, tok):
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = prompt_ids(tok, "sms text, label ham: ")
    params = GenParams(temperature=1.0, top_p=1.0, max_tokens=24)
    # What the model draws: the planted token early and often (so an engine that ignores it leaves debris).
    torch.manual_seed(0)
    raw = role_engine.model.generate(input_ids=torch.tensor([ids] * 16), attention_mask=torch.ones(16, len(ids), dtype=torch.long),
                                     max_new_tokens=24, do_sample=True, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)[:, len(ids):].tolist()
    assert sum(im_start in r for r in raw) >= 12
    gens = role_engine.generate_ids([ids] * 16, params, [0])
    assert sum(g.finish_reason == "stop" for g in gens) >= 12
    assert any(g.text for g in gens), "some text before the role token"
    for g in gens:
        assert not any(d in g.text for d in DEBRIS), g.text
        assert g.finish_reason == "length" or g.completion_tokens < 24


def test_the_corpus_carries_no_template_debris(role_engine):
    rows = generate_corpus(role_engine, {"ham": "sms text, label ham: "}, {"ham": 10},
                           SamplingConfig(max_new_tokens=24, batch_size=10, temperature=1.0, top_p=1.0), show_progress=False)
    assert len(rows) == 10
    assert not any(d in r["text"] for r in rows for d in DEBRIS)
