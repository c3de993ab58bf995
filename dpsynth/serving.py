"""`dpsynth serve`: start the Serve application on an embedded (local) Ray, or the cluster in RAY_ADDRESS.

The application lives in serve/ and is named by import path, as `serve run` names it:
dpsynth itself never imports serve/.
"""

from __future__ import annotations

import importlib
import logging
import os
import time

from dpsynth.config import ServeConfig
from dpsynth.errors import UserError

log = logging.getLogger(__name__)
APP = "serve.app:build_app"


def serve_config(adapters: list[str], overrides: list[str] | None = None, **options) -> ServeConfig:
    """ServeConfig from CLI arguments: options given (not None) plus `key=value` / `limits.key=value` overrides."""
    import yaml
    from pydantic import ValidationError

    tree: dict = {"adapters": list(adapters), **{k: v for k, v in options.items() if v is not None}}
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"serve config: override '{item}' must look like key=value")
        *parents, leaf = key.strip().split(".")
        node = tree
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    try:
        return ServeConfig.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise UserError(f"serve config: {where}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None


def load_builder(import_path: str = APP):
    module, _, attr = import_path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"serve: cannot import the application {import_path} ({e})") from None


def start(cfg: ServeConfig, import_path: str = APP, *, name: str = "dpsynth") -> str:
    """Build (checks adapters and auth before anything starts), deploy, and return the base URL."""
    import ray
    from ray import serve

    application = load_builder(import_path)(cfg.model_dump(mode="json"))
    if not ray.is_initialized():
        # "local" unless a cluster is named: never join some other Ray instance on this machine by accident.
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})  # Serve binds 0.0.0.0 unless told
    serve.run(application, name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"


def serve_forever(cfg: ServeConfig, import_path: str = APP) -> None:
    import ray
    from ray import serve

    url = start(cfg, import_path)
    log.info("serving %d adapter(s) with the %s engine on %s", len(cfg.adapters), cfg.engine, url)
    print(f"dpsynth serving on {url}  (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
