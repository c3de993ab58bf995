"""The Prefix-LM objective (Kurakin et al. 2023): prefix + text + EOS, loss on the text and EOS only.

One encoding and one scorer for everything that reads a text under a label prefix: the DP training step,
label sharpening, the private search's validation score, and the membership and canary attacks. Plain torch:
no Ray, no vLLM, no Opacus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Encoded:
    """One training example: token ids and which of them carry loss (text + EOS, not the prefix)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    loss_mask: torch.Tensor  # (B, L) 1 on text and EOS tokens
    unit_index: torch.Tensor | None = None
    """(B,) which privacy unit each row belongs to (0..units-1, a unit's rows contiguous); None: one row, one unit."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def units(self) -> int:
        if self.unit_index is None:
            return len(self)
        return int(self.unit_index.max()) + 1 if len(self) else 0


def encode(tokenizer, prefix: str, text: str, max_length: int) -> Encoded:
    """prefix + text + EOS (Kurakin et al. 2023, Prefix-LM); the text is truncated, never the prefix.

    Prefix and text are tokenized separately so that sampling can prompt with exactly the
    prefix tokens seen in training.
    """
    p = tokenizer(prefix, add_special_tokens=False).input_ids
    room = max_length - len(p) - 1
    if room < 1:
        raise ValueError(f"model.max_length {max_length} leaves no room for text after the {len(p)}-token prefix")
    t = tokenizer(text, add_special_tokens=False).input_ids[:room]
    return Encoded(tuple(p + t + [tokenizer.eos_token_id]), (0,) * len(p) + (1,) * (len(t) + 1))


def collate(examples: list[Encoded], pad_id: int, device: torch.device | str = "cpu",
            unit_index: list[int] | None = None) -> Batch:
    """Pad to the batch's longest example (snippets are short: a fixed length wastes compute). `unit_index`: the
    privacy unit of each example, when units hold several records."""
    width = max((len(e.input_ids) for e in examples), default=1)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.loss_mask)
    units = None if unit_index is None else torch.tensor(unit_index, dtype=torch.long, device=device)
    return Batch(ids.to(device), attn.to(device), mask.to(device), units)


_LEAN_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo",
                               "olmo2", "starcoder2", "stablelm"})
"""Causal LMs whose logits are exactly `lm_head(last hidden state)` (no soft-capping or logit scaling), so the head
can be applied to the loss positions alone."""


def causal_lm(model):
    """The Hugging Face causal LM inside Opacus' GradSampleModule and/or peft's PeftModel wrappers."""
    inner = getattr(model, "_module", model)  # GradSampleModule
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def lean_head(model):
    """(decoder, frozen output embedding) when the loss can be computed at the loss positions only, else None.

    Only for a frozen head: a trainable head (LoRA on lm_head) would see positions, not examples, as its batch, and
    its per-example gradients would be wrong. Those models take the full-logits path.
    """
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if (getattr(lm.config, "model_type", None) not in _LEAN_MODEL_TYPES or head is None or head.bias is not None
            or any(p.requires_grad for p in head.parameters()) or not hasattr(lm, "get_decoder")):
        return None
    return lm.get_decoder(), head


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """NLL of `targets` under softmax(hidden @ W^T) for a frozen W, in chunks of positions.

    The gradient with respect to `hidden` is computed in the forward pass, chunk by chunk, so no (positions x
    vocabulary) tensor outlives its chunk: memory is O(chunk x vocabulary + positions x hidden) instead of several
    fp32 copies of the full logits (the reason batch 1024 did not fit on one GPU).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        w = weight.to(hidden.dtype)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ w.t()).float()
            t = targets[s : s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            loss[s : s + chunk] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if need_grad:  # d nll / d logits = softmax - onehot, then back through W
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[s : s + chunk] = (probs.to(w.dtype) @ w).float()
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss[:, None]).to(ctx.hidden_dtype), None, None, None


