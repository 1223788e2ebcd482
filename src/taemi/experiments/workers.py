"""Worker processes of the experiment commands that take ``--jobs J`` (``taemi cv``,
``taemi sweep``): spawn-started, each with its share of the cores and the parent's log level,
and all stopped when the parent stops (an error, Ctrl-C or SIGTERM).

Spawn, not fork: a forked child would inherit torch's thread pools and any CUDA state of
the parent. A worker is stopped with SIGTERM, which :func:`taemi.signals.sigterm_raises`
turns into the trainer's clean-up, so its run folder stays resumable.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def worker_settings(workers: int) -> dict:
    """What each of ``workers`` processes gets: its torch threads (1/``workers`` of the cores;
    None when ``OMP_NUM_THREADS`` decides, as for ``taemi train``) and the log level."""
    from taemi.runtime import available_cores

    return {
        "threads": None
        if "OMP_NUM_THREADS" in os.environ
        else max(1, available_cores() // workers),
        "log_level": logging.getLogger().getEffectiveLevel(),
    }


def setup_worker(worker: dict | None) -> None:
    """In a worker process (``worker`` from :func:`worker_settings`): logging as the parent's,
    its threads. Nothing in the parent process (``worker`` None)."""
    if worker is None:
        return
    logging.basicConfig(level=worker["log_level"], format=LOG_FORMAT)
    if worker["threads"] is not None:
        from taemi.runtime import configure_threads

        configure_threads(worker["threads"])


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def terminate_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to every live worker of ``pool`` (ProcessPoolExecutor has no public way to
    reach its workers before Python 3.14)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
