"""dpsynth's own request body (pydantic): bad values become 400s that name the field. The OpenAI bodies are
Ray Serve LLM's (vLLM's protocol models)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CorpusRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    adapter: str
    num_examples: int = Field(ge=1)
    label_mix: Literal["dp", "uniform"] | dict[str, float] | None = None
    """`dp` (the adapter's DP label histogram; the default when it has one), `uniform`, or {label: weight}."""
    temperature: float = Field(0.8, gt=0.0, le=10.0)  # sampling.temperature's default
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    """Tokens per example; default: the adapter's own sampling length."""
    seed: int = 0
    format: Literal["jsonl", "csv"] = "jsonl"
    attributes: dict[str, str] | None = None
    """Only texts with these attribute values ({"queue": "billing"}): label_mix restricted to the matching cells."""

    @field_validator("label_mix")
    @classmethod
    def _weights(cls, v):
        if isinstance(v, dict) and (not v or any(not math.isfinite(w) or w < 0 for w in v.values()) or sum(v.values()) <= 0):
            raise ValueError("label weights must be finite, non-negative and not all zero")
        return v
