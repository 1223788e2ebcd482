"""SIGTERM as an interruption: the batch systems' stop signal cleans up like Ctrl-C.

A scheduler that ends a job (a time limit, a preemption, ``kill``) sends SIGTERM, whose
default action ends the process at once: no ``finally`` runs, so finished work that was
not yet committed is lost and temporary folders stay behind. Under
:func:`sigterm_raises` SIGTERM raises :class:`Terminated` instead, a ``KeyboardInterrupt``,
so every clean-up written for Ctrl-C runs for it too. The ``taemi`` command runs every
command under it and exits with status 143 (128 + SIGTERM), as a shell reports a
process ended by that signal.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

__all__ = ["Terminated", "sigterm_raises"]


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (under :func:`sigterm_raises`). A KeyboardInterrupt, so that
    everything that cleans up after Ctrl-C (committing finished clips, writing the
    summary, removing temporary folders) does the same for SIGTERM."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (once;
    a second SIGTERM during the clean-up is logged and ignored, SIGKILL still works). The
    previous handler is restored after. Outside the main thread this does nothing
    (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: object) -> None:
        nonlocal raised
        if raised:
            log.warning("SIGTERM again: still cleaning up after the first one")
            return
        raised = True
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
