"""`dpsynth` command line: train, sample, evaluate, run (all three), config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from dpsynth.config import JobConfig, load_config
from dpsynth.errors import UserError
from dpsynth.privacy import BudgetExceeded

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Differentially private synthetic text: DP-LoRA fine-tune, sample, evaluate.")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML job config (default: bundled defaults).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key, e.g. training.epochs=2 (repeatable).")]
OutOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (overrides output_dir).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
RunArg = Annotated[Path, typer.Argument(help="A run directory written by `dpsynth train`.")]


def _config(config: Path | None, overrides: list[str] | None, output: Path | None) -> JobConfig:
    sets = list(overrides or [])
    if output is not None:
        sets.append(f"output_dir={output}")
    return load_config(config, sets)


def _log_to(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "dpsynth.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def _summary(run_dir: Path, evaluation: dict | None = None) -> None:
    from dpsynth.privacy.certificate import read_certificate

    cert = read_certificate(run_dir / "certificate.json")
    table = Table(title=f"dpsynth run {run_dir}", show_header=False)
    table.add_row("epsilon spent", f"{cert['epsilon']:.4f}  ({cert['accountant']} accountant)")
    table.add_row("delta", f"{cert['delta']:.3g}")
    table.add_row("mechanism", f"{cert['steps']} steps, q={cert['sampling_rate']:.5f}, sigma={cert['noise_multiplier']:.4f}, C={cert['max_grad_norm']}")
    table.add_row("certificate", str(run_dir / "certificate.json"))
    table.add_row("adapter", str(run_dir / "adapter"))
    for fmt in ("jsonl", "csv"):
        if (run_dir / f"synthetic.{fmt}").exists():
            table.add_row("synthetic corpus", str(run_dir / f"synthetic.{fmt}"))
    if evaluation:
        for src in ("real", "synthetic"):
            m = evaluation[src]
            table.add_row(f"test accuracy, trained on {src}", f"{m['accuracy']:.3f}  (macro-F1 {m['macro_f1']:.3f})")
    Console().print(table)


@app.command()
def train(config: ConfigOpt = None, set_: SetOpt = None, output: OutOpt = None, quiet: QuietOpt = False) -> None:
    """DP-LoRA fine-tune the base model on the train split; write adapter + certificate."""
    from dpsynth.train.driver import train as run_training

    cfg = _config(config, set_, output)
    _log_to(cfg.output_dir)
    _summary(run_training(cfg, show_progress=not quiet))


@app.command()
def sample(run_dir: RunArg, num_examples: Annotated[Optional[int], typer.Option("--num-examples", "-n")] = None,
           set_: SetOpt = None, quiet: QuietOpt = False) -> None:
    """Sample a labelled synthetic corpus from a certified run (spends no privacy)."""
    from dpsynth.sample import load_run_config
    from dpsynth.sample import sample as run_sampling

    sets = [s if s.startswith("sampling.") else f"sampling.{s}" for s in (set_ or [])]
    if num_examples is not None:
        sets.append(f"sampling.num_examples={num_examples}")
    base = load_run_config(run_dir).model_dump(mode="json")
    params = load_config(None, sets, base=base).sampling
    _log_to(run_dir)
    path = run_sampling(run_dir, params, show_progress=not quiet)
    console.print(f"wrote {path}")


@app.command()
def evaluate(run_dir: RunArg) -> None:
    """Classifier trained on real vs synthetic data, tested on the real test split."""
    from dpsynth.evaluate import evaluate as run_evaluation

    _summary(run_dir, run_evaluation(run_dir))


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None, output: OutOpt = None, quiet: QuietOpt = False) -> None:
    """train + sample + evaluate, then print a summary."""
    from dpsynth.evaluate import evaluate as run_evaluation
    from dpsynth.sample import sample as run_sampling
    from dpsynth.train.driver import train as run_training

    cfg = _config(config, set_, output)
    _log_to(cfg.output_dir)
    run_dir = run_training(cfg, show_progress=not quiet)
    run_sampling(run_dir, cfg.sampling, show_progress=not quiet)
    _summary(run_dir, run_evaluation(run_dir))


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the full job config (defaults merged with your file and overrides) as YAML."""
    print(_config(config, set_, None).to_yaml(), end="")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = app(args=argv, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except (UserError, BudgetExceeded) as e:
        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
