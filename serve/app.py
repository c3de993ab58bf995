"""App builder: `serve run serve/config.yaml`, `serve run serve.app:build_app adapters=...`, or `dpsynth serve`.

build_app(args) validates the args (dpsynth.config.ServeConfig), refuses adapters whose
certificate is not in the privacy ledger, and wires Gateway (HTTP) -> Sampler (engine).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import ValidationError

from dpsynth.config import ServeConfig
from dpsynth.errors import UserError
from dpsynth.sample.adapters import load_certified

from .gateway import Gateway
from .sampler import Sampler


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_config(args: dict) -> ServeConfig:
    try:
        return ServeConfig.model_validate(args)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise UserError(f"serve config: {where}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}") from None


def auth_on(cfg: ServeConfig) -> bool:
    """On when asked, and by default whenever the server is reachable from another machine."""
    on = cfg.auth == "on" or (cfg.auth == "auto" and not is_loopback(cfg.host))
    if on and not cfg.token:
        raise UserError(f"serve: bearer-token auth is on (host {cfg.host}); set DPSYNTH_SERVE_TOKEN "
                        "(or auth: off to serve without it)")
    return on


def adapter_specs(cfg: ServeConfig) -> list[tuple[str, str]]:
    """(name, absolute run dir) per adapter; each must be certified in the ledger."""
    specs = []
    for item in cfg.adapters:
        name, _, path = item.rpartition("=") if "=" in item else (None, "", item)
        adapter = load_certified(Path(path), name or None, cfg.ledger)
        specs.append((adapter.name, str(adapter.run_dir)))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"adapters: names must be unique, got {names} (use name=path)")
    if cfg.merged and len(specs) != 1:
        raise UserError(f"merged: the merged-weights mode serves exactly one adapter, not {len(specs)}")
    return specs


def build_app(args: dict):
    cfg = parse_config(args)
    specs, on = adapter_specs(cfg), auth_on(cfg)
    options = {"merged": cfg.merged, "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
               "enforce_eager": cfg.enforce_eager}
    sampler = Sampler.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
                            "initial_replicas": cfg.min_replicas, "target_ongoing_requests": cfg.target_ongoing_requests},
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    ).bind(specs, None if cfg.ledger is None else str(cfg.ledger), cfg.engine, options)
    gateway_cfg = {**cfg.model_dump(mode="json"), "_adapters": specs, "_auth_on": on}
    return Gateway.options(max_ongoing_requests=cfg.limits.max_concurrent_requests + 32).bind(sampler, gateway_cfg)
