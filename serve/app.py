"""App builder: `serve run serve/config.yaml`, `serve run serve.app:build_app adapters=...`, or `dpsynth serve`.

build_app(args) validates the args (dpsynth.config.ServeConfig), refuses adapters whose certificate is not in the
privacy ledger, and wires Ray Serve LLM: our Ingress (OpenAiIngress + /v1/corpus) -> one LLM deployment per run
(merged into its base), or per base model serving its runs as LoRA adapters from `lora_store` (serve/lora.py).

The ledger is the server's own (`ledger` in the args, else DPSYNTH_LEDGER, else ~/.dpsynth/ledger.sqlite), resolved
once here and handed to every replica; never the ledger a run directory's config names.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

from pydantic import ValidationError

from dpsynth.config import ServeConfig, describe_validation_error, merge_trees
from dpsynth.errors import UserError
from dpsynth.sample import with_base
from dpsynth.sample.adapters import load_certified, same_base, server_ledger


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


def certified_adapters(cfg: ServeConfig) -> tuple[dict, ServeConfig]:
    """{name: CertifiedAdapter}, each checked against the ledger, and the config with `auto` lengths set from the runs
    (their max_length + max_new_tokens: long documents fit the engine's context)."""
    loaded, longest, new_tokens = [], 0, 0
    for item in cfg.adapters:
        name, _, path = item.rpartition("=") if "=" in item else (None, "", item)
        adapter = load_certified(Path(path), name or None, cfg.ledger)
        loaded.append(adapter)
        max_length = adapter.model.max_length if isinstance(adapter.model.max_length, int) else 64
        # a record of k text fields is written field by field, each up to max_new_tokens (dpsynth.sample.fields)
        fields = len(adapter.schema.text_columns)
        longest, new_tokens = max(longest, max_length + fields * adapter.max_new_tokens), max(new_tokens, adapter.max_new_tokens)
    names = [a.name for a in loaded]
    if len(set(names)) != len(names):
        raise UserError(f"adapters: names must be unique, got {names} (use name=path)")
    model = same_base(loaded)  # one base: the ingress tokenizes every prompt with its tokenizer
    # the base a run's config.yaml names must be the certified one (the config is not pinned by the certificate)
    with_base(model, model.base, loaded[0].certificate, key=f"{loaded[0].run_dir}/config.yaml model.base")
    if cfg.merged and len(loaded) != 1:
        raise UserError(f"merged: the merged-weights mode serves exactly one adapter, not {len(loaded)}")
    limits = cfg.limits.model_copy(update={"max_tokens": max(256, new_tokens)}) if cfg.limits.max_tokens == "auto" else cfg.limits
    return {a.name: a for a in loaded}, cfg.model_copy(update={"limits": limits, "max_model_len": max(128, longest + 16)
                                         if cfg.max_model_len == "auto" else cfg.max_model_len})


def autoscaling(cfg: ServeConfig) -> dict:
    """Ray Serve autoscaling of each engine deployment."""
    return {"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
            "initial_replicas": cfg.min_replicas, "target_ongoing_requests": cfg.target_ongoing_requests}


def llm_config(model_id: str, model_dir: str, adapters: list, cfg: ServeConfig, lora: dict | None = None):
    """Ray Serve LLM's `LLMConfig` for one engine deployment: a run merged into its base weights (`lora` None), or a
    base model serving `adapters` as LoRA from the store (`lora`: {"store": URI, "adapters": {suffix: pins}}).
    `cfg.llm_config` is merged over it, key by key, except for what decides which weights load."""
    from ray.serve.llm import LLMConfig

    from dpsynth.sample.batch import ENGINE_ENV
    from dpsynth.sample.engines import vllm_engine_kwargs

    from .lora import CERTIFIED, ray_path

    if cfg.cpus_per_replica <= 0 and cfg.gpus_per_replica <= 0:
        raise UserError("cpus_per_replica: the vllm engine needs some CPU or GPU per replica (cpus_per_replica > 0)")
    engine = vllm_engine_kwargs(model_dir, dtype=adapters[0].model.dtype, lora_ranks=[a.rank for a in adapters] if lora else None,
                                max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs, enforce_eager=cfg.enforce_eager)
    del engine["model"]  # Ray sets it from model_source
    # generation_config "vllm": no sampling defaults read from the model's files; every request says what it samples.
    engine.update(disable_log_stats=False, generation_config="vllm")
    bundle = {"CPU": cfg.cpus_per_replica, "GPU": cfg.gpus_per_replica}
    base = {
        "model_loading_config": {"model_id": model_id, "model_source": model_dir},
        "placement_group_config": {"bundle_per_worker": bundle},  # without it the replica asks for a GPU
        "engine_kwargs": engine,
        "runtime_env": {"env_vars": dict(ENGINE_ENV)},
        "log_engine_metrics": True,
        "deployment_config": {
            "autoscaling_config": autoscaling(cfg),
            "ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 10, "graceful_shutdown_timeout_s": 5},
    }
    if lora:
        base["lora_config"] = {"dynamic_lora_loading_path": ray_path(lora["store"]),
                               "max_num_adapters_per_replica": len(lora["adapters"])}
        base["experimental_configs"] = {CERTIFIED: lora}
    for path in (("model_loading_config",), ("lora_config", "dynamic_lora_loading_path"), ("experimental_configs", CERTIFIED)):
        node = cfg.llm_config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:  # what a replica loads is decided by the certified runs, never by the config
            raise UserError(f"llm_config.{'.'.join(path)}: set by dpsynth from the certified runs; remove it")
    try:
        return LLMConfig.model_validate(merge_trees(base, cfg.llm_config))
    except ValidationError as e:
        raise UserError(describe_validation_error(e, "llm_config")) from None


def vllm_deployments(adapters: dict, cfg: ServeConfig) -> tuple[dict, dict[str, str]]:
    """({engine model id: LLM deployment}, {run name: the model id it is asked for by}). Local runs: one merged model
    per run. `lora_store`: the certified adapters are published there and the base is one deployment serving each
    run as `<base id>:<name>-<sha12>` (Ray Serve LLM multi-LoRA), loaded only through CertifiedLoraLoader."""
    from ray.serve.llm import build_llm_deployment

    from dpsynth.models import cache_dir, resolve_base
    from dpsynth.sample.adapters import merged_model_dir

    from .lora import CertifiedLoraLoader, LoraVLLMEngine, publish, ray_path

    if cfg.lora_store is None:
        deployments = {name: build_llm_deployment(llm_config(name, str(merged_model_dir(a, cache_dir())), [a], cfg))
                       for name, a in adapters.items()}
        return deployments, {name: name for name in adapters}
    ray_path(cfg.lora_store)  # refused before anything is published
    runs = list(adapters.values())  # one base (certified_adapters)
    pins = dict(publish(a, cfg.lora_store) for a in runs)
    base = runs[0].certificate.base_model
    base_id = f"base-{(base.sha256 or hashlib.sha256(base.name.encode()).hexdigest())[:16]}"
    lora = {"store": cfg.lora_store, "adapters": pins}
    c = llm_config(base_id, str(resolve_base(runs[0].model.base)), runs, cfg, lora=lora)
    deployment = build_llm_deployment(c, bind_kwargs={"model_downloader": CertifiedLoraLoader, "engine_cls": LoraVLLMEngine})
    return {base_id: deployment}, {a.name: f"{base_id}:{suffix}" for a, suffix in zip(runs, pins)}


def build_app(args: dict):
    """Ingress -> one LLM deployment per served run: Ray's LLMServer (vllm) or TransformersServer (transformers)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard  # not re-exported by ray.serve.llm

    from .ingress import Ingress
    from .transformers_server import TransformersServer

    adapters, cfg = certified_adapters(parse_config(args))
    on = auth_on(cfg)
    specs = [(name, str(a.run_dir)) for name, a in adapters.items()]
    if cfg.engine == "vllm":
        deployments, routes = vllm_deployments(adapters, cfg)
    else:
        server = TransformersServer.options(
            autoscaling_config=autoscaling(cfg),
            ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        ).bind(specs, str(cfg.ledger), cfg.merged, cfg.max_num_seqs)
        deployments = dict.fromkeys(adapters, server)  # one engine holds every adapter (LoRA switched per batch)
        routes = {name: name for name in adapters}
    # Ray's ingress wants a card per deployment; /v1/models is ours (one entry per certified run)
    cards = {model_id: ModelCard(id=model_id, object="model", owned_by="dpsynth", permission=[], metadata={})
             for model_id in deployments}
    ingress_cfg = {**cfg.model_dump(mode="json"), "_adapters": specs, "_routes": routes, "_auth_on": on}
    # CPU generation can take longer than Ray's 600 s router timeout for one request.
    env = {"RAY_SERVE_LLM_ROUTER_HTTP_TIMEOUT": str(int(cfg.retry_timeout_s + 3600))}
    return serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=cfg.limits.max_concurrent_requests + 32,
                            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}).bind(deployments, cards, ingress_cfg)
