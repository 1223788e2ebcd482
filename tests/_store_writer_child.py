"""Deterministic synthetic clips for the store tests, and a slow writer process to kill.

Run as a script: ``python _store_writer_child.py ROOT N SHARD_SIZE SLEEP_S`` writes clips
0..N-1 (skipping those already in the store), printing ``committed K`` after every shard
commit and ``done`` at the end, sleeping ``SLEEP_S`` between adds.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from taemi.store import StoreWriter
from taemi.store.clip import ClipFeatures

DIMS = {"audio": 5, "vision": 4, "text": 3}


def clip_id(i: int) -> str:
    return f"{i:05d}"


def make_clip(i: int, *, text_tokens: bool = False, scale: float = 3.0) -> ClipFeatures:
    """Clip ``i``: varied lengths, some modalities missing, values from seed ``i``."""
    rng = np.random.default_rng(i)
    audio_missing, vision_missing, text_missing = i % 5 == 3, i % 7 == 4, i % 4 == 1
    audio = (rng.standard_normal((1 + i % 6, DIMS["audio"])) * scale).astype(np.float32)
    vision = (rng.standard_normal((1 + i % 4, DIMS["vision"])) * scale).astype(np.float32)
    text = (rng.standard_normal(DIMS["text"]) * scale).astype(np.float32)
    tokens = (rng.standard_normal((2 + i % 3, DIMS["text"])) * scale).astype(np.float32)
    return ClipFeatures(
        clip_id=clip_id(i),
        audio=None if audio_missing else audio,
        vision=None if vision_missing else vision,
        text=None if text_missing else text,
        text_tokens=tokens if text_tokens and not text_missing else None,
    )


def main(argv: list[str]) -> None:
    root, n, shard_size, sleep_s = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    with StoreWriter(root, dims=DIMS, text_tokens=True, shard_size=shard_size) as w:
        last = w.n_committed
        for i in range(n):
            if clip_id(i) in w:
                continue
            w.add(make_clip(i, text_tokens=True))
            if w.n_committed != last:
                last = w.n_committed
                print(f"committed {last}", flush=True)
            time.sleep(sleep_s)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
