"""SIGTERM stops a run as Ctrl-C does; a second signal ends the process at once.

``docker stop`` and systemd send SIGTERM, whose default action kills the process with no
summary. Inside :func:`stop_on_signals` the first SIGINT or SIGTERM raises
:class:`Interrupted` (a ``KeyboardInterrupt``, so the runner finishes the summary as for
Ctrl-C) and the second exits at once with 128 + the signal number, without a traceback:
an operator who signals twice means it. Records are already whole on disk
(:mod:`vpure.runtime.records`), so nothing written is lost.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """The first SIGINT or SIGTERM; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the handlers for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        if len(received) > 1:
            os._exit(128 + signum)
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
