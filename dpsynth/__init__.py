"""dpsynth: differentially private synthetic text.

data -> train (charges the ledger) -> adapter + certificate -> sample (free) -> evaluate.
"""

__version__ = "0.1.0"

from dpsynth.config import JobConfig, load_config  # noqa: E402
from dpsynth.errors import UserError  # noqa: E402


def train(cfg: JobConfig, **kw):
    """DP-LoRA fine-tune; returns the run directory holding adapter/ and certificate.json."""
    from dpsynth.train.driver import train as _train

    return _train(cfg, **kw)


def sample(run_dir, params=None, **kw):
    """Sample a synthetic corpus from a certified run; returns the corpus path."""
    from dpsynth.sample import sample as _sample

    return _sample(run_dir, params, **kw)


def evaluate(run_dir):
    """Real-vs-synthetic classifier comparison on the real test split."""
    from dpsynth.evaluate import evaluate as _evaluate

    return _evaluate(run_dir)


__all__ = ["JobConfig", "load_config", "UserError", "train", "sample", "evaluate", "__version__"]
