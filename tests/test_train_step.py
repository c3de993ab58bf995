"""Privacy invariants of the per-worker DP-LoRA step, on a tiny random model with the real tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpsynth.config import LoraConfig
from dpsynth.models import wrap_lora
from dpsynth.privacy.sampling import poisson_batches, schedule
from dpsynth.prefixlm import collate, encode, lean_head, micro_batches, per_example_loss
from dpsynth.train.step import DPLoRAStep, PlainLoRAStep, trainable

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
    step._per_example_grads(batch)  # the production per-example (per-unit) gradients
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
    """The sampler the Ray Train worker draws its batches from (dpsynth.privacy.sampling.poisson_batches); the
    worker's own draws are checked in test_distributed (test_the_worker_draws_fresh_poisson_batches...)."""
    n, q, steps = 1000, 0.05, 2000
    sizes = torch.tensor([len(b) for b in poisson_batches(n, q, steps)], dtype=torch.float64)
    assert len(sizes) == steps
    assert abs(sizes.mean().item() - q * n) < 0.7  # ~4.5 standard errors
    # Poisson sampling has variance Nq(1-q); fixed-size shuffled batches would have zero
    assert abs(sizes.var().item() / (n * q * (1 - q)) - 1) < 0.15
    batch = next(iter(poisson_batches(n, q, 1)))
    assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
    # membership is independent across examples: every example's inclusion rate is q
    hits = torch.zeros(n)
    for b in poisson_batches(n, q, steps):
        hits[b] += 1
    assert abs(hits.mean().item() / steps - q) < 0.002 and hits.min() > 0
    # by default every stream is fresh (OS entropy; nothing to replay it from), even under a fixed global seed
    torch.manual_seed(0)
    first = list(poisson_batches(n, q, 5))
    torch.manual_seed(0)
    assert list(poisson_batches(n, q, 5)) != first
    # only an explicit, caller-seeded generator (benchmarks) replays a stream
    assert (list(poisson_batches(n, q, 5, torch.Generator().manual_seed(7)))
            == list(poisson_batches(n, q, 5, torch.Generator().manual_seed(7))))


def test_noise_is_fresh_for_identical_inputs_and_weights(tok, tiny_model_dir):
    """Two steps with the same batch, the same initial weights and the same global torch seed (the worker seeds it
    from the config for the LoRA init) differ: the noise comes from OS entropy, not from anything replayable."""
    batch = batch_of(tok, 8, seed=3)
    after = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _fresh_lora(tiny_model_dir)
        step = DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, learning_rate=0.1,
                          optimizer="sgd")
        torch.manual_seed(0)
        step(batch)
        after.append(torch.cat([p.detach().flatten().clone() for p in step.params]))
    start = torch.cat([p.detach().flatten() for p in trainable(_fresh_lora(tiny_model_dir))])
    # each update is mostly noise (std lr*sigma*C/B = 0.0125 per coordinate), and the two noises are independent
    d1, d2 = after[0] - start, after[1] - start
    assert d1.std() > 0.01 and d2.std() > 0.01
    assert torch.corrcoef(torch.stack([d1, d2]))[0, 1].abs() < 0.2


def test_schedule_turns_epochs_or_steps_and_a_batch_size_into_q_and_steps():
    from dpsynth.errors import UserError

    s = schedule(10_000, 64, epochs=0.25)
    assert s.q == 64 / 10_000 and s.steps == 40
    assert schedule(10_000, 64, epochs=0.25, steps=7).steps == 7
    with pytest.raises(UserError, match="training.batch_size: 512 exceeds the 300 training units"):
        schedule(300, 512, epochs=1)


def test_the_step_states_the_event_it_releases(tok, lora_model):
    from dpsynth.privacy import SampledGaussian

    step = DPLoRAStep(lora_model, noise_multiplier=0.8, sampling_rate=0.01, max_grad_norm=1.0, expected_batch_size=8,
                      learning_rate=1e-2)
    assert step.event == SampledGaussian(0.8, 0.01)


# ---------------------------------------------------------------- lean step: micro-batches, frozen head, bf16


