"""Multi-LoRA serving from an object store (`lora_store`): publish certified adapters, load only those.

Ray Serve LLM serves a LoRA adapter asked for as `<base model id>:<suffix>` through the replica's downloader and
then loads the local copy into vLLM. dpsynth replaces both ends of that path:
- `publish` writes exactly the two files of a certified adapter under `<name>-<sha256[:12]>/`: the LoRA weights, whose
  bytes must be the ones the certificate pins, and their config, which must name the certificate's base model only
  (no local path). The pins (the certificate's digest, the config's) go to the replicas in the LLMConfig.
- `CertifiedLoraLoader` (the replica's downloader) loads only pinned suffixes. It never syncs a folder (Ray's would
  copy every object under the prefix, with keys that can climb out of its cache): it reads the two objects, checks
  them in memory against the pins, and writes them to a private directory named by their digests, which is what
  vLLM loads. Nothing that failed a check is written, and nothing another server or replica wrote is trusted.
- `LoraVLLMEngine` loads one adapter into vLLM at a time: Ray's engine checks "loaded?" and then awaits the load, so
  the first concurrent requests for an adapter on a fresh replica (after a restart, say) failed with vLLM's "has
  already been loaded".
The ingress asks for these ids itself and never lists the bucket (no `lora_paths`), so only certified runs are served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from dpsynth.errors import UserError
from dpsynth.storage import Storage

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
CERTIFIED = "dpsynth_certified_adapters"
"""LLMConfig.experimental_configs key: {"store": the lora_store URI, "adapters": {suffix: {file: sha256}}}."""
SECRET_OPTIONS = ("access_key", "secret_key", "session_token")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(adapter, store: str) -> tuple[str, dict[str, str]]:
    """Write one certified adapter's two files to the store; (its suffix, their sha256). Each file is read once, and
    what is checked is what is uploaded. Rewritten on every start, so a tampered copy is repaired, never trusted."""
    pinned = adapter.certificate.artefacts.get("adapter")
    if pinned is None:
        raise UserError(f"{adapter.run_dir}: its certificate pins no adapter weights; it cannot be served from lora_store")
    weights, config = (adapter.adapter_dir / WEIGHTS).read_bytes(), (adapter.adapter_dir / CONFIG).read_bytes()
    if _sha(weights) != pinned:
        raise UserError(f"{adapter.run_dir}: adapter/ does not match its certificate (sha256 differs); refusing to serve it")
    doc = json.loads(config)
    if doc.get("base_model_name_or_path") != adapter.certificate.base_model.name or int(doc.get("r", -1)) != adapter.rank:
        raise UserError(f"{adapter.run_dir}: adapter/{CONFIG} does not describe the certified adapter (base model "
                        f"'{adapter.certificate.base_model.name}', rank {adapter.rank}); refusing to publish it")
    name = f"{adapter.name}-{pinned[:12]}"
    target = Storage(store).child(name)
    target.write_bytes(WEIGHTS, weights)  # the weights first: the config is what marks an adapter as present
    target.write_bytes(CONFIG, config)
    return name, {WEIGHTS: pinned, CONFIG: _sha(config)}


def ray_path(store: str) -> str:
    """The store as Ray's LoRA config names it (s3:// or gs://, no query). Credentials belong in the environment."""
    parts = urlsplit(store)
    secrets = [k for k, _ in parse_qsl(parts.query) if k in SECRET_OPTIONS]
    if secrets:
        raise UserError(f"lora_store: put {', '.join(secrets)} in the environment (AWS_* variables), not in the URI: "
                        "the URI travels in the replicas' config")
    scheme = "gs" if parts.scheme == "gcs" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def fetch_verified(store: str, suffix: str, pins: dict[str, str], root: str) -> str:
    """The two pinned files of `suffix`, read from the store, checked in memory, and written to a private directory
    named by their digests (the directory vLLM loads); an existing one is used only if its files still match."""
    target = Path(root) / "dpsynth" / "-".join(pins[f] for f in (WEIGHTS, CONFIG))
    if all((target / f).is_file() and _sha((target / f).read_bytes()) == pins[f] for f in pins):
        return str(target)
    source = Storage(store).child(suffix)
    files = {f: source.read_bytes(f) for f in (WEIGHTS, CONFIG)}
    for f, data in files.items():
        if data is None or _sha(data) != pins[f]:
            raise ValueError(f"adapter {suffix!r}: {f} in the store is {'missing' if data is None else 'not the certified file'} "
                             "(sha256 differs); refusing to load it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    for f, data in files.items():
        (tmp / f).write_bytes(data)
    try:
        os.replace(tmp, target)  # whole or not at all; a concurrent replica wrote the same bytes
    except OSError:
        for f in files:
            (tmp / f).unlink(missing_ok=True)
        tmp.rmdir()
        if not all(_sha((target / f).read_bytes()) == pins[f] for f in pins):
            raise ValueError(f"adapter {suffix!r}: {target} holds other files; refusing to load it") from None
    return str(target)


class CertifiedLoraLoader(LoraModelLoader):
    """The replica's LoRA downloader: only pinned adapters, fetched file by file and verified (module docstring)."""

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        certified = llm_config.experimental_configs.get(CERTIFIED, {})
        suffix = lora_model_id.partition(":")[2]
        pins = certified.get("adapters", {}).get(suffix)
        if pins is None:
            raise ValueError(f"adapter {lora_model_id!r} is not one this server certified")
        if lora_model_id not in self.disk_cache:
            path = await asyncio.to_thread(fetch_verified, certified["store"], suffix, pins, self.lora_root)
            self.disk_cache[lora_model_id] = DiskMultiplexConfig(
                model_id=lora_model_id, max_total_tokens=None, local_path=path, lora_assigned_int_id=global_id_manager.next())
        return self.disk_cache[lora_model_id]


class LoraVLLMEngine(VLLMEngine):
    """Ray's vLLM engine with each adapter's load into vLLM done once (see the module docstring)."""

    async def resolve_lora(self, disk_lora_model) -> None:
        locks = self.__dict__.setdefault("_lora_locks", {})  # made on the replica's event loop
        async with locks.setdefault(disk_lora_model.model_id, asyncio.Lock()):
            await super().resolve_lora(disk_lora_model)  # returns at once when it is loaded
