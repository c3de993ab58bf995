"""SIGINT and SIGTERM as a request to stop at the next safe point (a step boundary), not a crash.

Ctrl-C sends SIGINT; a job scheduler or a Kubernetes eviction sends SIGTERM. Either one asks the running job to
stop cleanly: a checkpoint is written, the ledger run stays open with its charges, and running the same command
again resumes it. A second signal stops at once (as kill -9 would: the run still resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The job stopped at a safe point because it was asked to; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def graceful_stop(on_stop: Callable[[int], None] | None = None) -> Iterator[Callable[[], int | None]]:
    """Within the block, SIGINT/SIGTERM set a flag (and call `on_stop(signum)` once) instead of killing the process;
    yields a function returning the signal received, if any. Outside the main thread nothing is installed."""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt  # a second signal: stop now
        received.append(signum)
        log.warning("%s received: stopping at the next step boundary (send it again to stop at once)",
                    signal.Signals(signum).name)
        if on_stop is not None:
            on_stop(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
