"""Multi-LoRA serving from an object store (`lora_store`): publish certified adapters, load only those.

Ray Serve LLM serves a LoRA adapter asked for as `<base model id>:<suffix>` by downloading everything under
`<dynamic_lora_loading_path>/<suffix>/` into a node-wide cache keyed by the suffix, then loading it into vLLM. So:
- `publish` writes exactly the two files a certificate covers (the LoRA weights it pins by sha256, and their config)
  under `<name>-<sha256[:12]>/`: a changed adapter is a new suffix, never a stale cache entry;
- `CertifiedLoraLoader` (the replica's downloader) loads only the suffixes the builder certified, and re-hashes what
  arrived before vLLM sees it: the object store is shared storage, not part of the certificate;
- `LoraVLLMEngine` loads one adapter into vLLM at a time: Ray's engine checks "loaded?" and then awaits the load, so
  the first concurrent requests for an adapter on a fresh replica (after a restart, say) failed with vLLM's "has
  already been loaded".
The ingress asks for these ids itself and never lists the bucket (no `lora_paths`), so only certified runs are served.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from dpsynth.errors import UserError
from dpsynth.storage import Storage

FILES = ("adapter_model.safetensors", "adapter_config.json")  # the weights first: Ray 404s until the config exists
CERTIFIED = "dpsynth_certified_adapters"
"""LLMConfig.experimental_configs key: {suffix: {file: sha256}} of the adapters a replica may load."""


def suffix(adapter) -> str:
    return f"{adapter.name}-{adapter.certificate.artefacts['adapter'][:12]}"


def digests(adapter_dir: Path) -> dict[str, str]:
    return {f: hashlib.sha256((Path(adapter_dir) / f).read_bytes()).hexdigest() for f in FILES}


def publish(adapter, store: str) -> tuple[str, dict[str, str]]:
    """Write one certified adapter's files to the store; (its suffix, their sha256). Rewritten on every start, so a
    tampered copy is repaired rather than trusted."""
    if "adapter" not in adapter.certificate.artefacts:
        raise UserError(f"{adapter.run_dir}: its certificate pins no adapter weights; it cannot be served from lora_store")
    name = suffix(adapter)
    target = Storage(store).child(name)
    for f in FILES:
        target.write_bytes(f, (adapter.adapter_dir / f).read_bytes())
    return name, digests(adapter.adapter_dir)


def ray_location(store: str) -> tuple[str, dict[str, str]]:
    """(the store as Ray's loader names it, the environment its S3 client needs): Ray reads no URI options, so
    dpsynth's ?endpoint_override=&scheme=&region= become the AWS SDK's variables in the replicas."""
    parts = urlsplit(store)
    options = dict(parse_qsl(parts.query))
    env = {}
    if parts.scheme == "s3":
        if "endpoint_override" in options:
            env["AWS_ENDPOINT_URL_S3"] = f"{options.pop('scheme', 'https')}://{options.pop('endpoint_override')}"
        if "region" in options:
            env["AWS_DEFAULT_REGION"] = options.pop("region")
    if options:
        raise UserError(f"lora_store: option(s) {', '.join(sorted(options))} are not understood by Ray's adapter "
                        "loader; set them in the replicas' environment instead")
    scheme = "gs" if parts.scheme == "gcs" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", "")), env


class CertifiedLoraLoader(LoraModelLoader):
    """Ray's LoRA downloader, limited to the certified adapters and checking their bytes after download."""

    async def load_model_from_config(self, lora_model_id: str, llm_config):
        allowed = llm_config.experimental_configs.get(CERTIFIED, {})
        name = lora_model_id.partition(":")[2]
        if name not in allowed:
            raise ValueError(f"adapter {lora_model_id!r} is not one this server certified")
        disk = await super().load_model_from_config(lora_model_id, llm_config)
        try:
            got = digests(Path(disk.local_path))
        except FileNotFoundError:  # Ray's download logs a failed file and goes on
            got = {}
        if got != allowed[name]:
            self.disk_cache.pop(lora_model_id, None)
            shutil.rmtree(disk.local_path, ignore_errors=True)
            raise ValueError(f"adapter {lora_model_id!r}: the files in the store do not match its certificate "
                             "(sha256 differs); refusing to load them")
        return disk


class LoraVLLMEngine(VLLMEngine):
    """Ray's vLLM engine with adapter loading serialised (see the module docstring)."""

    async def resolve_lora(self, disk_lora_model) -> None:
        if not hasattr(self, "_lora_lock"):
            self._lora_lock = asyncio.Lock()  # made on the replica's event loop
        async with self._lora_lock:
            await super().resolve_lora(disk_lora_model)  # returns at once when it is loaded
