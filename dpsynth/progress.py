"""Progress bars for long work (rich), off when not wanted (tests, CI logs), with a log line every so often."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, *, unit: str | None = None, completed: int = 0,
                 log_every: float | None = None) -> Iterator[Callable[..., None]]:
    """Yield `advance(note="", n=1, work=0)`: n more items done, and `work` more `unit`s (e.g. tokens), shown as a
    rate (`unit`/s) beside the ETA. `completed` items were done before (a resumed job): they count towards the bar, not
    towards the rate or the ETA. With `log_every` (seconds), the same line is also logged that often (log files, runs
    without a terminal), whether or not the bar is shown."""
    start, state = time.monotonic(), {"done": completed, "work": 0, "items": 0, "logged": time.monotonic()}

    def line(note: str = "") -> str:
        elapsed = max(time.monotonic() - start, 1e-9)
        rate = f", {state['work'] / elapsed:,.0f} {unit}/s" if unit else ""
        left = total - state["done"]
        eta = f", ETA {_eta(left * elapsed / state['items'])}" if state["items"] and left > 0 else ""
        return f"{description}: {state['done']}/{total}{rate}{eta}" + (f" ({note})" if note else "")

    def count(note: str, n: int, work: float) -> None:
        state["done"] += n
        state["items"] += n
        state["work"] += work
        if log_every is not None and (time.monotonic() - state["logged"] >= log_every or state["done"] >= total):
            state["logged"] = time.monotonic()
            log.info("%s", line(note))

    def rate() -> str:
        return f"{state['work'] / max(time.monotonic() - start, 1e-9):,.0f} {unit}/s" if unit else ""

    if not enabled:
        yield lambda note="", n=1, work=0: count(note, n, work)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[note]}"))
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, note="", rate="")

        def advance(note="", n=1, work=0):
            count(note, n, work)
            progress.update(task, advance=n, note=note, rate=rate())

        yield advance
