"""What may leave the data owner: the release boundary of a run directory.

A run directory has two parts:

* the **shareable part** (the top level): only files listed in `MANIFEST.json`, each with its provenance: the
  output of a charged mechanism named in the run's certificate, post-processing of files already released, a
  certificate, or a fact declared public (the label set, the config without local paths);
* the **owner-only part** (`owner/`, and the job scratch `.checkpoints/`): logs, per-step metrics (true batch
  sizes, losses), evaluation and audit, search trials, the full config. Nothing there is released.

Jobs never write into the shareable part themselves: they hand files to a `Release`, which refuses a file without
a provenance the certificate backs, and which writes the manifest. `export(run_dir, dest)` copies exactly the
manifest's files (checked against their digests) and nothing else; it is what a third party may receive.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpsynth.errors import UserError
from dpsynth.io import atomic_dir, atomic_write_bytes
from dpsynth.privacy.certificate import read_certificate

OWNER = "owner"
"""The owner-only part of a run directory: never exported."""
MANIFEST = "MANIFEST.json"
CERTIFICATE = "certificate.json"
FORMAT = 1

PUBLIC = {
    "labels.json": "the label set, declared public by the data owner (the classes a corpus is conditioned on)",
    "config.yaml": ("the job config without local paths: the owner's choices, plus what a run planned from released "
                    "facts only (lengths and, with steps: auto, steps and corpus and evaluation sizes: from the DP "
                    "length histogram and a probe of dummy tokens)"),
}
"""The only files a job may declare public, and why they are."""


class ReleaseError(UserError):
    pass


@dataclass(frozen=True)
class Provenance:
    """Why one released file may leave the owner."""

    kind: Literal["mechanism", "post-processing", "certificate", "public"]
    source: tuple[str, ...]
    """mechanism: the charged mechanism's name; post-processing: the released files it was computed from only;
    certificate / public: empty."""

    def why(self, name: str) -> str:
        if self.kind == "mechanism":
            return f"output of the charged mechanism {self.source[0]} (see the certificate)"
        if self.kind == "post-processing":
            return f"post-processing of {', '.join(self.source)} only (free under DP)"
        if self.kind == "certificate":
            return "certificate: public parameters of what ran, and digests of the released artefacts"
        return PUBLIC[name]


def mechanism(name: str) -> Provenance:
    return Provenance("mechanism", (name,))


def post_processing(*of: str) -> Provenance:
    if not of:
        raise ValueError("post-processing of what? name the released files it was computed from")
    return Provenance("post-processing", tuple(of))


def certificate() -> Provenance:
    return Provenance("certificate", ())


def public() -> Provenance:
    return Provenance("public", ())


def owner_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / OWNER


def owner_path(run_dir: str | Path, name: str) -> Path:
    """Where an owner-only file of a run lives (logs, metrics, evaluation, trials, the full config)."""
    return owner_dir(run_dir) / name


def mechanisms_of(cert) -> set[str]:
    """The charged mechanisms a certificate certifies: its generator, and each DP histogram it released."""
    names = {cert.mechanism.kind}
    if cert.label_histogram is not None:
        names.add("label_histogram")
    if cert.length_histogram is not None:
        names.add("length_histogram")
    return names


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{run_dir}: no {MANIFEST}; not a released dpsynth run (or written by an older dpsynth)")
    try:
        doc = json.loads(path.read_text())
        files = doc["files"]
    except (ValueError, KeyError, TypeError):
        raise ReleaseError(f"{path}: not a dpsynth manifest") from None
    if not isinstance(files, dict):
        raise ReleaseError(f"{path}: not a dpsynth manifest")
    return doc


class Release:
    """The shareable part of one run directory, and its manifest.

    `cert` is the run's certificate: a `mechanism(...)` provenance must name a mechanism it certifies. A Release can
    be reopened (e.g. by `dpsynth sample`, adding a corpus); `commit()` writes the manifest, then the run's
    certificate last (its presence marks a complete run).
    """

    def __init__(self, run_dir: str | Path, cert, *, certificate_name: str = CERTIFICATE) -> None:
        self.run_dir = Path(run_dir)
        self.cert = cert
        self.certificate_name = certificate_name
        self.allowed = mechanisms_of(cert)
        path = self.run_dir / MANIFEST
        self.files: dict[str, dict] = read_manifest(self.run_dir)["files"] if path.is_file() else {}
        self._pending_certificate: bytes | None = None

    # --- the shareable part ---------------------------------------------------------------------------------

    def _check(self, name: str, provenance: Provenance) -> None:
        if not isinstance(provenance, Provenance):
            raise ReleaseError(f"release: {name} has no provenance; only charged mechanisms, their post-processing "
                               "and declared-public facts leave the owner")
        if Path(name).is_absolute() or ".." in Path(name).parts or Path(name).parts[0] in (OWNER, MANIFEST):
            raise ReleaseError(f"release: {name} is not a name in the shareable part")
        if provenance.kind == "mechanism" and provenance.source[0] not in self.allowed:
            raise ReleaseError(f"release: {name} claims mechanism {provenance.source[0]}, which the certificate does "
                               f"not certify (it certifies {', '.join(sorted(self.allowed))})")
        if provenance.kind == "post-processing":
            missing = [s for s in provenance.source if s not in self.files and not self._is_released_dir(s)]
            if missing:
                raise ReleaseError(f"release: {name} is post-processing of {', '.join(missing)}, which is not released")
        if provenance.kind == "public" and name not in PUBLIC:
            raise ReleaseError(f"release: {name} is not a declared-public fact (public: {', '.join(PUBLIC)})")

    def _is_released_dir(self, name: str) -> bool:
        prefix = name.rstrip("/") + "/"
        return any(f.startswith(prefix) for f in self.files)

    def _record(self, name: str, provenance: Provenance) -> None:
        self.files[name] = {"sha256": _sha256(self.run_dir / name), "kind": provenance.kind,
                            "source": list(provenance.source), "why": provenance.why(Path(name).name)}

    def share_bytes(self, name: str, data: bytes, provenance: Provenance) -> Path:
        self._check(name, provenance)
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        self._record(name, provenance)
        return path

    def share_text(self, name: str, text: str, provenance: Provenance) -> Path:
        return self.share_bytes(name, text.encode(), provenance)

    def share_json(self, name: str, obj, provenance: Provenance) -> Path:
        return self.share_text(name, json.dumps(obj, indent=2, sort_keys=True), provenance)

    def share_dir(self, name: str, src: Path, provenance: Provenance) -> Path:
        """A whole directory (e.g. the adapter), every file of it listed with the same provenance."""
        self._check(name, provenance)
        with atomic_dir(self.run_dir / name) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        for stale in [f for f in self.files if f.startswith(name.rstrip("/") + "/")]:
            del self.files[stale]
        for f in sorted(p for p in (self.run_dir / name).rglob("*") if p.is_file()):
            self._record(str(f.relative_to(self.run_dir)), provenance)
        return self.run_dir / name

    def share_certificate(self, name: str, cert) -> Path:
        """A corpus certificate (or the run's own, through commit): public parameters and digests."""
        from dpsynth.privacy.certificate import write_certificate

        self._check(name, certificate())
        write_certificate(self.run_dir / name, cert)
        self._record(name, certificate())
        return self.run_dir / name

    # --- the owner-only part --------------------------------------------------------------------------------

    def owner_bytes(self, name: str, data: bytes) -> Path:
        path = owner_path(self.run_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return path

    def owner_text(self, name: str, text: str) -> Path:
        return self.owner_bytes(name, text.encode())

    def owner_json(self, name: str, obj) -> Path:
        return self.owner_text(name, json.dumps(obj, indent=2))

    # --- commit ---------------------------------------------------------------------------------------------

    def commit(self, *, with_certificate: bool = True) -> None:
        """Write the manifest (every shareable file and why it may leave), then the run's certificate, last."""
        body = None
        if with_certificate:  # listed with its digest now, written after the manifest: its presence marks the end
            body = (json.dumps(self.cert.to_json(), indent=2, sort_keys=True) + "\n").encode()
            self.files[self.certificate_name] = {"sha256": hashlib.sha256(body).hexdigest(), "kind": "certificate",
                                                 "source": [], "why": certificate().why(self.certificate_name)}
        doc = {"format": FORMAT, "run_id": self.cert.run_id,
               "about": "the files of this run that may leave the data owner, and why; `dpsynth export` copies "
                        "exactly these", "files": dict(sorted(self.files.items()))}
        atomic_write_bytes(self.run_dir / MANIFEST, json.dumps(doc, indent=2).encode())
        if body is not None:
            atomic_write_bytes(self.run_dir / self.certificate_name, body)


def export(run_dir: str | Path, dest: str | Path) -> list[str]:
    """Copy exactly the manifest's files (each checked against its digest) and the manifest into `dest`, atomically.
    Returns the files written. Refuses a non-empty `dest`, a missing or altered file, and an incomplete run."""
    run_dir, dest = Path(run_dir).expanduser().resolve(), Path(dest).expanduser().resolve()
    if not (run_dir / CERTIFICATE).is_file():
        raise ReleaseError(f"export: {run_dir} holds no certified run (no {CERTIFICATE})")
    files = read_manifest(run_dir)["files"]
    if CERTIFICATE not in files:
        raise ReleaseError(f"export: {run_dir / MANIFEST} does not list {CERTIFICATE}")
    if dest == run_dir or run_dir in dest.parents:
        raise ReleaseError(f"export: {dest} is inside the run directory")
    if dest.exists() and any(dest.iterdir()):
        raise ReleaseError(f"export: {dest} is not empty")
    cert = read_certificate(run_dir / CERTIFICATE)
    allowed = mechanisms_of(cert)
    for name, entry in files.items():
        # The manifest is a file on disk: check every entry as the Release checked it when it was written.
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts or parts[0] in (OWNER, ".checkpoints", MANIFEST):
            raise ReleaseError(f"export: the manifest lists {name!r}, which is not in the shareable part")
        kind, source = entry.get("kind"), entry.get("source") or []
        if (kind == "mechanism" and (not source or source[0] not in allowed)) or \
                (kind == "public" and Path(name).name not in PUBLIC) or \
                kind not in ("mechanism", "post-processing", "certificate", "public"):
            raise ReleaseError(f"export: the manifest's provenance of {name} ({kind} {source}) is not one the "
                               "certificate backs")
        src = run_dir / name
        if src.is_symlink() or any(p.is_symlink() for p in src.parents if run_dir in p.parents or p == run_dir) \
                or run_dir not in src.resolve().parents:
            raise ReleaseError(f"export: {name} is a link or leads outside the run directory")
        if not src.is_file():
            raise ReleaseError(f"export: {name} is listed in the manifest but missing from {run_dir}")
        if _sha256(src) != entry["sha256"]:
            raise ReleaseError(f"export: {name} changed since it was released (sha256 differs from the manifest)")
    with atomic_dir(dest) as tmp:
        for name in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / name, tmp / name)
        shutil.copy2(run_dir / MANIFEST, tmp / MANIFEST)
    return sorted([*files, MANIFEST])


# --- the config without local paths ----------------------------------------------------------------------------

def shareable_config(cfg) -> str:
    """The job config as YAML with every local path taken out: the owner's data file keeps only its file name (the
    dataset name is in the certificate anyway), the ledger, output and storage locations are dropped to defaults."""
    import yaml

    from dpsynth.data import BUNDLED

    doc = cfg.model_dump(mode="json")
    source = doc["data"]["source"]
    if source not in BUNDLED:
        doc["data"]["source"] = Path(source).name
    base = doc["model"]["base"]
    if "/" in base and Path(base).expanduser().exists():  # a local model directory: its name only
        doc["model"]["base"] = Path(base).name
    doc["privacy"]["ledger"] = "~/.dpsynth/ledger.sqlite"
    doc["scaling"]["storage_path"] = None
    doc["scaling"]["address"] = None
    doc["output_dir"] = "."
    return yaml.safe_dump(doc, sort_keys=False)
