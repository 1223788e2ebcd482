"""Distributed feature extraction: the corpus split into shards, one worker per shard, the
shards' stores merged into one and verified.

Sharding. Clip ``id`` belongs to shard ``blake2b(id as UTF-8, 8-byte digest)`` read as a
big-endian unsigned integer, modulo ``N``. Shards are numbered from 0: ``K`` in
``0..N-1`` (a SLURM array ``--array=0-(N-1)`` gives ``$SLURM_ARRAY_TASK_ID`` directly).
The assignment depends on the id alone, not on listing order, folder layout or the
machine that lists the corpus, so independent workers agree on it without talking to
each other, and a hash spreads any id scheme evenly. An input that fails before it has
an id (a file name that is not UTF-8) is assigned by its file name the same way, so
exactly one shard reports it.

Workers. A worker is ``taemi extract ... --shard K/N --out STORE.shards/shard-K-of-N``
(an ordinary extraction of its sources, resumable by the store's own resume), with its
output appended to ``STORE.shards/shard-K-of-N.log``. :func:`extract_distributed` runs
the N workers on a backend, shows per-shard progress (a clip counts as done when its
transcript is written, just before its features are added), then merges the shard stores into
``STORE`` with :func:`taemi.store.merge.merge_stores`, which verifies the result:

- ``local``: N subprocesses on this machine, each with ``threads_per_worker`` threads
  (``OMP_NUM_THREADS`` and the BLAS equivalents; default: this machine's CPUs / N);
- ``ray``: each shard is one Ray task (``num_cpus=threads_per_worker``,
  ``num_gpus=gpus_per_worker``) that runs the same worker command on whatever node Ray
  schedules it (Ray, https://docs.ray.io; ``pip install 'taemi[distributed]'``).
  ``ray_address`` joins a running cluster (``"auto"``: the one this node belongs to,
  an error if there is none); without it a new local Ray instance is started. On a cluster the inputs, ``STORE`` and the
  working directory must be on a filesystem every node mounts at the same path, and
  taemi must be installed in the Python that Ray runs on every node.

A worker that exits non-zero (other than an extraction that completed with every clip
failed, exit status 1 with its summary written) is reported with its log file; the
others run on, and the shards are not merged. Rerunning the same command resumes: each
worker skips the clips its shard store has, and the merge skips the clips ``STORE``
has. The number of shards must stay the same for that (it names the shard folders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taemi.store import SUMMARY_FILE, TRANSCRIPTS  # TRANSCRIPTS: one file per done clip
from taemi.store.merge import MergeReport, merge_stores

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
#: Above this many shards, one overall progress bar instead of one per shard.
_MAX_BARS = 16


# --------------------------------------------------------------------------- sharding


def shard_of(key: str, n: int) -> int:
    """The shard (0-based) of a clip id among ``n`` shards; see the module docstring."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of shards must be a positive int, got {n!r}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), with 0 <= K < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shards are numbered 0 to N-1)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or k >= n:
        raise ValueError(
            f"--shard {text}: K must be in 0..N-1 and N >= 1 (shards are numbered from 0)"
        )
    return k, n


def _error_key(record: dict) -> str:
    """What an input error is sharded by: its clip id, else its file name."""
    if record.get("clip_id") is not None:
        return record["clip_id"]
    return Path(str(record.get("path") or "")).name


def select_shard(
    sources: Sequence[Any], input_errors: Sequence[dict], k: int, n: int
) -> tuple[list, list[dict]]:
    """The sources (anything with a ``clip_id``) and input error records of shard ``k`` of ``n``."""
    if not 0 <= k < n:
        raise ValueError(f"shard {k} of {n}: K must be in 0..N-1")
    return (
        [s for s in sources if shard_of(s.clip_id, n) == k],
        [e for e in input_errors if shard_of(_error_key(e), n) == k],
    )


