"""Writing a record of several text fields one field at a time (dpsynth.records).

A record's training text is `<subject>S</subject>\n<body>B</body>`, so the adapter has learned p(S | prompt,
`<subject>`), then p(B | ..., `</subject>\n<body>`). Sampling follows that chain: each field is generated after
its opening marker and cut at its closing one, and the markers themselves are written, not sampled. The record's
structure then never depends on the model emitting markup (a small or briefly trained model rarely does), while
every field's text still does; what still fails to parse (a field holding another field's marker, every field
empty) is redrawn by the caller like an empty text. Post-processing of the DP adapter, as all sampling.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from dpsynth.records import RecordSchema

from .engines import Engine, GenParams, Generation

FIELD_SEED = 7919
"""Field k of a record samples with seed + k * FIELD_SEED: fields draw independently, reproducibly."""


def opener(schema: RecordSchema, k: int) -> str:
    return ("\n" if k else "") + f"<{schema.text_columns[k]}>"


def cut(schema: RecordSchema, k: int, text: str) -> str:
    """Field k's value from its generation: up to its closing marker (or the end), stripped, then closed."""
    col = schema.text_columns[k]
    return text.split(f"</{col}>", 1)[0].strip() + f"</{col}>"


def field_seed(seed: int | None, k: int) -> int | None:
    return None if seed is None else (seed + k * FIELD_SEED) & 0x7FFFFFFF


class FieldByField:
    """An `Engine` that writes each record field after field (one batched call per field); one text field is the
    wrapped engine itself."""

    def __init__(self, engine: Engine, schema: RecordSchema):
        self.engine, self.schema = engine, schema
        self.name, self.tok = engine.name, engine.tok

    def generate_ids(self, prompts: list[list[int]], params: GenParams,
                     seeds: Sequence[int | None] | None = None) -> list[Generation]:
        if len(self.schema.text_columns) == 1:
            return self.engine.generate_ids(prompts, params, seeds)
        written, tokens = [""] * len(prompts), [0] * len(prompts)
        for k in range(len(self.schema.text_columns)):
            written = [w + opener(self.schema, k) for w in written]
            rows = [p + self.tok(w, add_special_tokens=False).input_ids for p, w in zip(prompts, written)]
            gens = self.engine.generate_ids(rows, params, None if seeds is None else [field_seed(s, k) for s in seeds])
            for i, g in enumerate(gens):
                written[i] += cut(self.schema, k, g.text)
                tokens[i] += g.completion_tokens
        return [Generation(w, t, "stop") for w, t in zip(written, tokens)]


async def generate_fields(schema: RecordSchema, tok, generate: Callable[[list[int], int], Awaitable[tuple[str, int]]],
                          prompt: list[int], seed: int) -> tuple[str, int]:
    """The online form (serving): `generate(prompt_ids, seed) -> (text, completion tokens)` called once per field."""
    if len(schema.text_columns) == 1:
        return await generate(prompt, seed)
    written, tokens = "", 0
    for k in range(len(schema.text_columns)):
        written += opener(schema, k)
        text, used = await generate(prompt + tok(written, add_special_tokens=False).input_ids, field_seed(seed, k))
        written += cut(schema, k, text)
        tokens += used
    return written, tokens
