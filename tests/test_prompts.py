"""The conditioning prompt: a chat instruction on an instruct base, the plain Prefix-LM prefix otherwise; built from
public facts only, carrying zero loss, and the same in training, sampling and scoring."""

from __future__ import annotations

import copy

import pytest

from dpsynth.config import load_config
from dpsynth.prefixlm import encode
from dpsynth.prompts import label_prompt, render, style_of


@pytest.fixture(scope="module")
def tok(bundled_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir)


def test_an_instruct_base_gets_a_chat_instruction_whose_answer_is_the_text(tok):
    cfg = load_config(None, ["data.description=SMS messages"])
    assert style_of(cfg.model, tok) == "chat"
    prompt = label_prompt(cfg, tok, "sms", "spam")
    assert prompt.startswith("<|im_start|>system\n<|im_end|>")  # an empty system turn, not the 16-token persona
    assert "Write one text from SMS messages, with label: spam. Reply with the text only." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # the text is the assistant turn, ended by the template's end-of-turn token (the tokenizer's EOS); zero loss on
    # every prompt token
    enc = encode(tok, prompt, "WINNER!! Claim your prize now", 96)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert enc.loss_mask[:n_prompt] == (0,) * n_prompt and all(enc.loss_mask[n_prompt:])
    assert enc.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    # without a description the dataset is named; with system_prompt null the template's own default is used
    plain_name = label_prompt(load_config(None, []), tok, "trec", "NUM")
    assert "from the dataset 'trec', with label: NUM." in plain_name
    default_system = label_prompt(load_config(None, ["model.system_prompt=null"]), tok, "trec", "NUM")
    assert "You are a helpful AI assistant" in default_system


def test_a_base_model_or_plain_gets_the_prefix_lm_template(tok):
    no_chat = copy.deepcopy(tok)
    no_chat.chat_template = None
    cfg = load_config(None, [])
    assert style_of(cfg.model, no_chat) == "plain"
    assert label_prompt(cfg, no_chat, "rotten_tomatoes", "fresh") == "rotten_tomatoes text, label fresh: "
    assert label_prompt(load_config(None, ["model.prompt=plain"]), tok, "rt", "fresh") == "rt text, label fresh: "
    with pytest.raises(ValueError, match="chat template"):
        label_prompt(load_config(None, ["model.prompt=chat"]), no_chat, "rt", "fresh")


def test_several_attributes_render_through_the_same_prompt(tok):
    """The records shape (several attribute columns) uses the one prompt: every value, in the given order."""
    cfg = load_config(None, ["data.description=clinical notes"])
    prompt = render(cfg.model, tok, dataset="notes", conditions={"specialty": "cardiology", "note type": "discharge"},
                    description=cfg.data.description)
    assert "with specialty: cardiology, note type: discharge." in prompt
    plain = load_config(None, ["model.prompt=plain"]).model.model_copy(
        update={"prefix_template": "{dataset} {specialty} note, label {label}: "})
    assert render(plain, tok, dataset="notes", conditions={"specialty": "cardiology", "label": "x"}) == \
        "notes cardiology note, label x: "


def test_an_instruction_that_conditions_on_nothing_is_refused():
    from dpsynth.errors import UserError

    with pytest.raises(UserError, match="model.instruction"):
        load_config(None, ["model.instruction=Write a text."])