def _fresh_lora(tiny_model_dir, dtype=torch.float32, target_modules=("q_proj", "v_proj")):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model = wrap_lora(model, LoraConfig(r=8, alpha=16, target_modules=target_modules, last_layers=None))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.manual_seed(hash(name) % 2**31)
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("micro", [1, 3, 5])
def test_micro_batched_update_equals_one_shot_update(tok, tiny_model_dir, micro):
    batch = batch_of(tok, 11, seed=5)
    after = []
    for size in (None, micro):
        model = _fresh_lora(tiny_model_dir)
        step = DPLoRAStep(model, noise_multiplier=0.7, max_grad_norm=0.05, expected_batch_size=10, learning_rate=0.5,
                          noise_generator=torch.Generator().manual_seed(42), optimizer="sgd", micro_batch_size=size)
        step(batch)
        after.append([p.detach().clone() for p in step.params])
    one_shot, pieces = after
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(one_shot, pieces))
    # and the step did move the weights (clipping at 0.05 is active, the noise is real)
    start = [p.detach() for p in trainable(_fresh_lora(tiny_model_dir))]
    assert all(not torch.allclose(a, b) for a, b in zip(start, one_shot))


def test_micro_batches_are_cut_to_their_own_longest_example(tok):
    short = [encode(tok, "[reviews][pos]: ", "ok", 32)] * 2
    long = [encode(tok, "[reviews][neg]: ", "a long review " * 5, 32)]
    parts = micro_batches(collate(short + long, tok.pad_token_id), 2)
    assert [len(p) for p in parts] == [2, 1]
    assert parts[0].input_ids.shape[1] == len(short[0].input_ids) < parts[1].input_ids.shape[1]


def test_a_trainable_head_takes_the_full_logits_path(tiny_model_dir):
    """LoRA on lm_head would see loss positions, not examples, as its batch: its per-example gradients would be wrong."""
    frozen = _fresh_lora(tiny_model_dir)
    assert lean_head(frozen) is not None
    head = wrap_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(target_modules=("q_proj", "lm_head"), last_layers=None))
    assert lean_head(head) is None


def test_lean_loss_equals_full_logits_loss(tok, tiny_model_dir, monkeypatch):
    """The loss-positions-only head (fused, chunked) gives the same losses and LoRA gradients as full logits."""
    import dpsynth.prefixlm as prefixlm

    model = _fresh_lora(tiny_model_dir)
    batch = batch_of(tok, 6, seed=9)
    lean = per_example_loss(model, batch, chunk=7)  # several chunks
    g_lean = torch.autograd.grad(lean.sum(), trainable(model))
    monkeypatch.setattr(prefixlm, "lean_head", lambda m: None)
    full = per_example_loss(model, batch)
    g_full = torch.autograd.grad(full.sum(), trainable(model))
    assert torch.allclose(lean, full, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_lean, g_full))


def test_clipping_holds_in_float32_on_a_bf16_base(tok, tiny_model_dir):
    model = _fresh_lora(tiny_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in trainable(model)} == {torch.float32}  # LoRA stays float32 on a bf16 base
    assert next(p for p in model.parameters() if not p.requires_grad).dtype == torch.bfloat16
    clip = 1e-3
    for i in range(3):
        grads = dp_grads(model, batch_of(tok, 1, seed=i), sigma=0.0, clip=clip, expected=1)
        joint = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        assert clip * 0.999 <= joint <= clip * (1 + 1e-5)


_PEAK_SCRIPT = r"""
import json, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from dpsynth.config import LoraConfig
from dpsynth.models import wrap_lora
from dpsynth.prefixlm import collate, encode
from dpsynth.train.step import DPLoRAStep
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, tie_word_embeddings=True)
torch.manual_seed(0)
model = wrap_lora(LlamaForCausalLM(cfg), LoraConfig(r=64, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                           "up_proj", "down_proj"), last_layers=None))
micro = None if sys.argv[3] == "none" else int(sys.argv[3])
step = DPLoRAStep(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16, learning_rate=1e-3, micro_batch_size=micro)
def batch(n):
    return collate([encode(tok, "[r][pos]: ", "word " * 200, 64) for _ in range(n)], tok.pad_token_id)
step(batch(8))  # warm-up: allocator, optimizer state
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
b = batch(int(sys.argv[2]))
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
step(b)
print(json.dumps({"growth_mib": (status("VmHWM:") - before) / 1024}))
"""


