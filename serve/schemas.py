"""Request bodies of the HTTP API (pydantic): bad values become 400s that name the field."""

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


class CompletionRequest(BaseModel):
    """The OpenAI /v1/completions body; options we cannot honour are refused, never silently dropped."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=10.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0

    def unsupported(self) -> str | None:
        if self.stop:
            return "stop sequences are not supported"
        if self.echo or self.logprobs or self.suffix or (self.best_of or 1) > 1:
            return "echo, logprobs, suffix and best_of are not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported"
        return None
