"""The house rules of the layout, checked on the source: data flows one way and the Ray layers sit on top."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _strings(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _is_module(dotted: str) -> bool:
    """Whether 'serve.app' / 'tune.search:run_trials' names a module of the layers (not a config key like serve.engine)."""
    parts = dotted.split(":")[0].split(".")
    return (ROOT.joinpath(*parts).with_suffix(".py").is_file() or ROOT.joinpath(*parts).is_dir()
            or ROOT.joinpath(*parts[:-1]).with_suffix(".py").is_file())


SOURCES = sorted((ROOT / "dpsynth").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dpsynth_never_reaches_the_ray_layers(path):
    """serve/ and tune/ are thin layers over dpsynth: no import of them, and no import-path string naming them."""
    layers = {m for m in _imports(path) if m.split(".")[0] in {"serve", "tune"}}
    assert not layers, f"{path} imports {layers}"
    paths = [s for s in _strings(path) if re.fullmatch(r"(serve|tune)(\.\w+)+(:\w+)?", s) and _is_module(s)]
    assert not paths, f"{path} names {paths}"


def test_sampling_is_post_processing_only():
    """sample/ reads a certified adapter; it never reaches into training."""
    for path in (ROOT / "dpsynth" / "sample").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("dpsynth.train") or m.startswith("dpsynth.incontext")}
        assert not bad, f"{path} imports {bad}"


def test_the_cli_finds_the_ray_layers_through_entry_points():
    from dpsynth.cli import _ray_layer
    from serve.app import build_app
    from tune.search import run_trials

    assert _ray_layer("serve") is build_app and _ray_layer("tune") is run_trials


WRITERS = {"atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_dir", "write_certificate"}
"""Calls that put a file somewhere: in a job, they would bypass the release boundary."""


@pytest.mark.parametrize("module", ["train/driver.py", "tuning.py", "incontext/run.py", "sample/__init__.py"])
def test_jobs_write_the_run_directory_only_through_the_release(module):
    """Training, the search, in-context generation and sampling reach the run directory only through
    dpsynth.release.Release (which records each shared file's provenance in the manifest): no direct writer calls."""
    tree = ast.parse((ROOT / "dpsynth" / module).read_text())
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
              for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not called & WRITERS, f"{module} calls {called & WRITERS}"
    jobs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in {"train", "search", "generate"}]
    for fn in jobs:  # each job entry point is the skeleton with its job plugged in, nothing more
        calls = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        assert "run_private_job" in calls, f"{module}:{fn.name} does not go through run_private_job"
