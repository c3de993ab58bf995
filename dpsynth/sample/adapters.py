"""Certified adapters: a run directory whose certificate the privacy ledger holds, and what sampling needs from it.

Only the adapter, its certificate and the run's public metadata (labels, DP label histogram,
model section of the config) are read; the private data never is.

The ledger a certificate is checked against is the server's (or sampler's) own: named by its operator (`--ledger`,
the serve config's `ledger`), else DPSYNTH_LEDGER, else ~/.dpsynth/ledger.sqlite (`server_ledger`). Never one a
run directory names: a forged run directory could name a forged ledger holding its forged certificate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from dpsynth.records import RecordSchema

from dpsynth.config import ModelConfig, PrivacyConfig
from dpsynth.errors import UserError
from dpsynth.io import atomic_dir
from dpsynth.models import check_adapter
from dpsynth.privacy import ledger_exists, open_ledger
from dpsynth.privacy.certificate import Certificate, read_certificate

from .corpus import SHORTHAND, load_run_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CertifiedAdapter:
    name: str
    run_dir: Path
    certificate: Certificate
    model: ModelConfig
    labels: tuple[str, ...]
    dp_proportions: dict[str, float] | None
    rank: int
    prompts: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int = 40
    """The run's own sampling length (its DP length histogram's, when `auto`)."""
    schema: RecordSchema = SHORTHAND
    """The run's record schema: what a generation must parse into, and the corpus's columns."""

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    def proportions(self, spec) -> dict[str, float]:
        """`dp` (the run's DP label histogram), `uniform`, or {label: weight} restricted to known labels."""
        if spec == "dp":
            if self.dp_proportions is None:
                raise UserError(f"label_mix: adapter '{self.name}' has no DP label histogram; use 'uniform' or weights")
            return self.dp_proportions
        if spec == "uniform":
            return {lab: 1.0 for lab in self.labels}
        return dict(spec)

    def public_info(self) -> dict:
        """What the server shows about an adapter: its privacy guarantee, never data."""
        c = self.certificate
        return {"epsilon": c.epsilon, "delta": c.delta, "accountant": c.accountant, "run_id": c.run_id,
                "privacy_unit": c.dataset.unit, "dataset_fingerprint": c.dataset.fingerprint, "base_model": c.base_model.name,
                "labels": list(self.labels), "lora_rank": self.rank}


def verify_in_ledger(cert: Certificate, ledger_path: str | Path, where: str) -> None:
    """The run must be closed in the ledger with exactly this certificate (a read: the file is opened read-only)."""
    if not ledger_exists(ledger_path):
        raise UserError(f"{where}: privacy ledger {ledger_path} not found, so its certificate cannot be checked")
    record = open_ledger(ledger_path, readonly=True).run(cert.run_id)
    if record is None or record["status"] != "closed" or record["certificate"] != cert.without_corpus().to_json():
        raise UserError(f"{where}: certificate of run '{cert.run_id}' is not in the ledger {ledger_path}; refusing to serve it")


def server_ledger(ledger: str | Path | None = None) -> Path | str:
    """The ledger certificates are verified against: `ledger` as the server's operator named it, else the default
    ledger (DPSYNTH_LEDGER, else ~/.dpsynth/ledger.sqlite, resolved as privacy.ledger's default is). Never a run's."""
    return PrivacyConfig().ledger if ledger is None else PrivacyConfig(ledger=ledger).ledger


def load_certified(run_dir: str | Path, name: str | None = None, ledger: str | Path | None = None) -> CertifiedAdapter:
    """Read one run directory and check its certificate against the server's ledger (`server_ledger(ledger)`)."""
    adapter = read_adapter(run_dir, name)
    verify_in_ledger(adapter.certificate, server_ledger(ledger), str(adapter.run_dir))
    return adapter


def read_adapter(run_dir: str | Path, name: str | None = None) -> CertifiedAdapter:
    """Read a run directory with a well-formed certificate (the ledger is not consulted here)."""
    run_dir = Path(run_dir).expanduser().resolve()
    cert = read_certificate(run_dir / "certificate.json")
    cfg = load_run_config(run_dir)
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: no adapter/ directory")
    check_adapter(run_dir, cert)
    labels = tuple(sorted(json.loads((run_dir / "labels.json").read_text())))
    dist = run_dir / "label_distribution.json"
    rank = int(json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"])
    from dpsynth.models import load_tokenizer
    from dpsynth.prompts import label_prompts

    prompts = label_prompts(cfg, load_tokenizer(cfg.model), cert.dataset.name, labels)
    new_tokens = cfg.sampling.max_new_tokens if isinstance(cfg.sampling.max_new_tokens, int) else 40
    return CertifiedAdapter(name or run_dir.name, run_dir, cert, cfg.model, labels,
                            json.loads(dist.read_text()) if dist.is_file() else None, rank, prompts, new_tokens,
                            RecordSchema.of(cfg.data))


def same_base(adapters: list[CertifiedAdapter]) -> ModelConfig:
    """Adapters served together share one base model (one engine)."""
    bases = {(a.model.base, a.certificate.base_model.sha256, a.model.dtype) for a in adapters}
    if len(bases) != 1:
        raise UserError(f"adapters: served together they must share one base model; got {sorted(map(str, bases))}")
    return adapters[0].model


def merged_model_dir(adapter: CertifiedAdapter, cache: Path) -> Path:
    """The adapter merged into the base weights (cached by adapter content): plain weights sample faster than LoRA."""
    from dpsynth.models import load_adapter

    h = hashlib.sha256()
    for f in sorted(adapter.adapter_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    h.update(json.dumps(adapter.certificate.base_model.model_dump(mode="json"), sort_keys=True).encode())
    target = Path(cache) / "merged" / h.hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    log.info("merging adapter '%s' into the base weights once; cached at %s", adapter.name, target)
    model, tok = load_adapter(adapter.run_dir, adapter.model)
    merged = model.merge_and_unload()
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target
