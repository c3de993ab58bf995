"""`dpsynth serve`: start the Serve application on an embedded (local) Ray, or the cluster in RAY_ADDRESS.

The application (serve/app.py's build_app) is handed in by the caller (the CLI): dpsynth itself never imports
serve/, by name or by import path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from dpsynth.config import ServeConfig, describe_validation_error
from dpsynth.errors import UserError

log = logging.getLogger(__name__)


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
        raise UserError(describe_validation_error(e, "serve config")) from None


def start(cfg: ServeConfig, build_app: Callable[[dict], object], *, name: str = "dpsynth") -> str:
    """Build (checks adapters and auth before anything starts), deploy, and return the base URL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        # "local" unless a cluster is named: never join some other Ray instance on this machine by accident.
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    application = build_app(cfg.model_dump(mode="json"))  # Ray Serve LLM's builders read the running Ray
    serve.start(http_options={"host": cfg.host, "port": cfg.port})  # Serve binds 0.0.0.0 unless told
    serve.run(application, name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"


def serve_forever(cfg: ServeConfig, build_app: Callable[[dict], object]) -> None:
    import ray
    from ray import serve

    url = start(cfg, build_app)
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
