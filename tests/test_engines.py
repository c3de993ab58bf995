"""The engine contract, run against every offline engine (transformers everywhere; vLLM where it is installed):
one Generation per prompt in order, max_tokens honoured, seeds reproducible, and greedy outputs equal across
engines (float32), so the corpus does not depend on which engine made it."""

from __future__ import annotations

import pytest
import torch

from dpsynth.config import SamplingConfig
from dpsynth.sample.engines import GenParams, TransformersEngine, left_pad, prompt_ids, sample_texts, stop_token_ids

PROMPTS = ["[reviews][pos]: ", "[reviews][neg]: a", "[reviews][pos]: the cast and the story were"]


@pytest.fixture(scope="module")
def tok(vllm_tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vllm_tiny_model_dir)


@pytest.fixture(scope="module")
def engines(vllm_tiny_model_dir, tok):
    """Every engine on the same float32 weights: transformers, and vLLM when it imports (one start per module)."""
    from transformers import AutoModelForCausalLM

    made = {"transformers": TransformersEngine(AutoModelForCausalLM.from_pretrained(vllm_tiny_model_dir,
                                                                                      dtype=torch.float32).eval(), tok)}
    try:
        import vllm  # noqa: F401
    except ImportError:
        vllm = None
    if vllm is not None:
        from dpsynth.sample.engines import VLLMEngine

        made["vllm"] = VLLMEngine(vllm_tiny_model_dir, tok, dtype="float32", max_model_len=128, max_num_seqs=16,
                                  enforce_eager=True)
    yield made
    if "vllm" in made:
        made["vllm"].close()


@pytest.fixture(params=["transformers", "vllm"])
def engine(request, engines):
    if request.param not in engines:
        pytest.skip("vLLM is not installed here")
    return engines[request.param]


def test_one_generation_per_prompt_in_order_within_max_tokens(engine, tok):
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    gens = engine.generate_ids(ids, GenParams(temperature=1.0, top_p=0.95, max_tokens=5), [1, 2, 3])
    assert len(gens) == len(PROMPTS)
    for g in gens:
        assert 1 <= g.completion_tokens <= 5 and g.finish_reason in ("stop", "length")
        assert g.finish_reason == "stop" or g.completion_tokens == 5


def test_greedy_is_deterministic(engine, tok):
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    greedy = GenParams(temperature=0.0, top_p=1.0, max_tokens=8)
    assert [g.text for g in engine.generate_ids(ids, greedy)] == [g.text for g in engine.generate_ids(ids, greedy)]


def test_the_same_seeds_give_the_same_samples(engine, tok):
    ids = [prompt_ids(tok, PROMPTS[0])] * 4
    params = GenParams(temperature=1.0, top_p=1.0, max_tokens=8)
    first = [g.text for g in engine.generate_ids(ids, params, [7, 8, 9, 10])]
    assert first == [g.text for g in engine.generate_ids(ids, params, [7, 8, 9, 10])]


def test_sample_texts_is_the_corpus_samplers_call(engine):
    texts = sample_texts(engine, PROMPTS[0], 3, SamplingConfig(max_new_tokens=4, temperature=1.0))
    assert len(texts) == 3 and all(isinstance(t, str) and t == t.strip() for t in texts)


def test_greedy_outputs_are_the_same_on_every_engine(engines, tok):
    if len(engines) < 2:
        pytest.skip("vLLM is not installed here")
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    greedy = GenParams(temperature=0.0, top_p=1.0, max_tokens=8)
    outs = {name: [(g.text, g.completion_tokens, g.finish_reason) for g in e.generate_ids(ids, greedy)]
            for name, e in engines.items()}
    assert outs["vllm"] == outs["transformers"]


def test_every_engine_stops_at_every_special_and_role_token(engine, tok):
    assert set(stop_token_ids(tok)) <= set(engine.stop_ids)
    assert {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")} <= set(engine.stop_ids)


def test_vllm_ends_the_text_at_a_planted_role_token(engines, tok):
    """vLLM on the engine's own SamplingParams, with `<|im_start|>` made likely (logit_bias, test-only): it stops
    there and leaves it out of the text. (tests/test_stop_tokens.py plants it in the weights for transformers.)"""
    if "vllm" not in engines:
        pytest.skip("vLLM is not installed here")
    from vllm.inputs import TokensPrompt

    from dpsynth.sample.engines import vllm_params

    e, im_start = engines["vllm"], tok.convert_tokens_to_ids("<|im_start|>")
    params = [vllm_params(e.vllm, GenParams(temperature=1.0, top_p=1.0, max_tokens=24), s, stop_ids=e.stop_ids)
              for s in range(8)]
    for p in params:
        p.logit_bias = {im_start: 10.0}
    outs = e.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tok, PROMPTS[0]))] * 8, params, use_tqdm=False)
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(stopped) >= 5 and all(o.stop_reason == im_start for o in stopped)
    assert not any(m in o.outputs[0].text for o in outs for m in ("<|im_start|>", "<|im_end|>", "assistant\n"))


def test_left_pad_continues_every_row_from_its_own_last_token():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_a_frozen_models_head_is_handed_contiguous_rows(vllm_tiny_model_dir, tok):
    """generate's prefill hands the head a strided slice (the last position); on a frozen model (a loaded adapter, the
    sampler's case) torch then copies the head's weight once per row. The engine makes the head's input contiguous:
    the texts are the same as generate's alone, and no input to the head is strided."""
    from transformers import AutoModelForCausalLM

    def frozen():
        return AutoModelForCausalLM.from_pretrained(vllm_tiny_model_dir, dtype=torch.float32).eval().requires_grad_(False)

    model, plain = frozen(), frozen()
    engine = TransformersEngine(model, tok)
    raw = TransformersEngine.__new__(TransformersEngine)  # the same engine over a model without the hook
    raw.__dict__.update(engine.__dict__, model=plain)
    seen: dict[str, list[bool]] = {"engine": [], "raw": []}
    for name, m in (("engine", model), ("raw", plain)):
        m.get_output_embeddings().register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(
            args[0].is_contiguous()))
    ids, params = [prompt_ids(tok, p) for p in PROMPTS], GenParams(temperature=0.0, max_tokens=4)
    assert [g.text for g in engine.generate_ids(ids, params)] == [g.text for g in raw.generate_ids(ids, params)]
    assert not all(seen["raw"]), "generate no longer hands the head a strided slice: the hook may be unneeded"
    assert seen["engine"] and all(seen["engine"])
    hooks = len(model.get_output_embeddings()._forward_pre_hooks)
    TransformersEngine(model, tok)  # a second engine over the same model adds no second hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == hooks
