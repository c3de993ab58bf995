"""App builder: `serve run serve/config.yaml`, `serve run serve.app:build_app adapters=...`, or `dpsynth serve`.

build_app(args) validates the args (dpsynth.config.ServeConfig), refuses adapters whose
certificate is not in the privacy ledger, and wires Gateway (HTTP) -> Sampler (engine).

The ledger is the server's own (`ledger` in the args, else DPSYNTH_LEDGER, else ~/.dpsynth/ledger.sqlite), resolved
once here and handed to every replica; never the ledger a run directory's config names.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import ValidationError

from dpsynth.config import ServeConfig, describe_validation_error
from dpsynth.errors import UserError
from dpsynth.sample.adapters import load_certified, server_ledger

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
    """The serve config, its ledger resolved to the server's own (see the module docstring)."""
    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, "serve config")) from None
    return cfg.model_copy(update={"ledger": server_ledger(cfg.ledger)})


def auth_on(cfg: ServeConfig) -> bool:
    """On when asked, and by default whenever the server is reachable from another machine."""
    on = cfg.auth == "on" or (cfg.auth == "auto" and not is_loopback(cfg.host))
    if on and not cfg.token:
        raise UserError(f"serve: bearer-token auth is on (host {cfg.host}); set DPSYNTH_SERVE_TOKEN "
                        "(or auth: off to serve without it)")
    return on


def adapter_specs(cfg: ServeConfig) -> tuple[list[tuple[str, str]], ServeConfig]:
    """(name, absolute run dir) per adapter, each certified in the ledger; and the config with `auto` lengths set
    from the runs (their max_length + max_new_tokens: long documents fit the engine's context)."""
    specs, longest, new_tokens = [], 0, 0
    for item in cfg.adapters:
        name, _, path = item.rpartition("=") if "=" in item else (None, "", item)
        adapter = load_certified(Path(path), name or None, cfg.ledger)
        specs.append((adapter.name, str(adapter.run_dir)))
        max_length = adapter.model.max_length if isinstance(adapter.model.max_length, int) else 64
        # a record of k text fields is written field by field, each up to max_new_tokens (dpsynth.sample.fields)
        fields = len(adapter.schema.text_columns)
        longest, new_tokens = max(longest, max_length + fields * adapter.max_new_tokens), max(new_tokens, adapter.max_new_tokens)
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"adapters: names must be unique, got {names} (use name=path)")
    if cfg.merged and len(specs) != 1:
        raise UserError(f"merged: the merged-weights mode serves exactly one adapter, not {len(specs)}")
    limits = cfg.limits.model_copy(update={"max_tokens": max(256, new_tokens)}) if cfg.limits.max_tokens == "auto" else cfg.limits
    return specs, cfg.model_copy(update={"limits": limits, "max_model_len": max(128, longest + 16)
                                         if cfg.max_model_len == "auto" else cfg.max_model_len})


def build_app(args: dict):
    specs, cfg = adapter_specs(parse_config(args))
    on = auth_on(cfg)
    options = {"merged": cfg.merged, "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
               "enforce_eager": cfg.enforce_eager}
    sampler = Sampler.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
                            "initial_replicas": cfg.min_replicas, "target_ongoing_requests": cfg.target_ongoing_requests},
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    ).bind(specs, str(cfg.ledger), cfg.engine, options)
    gateway_cfg = {**cfg.model_dump(mode="json"), "_adapters": specs, "_auth_on": on}
    return Gateway.options(max_ongoing_requests=cfg.limits.max_concurrent_requests + 32).bind(sampler, gateway_cfg)
