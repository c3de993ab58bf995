"""The conditioning prompt: the Prefix-LM prefix every text is trained under (zero loss) and sampled from.

Kurakin et al. 2023 condition on `[dataset][label]`. On an instruct base such as the bundled SmolLM2-Instruct a bare
`sms text, label ham: ` sends the model into code and markup before the first DP step; the same facts said as an
instruction through the tokenizer's chat template put it in the right genre from step 0 (measured in
BENCHMARKS.md, "Your own data"). So:

* `chat` (the default `auto` on a tokenizer with a chat template): one user turn, `model.instruction`, rendered by
  the tokenizer's own template with the generation prompt; the assistant turn is the text, ended by the template's
  own end-of-turn token (the tokenizer's EOS), so training teaches the model to answer with the text alone;
* `plain` (`auto` on a base model): `model.prefix_template`, as in the paper.

A prompt is built from public facts only: the dataset name, `data.description`, and the values it is conditioned
on (every attribute of a record, dpsynth.records: `label: fresh`, or `queue: billing, priority: high`; nothing
for unlabelled data, which gets `unconditioned_instruction`). It never looks
at the private data: choosing it by the data would be a hyperparameter choice on private data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dpsynth.config import JobConfig, ModelConfig


def style_of(model: ModelConfig, tokenizer) -> str:
    """`chat` or `plain`: `auto` is chat exactly when the tokenizer has a chat template."""
    if model.prompt != "auto":
        return model.prompt
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def conditions_text(conditions: Mapping[str, str]) -> str:
    """`label: fresh`, or `specialty: cardiology, note type: discharge` for several attributes."""
    return ", ".join(f"{name}: {value}" for name, value in conditions.items())


def label_text(conditions: Mapping[str, str]) -> str:
    """What {label} stands for in a template: the value itself for one condition (`fresh`, as in Kurakin et al.),
    `name: value, ...` for several."""
    return next(iter(conditions.values())) if len(conditions) == 1 else conditions_text(conditions)


def render(model: ModelConfig, tokenizer, *, dataset: str, conditions: Mapping[str, str],
           description: str | None = None) -> str:
    """The prompt for one combination of condition values (e.g. {"label": "fresh"})."""
    if style_of(model, tokenizer) == "plain":
        fields = {"label": label_text(conditions), **conditions, "dataset": dataset, "description": description or dataset}
        return (model.prefix_template if conditions else model.unconditioned_prefix_template).format(**fields)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.prompt: chat needs a tokenizer with a chat template; use plain")
    source = description or f"the dataset '{dataset}'"
    template = model.instruction if conditions else model.unconditioned_instruction
    instruction = template.format(**{"label": label_text(conditions), **conditions, "source": source, "dataset": dataset,
                                     "conditions": conditions_text(conditions)})
    messages = [{"role": "user", "content": instruction}]
    if model.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": model.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def label_prompt(cfg: JobConfig, tokenizer, dataset: str, label: str) -> str:
    """The prompt of one label: one cell of the record schema's attributes (dpsynth.records), `label` itself in the
    one-label shorthand, nothing for unlabelled data."""
    from dpsynth.records import RecordSchema

    conditions = RecordSchema.of(cfg.data).conditions(label)
    return render(cfg.model, tokenizer, dataset=dataset, conditions=conditions, description=cfg.data.description)


def label_prompts(cfg: JobConfig, tokenizer, dataset: str, labels: Iterable[str]) -> dict[str, str]:
    return {lab: label_prompt(cfg, tokenizer, dataset, lab) for lab in labels}


def plain_prefixes(cfg: JobConfig, tokenizer, dataset: str, labels: Iterable[str]) -> dict[str, str]:
    """Each cell's plain prefix (`model.prefix_template`, whatever model.prompt says): the training-free in-context
    generator's few-shot prefix, which a chat template's turns would break up. In the one-label shorthand this is
    the paper's `format_prefix(template, dataset, label)`; a record's attributes and unlabelled data render as
    they do everywhere else."""
    from dpsynth.records import RecordSchema

    schema, plain = RecordSchema.of(cfg.data), cfg.model.model_copy(update={"prompt": "plain"})
    return {lab: render(plain, tokenizer, dataset=dataset, conditions=schema.conditions(lab),
                        description=cfg.data.description) for lab in labels}


def check_prompts_fit(cfg: JobConfig, tokenizer, dataset: str, labels: Iterable[str]) -> None:
    """Refuse a fixed model.max_length the longest prompt leaves no room in (`auto` sizes itself to the prompt).
    Checked before anything is charged: prompts are public, so the refusal tells nothing of the data."""
    from dpsynth.errors import UserError

    if not isinstance(cfg.model.max_length, int):
        return
    longest = max((len(tokenizer(p, add_special_tokens=False).input_ids)
                   for p in label_prompts(cfg, tokenizer, dataset, labels).values()), default=0)
    if longest + 2 > cfg.model.max_length:  # one text token and EOS at least
        raise UserError(f"model.max_length: {cfg.model.max_length} leaves no room for text after the {longest}-token "
                        f"{style_of(cfg.model, tokenizer)} prompt; raise it (or use auto)")
