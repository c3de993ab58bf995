"""Ray Tune runner for dpsynth's private search: K trials of dpsynth.tuning.trial, sharing the cluster.

Random search (Optuna's RandomSampler through Ray Tune's OptunaSearch): Papernot & Steinke's
guarantee needs i.i.d. trials, so no sampler that adapts to earlier (private) scores, and FIFO
scheduling (no early stopping on private metrics).
"""

from __future__ import annotations

from typing import Callable


def run_trials(trial: Callable[[dict], dict], *, plan: dict, space: dict, num_trials: int, max_concurrent: int,
               storage: str) -> list[dict]:
    """Run `num_trials` trials; return one dict per trial: its (C, lr), score and checkpoint (None if it failed)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from dpsynth.storage import Storage

    def trainable(config: dict) -> None:
        tune.report(trial({**config, "plan": plan}))

    fs, path = Storage(storage).filesystem()  # a path or an s3:// / gs:// URI (with its endpoint options)
    param_space = {name: tune.loguniform(lo, hi) if lo < hi else lo for name, (lo, hi) in space.items()}
    searcher = OptunaSearch(metric="score", mode="min", sampler=optuna.samplers.RandomSampler())
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.01}),  # the trial's Ray Train workers reserve the real CPUs/GPUs
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_trials, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name="search", storage_path=path, storage_filesystem=fs, verbose=0),
    )
    grid = tuner.fit()
    out = []
    for result in grid:
        cfg = result.config or {}
        metrics = result.metrics or {}
        out.append({"max_grad_norm": cfg.get("max_grad_norm"), "learning_rate": cfg.get("learning_rate"),
                    "score": metrics.get("score") if result.error is None else None,
                    "checkpoint": metrics.get("checkpoint")})
    return out
