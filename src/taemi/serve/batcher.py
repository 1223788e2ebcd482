"""Micro-batching: items submitted from many threads, run in batches by one worker thread.

``taemi serve`` extracts each request's features in a thread pool; every extracted clip is
then submitted here, and the fusion model runs once per micro-batch over clips of
whichever requests are ready: a batch is formed from the first waiting item plus those
that arrive within ``max_wait_s`` of its submission, up to ``batch_size`` items. One
thread runs every batch, so the model is never called concurrently.

Each submission gets a :class:`concurrent.futures.Future` that is resolved exactly once
(its result, or the exception of its item). When a batch raises, its items are run again
one at a time, so only the item that fails gets the exception: one request's bad clip
never fails another's. The batch sizes formed are counted (:meth:`MicroBatcher.stats`).

No torch here: the batch function is passed in (a stand-in in ``tests/test_serve_api.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Batched", "BatcherClosed", "MicroBatcher"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher was closed before the item ran."""


@dataclass
class Batched(Generic[R]):
    """The result of one item, and the batch it ran in."""

    value: R
    batch_size: int  # items in the batch that computed it (1 when rerun alone after a failure)
    waited: float  # seconds from submission to the start of its batch
    seconds: float  # seconds the batch function took for its batch


@dataclass
class _Pending:
    item: Any
    future: Future
    submitted: float = field(default_factory=time.monotonic)


_STOP = object()


class MicroBatcher(Generic[T, R]):
    """Runs ``run_batch(items) -> results`` (one result per item, in order) on batches of
    at most ``batch_size`` items, waiting at most ``max_wait_s`` after an item's submission
    for others to join it. Start with :meth:`start` (or use it as a context manager)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        batch_size: int = 8,
        max_wait_s: float = 0.02,
        name: str = "taemi-batcher",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not (isinstance(max_wait_s, (int, float)) and 0 <= max_wait_s < 60):
            raise ValueError(f"max_wait_s must be in [0, 60) seconds, got {max_wait_s!r}")
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.max_wait_s = float(max_wait_s)
        self.name = name
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._sizes: Counter[int] = Counter()  # batch size -> batches formed
        self._items = 0  # items answered
        self._failed = 0  # items answered with an exception

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> MicroBatcher[T, R]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking items; the items already submitted still run; then the thread ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> MicroBatcher[T, R]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- use -----------------------------------------------------------------------

    def submit(self, item: T) -> Future:
        """Queue ``item``; the future resolves to a :class:`Batched` (or the item's exception)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed(f"{self.name} is closed: no more items are taken")
            if self._thread is None:
                raise RuntimeError(f"{self.name} was not started (call start())")
            self._queue.put(_Pending(item, fut))
        return fut

    def stats(self) -> dict[str, Any]:
        """Batches formed so far: ``{"batches", "items", "failed", "sizes": {size: count}}``."""
        with self._lock:
            return {
                "batches": sum(self._sizes.values()),
                "items": self._items,
                "failed": self._failed,
                "sizes": {str(k): v for k, v in sorted(self._sizes.items())},
            }

    def waiting(self) -> int:
        """Items submitted and not yet in a batch (approximate while batches form)."""
        return self._queue.qsize()

    # -- the worker thread ---------------------------------------------------------------

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = first.submitted + self.max_wait_s
            while len(batch) < self.batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            # a future its caller cancelled (a client gone) is dropped here; the others can
            # no longer be cancelled, so each is answered exactly once below
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)
        # closed: anything submitted after _STOP cannot exist (submit refuses), but be exact
        while True:
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                break
            if left is not _STOP and left.future.set_running_or_notify_cancel():
                self._answer(left, exc=BatcherClosed(f"{self.name} closed before the item ran"))

    def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        try:
            results = list(self.run_batch([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(
                    f"the batch function returned {len(results)} results for {len(batch)} items"
                )
        except Exception as e:  # noqa: BLE001 - isolate the failing item: rerun one by one
            if len(batch) == 1:
                with self._lock:
                    self._sizes[1] += 1
                self._answer(batch[0], exc=e)
                return
            log.warning(
                "a fusion batch of %d items failed (%s: %s); running them one at a time",
                len(batch),
                type(e).__name__,
                e,
            )
            for p in batch:
                self._run([p])
            return
        seconds = time.monotonic() - started
        with self._lock:
            self._sizes[len(batch)] += 1
        for p, r in zip(batch, results):
            self._answer(p, Batched(r, len(batch), started - p.submitted, seconds))

    def _answer(self, p: _Pending, value: Batched | None = None, exc: BaseException | None = None):
        with self._lock:
            self._items += 1
            self._failed += exc is not None
        if exc is not None:
            p.future.set_exception(exc)
        else:
            p.future.set_result(value)
