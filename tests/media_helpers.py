"""Media files written by PyAV for tests: H.264 video from RGB frames and/or mono audio."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

#: Audio given as a whole array, or as a function (start, stop) -> samples of that range
#: (so a 20-minute recording never sits in memory).
Samples = np.ndarray | Callable[[int, int], np.ndarray]


def write_media(
    path: Path | bytes,
    *,
    samples: Samples | None = None,
    n_samples: int | None = None,
    rate: int = 16_000,
    frames: list[np.ndarray] | None = None,
    fps: int = 25,
) -> Path | bytes:
    """Write ``frames`` (RGB uint8, one size) as H.264 and ``samples`` (float, mono) as
    AAC in .mp4 or 16-bit PCM otherwise, in blocks of 10 s. ``n_samples`` is required
    when ``samples`` is a function."""
    name = os.fsdecode(path)
    container = av.open(name, "w")
    vstream = astream = None
    if frames is not None:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.height, vstream.width = frames[0].shape[:2]
        vstream.pix_fmt = "yuv420p"
    if samples is not None:
        astream = container.add_stream(
            "aac" if name.endswith(".mp4") else "pcm_s16le", rate=rate, layout="mono"
        )
    if vstream is not None:
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
    if astream is not None:
        if callable(samples):
            assert n_samples is not None, "n_samples is needed with a sample function"
            total, block_of = n_samples, samples
        else:
            total, block_of = len(samples), lambda a, b: samples[a:b]
        block = 10 * rate
        for start in range(0, total, block):
            signal = np.ascontiguousarray(
                np.asarray(block_of(start, min(total, start + block)), np.float32)[None]
            )
            frame = av.AudioFrame.from_ndarray(signal, format="fltp", layout="mono")  # (1, n)
            frame.rate, frame.pts = rate, start
            for packet in astream.encode(frame):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)
    container.close()
    return path
