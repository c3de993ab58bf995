"""Privacy invariants of the per-worker DP-LoRA step, on a tiny random model with the real tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpsynth.config import LoraConfig
from dpsynth.models import wrap_lora
from dpsynth.train.driver import poisson_sampler
from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, collate, encode, per_example_loss, trainable

from conftest import make_rows

PREFIX = "[reviews][{}]: "


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def lora_model(tiny_model_dir):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = wrap_lora(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    # LoRA B starts at zero, which makes A's gradient zero; give B values so every LoRA tensor has a gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch_of(tok, n: int, seed: int = 0):
    rows = make_rows(n, seed)
    return collate([encode(tok, PREFIX.format(r["sentiment"]), r["review"], 32) for r in rows], tok.pad_token_id)


def dp_grads(model, batch, *, sigma, clip, expected, seed=0):
    """Backward + Opacus clip/noise/normalise (no optimizer update); returns the LoRA grads."""
    step = DPLoRAStep(model, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected,
                      learning_rate=1e-3, noise_generator=torch.Generator().manual_seed(seed))
    per_example_loss(step.module, batch).mean().backward()
    step.optimizer.pre_step()
    grads = [p.grad.detach().clone() for p in step.params]
    step.module._close()  # remove the hooks so the model can be wrapped again
    return grads


def test_prefix_tokens_carry_zero_loss(tok, lora_model):
    enc = encode(tok, "[reviews][pos]: ", "a truly great film", 32)
    n_prefix = len(tok("[reviews][pos]: ", add_special_tokens=False).input_ids)
    assert enc.loss_mask[:n_prefix] == (0,) * n_prefix
    assert all(enc.loss_mask[n_prefix:]) and enc.input_ids[-1] == tok.eos_token_id

    batch = collate([enc], tok.pad_token_id)
    with torch.no_grad():
        got = per_example_loss(lora_model, batch)[0]
        logits = lora_model(input_ids=batch.input_ids).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], batch.input_ids[0, 1:], reduction="none")
    text_only = nll[n_prefix - 1:].mean()  # targets at positions >= n_prefix: the text tokens and EOS
    with_prefix = nll.mean()
    assert torch.allclose(got, text_only, atol=1e-5)
    assert not torch.allclose(got, with_prefix, atol=1e-3)


def test_per_example_loss_ignores_padding_and_other_examples(tok, lora_model):
    a = encode(tok, "[reviews][pos]: ", "short", 32)
    b = encode(tok, "[reviews][neg]: ", "a much longer review text than the first one", 32)
    with torch.no_grad():
        together = per_example_loss(lora_model, collate([a, b], tok.pad_token_id))
        alone = per_example_loss(lora_model, collate([a], tok.pad_token_id))
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_text_is_truncated_never_the_prefix(tok):
    enc = encode(tok, "[reviews][pos]: ", "word " * 100, 20)
    assert len(enc.input_ids) == 20 and enc.input_ids[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        encode(tok, "[reviews][pos]: ", "x", 3)


def test_only_lora_parameters_change_base_bit_identical(tok, lora_model):
    base_before = {n: p.detach().clone() for n, p in lora_model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in lora_model.named_parameters() if "lora_" in n}
    assert {n for n, p in lora_model.named_parameters() if p.requires_grad} == set(lora_before)
    step = DPLoRAStep(lora_model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, learning_rate=1e-2)
    for seed in range(3):
        step(batch_of(tok, 8, seed))
    after = dict(lora_model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base_before.items())
    assert all(not torch.equal(after[n], p) for n, p in lora_before.items())


def test_clipping_is_joint_over_all_trainable_parameters(tok, lora_model):
    clip = 1e-3  # far below the raw per-example norms
    for i in range(3):
        grads = dp_grads(lora_model, batch_of(tok, 1, seed=i), sigma=0.0, clip=clip, expected=1)
        joint = torch.sqrt(sum((g**2).sum() for g in grads))
        # flat clipping: the whole per-example gradient has norm C (per-tensor clipping would give up to C*sqrt(#tensors))
        assert joint <= clip * (1 + 1e-4)
        assert joint >= clip * 0.99
        assert len(grads) > 4


def test_clipped_sum_of_a_batch_is_bounded_by_batch_times_clip(tok, lora_model):
    clip, n = 1e-3, 8
    grads = dp_grads(lora_model, batch_of(tok, n), sigma=0.0, clip=clip, expected=1)
    assert torch.sqrt(sum((g**2).sum() for g in grads)) <= n * clip * (1 + 1e-4)


def test_no_noise_no_clip_equals_non_private_step(tok, lora_model):
    batch = batch_of(tok, 8)
    reference = copy.deepcopy(lora_model)
    dp = dp_grads(lora_model, batch, sigma=0.0, clip=1e9, expected=8)  # C effectively infinite
    (per_example_loss(reference, batch).sum() / 8).backward()  # the non-private step's gradient
    ref = [p.grad for p in trainable(reference)]
    assert len(dp) == len(ref) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(dp, ref))


def test_plain_step_updates_lora(tok, lora_model):
    step = PlainLoRAStep(lora_model, expected_batch_size=8, learning_rate=1e-2)
    before = [p.detach().clone() for p in trainable(lora_model)]
    first = step(batch_of(tok, 8))
    for _ in range(5):
        last = step(batch_of(tok, 8))
    assert last < first and all(not torch.equal(a, b) for a, b in zip(before, trainable(lora_model)))


def test_noise_std_is_sigma_c_over_expected_batch_size(tok, lora_model):
    sigma, clip, expected = 2.0, 0.5, 40
    batch = batch_of(tok, 8)
    clean = torch.cat([g.flatten() for g in dp_grads(lora_model, batch, sigma=0.0, clip=clip, expected=expected)])
    noise = []
    for seed in range(8):
        noisy = torch.cat([g.flatten() for g in dp_grads(lora_model, batch, sigma=sigma, clip=clip, expected=expected, seed=seed)])
        noise.append(noisy - clean)
    noise = torch.cat(noise)
    want = sigma * clip / expected
    assert noise.numel() > 10_000
    assert abs(noise.std().item() / want - 1) < 0.03
    assert abs(noise.mean().item()) < 0.05 * want


def test_empty_poisson_batch_is_a_pure_noise_step(tok, lora_model):
    step = DPLoRAStep(lora_model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, learning_rate=1e-2)
    before = [p.detach().clone() for p in step.params]
    empty = collate([], tok.pad_token_id)
    assert len(empty) == 0
    step(empty)
    assert any(not torch.equal(a, b) for a, b in zip(before, step.params))


def test_poisson_batch_sizes_have_mean_qn_and_binomial_variance():
    n, q, steps = 1000, 0.05, 2000
    sizes = torch.tensor([len(b) for b in poisson_sampler(n, q, steps, seed=3)], dtype=torch.float64)
    assert len(sizes) == steps
    assert abs(sizes.mean().item() - q * n) < 0.7  # ~4.5 standard errors
    # Poisson sampling has variance Nq(1-q); fixed-size shuffled batches would have zero
    assert abs(sizes.var().item() / (n * q * (1 - q)) - 1) < 0.15
    batch = next(iter(poisson_sampler(n, q, 1, seed=4)))
    assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
