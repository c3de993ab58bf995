"""DP-LoRA training: the per-worker step (step.py, plain torch + peft + opacus) and the run driver (driver.py)."""