def _loss_positions(model, batch: Batch, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(example index, NLL) of every loss position, in row-major order."""
    targets_mask = batch.loss_mask[:, 1:].bool()
    rows, cols = targets_mask.nonzero(as_tuple=True)  # position t predicts token t + 1
    lean = lean_head(model)
    if lean is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        nll = F.cross_entropy(logits[rows, cols].float(), batch.input_ids[rows, cols + 1], reduction="none")
        return rows, nll
    decoder, head = lean
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    vocab = head.weight.shape[0]
    nll = _FrozenHeadCrossEntropy.apply(hidden[rows, cols], head.weight, batch.input_ids[rows, cols + 1],
                                        chunk or max(64, (1 << 26) // vocab))
    return rows, nll


def per_example_loss(model, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token NLL over each example's own text + EOS tokens, shape (B,), float32.

    Not the model's `labels=` loss, which averages over all tokens of the batch and so mixes examples
    (per-example clipping needs one loss per example). Where the head is frozen and plain (`lean_head`), the
    head and the softmax run only at the loss positions, in chunks: prefix and padding positions never get a
    vocabulary-sized row of logits.
    """
    rows, nll = _loss_positions(model, batch, chunk)
    size = batch.input_ids.shape[0]
    total = torch.zeros(size, dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    count = torch.zeros(size, dtype=nll.dtype, device=nll.device).index_add(0, rows, torch.ones_like(nll))
    return total / count.clamp_min(1.0)


def micro_batches(batch: Batch, size: int | None) -> list[Batch]:
    """Physical micro-batches of one logical batch, each cut to its own longest example (right padding). Units are
    never split: a micro-batch holds whole units (a unit larger than `size` gets one of its own)."""
    n = len(batch)
    if n == 0:
        return [batch]
    size = n if size is None else max(1, size)
    if batch.unit_index is None:
        spans = [(i, i + 1) for i in range(n)]
    else:
        starts = [0] + [i for i in range(1, n) if batch.unit_index[i] != batch.unit_index[i - 1]]
        spans = list(zip(starts, starts[1:] + [n]))
    bounds: list[tuple[int, int]] = []
    first, last = spans[0]
    for begin, end in spans[1:]:
        if end - first > size:  # this unit does not fit: close the micro-batch before it
            bounds.append((first, last))
            first = begin
        last = end
    bounds.append((first, last))
    out = []
    for s, e in bounds:
        attn = batch.attention_mask[s:e]
        width = max(1, int(attn.sum(1).max()))
        units = None if batch.unit_index is None else batch.unit_index[s:e] - batch.unit_index[s]
        out.append(Batch(batch.input_ids[s:e, :width], attn[:, :width], batch.loss_mask[s:e, :width], units))
    return out


def token_nll(model, batch: Batch, chunk: int | None = None) -> list[torch.Tensor]:
    """Per-token NLL of each example's text + EOS tokens (float32, on the model's device)."""
    rows, nll = _loss_positions(model, batch, chunk)
    counts = torch.bincount(rows, minlength=len(batch)).tolist()
    return list(torch.split(nll, counts))


@torch.inference_mode()
def score_texts(model, tok, items: Sequence[tuple[str, str]], max_length: int, batch_size: int = 32) -> list[np.ndarray]:
    """Per-token NLL of each `text` given its `prefix` (text tokens then EOS), batched by similar length. The texts
    of one prefix share its forward pass (`score_after_prefix`) where the model is one whose cache we know."""
    out: list[np.ndarray] = [np.zeros(0)] * len(items)
    if lean_head(model) is not None and all(prefix for prefix, _ in items):  # an empty prompt has no cache to share
        by_prefix: dict[str, list[int]] = {}
        for i, (prefix, _) in enumerate(items):
            by_prefix.setdefault(prefix, []).append(i)
        for prefix, idx in by_prefix.items():
            for i, nll in zip(idx, score_after_prefix(model, tok, prefix, [items[i][1] for i in idx], max_length,
                                                      batch_size)):
                out[i] = nll
        return out
    encoded = [encode(tok, prefix, text, max_length) for prefix, text in items]
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # similar lengths together
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, nll in zip(chunk, token_nll(model, collate([encoded[i] for i in chunk], tok.pad_token_id, device))):
            out[i] = nll.double().cpu().numpy()
    return out


@torch.inference_mode()
def score_after_prefix(model, tok, prefix: str, texts: Sequence[str], max_length: int,
                       batch_size: int = 32) -> list[np.ndarray]:
    """`score_texts` for texts under one prefix, on a model with a lean head: the prefix runs once and its key/value
    cache serves every batch, so a batch costs its text tokens only (label sharpening scores every candidate under
    every label's prompt, and the chat prompt is longer than a short text: 34 prompt tokens to about 15 of a
    question's)."""
    import copy

    encoded = [encode(tok, prefix, text, max_length) for text in texts]
    if not encoded:
        return []
    decoder, head = lean_head(model)
    device = head.weight.device
    prompt = list(encoded[0].input_ids[: encoded[0].loss_mask.index(1)])
    cached = decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache = cached.past_key_values
    first = torch.log_softmax((cached.last_hidden_state[0, -1] @ head.weight.T).float(), dim=-1)
    out: list[np.ndarray] = [np.zeros(0)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # similar lengths together
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [list(encoded[i].input_ids[len(prompt):]) for i in chunk]  # text tokens, then EOS
        nll = [[-float(first[r[0]])] for r in rows]  # the first text token: predicted by the prompt's last position
        width = max(len(r) for r in rows) - 1  # the positions that predict the rest (the last token predicts nothing)
        if width > 0:
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.ones((len(rows), len(prompt) + width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r) - 1] = torch.tensor(r[:-1])
                attn[j, len(prompt) + len(r) - 1:] = 0  # right padding: causal attention never looks ahead at it
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(rows))
            hidden = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), past_key_values=past,
                             position_ids=torch.arange(len(prompt), len(prompt) + width, device=device)[None].expand(
                                 len(rows), -1), use_cache=True).last_hidden_state
            for j, r in [(j, r) for j, r in enumerate(rows) if len(r) > 1]:
                targets = torch.tensor(r[1:], dtype=torch.long, device=device)
                logits = (hidden[j, : len(r) - 1] @ head.weight.T).float()
                nll[j] += F.cross_entropy(logits, targets, reduction="none").double().cpu().tolist()
        for i, values in zip(chunk, nll):
            out[i] = np.array(values, dtype=np.float64)
    return out
