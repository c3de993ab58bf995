"""What one DP-LoRA run will release, planned before anything runs: the DP-SGD schedule (q and steps from the one
schedule), the DP histograms of the data (label mix, lengths), and the noise, calibrated together to
privacy.epsilon by the one calibrator. No Ray, no Opacus: the bare-GPU benchmarks plan with it too."""

from __future__ import annotations

from dataclasses import dataclass

from dpsynth.config import JobConfig
from dpsynth.data_releases import DataReleases, plan_releases
from dpsynth.errors import UserError
from dpsynth.privacy import SampledGaussian
from dpsynth.privacy.calibration import CalibrationError, calibrate
from dpsynth.privacy.run import Plan
from dpsynth.privacy.sampling import Schedule, schedule


@dataclass(frozen=True)
class TrainingPlan:
    """What one DP-LoRA run will release: its DP-SGD schedule and noise, and the DP histograms of the data."""

    plan: Plan
    sigma: float
    schedule: Schedule
    releases: DataReleases


def plan_training(cfg: JobConfig, train_units: int, delta: float, steps: int | None = None,
                  releases: DataReleases | None = None) -> TrainingPlan:
    """The DP-SGD steps (q and step count from the one schedule) and the data's histograms, calibrated together to
    privacy.epsilon with the one calibrator (or a fixed training.noise_multiplier, still refused if it overspends)."""
    t, acc, target = cfg.training, cfg.privacy.accountant, cfg.privacy.epsilon
    if steps is None and t.steps != "auto":
        steps = t.steps
    sched = schedule(train_units, t.batch_size, epochs=t.epochs, steps=steps)  # `auto` unresolved: by epochs
    releases = releases or plan_releases(cfg, delta, acc)  # given: what the run already admitted (auto steps)
    prior = releases.events

    def events_for(sigma: float):
        return (*prior, SampledGaussian(sigma, sched.q, sched.steps))

    if t.noise_multiplier is None:
        try:
            sigma = calibrate(events_for, target, delta, accountant=acc)
        except CalibrationError as e:
            raise UserError(f"privacy.epsilon: {e}") from None
    else:
        sigma = t.noise_multiplier
        if sigma <= 0:
            raise UserError("training.noise_multiplier: must be > 0 (sigma = 0 is not private)")
    plan = Plan(events_for(sigma), acc, delta)
    if plan.epsilon > target:
        raise UserError(f"training.noise_multiplier: sigma={sigma} spends eps={plan.epsilon:.3f} over {sched.steps} steps, "
                        f"above privacy.epsilon={target}")
    return TrainingPlan(plan, sigma, sched, releases)


