"""Label sharpening: keep the candidates the adapter itself reads most clearly as their own label."""

from __future__ import annotations

import numpy as np
import pytest

from dpsynth.sample.sharpen import candidates_needed, margins, select


def test_candidates_needed_over_generates_by_the_keep_rate():
    assert candidates_needed(10, 1.0) == 10
    assert candidates_needed(10, 0.5) == 20
    assert candidates_needed(10, 0.3) == 34


def test_margin_is_own_calibrated_log_posterior_minus_the_best_other():
    scores = np.array([[-1.0, -3.0, -2.0], [-5.0, -1.0, -4.0]])  # label means: -3, -2, -3
    m = margins(scores, np.array([0, 0]), np.log(np.full(3, 1 / 3)))
    assert m == pytest.approx([(-1 + 3) - (-2 + 3), (-5 + 3) - (-1 + 2)])
    # the prior moves the posterior: a rare label needs a clearer text
    m2 = margins(scores, np.array([0, 0]), np.log(np.array([0.1, 0.45, 0.45])))
    assert m2[0] == pytest.approx(m[0] + np.log(0.1) - np.log(0.45))


def test_calibration_stops_a_prefix_that_favours_every_text_from_winning():
    """Label 'b''s prefix makes every text 2 nats likelier; calibrated, the texts' own evidence decides."""
    evidence = np.array([[0.5, -0.5], [-0.5, 0.5], [0.4, -0.4], [-0.4, 0.4]])
    scores = evidence + np.array([0.0, 2.0])
    m = margins(scores, np.array([0, 1, 0, 1]), np.log(np.array([0.5, 0.5])))
    assert (m > 0).all()


def test_select_keeps_exact_counts_best_margins_first_and_skips_duplicates():
    rows = [{"text": t, "label": lab} for t, lab in
            [("a1", "pos"), ("a2", "pos"), ("a2 ", "pos"), ("a3", "pos"), ("b1", "neg"), ("b2", "neg"), ("b3", "neg")]]
    # columns: (neg, pos) log-likelihoods; labels sorted as given
    scores = np.array([[-5, -1], [-5, -2], [-5, -2], [-1, -3], [-1, -4], [-3, -1], [-2, -2.5]], dtype=float)
    kept, stats = select(rows, {"pos": 2, "neg": 2}, scores, ["neg", "pos"], {"neg": 1.0, "pos": 1.0})
    assert [r["text"] for r in kept if r["label"] == "pos"] == ["a1", "a2"]  # "a2 " is a duplicate of a2
    assert [r["text"] for r in kept if r["label"] == "neg"] == ["b1", "b3"]  # b2 reads as pos: dropped
    assert stats["per_label"]["pos"]["adapter_agrees"] == pytest.approx(3 / 4)
    assert stats["per_label"]["neg"]["adapter_agrees"] == pytest.approx(2 / 3)
    assert stats["kept"] == 4 and stats["candidates"] == 7


def test_select_fills_from_duplicates_rather_than_coming_short():
    rows = [{"text": "same", "label": "pos"}] * 3
    kept, _ = select(rows, {"pos": 2}, np.zeros((3, 1)), ["pos"], {"pos": 1.0})
    assert len(kept) == 2


def test_scores_under_a_shared_prompt_equal_the_full_forward_pass(tiny_model_dir):
    """score_texts runs each prompt once and scores its texts from the cached keys and values: the per-token NLL is
    the full forward pass's, for every prompt, text length (empty, truncated), and with a LoRA adapter on top."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpsynth.config import LoraConfig
    from dpsynth.models import wrap_lora
    from dpsynth.prefixlm import collate, encode, score_texts, token_nll

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                      LoraConfig(r=2, target_modules=["q_proj", "v_proj"], last_layers=None))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the scores
    model.eval()
    texts = ["", "ok", "the film was a quiet triumph of craft", "word " * 80, "short one", "another, longer text here"]
    items = [(prefix, t) for prefix in ("[reviews][pos]: ", "<|im_start|>user\nWrite one review.<|im_end|>\n") for t in texts]
    got = score_texts(model, tok, items, max_length=40, batch_size=4)
    for (prefix, text), nll in zip(items, got):
        enc = encode(tok, prefix, text, 40)
        with torch.no_grad():  # the full forward pass, one text at a time
            ref = token_nll(model, collate([enc], tok.pad_token_id))[0].double().numpy()
        assert nll.shape == ref.shape and np.allclose(nll, ref, atol=1e-4), (prefix, text)
