"""The Ray Tune application of dpsynth: a thin layer over dpsynth.tuning (search space, Tuner)."""