def test_peak_memory_does_not_grow_with_the_logical_batch(tiny_model_dir, tmp_path):
    """Measured, in fresh processes: with the micro-batch fixed, a 16x larger logical batch costs (almost) no more
    peak memory; the same batch in one shot does (the control, which shows the measurement can fail)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)

    def growth(n: int, micro: str) -> float:
        out = subprocess.run([sys.executable, str(script), tiny_model_dir, str(n), micro], capture_output=True, text=True,
                             timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]

    small, large, one_shot = growth(8, "8"), growth(128, "8"), growth(128, "none")
    assert one_shot > small + 300, (small, large, one_shot)  # the control: 128 examples at once need far more
    print(f"peak growth MiB: micro 8 x 8 {small:.0f}, micro 8 x 128 {large:.0f}, one shot 128 {one_shot:.0f}")
    assert large < small + 0.2 * (one_shot - small), (small, large, one_shot)


# ---------------------------------------------------------------- privacy units: a person's records clipped as one


def _unit_rows(tok, n_records: int, seed: int):
    rows = make_rows(n_records, seed)
    return [encode(tok, PREFIX.format(r["sentiment"]), r["review"], 32) for r in rows]


def test_a_unit_with_fifty_records_moves_the_clipped_sum_no_more_than_a_unit_with_one(tok, tiny_model_dir):
    clip = 1e-3
    norms = {}
    for n in (1, 50):
        model = _fresh_lora(tiny_model_dir)
        batch = collate(_unit_rows(tok, n, seed=n), tok.pad_token_id, unit_index=[0] * n)
        grads = dp_grads(model, batch, sigma=0.0, clip=clip, expected=1)
        norms[n] = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    assert norms[50] <= clip * (1 + 1e-5) and norms[1] <= clip * (1 + 1e-5)
    # the same 50 records as 50 record-level units would move it 50 times as far
    model = _fresh_lora(tiny_model_dir)
    batch = collate(_unit_rows(tok, 50, seed=50), tok.pad_token_id)
    apart = torch.sqrt(sum((g.double() ** 2).sum() for g in dp_grads(model, batch, sigma=0.0, clip=clip, expected=1)))
    assert apart.item() > 10 * clip


def test_a_units_gradient_is_the_mean_of_its_records(tok, tiny_model_dir):
    """Unclipped (C huge), a two-unit batch's gradient is the sum over units of the mean of each unit's records."""
    rows = _unit_rows(tok, 5, seed=8)
    model = _fresh_lora(tiny_model_dir)
    got = dp_grads(model, collate(rows, tok.pad_token_id, unit_index=[0, 0, 0, 1, 1]), sigma=0.0, clip=1e9, expected=1)
    ref_model = _fresh_lora(tiny_model_dir)
    losses = per_example_loss(ref_model, collate(rows, tok.pad_token_id))
    want = torch.autograd.grad(losses[:3].mean() + losses[3:].mean(), trainable(ref_model))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, want))


def test_micro_batches_never_split_a_unit(tok):
    batch = collate(_unit_rows(tok, 7, seed=1), tok.pad_token_id, unit_index=[0, 0, 0, 1, 2, 2, 2])
    parts = micro_batches(batch, 2)
    assert [len(p) for p in parts] == [3, 1, 3]  # a unit larger than the micro-batch gets one of its own
    assert [p.unit_index.tolist() for p in parts] == [[0, 0, 0], [0], [0, 0, 0]]


def test_with_units_the_poisson_batch_counts_units(tok):
    """The worker's batch: Poisson over units (mean q x units), each sampled unit's records, capped, together."""
    from dpsynth.train.worker import unit_batch

    units = [_unit_rows(tok, 1 + (u % 7), seed=u) for u in range(400)]
    q, steps = 0.05, 300
    sizes = []
    for idx in poisson_batches(len(units), q, steps):
        batch = unit_batch(units, idx, per_record=False, cap=4, pad_id=tok.pad_token_id, device="cpu")
        assert batch.units == len(idx) and len(batch) == sum(min(4, len(units[u])) for u in idx)
        sizes.append(len(idx))
    assert abs(sum(sizes) / steps - q * len(units)) < 1.0  # ~5 standard errors of the mean