def shard_store(store: str | os.PathLike[str], k: int, n: int) -> Path:
    """Where shard ``k`` of ``n`` of the store ``store`` is extracted: ``STORE.shards/shard-K-of-N``."""
    root = Path(store)
    width = len(str(n - 1))
    return root.with_name(root.name + ".shards") / f"shard-{k:0{width}d}-of-{n}"


# --------------------------------------------------------------------------- runs


@dataclass
class ShardRun:
    """One worker: its shard, where it writes, and how it ended."""

    k: int
    n: int
    store: Path  # the shard's feature store
    log: Path  # the worker's stdout + stderr (appended on every run)
    clips: int  # sources assigned to the shard
    returncode: int | None = None  # the worker's exit status; None: it did not run to the end
    host: str | None = None  # where it ran
    error: str | None = None  # why it counts as failed
    summary: dict[str, Any] | None = None  # its extract_summary.json
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode is not None

    def done(self) -> int:
        """Clips of this shard extracted so far (their transcripts are written)."""
        try:
            return sum(1 for e in os.scandir(self.store / TRANSCRIPTS) if e.name.endswith(".txt"))
        except FileNotFoundError:
            return 0


@dataclass
class DistributedResult:
    store: Path
    backend: str
    shards: list[ShardRun]
    merge: MergeReport | None = None  # None when a worker failed (nothing merged)
    seconds: float = 0.0
    threads_per_worker: int = 1
    workers_seconds: float = 0.0  # until the last worker ended (the rest is the merge)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[ShardRun]:
        return [s for s in self.shards if not s.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and self.merge is not None


def worker_command(
    extract_args: Sequence[str], run: ShardRun, global_args: Sequence[str] = ()
) -> list[str]:
    """Arguments after ``python`` of the worker extracting ``run``'s shard."""
    return [
        "-m",
        "taemi",
        *global_args,
        "extract",
        *extract_args,
        "--out",
        str(run.store),
        "--shard",
        f"{run.k}/{run.n}",
        "--no-progress",
    ]


def _thread_env(threads: int) -> dict[str, str]:
    return {v: str(threads) for v in _THREAD_VARS}


def _finish(
    run: ShardRun, returncode: int | None, started_wall: float, error: str | None = None
) -> None:
    """Record how a worker ended; exit status 1 with a fresh summary is a completed shard
    whose clips all failed (each is in its extract_errors.jsonl), not a failed worker."""
    run.returncode = returncode
    run.seconds = time.time() - started_wall
    path = run.store / SUMMARY_FILE
    fresh = path.is_file() and path.stat().st_mtime >= started_wall - 1
    if fresh:
        try:
            run.summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            run.summary = None
    if error is not None:
        run.error = error
    elif returncode == 0:
        pass
    elif returncode == 1 and run.summary is not None and not run.summary.get("interrupted"):
        log.warning(
            "shard %d/%d: no clip could be extracted (%d failed), see %s",
            run.k,
            run.n,
            run.summary.get("failed", 0),
            run.store / "extract_errors.jsonl",
        )
    else:
        run.error = f"worker exited with status {returncode}; its log: {run.log}"


# --------------------------------------------------------------------------- backends


class _LocalBackend:
    """Each worker a subprocess of this one."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.procs: dict[int, tuple[subprocess.Popen, Any, float]] = {}

    def start(self, run: ShardRun, cmd: list[str]) -> None:
        env = {**os.environ, **_thread_env(self.threads)}
        fh = open(run.log, "ab")  # noqa: SIM115 (closed when the worker ends)
        fh.write(
            f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {sys.executable} {' '.join(cmd)}\n".encode()
        )
        fh.flush()
        proc = subprocess.Popen(
            [sys.executable, *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
        run.host = socket.gethostname()
        self.procs[run.k] = (proc, fh, time.time())

    def poll(self, run: ShardRun) -> bool:
        proc, fh, t0 = self.procs[run.k]
        rc = proc.poll()
        if rc is None:
            return False
        fh.close()
        _finish(run, rc, t0)
        return True

    def stop(self) -> None:
        for proc, fh, _ in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, fh, _ in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            fh.close()

    def close(self) -> None:
        pass


def _ray_worker(cmd: list[str], log_path: str, cwd: str, env: dict[str, str]) -> dict[str, Any]:
    """Body of a Ray task: run one worker command on this node (its own Python)."""
    host = socket.gethostname()
    if not os.path.isdir(cwd):
        return {
            "rc": None,
            "host": host,
            "error": (
                f"the working directory {cwd} does not exist on node {host}: run from a folder on the "
                "filesystem every node shares"
            ),
        }
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        fh.write(
            f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} on {host}: {sys.executable} {' '.join(cmd)}\n".encode()
        )
        fh.flush()
        proc = subprocess.Popen(
            [sys.executable, *cmd],
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            rc = proc.wait()
        except BaseException:  # cancelled: stop the worker too
            proc.terminate()
            proc.wait()
            raise
    return {"rc": rc, "host": host, "error": None}


def import_ray():
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "the ray backend needs Ray: pip install 'taemi[distributed]' (or pip install 'ray>=2.9,<3'), "
            "on every node of the cluster"
        ) from e
    return ray


class _RayBackend:
    """Each worker a Ray task, scheduled by Ray on any node of the cluster."""

    def __init__(self, threads: int, gpus: float, address: str | None) -> None:
        self.ray = ray = import_ray()
        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(
                address=address or "local", log_to_driver=False
            )  # "local": a new instance, never another's
            where = f"cluster at {address}" if address else "a local Ray instance"
            log.info("ray: connected to %s (%s CPUs)", where, ray.cluster_resources().get("CPU"))
        self.task = ray.remote(num_cpus=threads, num_gpus=gpus)(_ray_worker)
        self.threads = threads
        self.refs: dict[int, tuple[Any, float]] = {}

    def start(self, run: ShardRun, cmd: list[str]) -> None:
        ref = self.task.remote(cmd, str(run.log.resolve()), os.getcwd(), _thread_env(self.threads))
        self.refs[run.k] = (ref, time.time())

    def poll(self, run: ShardRun) -> bool:
        ref, t0 = self.refs[run.k]
        ready, _ = self.ray.wait([ref], timeout=0)
        if not ready:
            return False
        try:
            out = self.ray.get(ref)
        except (
            self.ray.exceptions.RayError
        ) as e:  # the task raised, or its node died: the others go on
            _finish(
                run, None, t0, error=f"Ray task failed: {type(e).__name__}: {e}; log: {run.log}"
            )
            return True
        run.host = out["host"]
        _finish(run, out["rc"], t0, error=out["error"])
        return True

    def stop(self) -> None:
        for ref, _ in self.refs.values():
            self.ray.cancel(ref)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


# --------------------------------------------------------------------------- driver


def extract_distributed(
    store: str | os.PathLike[str],
    extract_args: Sequence[str],
    sources: Sequence[Any],
    n: int,
    *,
    input_errors: Sequence[dict] = (),
    backend: str = "local",
    ray_address: str | None = None,
    threads_per_worker: int | None = None,
    gpus_per_worker: float = 0.0,
    global_args: Sequence[str] = (),
    poll_seconds: float = 1.0,
    merge: bool = True,
    replace: bool = False,
    progress: bool = True,
) -> DistributedResult:
    """Extract ``sources`` into the store ``store`` with ``n`` workers; see the module docstring.

    ``extract_args`` are the ``taemi extract`` options of every worker (``--input ...`` and
    the extraction settings, without ``--out``/``--shard``); each worker lists the inputs
    itself and keeps its shard. ``sources`` (this process's listing of the same inputs)
    only sizes the progress bars. ``merge=False`` stops after the workers; ``replace=True``
    (with ``--force`` among ``extract_args``) supersedes clips already in ``store``.
    """
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of workers must be a positive int, got {n!r}")
    if threads_per_worker is None:
        threads_per_worker = max(1, (os.cpu_count() or 1) // n)
    if threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
    if gpus_per_worker and backend != "ray":
        raise ValueError(
            "gpus_per_worker is a Ray resource request; with the local backend use --device"
        )
    t_start = time.perf_counter()
    runs: list[ShardRun] = []
    for k in range(n):
        srcs, _ = select_shard(sources, input_errors, k, n)
        sdir = shard_store(store, k, n)
        runs.append(ShardRun(k, n, sdir, sdir.with_name(sdir.name + ".log"), len(srcs)))
    runs[0].store.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "%d clips in %d shards (%s) under %s, %d thread(s) per worker, backend %s",
        len(sources),
        n,
        ", ".join(str(r.clips) for r in runs),
        runs[0].store.parent,
        threads_per_worker,
        backend,
    )

    runner = (
        _LocalBackend(threads_per_worker)
        if backend == "local"
        else _RayBackend(threads_per_worker, gpus_per_worker, ray_address)
    )
    result = DistributedResult(Path(store), backend, runs, threads_per_worker=threads_per_worker)
    bars = _Bars(runs, progress, tqdm)
    try:
        for run in runs:
            runner.start(run, worker_command(extract_args, run, global_args))
        running = list(runs)
        while running:
            for run in list(running):
                if runner.poll(run):
                    running.remove(run)
                    _log_end(run)
            bars.update()
            if running:
                time.sleep(poll_seconds)
    except BaseException:
        runner.stop()
        raise
    finally:
        bars.close()
        runner.close()
    result.workers_seconds = time.perf_counter() - t_start

    if result.failed:
        for run in result.failed:
            log.error("shard %d/%d failed: %s", run.k, run.n, run.error)
        log.error(
            "%d of %d workers failed: the shards are not merged; fix the cause and rerun the same "
            "command (finished clips are skipped)",
            len(result.failed),
            n,
        )
    elif merge:
        result.merge = merge_stores(
            store, [r.store for r in runs], replace=replace, progress=progress
        )
    result.seconds = time.perf_counter() - t_start
    return result


def _log_end(run: ShardRun) -> None:
    if not run.ok:
        return
    s = run.summary or {}
    log.info(
        "shard %d/%d finished on %s in %.0f s: %s done, %s skipped, %s failed",
        run.k,
        run.n,
        run.host,
        run.seconds,
        s.get("done", "?"),
        s.get("skipped", "?"),
        s.get("failed", "?"),
    )


class _Bars:
    """Per-shard progress bars (one overall bar above ``_MAX_BARS`` shards)."""

    def __init__(self, runs: list[ShardRun], enabled: bool, tqdm) -> None:
        self.runs = runs
        self.enabled = enabled
        if not enabled:
            self.bars = []
        elif len(runs) <= _MAX_BARS:
            self.bars = [
                tqdm(
                    total=r.clips,
                    desc=f"shard {r.k}/{r.n}",
                    unit="clip",
                    position=i,
                    leave=True,
                    dynamic_ncols=True,
                )
                for i, r in enumerate(runs)
            ]
        else:
            self.bars = [
                tqdm(
                    total=sum(r.clips for r in runs),
                    desc="extract",
                    unit="clip",
                    dynamic_ncols=True,
                )
            ]

    def update(self) -> None:
        if not self.enabled:
            return
        if len(self.bars) == len(self.runs):
            for bar, run in zip(self.bars, self.runs):
                bar.n = min(run.done(), run.clips)
                state = (
                    "running"
                    if run.returncode is None and run.error is None
                    else ("ok" if run.ok else "FAILED")
                )
                bar.set_postfix_str(state, refresh=False)
                bar.refresh()
        else:
            bar = self.bars[0]
            bar.n = sum(min(r.done(), r.clips) for r in self.runs)
            ended = [r for r in self.runs if r.returncode is not None or r.error is not None]
            bar.set_postfix(
                finished=sum(r.ok for r in ended),
                failed=sum(not r.ok for r in ended),
                running=len(self.runs) - len(ended),
                refresh=False,
            )
            bar.refresh()

    def close(self) -> None:
        self.update()
        for bar in self.bars:
            bar.close()
