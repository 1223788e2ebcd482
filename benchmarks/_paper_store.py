"""Helpers shared by the store benchmarks: paper-dimension synthetic stores, page-cache
control and /proc memory readings. Not a benchmark itself.

Linux only for the page-cache and /proc parts (``os.posix_fadvise``, ``/proc/self/status``,
optionally util-linux ``fincore``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from taemi.data.sampler import abaw_like_lengths
from taemi.store import FeatureStore, StoreError, StoreWriter
from taemi.store.clip import ClipFeatures

#: Feature sizes of the paper's backbones (docs/method.md section 3).
PAPER_DIMS = {"audio": 1027, "vision": 768, "text": 768}


@contextlib.contextmanager
def work_folder(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (created, kept afterwards: --workdir), or a temporary folder removed on exit."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def length_range(max_len: int) -> tuple[int, int]:
    """Clip lengths are drawn uniformly from [ceil(max/2), max]: 599 -> 300..599, 400 -> 200..400."""
    return (max_len + 1) // 2, max_len


#: Length mixes :func:`build_store` can write: ``uniform`` (:func:`length_range`, the worst
#: case near the caps) or ``abaw`` (:func:`taemi.data.sampler.abaw_like_lengths`: the
#: corpus's mix, audio mean 6.9 s / p95 11.5 s, some clips without audio or face).
LENGTH_MIXES = ("uniform", "abaw")


def expected_bytes(
    n_clips: int, max_audio_len: int, max_vision_len: int, itemsize: int = 2, mix: str = "uniform"
) -> int:
    """Mean on-disk size of a store built by :func:`build_store` (data files only)."""
    if mix == "abaw":
        L = abaw_like_lengths(
            n_clips, seed=0, max_audio_len=max_audio_len, max_vision_len=max_vision_len
        )
        rows = L[:, 0].sum() * PAPER_DIMS["audio"] + L[:, 1].sum() * PAPER_DIMS["vision"]
        return int((rows + n_clips * PAPER_DIMS["text"]) * itemsize)
    a_lo, a_hi = length_range(max_audio_len)
    v_lo, v_hi = length_range(max_vision_len)
    per_clip = (
        (a_lo + a_hi) / 2 * PAPER_DIMS["audio"]
        + (v_lo + v_hi) / 2 * PAPER_DIMS["vision"]
        + PAPER_DIMS["text"]
    )
    return int(n_clips * per_clip * itemsize)


def build_store(
    root: Path,
    n_clips: int,
    *,
    max_audio_len: int = 599,
    max_vision_len: int = 400,
    seed: int = 0,
    mix: str = "uniform",
) -> FeatureStore:
    """A float16 store of ``n_clips`` paper-dimension clips with N(0, 1) values, or the one
    already at ``root`` if it holds exactly those clips (ids ``00000``, ``00001``, ...).

    Lengths (``mix``): ``uniform``: T_a, T_v uniform in :func:`length_range`, every modality
    present; ``abaw``: :func:`taemi.data.sampler.abaw_like_lengths` (seed 0), a length 0 is
    a missing modality. Written clip by clip through :class:`StoreWriter` (256 clips per
    shard, the writer's default).
    """
    if mix not in LENGTH_MIXES:
        raise ValueError(f"mix must be one of {LENGTH_MIXES}, got {mix!r}")
    if mix == "abaw":
        return _build_abaw_store(root, n_clips, max_audio_len, max_vision_len, seed)
    ids = [f"{k:05d}" for k in range(n_clips)]
    if (root / "manifest.json").exists():
        try:
            store = FeatureStore(root)
        except StoreError as exc:
            raise SystemExit(
                f"{root} holds a damaged store ({exc}); delete it or choose another --workdir"
            ) from None
        a_lo, a_hi = length_range(max_audio_len)
        v_lo, v_hi = length_range(max_vision_len)
        fits = (
            store.ids == ids
            and store.dims == PAPER_DIMS
            and store.manifest["dtype"] == "float16"
            and a_lo <= store.lengths["audio"].min() <= store.lengths["audio"].max() <= a_hi
            and v_lo <= store.lengths["vision"].min() <= store.lengths["vision"].max() <= v_hi
        )
        if not fits:
            raise SystemExit(
                f"{root} holds a store that is not the requested one ({len(store)} clips, "
                f"dims {store.dims}); delete it or choose another --workdir"
            )
        print(f"reusing {root} ({n_clips} clips)")
        return store

    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)

    a_lo, a_hi = length_range(max_audio_len)
    v_lo, v_hi = length_range(max_vision_len)
    with StoreWriter(root, dims=PAPER_DIMS, dtype="float16") as writer:
        for cid in tqdm(ids, desc=f"writing {root.name}", unit="clip", mininterval=2.0):
            t_a = int(rng.integers(a_lo, a_hi + 1))
            t_v = int(rng.integers(v_lo, v_hi + 1))
            writer.add(
                ClipFeatures(
                    clip_id=cid,
                    audio=normal(t_a, PAPER_DIMS["audio"]),  # (T_a, 1027)
                    vision=normal(t_v, PAPER_DIMS["vision"]),  # (T_v, 768)
                    text=normal(PAPER_DIMS["text"]),  # (768,)
                )
            )
    return FeatureStore(root)


def _build_abaw_store(
    root: Path, n_clips: int, max_audio_len: int, max_vision_len: int, seed: int
) -> FeatureStore:
    ids = [f"{k:05d}" for k in range(n_clips)]
    L = abaw_like_lengths(
        n_clips, seed=0, max_audio_len=max_audio_len, max_vision_len=max_vision_len
    )
    if (root / "manifest.json").exists():
        store = FeatureStore(root)
        fits = (
            store.ids == ids
            and store.dims == PAPER_DIMS
            and np.array_equal(store.lengths["audio"], L[:, 0])
            and np.array_equal(store.lengths["vision"], L[:, 1])
        )
        if not fits:
            raise SystemExit(
                f"{root} holds a store that is not the requested one; delete it or choose another --workdir"
            )
        print(f"reusing {root} ({n_clips} clips, abaw length mix)")
        return store
    rng = np.random.default_rng(seed)
    # one pool of N(0, 1) float16 values, read at random offsets: the values do not matter
    # to the benchmarks, and drawing 8e9 normals for a 17,000-clip store would take minutes
    pool = rng.standard_normal(1 << 24, dtype=np.float32).astype(np.float16)

    def values(t: int, d: int) -> np.ndarray | None:
        if t == 0:
            return None
        start = int(rng.integers(0, len(pool) - t * d))
        return pool[start : start + t * d].reshape(t, d)

    with StoreWriter(root, dims=PAPER_DIMS, dtype="float16") as writer:
        for cid, (t_a, t_v) in zip(
            tqdm(ids, desc=f"writing {root.name}", unit="clip", mininterval=2.0), L
        ):
            writer.add(
                ClipFeatures(
                    clip_id=cid,
                    audio=values(int(t_a), PAPER_DIMS["audio"]),  # (T_a, 1027)
                    vision=values(int(t_v), PAPER_DIMS["vision"]),  # (T_v, 768)
                    text=values(1, PAPER_DIMS["text"])[0],  # (768,)
                )
            )
    return FeatureStore(root)


def data_files(store: FeatureStore) -> list[Path]:
    """The store's ``*.bin`` files, shard by shard."""
    out = []
    for shard in store.manifest["shards"]:
        sdir = store.root / "shards" / shard["name"]
        out += sorted(sdir.glob("*.bin"))
    return out


def check_free_disk(where: Path, need: int, what: str) -> None:
    """Exit with a clear message when ``where`` has less than ``need`` bytes free (+ 1 GB margin)."""
    free = shutil.disk_usage(where).free
    margin = 1 << 30
    if free < need + margin:
        raise SystemExit(
            f"not enough disk space for {what}: need about {need / 1e9:.1f} GB (+1 GB margin) in "
            f"{where}, only {free / 1e9:.1f} GB free. Pass --workdir on a bigger disk or ask for less."
        )


# --------------------------------------------------------------------------- page cache


def drop_from_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to drop the files' clean cached pages (POSIX_FADV_DONTNEED).

    Pages still mapped by a process stay. Returns False where fadvise is unavailable. On a
    virtual machine the host may still cache the blocks, so "cold" can be faster than disk.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux ``fincore``), None if unknown."""
    exe = shutil.which("fincore")
    if exe is None:
        return None
    res = subprocess.run(
        [exe, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return None
    resident = total = 0
    for line in res.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            resident, total = resident + int(r), total + int(s)
    return resident / total if total else None


# --------------------------------------------------------------------------- /proc


def proc_status(pid: str = "self") -> dict[str, int]:
    """Memory lines of ``/proc/<pid>/status`` in bytes: VmHWM, VmRSS, RssAnon, RssFile, RssShmem."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024  # reported in kB
    return out


class PeakSampler(threading.Thread):
    """Polls /proc/self/status every ``interval`` s and keeps the maxima (torch and the
    ONNX/CTranslate2 runtimes release the GIL in their kernels, so samples land during
    model calls too)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        for k, v in proc_status().items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        self.sample()
        return self.peak
