"""The shape of a user's records: which columns are free text and which are the categorical attributes a text is
conditioned on (dpsynth.prompts), and how a record becomes one training text and one condition cell and back.

* Several text fields (`data.text_columns`, e.g. subject and body) are rendered into one training text with
  unambiguous markers, `<subject>...</subject>\n<body>...</body>`, so the loss covers all of them and a sample can
  be parsed back into its fields (a sample that does not parse is redrawn: post-processing, it costs nothing). One
  text field is the text itself, unmarked.
* The attribute values of a record form its *cell*: the value itself for one attribute (so the one-label config,
  `data.label_column`, is unchanged), a JSON object of column -> value for several, and "" for unlabelled data
  (`data.attribute_columns: []`). A cell is what the rest of dpsynth calls a label: the DP histogram over cells is
  the DP joint of the attributes, a corpus is drawn per cell, sharpening scores each cell's prompt.

The one-label shorthand (`text_columns` and `attribute_columns` unset) keeps dpsynth's `text` / `label` output
columns; a record schema writes the user's own column names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dpsynth.config import DataConfig


@dataclass(frozen=True)
class RecordSchema:
    text_columns: tuple[str, ...]
    attribute_columns: tuple[str, ...]
    shorthand: bool = False
    """The one-text, one-label config (`data.text_column`, `data.label_column`): output columns `text`, `label`."""

    @classmethod
    def of(cls, data: DataConfig) -> RecordSchema:
        shorthand = data.text_columns is None and data.attribute_columns is None
        texts = tuple(data.text_columns) if data.text_columns is not None else (data.text_column,)
        attrs = tuple(data.attribute_columns) if data.attribute_columns is not None else (data.label_column,)
        return cls(texts, attrs, shorthand)

    @property
    def unlabelled(self) -> bool:
        return not self.attribute_columns

    # text fields -----------------------------------------------------------------------------------------------

    def join(self, fields: Sequence[str]) -> str:
        """One training text from the record's text fields (in text_columns order)."""
        if len(self.text_columns) == 1:
            return fields[0]
        return "\n".join(f"<{c}>{v}</{c}>" for c, v in zip(self.text_columns, fields))

    def parse(self, text: str) -> dict[str, str] | None:
        """A (generated) text's fields, or None when it is not one record: markers missing, repeated or out of
        order, or every field empty."""
        text = text.strip()
        if len(self.text_columns) == 1:
            return {self.text_columns[0]: text} if text else None
        m = self._pattern().fullmatch(text)
        if m is None:
            return None
        fields = {c: m.group(i + 1).strip() for i, c in enumerate(self.text_columns)}
        if not any(fields.values()) or any(f"<{c}>" in v or f"</{c}>" in v for v in fields.values()
                                           for c in self.text_columns):
            return None
        return fields

    def _pattern(self) -> re.Pattern:
        body = r"\s*".join(rf"<{re.escape(c)}>(.*?)</{re.escape(c)}>" for c in self.text_columns)
        return re.compile(body, re.DOTALL)

    # attribute cells -------------------------------------------------------------------------------------------

    def cell(self, values: Sequence[str]) -> str:
        """The condition cell of one record's attribute values (in attribute_columns order)."""
        if not self.attribute_columns:
            return ""
        if len(self.attribute_columns) == 1:
            return values[0]
        return json.dumps(dict(zip(self.attribute_columns, values)), ensure_ascii=False)

    def attributes(self, cell: str) -> dict[str, str]:
        """Column -> value of a cell (the inverse of `cell`)."""
        if not self.attribute_columns:
            return {}
        if len(self.attribute_columns) == 1:
            return {self.attribute_columns[0]: cell}
        values = json.loads(cell)
        return {c: str(values[c]) for c in self.attribute_columns}

    def conditions(self, cell: str) -> dict[str, str]:
        """What the prompt names for a cell: `label` in the shorthand (the prompt of earlier versions), else each
        attribute column by its name."""
        if self.shorthand:
            return {"label": cell}
        return self.attributes(cell)

    def cells(self, domains: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
        """Every cell of the product of the attributes' value domains, sorted."""
        combos: list[tuple[str, ...]] = [()]
        for c in self.attribute_columns:
            combos = [(*k, v) for k in combos for v in domains[c]]
        return tuple(sorted(self.cell(k) for k in combos))

    def restrict(self, proportions: Mapping[str, float], wanted: Mapping[str, str], key: str = "attributes") -> dict[str, float]:
        """`proportions` over cells, kept only where every attribute in `wanted` has the wanted value (a corpus of
        billing tickets only: {"queue": "billing"}). Unknown columns and values are refused naming them."""
        from dpsynth.errors import UserError

        domains: dict[str, set[str]] = {c: set() for c in self.attribute_columns}
        for cell in proportions:
            for c, v in self.attributes(cell).items():
                domains[c].add(v)
        for c, v in wanted.items():
            if c not in domains:
                raise UserError(f"{key}: '{c}' is not an attribute column ({', '.join(self.attribute_columns) or 'none'})")
            if v not in domains[c]:
                raise UserError(f"{key}.{c}: '{v}' is not one of its values ({', '.join(sorted(domains[c]))})")
        kept = {cell: w for cell, w in proportions.items()
                if all(self.attributes(cell)[c] == v for c, v in wanted.items())}
        if sum(kept.values()) <= 0:
            raise UserError(f"{key}: no weight is left on the cells with {wanted}; give label_mix weights for them")
        return kept

    # output records --------------------------------------------------------------------------------------------

    @property
    def output_columns(self) -> tuple[str, ...]:
        if self.shorthand:
            return ("text", "label")
        return (*self.text_columns, *self.attribute_columns)

    def record(self, text: str, cell: str) -> dict[str, str] | None:
        """A corpus row in the user's columns (`text`, `label` in the shorthand); None when the text does not parse.
        One text field takes any text, even an empty one (the in-context generator cannot redraw for free)."""
        if self.shorthand:
            return {"text": text, "label": cell}
        if len(self.text_columns) == 1:
            return {self.text_columns[0]: text, **self.attributes(cell)}
        fields = self.parse(text)
        if fields is None:
            return None
        return {**fields, **self.attributes(cell)}

    def from_record(self, row: Mapping) -> tuple[str, str]:
        """(training text, cell) of a corpus row written by `record`."""
        if self.shorthand:
            return str(row["text"]), str(row["label"])
        return (self.join([str(row.get(c) or "") for c in self.text_columns]),
                self.cell([str(row[c]) for c in self.attribute_columns]))
