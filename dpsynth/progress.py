"""Progress bars for long work (rich), off when not wanted (tests, CI logs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(note="", n=1)`."""
    if not enabled:
        yield lambda note="", n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, note="")
        yield lambda note="", n=1: progress.update(task, advance=n, note=note)
