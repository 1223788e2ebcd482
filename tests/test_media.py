"""taemi.extract.media: decoding real and generated media with PyAV.

Generated media is written by PyAV itself into a temporary folder (tiny frames, short
tones), so no binary assets are committed. Real media: the CREMA-D sample in
../shared/data/crema-d-sample (or $TAEMI_CREMA_D), marked ``realmedia``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is not installed (media extra)")

from taemi.extract.media import (
    Audio,
    MediaError,
    Video,
    decode_audio,
    decode_video,
    display_path,
    probe,
    rate_representatives,
    read_face_images,
    uniform_indices,
)

SR = 16000


# ---------------------------------------------------------------- generated media


def _frame_image(i: int, size: tuple[int, int]) -> np.ndarray:
    """Generated frame ``i``: grey, a bar moving along the top 8 rows, and ``i`` written in
    binary as 8x8 black/white blocks along the bottom 8 rows (survives lossy codecs)."""
    width, height = size
    img = np.full((height, width, 3), 128, dtype=np.uint8)  # (H, W, 3)
    img[:8, (4 * i) % width : (4 * i) % width + 4] = 255
    for bit in range(width // 8):
        img[height - 8 :, 8 * bit : 8 * bit + 8] = 255 if (i >> bit) & 1 else 0
    return img


def frame_index(frame: np.ndarray) -> int:
    """Inverse of :func:`_frame_image`: the index read from the bottom row of blocks."""
    height, width = frame.shape[:2]
    bits = [
        frame[height - 6 : height - 2, 8 * b + 2 : 8 * b + 6].mean() > 128
        for b in range(width // 8)
    ]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_media(
    path: Path,
    *,
    vcodec: str | None = None,
    acodec: str | None = None,
    seconds: float = 1.0,
    fps: int = 25,
    size: tuple[int, int] = (64, 48),
    video_pts: list[int] | None = None,
    rate: int = 44100,
    layout: str = "mono",
    freqs: tuple[float, ...] = (440.0,),
    amplitude: float = 0.5,
    fmt: str | None = None,
) -> Path:
    """Write a clip with PyAV: video frames ``_frame_image(i)`` with ``video_pts`` in units
    of 1/fps (default 0..n-1), and/or a sine tone per channel (``freqs[c]``, the last one
    repeated)."""
    container = av.open(os.fsdecode(path), "w", format=fmt)
    vstream = astream = None  # every stream is added before the first packet is muxed
    if vcodec:
        vstream = container.add_stream(vcodec, rate=fps)
        vstream.width, vstream.height = size
        vstream.pix_fmt = "yuv420p"
    if acodec:
        astream = container.add_stream(acodec, rate=rate, layout=layout)
    if vstream is not None:
        pts_list = video_pts if video_pts is not None else list(range(round(seconds * fps)))
        for i, pts in enumerate(pts_list):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, size), format="rgb24")
            frame.pts = pts
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
    if astream is not None:
        channels = astream.layout.nb_channels
        n = round(seconds * rate)
        t = np.arange(n) / rate  # (n,)
        waves = [
            amplitude * np.sin(2 * np.pi * freqs[min(c, len(freqs) - 1)] * t)
            for c in range(channels)
        ]
        signal = np.stack(waves).astype(np.float32)  # (C, n)
        block = 4096
        for start in range(0, n, block):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(signal[:, start : start + block]), format="fltp", layout=layout
            )
            frame.rate = rate
            frame.pts = start
            for packet in astream.encode(frame):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)
    container.close()
    return path


#: name -> (suffix, video codec, audio codec, audio rate)
AV_CONTAINERS = {
    "mp4": ("mp4", "libx264", "aac", 44100),
    "mkv": ("mkv", "mpeg4", "libopus", 48000),
    "webm": ("webm", "libvpx", "libopus", 48000),
    "flv": ("flv", "flv", "libmp3lame", 44100),
    "avi": ("avi", "mpeg4", "pcm_s16le", 44100),
}
AUDIO_CONTAINERS = {
    "mp3": ("mp3", "libmp3lame", 44100),
    "wav": ("wav", "pcm_s16le", 44100),
    "m4a": ("m4a", "aac", 48000),
}
#: Largest codec frame in input samples (mp3 1152, aac 1024 + priming, opus 960 at 48k).
CODEC_SLACK_SECONDS = 2048 / 44100


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All generated clips of this module, by name."""
    root = tmp_path_factory.mktemp("media")
    out: dict[str, Path] = {}
    for name, (suffix, vcodec, acodec, rate) in AV_CONTAINERS.items():
        out[f"av_{name}"] = write_media(
            root / f"av.{suffix}", vcodec=vcodec, acodec=acodec, rate=rate
        )
    for name, (suffix, acodec, rate) in AUDIO_CONTAINERS.items():
        out[f"audio_{name}"] = write_media(
            root / f"tone.{suffix}", acodec=acodec, rate=rate, seconds=2.0
        )
    for rate in (44100, 48000, 8000):
        out[f"wav_{rate}"] = write_media(
            root / f"tone_{rate}.wav", acodec="pcm_s16le", rate=rate, seconds=1.3
        )
    out["stereo"] = write_media(
        root / "stereo.wav", acodec="pcm_s16le", layout="stereo", freqs=(440.0, 1000.0)
    )
    out["silent"] = write_media(root / "silent.wav", acodec="pcm_s16le", amplitude=0.0)
    out["wav_20s"] = write_media(root / "20s.wav", acodec="pcm_s16le", rate=8000, seconds=20.0)
    out["wav_5s"] = write_media(root / "5s.wav", acodec="pcm_s16le", rate=8000, seconds=5.0)
    out["video_only"] = write_media(root / "video_only.mp4", vcodec="libx264")
    out["video_50"] = write_media(root / "video_50.mkv", vcodec="mpeg4", seconds=2.0)
    out["video_30fps"] = write_media(root / "video_30.mp4", vcodec="libx264", fps=30, seconds=3.0)
    # Irregular timestamps (ms) under a declared rate of 1000 fps: only pts tell the truth.
    out["vfr"] = write_media(
        root / "vfr.mkv", vcodec="mpeg4", fps=1000, video_pts=[0, 40, 100, 110, 300, 1000]
    )
    return out


def _fft_peak(x: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))  # (N // 2 + 1,)
    return float(np.fft.rfftfreq(x.shape[0], 1 / sample_rate)[np.argmax(spectrum)])


def _check_audio(audio: Audio | None, seconds: float, slack: float) -> Audio:
    assert audio is not None
    assert audio.sample_rate == SR
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert np.isfinite(audio.samples).all()
    assert abs(audio.samples.shape[0] - round(seconds * SR)) <= round(slack * SR)
    assert not audio.truncated
    return audio


# ---------------------------------------------------------------- containers


@pytest.mark.parametrize("name", list(AV_CONTAINERS))
def test_audio_video_containers_decode(gen: dict[str, Path], name: str) -> None:
    path = gen[f"av_{name}"]
    info = probe(path)
    assert info["audio"] and info["video"]
    assert info["duration"] == pytest.approx(1.0, abs=0.1)
    audio = _check_audio(decode_audio(path), 1.0, CODEC_SLACK_SECONDS)
    assert _fft_peak(audio.samples, SR) == pytest.approx(440, abs=3)
    video = decode_video(path)
    assert video is not None and len(video) == 25 and video.total_frames_seen == 25
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in video.frames)
    assert (np.diff(video.timestamps) > 0).all()
    assert 1 / np.diff(video.timestamps).mean() == pytest.approx(25, rel=0.01)
    start = video.timestamps[0]
    assert [frame_index(f) for f in video.frames] == [
        round((t - start) * 25) for t in video.timestamps
    ]


@pytest.mark.parametrize("name", list(AUDIO_CONTAINERS))
def test_audio_only_containers_decode(gen: dict[str, Path], name: str) -> None:
    path = gen[f"audio_{name}"]
    assert probe(path)["video"] is False
    audio = _check_audio(decode_audio(path), 2.0, CODEC_SLACK_SECONDS)
    assert audio.duration == pytest.approx(2.0, abs=0.05)
    assert _fft_peak(audio.samples, SR) == pytest.approx(440, abs=1)
    assert decode_video(path) is None


@pytest.mark.parametrize("rate", [44100, 48000, 8000])
def test_resampling_keeps_length_and_frequency(gen: dict[str, Path], rate: int) -> None:
    audio = decode_audio(gen[f"wav_{rate}"])
    # PCM input: the sample count is exact up to the resampler's rounding.
    audio = _check_audio(audio, 1.3, 4 / SR)
    assert _fft_peak(audio.samples, SR) == pytest.approx(440, abs=1)
    middle = audio.samples[SR // 4 : -SR // 4]
    assert np.abs(middle).max() == pytest.approx(0.5, abs=0.02)  # level kept


def test_stereo_is_downmixed(gen: dict[str, Path]) -> None:
    audio = decode_audio(gen["stereo"])
    assert audio is not None and audio.samples.ndim == 1
    spectrum = np.abs(np.fft.rfft(audio.samples))  # (N // 2 + 1,)
    freqs = np.fft.rfftfreq(audio.samples.shape[0], 1 / SR)
    left = spectrum[np.argmin(np.abs(freqs - 440))]
    right = spectrum[np.argmin(np.abs(freqs - 1000))]
    assert left == pytest.approx(right, rel=0.1)  # both channels, equal weight
    assert left > 100 * np.median(spectrum)


def test_silent_track_is_not_an_error(gen: dict[str, Path]) -> None:
    audio = decode_audio(gen["silent"])
    assert audio is not None and audio.samples.shape[0] == SR
    assert not audio.samples.any()


def test_rate_change_mid_stream(tmp_path: Path) -> None:
    """Two MP3s glued together (44.1 kHz mono 440 Hz, then 24 kHz stereo 1000 Hz)."""
    first = write_media(tmp_path / "a.mp3", acodec="libmp3lame", rate=44100)
    second = write_media(
        tmp_path / "b.mp3", acodec="libmp3lame", rate=24000, layout="stereo", freqs=(1000.0,)
    )
    path = tmp_path / "glued.mp3"
    path.write_bytes(first.read_bytes() + second.read_bytes())
    audio = decode_audio(path)
    assert audio is not None
    assert audio.seconds == pytest.approx(2.0, abs=0.15)
    assert _fft_peak(audio.samples[: int(0.8 * SR)], SR) == pytest.approx(440, abs=3)
    assert _fft_peak(audio.samples[-int(0.8 * SR) :], SR) == pytest.approx(1000, abs=3)


# ---------------------------------------------------------------- cutting and padding


def test_max_seconds_cut_is_sample_accurate(gen: dict[str, Path]) -> None:
    audio = decode_audio(gen["wav_20s"], max_seconds=12.0)
    assert audio is not None
    assert audio.samples.shape[0] == 192000
    assert audio.truncated and audio.duration == pytest.approx(20.0)
    whole = decode_audio(gen["wav_20s"], max_seconds=None)
    assert whole is not None and not whole.truncated
    assert whole.samples.shape[0] == pytest.approx(320000, abs=4)
    np.testing.assert_array_equal(audio.samples, whole.samples[:192000])  # a prefix
    wave, mask = audio.padded(12.0)
    assert wave.shape == mask.shape == (192000,) and mask.sum() == 192000
    with pytest.raises(ValueError, match="cannot pad"):
        audio.padded(10.0)


def test_short_file_pads_with_exact_mask(gen: dict[str, Path]) -> None:
    audio = decode_audio(gen["wav_5s"], max_seconds=12.0)
    assert audio is not None and not audio.truncated
    n = audio.samples.shape[0]
    assert abs(n - 80000) <= 4
    wave, mask = audio.padded()
    assert wave.dtype == np.float32 and wave.shape == (192000,)
    assert mask.sum() == n and mask[:n].all() and not mask[n:].any()
    np.testing.assert_array_equal(wave[:n], audio.samples)
    assert not wave[n:].any()
    # A cut at exactly the file's length is not a truncation.
    exact = decode_audio(gen["wav_5s"], max_seconds=n / SR)
    assert exact is not None and exact.samples.shape[0] == n and not exact.truncated


class _CountingContainer:
    """Wraps a PyAV input container and counts the packets its ``demux`` yields."""

    def __init__(self, inner: object, counter: list[int]) -> None:
        self._inner = inner
        self._counter = counter

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def demux(self, *args: object, **kwargs: object):
        for packet in self._inner.demux(*args, **kwargs):
            self._counter[0] += 1
            yield packet


def test_long_file_is_cut_without_reading_it(
    tmp_path: Path, gen: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 minutes, mono 8 kHz PCM (19 MB): written in one pass of 120 ten-second blocks.
    long_path = tmp_path / "20min.wav"
    container = av.open(str(long_path), "w")
    stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
    block = (0.3 * np.sin(2 * np.pi * 300 * np.arange(80000) / 8000)).astype(np.float32)
    for i in range(120):
        frame = av.AudioFrame.from_ndarray(block[None], format="flt", layout="mono")
        frame.rate, frame.pts = 8000, i * 80000
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()

    real_open = av.open
    counter = [0]
    monkeypatch.setattr(av, "open", lambda *a, **k: _CountingContainer(real_open(*a, **k), counter))

    def cost(path: Path) -> tuple[int, float, int]:
        counter[0] = 0
        best = float("inf")
        for _ in range(3):
            tracemalloc.start()
            start = time.perf_counter()
            audio = decode_audio(path, max_seconds=12.0)
            best = min(best, time.perf_counter() - start)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert audio is not None and audio.samples.shape[0] == 192000 and audio.truncated
        return counter[0] // 3, best, peak

    short_packets, short_time, _ = cost(gen["wav_20s"])
    long_packets, long_time, long_peak = cost(long_path)
    assert long_packets <= short_packets + 2  # demuxing stops at 12 s
    assert long_time < 5 * short_time + 0.05
    assert long_peak < 8 * 2**20  # the whole file at 16 kHz would be 77 MB


# ---------------------------------------------------------------- video policies


def test_video_only_and_audio_only(gen: dict[str, Path]) -> None:
    assert decode_audio(gen["video_only"]) is None
    info = probe(gen["video_only"])
    assert info["audio"] is False and info["video"] is True
    assert info["duration"] == pytest.approx(1.0, abs=0.1)
    assert "mp4" in str(info["format"])
    assert decode_video(gen["audio_wav"]) is None


def test_policy_first(gen: dict[str, Path]) -> None:
    video = decode_video(gen["video_50"], max_frames=5, policy="first")
    assert video is not None and video.policy == "first"
    np.testing.assert_allclose(video.timestamps, [0, 0.04, 0.08, 0.12, 0.16])
    assert [frame_index(f) for f in video.frames] == [0, 1, 2, 3, 4]
    assert video.total_frames_seen == 5
    cut = decode_video(gen["video_50"], max_frames=400, max_seconds=0.5)
    assert cut is not None and len(cut) == 13  # t = 0, 0.04, ..., 0.48
    whole = decode_video(gen["video_50"], max_frames=400)
    assert whole is not None and len(whole) == 50 and whole.total_frames_seen == 50


def test_policy_uniform(gen: dict[str, Path]) -> None:
    video = decode_video(gen["video_50"], max_frames=5, policy="uniform")
    assert video is not None and video.policy == "uniform"
    # targets 0, 0.49, 0.98, 1.47, 1.96 s -> nearest frames (ties to the earlier one)
    np.testing.assert_allclose(video.timestamps, [0, 0.48, 0.96, 1.48, 1.96])
    assert [frame_index(f) for f in video.frames] == [0, 12, 24, 37, 49]
    assert video.total_frames_seen == 50
    window = decode_video(gen["video_50"], max_frames=3, policy="uniform", max_seconds=1.0)
    assert window is not None
    np.testing.assert_allclose(window.timestamps, [0, 0.48, 0.96])
    assert window.total_frames_seen == 25
    everything = decode_video(gen["video_50"], max_frames=400, policy="uniform")
    assert everything is not None and len(everything) == 50


def test_timestamps_come_from_pts_not_fps(gen: dict[str, Path]) -> None:
    video = decode_video(gen["vfr"])
    assert video is not None
    np.testing.assert_allclose(video.timestamps, [0, 0.04, 0.1, 0.11, 0.3, 1.0])
    assert [frame_index(f) for f in video.frames] == list(range(6))
    three = decode_video(gen["vfr"], max_frames=3, policy="uniform")
    assert three is not None
    np.testing.assert_allclose(three.timestamps, [0, 0.3, 1.0])
    # targets 0, 1/3, 2/3, 1: 2/3 is nearest to 1.0 too -> three distinct frames, not four
    four = decode_video(gen["vfr"], max_frames=4, policy="uniform")
    assert four is not None
    np.testing.assert_allclose(four.timestamps, [0, 0.3, 1.0])


def test_uniform_indices_rule() -> None:
    times = np.arange(10, dtype=np.float64)
    np.testing.assert_array_equal(uniform_indices(times, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(uniform_indices(times, 1), [0])
    np.testing.assert_array_equal(uniform_indices(times, 20), np.arange(10))
    np.testing.assert_array_equal(uniform_indices(np.arange(4.0), 3), [0, 1, 3])  # tie: earlier
    with pytest.raises(ValueError):
        uniform_indices(times, 0)


def test_argument_validation(gen: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown video policy"):
        decode_video(gen["video_50"], policy="middle")
    with pytest.raises(ValueError, match="max_frames"):
        decode_video(gen["video_50"], max_frames=0)
    with pytest.raises(ValueError, match="max_seconds"):
        decode_audio(gen["wav_5s"], max_seconds=0)
    with pytest.raises(ValueError, match="frames but"):
        Video(frames=[], timestamps=np.zeros(1), total_frames_seen=0, policy="first")


def test_cover_art_is_not_video(tmp_path: Path) -> None:
    path = tmp_path / "cover.mp3"
    container = av.open(str(path), "w")
    audio = container.add_stream("libmp3lame", rate=44100, layout="mono")
    picture = container.add_stream("mjpeg", rate=1)
    picture.width, picture.height, picture.pix_fmt = 16, 16, "yuvj420p"
    picture.disposition = av.stream.Disposition.attached_pic
    image = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    image.pts = 0
    for packet in picture.encode(image) + picture.encode():
        container.mux(packet)
    tone = (0.3 * np.sin(np.arange(44100) / 10)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
    frame.rate, frame.pts = 44100, 0
    for packet in audio.encode(frame) + audio.encode():
        container.mux(packet)
    container.close()
    with av.open(str(path)) as check:  # the file really carries a picture stream
        assert [s.type for s in check.streams] == ["audio", "video"]
    assert probe(path)["video"] is False
    assert decode_video(path) is None
    assert decode_audio(path) is not None


# ---------------------------------------------------------------- bad input


def _bad_file(tmp_path: Path, kind: str, gen: dict[str, Path]) -> tuple[Path, str]:
    """A broken input of ``kind`` and a regex its MediaError must match."""
    if kind == "zero_length":
        path = tmp_path / "empty.mp4"
        path.write_bytes(b"")
        return path, "empty"
    if kind == "random_bytes":
        path = tmp_path / "random.mp4"
        path.write_bytes(np.random.default_rng(0).bytes(20000))
        return path, "cannot read it as media"
    if kind == "text":
        path = tmp_path / "notes.wav"
        path.write_text("this is not audio\n" * 50)
        return path, "cannot read it as media"
    if kind == "truncated_header":
        path = tmp_path / "head.mp4"
        path.write_bytes(gen["av_mp4"].read_bytes()[:200])
        return path, "cannot read it as media"
    if kind == "directory":
        path = tmp_path / "folder.mp4"
        path.mkdir()
        return path, "is a directory"
    if kind == "missing":
        return tmp_path / "nothing.mp4", "no such file"
    raise AssertionError(kind)


BAD_KINDS = ["zero_length", "random_bytes", "text", "truncated_header", "directory", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_media_error(tmp_path: Path, gen: dict[str, Path], kind: str) -> None:
    path, reason = _bad_file(tmp_path, kind, gen)
    for call in (probe, decode_audio, decode_video):
        with pytest.raises(MediaError, match=reason) as info:
            call(path)
        assert str(path) in str(info.value)


def test_audio_stream_without_samples(tmp_path: Path) -> None:
    path = tmp_path / "no_packets.mkv"
    container = av.open(str(path), "w")
    video = container.add_stream("mpeg4", rate=25)
    video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
    container.add_stream("pcm_s16le", rate=16000, layout="mono")  # declared, never written
    for i in range(3):
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        frame.pts = i
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    container.close()
    assert probe(path)["audio"] is True
    with pytest.raises(MediaError, match="no_packets.mkv: audio stream decodes to no samples"):
        decode_audio(path)
    assert decode_video(path) is not None


def test_truncated_file_keeps_what_decodes(
    tmp_path: Path, gen: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = gen["audio_mp3"].read_bytes()
    path = tmp_path / "half.mp3"
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="taemi.extract.media"):
        audio = decode_audio(path)
    assert audio is not None
    assert 0.7 < audio.seconds < 1.3  # about half of 2 s
    assert audio.duration == pytest.approx(2.0, abs=0.05)  # as the header declares
    assert any("half.mp3" in r.message and "truncated" in r.message for r in caplog.records)


def test_corrupt_middle_keeps_what_decodes(
    tmp_path: Path, gen: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = bytearray(gen["audio_mp3"].read_bytes())
    n = len(data)
    data[n // 3 : n // 3 + n // 4] = np.random.default_rng(1).bytes(n // 4)
    path = tmp_path / "corrupt.mp3"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="taemi.extract.media"):
        audio = decode_audio(path)
    assert audio is not None and 0.3 < audio.seconds < 2.0
    assert np.isfinite(audio.samples).all()
    assert any("corrupt.mp3" in r.message for r in caplog.records)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root, which can read files without read permission",
)
def test_permission_denied(tmp_path: Path, gen: dict[str, Path]) -> None:
    path = tmp_path / "locked.wav"
    path.write_bytes(gen["wav_5s"].read_bytes())
    path.chmod(0)
    try:
        with pytest.raises(MediaError, match="locked.wav: permission denied"):
            decode_audio(path)
    finally:
        path.chmod(0o644)


def test_permission_denied_by_ffmpeg_is_a_media_error(
    tmp_path: Path, gen: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check without needing a non-root user: FFmpeg's EACCES on open."""

    def refuse(name: str, *args: object, **kwargs: object) -> None:
        raise av.error.PermissionError(errno.EACCES, "Permission denied", name)

    monkeypatch.setattr(av, "open", refuse)
    with pytest.raises(MediaError, match="5s.wav: permission denied"):
        decode_audio(gen["wav_5s"])


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names need Linux")
def test_non_utf8_file_names(tmp_path: Path, gen: dict[str, Path]) -> None:
    good = os.path.join(os.fsencode(tmp_path), b"clip_\xff.wav")
    with open(good, "wb") as handle:
        handle.write(gen["wav_5s"].read_bytes())
    for name in (good, os.fsdecode(good)):  # bytes, and str with surrogate escapes
        audio = decode_audio(name)
        assert audio is not None and abs(audio.samples.shape[0] - 80000) <= 4
    assert probe(good)["audio"] is True
    bad = os.path.join(os.fsencode(tmp_path), b"bad_\xfe.mp4")
    with open(bad, "wb") as handle:
        handle.write(b"\x00garbage" * 100)
    with pytest.raises(MediaError) as info:
        decode_audio(bad)
    message = str(info.value)
    assert "bad_\\xfe.mp4" in message
    message.encode("utf-8")  # printable: no lone surrogates
    assert display_path(Path(os.fsdecode(bad))).endswith("bad_\\xfe.mp4")


# ---------------------------------------------------------------- face_images folders


def _write_images(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        k = int(Path(name).stem) if Path(name).stem.isdigit() else 0
        Image.new("L", (6, 4), color=k).save(folder / name)  # grey, 1 channel


def test_face_images_sorted_numerically(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "00042"
    _write_images(folder, [f"{k}.jpg" for k in (10, 2, 1, 11, 9, 0)] + ["3.png"])
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="taemi.extract.media"):
        video = read_face_images(folder)
    assert video is not None
    np.testing.assert_array_equal(video.timestamps, [0, 1, 2, 3, 9, 10, 11])
    assert all(f.shape == (4, 6, 3) and f.dtype == np.uint8 for f in video.frames)
    assert [round(f.mean()) for f in video.frames] == [0, 1, 2, 3, 9, 10, 11]
    assert video.total_frames_seen == 7
    assert any("ignored 1" in r.message for r in caplog.records)
    first = read_face_images(folder, max_frames=3)
    assert first is not None
    np.testing.assert_array_equal(first.timestamps, [0, 1, 2])
    assert first.total_frames_seen == 7


def test_face_images_missing_or_empty(tmp_path: Path) -> None:
    assert read_face_images(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert read_face_images(tmp_path / "empty") is None


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["1.jpg", "01.jpg"], "appears twice"),
        (["1.jpg", "face.jpg"], r"face\.jpg: face image name is not an integer"),
    ],
)
def test_face_images_bad_names(tmp_path: Path, names: list[str], reason: str) -> None:
    _write_images(tmp_path / "clip", names)
    with pytest.raises(MediaError, match=reason):
        read_face_images(tmp_path / "clip")


def test_face_images_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    _write_images(folder, ["1.jpg", "2.jpg"])
    (folder / "3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(MediaError, match=r"3\.jpg: unreadable image"):
        read_face_images(folder)
    not_a_folder = tmp_path / "file.jpg"
    not_a_folder.write_bytes(b"x")
    with pytest.raises(MediaError, match="is not a folder"):
        read_face_images(not_a_folder)


# ---------------------------------------------------------------- real media (CREMA-D)


def crema_d_media() -> Path:
    """The CREMA-D sample's media folder; skips the test when it is absent."""
    root = os.environ.get("TAEMI_CREMA_D")
    base = (
        Path(root)
        if root
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )
    folder = base / "media"
    if not folder.is_dir():
        pytest.skip(f"CREMA-D sample not found at {base} (set TAEMI_CREMA_D to its folder)")
    return folder


@pytest.mark.realmedia
def test_crema_d_flv_clips() -> None:
    clips = sorted(crema_d_media().glob("*.flv"))
    assert len(clips) == 6
    for path in clips:
        info = probe(path)
        assert info["audio"] and info["video"] and info["format"] == "flv", path.name
        audio = decode_audio(path)
        assert audio is not None and audio.sample_rate == SR and not audio.truncated, path.name
        assert audio.samples.dtype == np.float32 and np.isfinite(audio.samples).all()
        assert 1.7 < audio.seconds < 2.5, (path.name, audio.seconds)
        assert np.sqrt(np.mean(audio.samples**2)) > 1e-3, path.name  # speech, not silence
        video = decode_video(path)
        assert video is not None, path.name
        # README says 56-67 frames; the DIS clip actually has 70.
        assert 56 <= len(video) <= 70, (path.name, len(video))
        assert all(f.shape == (360, 480, 3) and f.dtype == np.uint8 for f in video.frames)
        assert (np.diff(video.timestamps) > 0).all(), path.name
        fps = (len(video) - 1) / (video.timestamps[-1] - video.timestamps[0])
        assert fps == pytest.approx(float(Fraction(30000, 1001)), abs=0.05), (path.name, fps)


@pytest.mark.realmedia
def test_crema_d_mp3_clips() -> None:
    clips = sorted(crema_d_media().glob("*.mp3"))
    assert len(clips) == 6
    for path in clips:
        audio = decode_audio(path)
        assert audio is not None and 2.0 < audio.seconds < 3.0, path.name
        assert np.sqrt(np.mean(audio.samples**2)) > 1e-3, path.name
        assert decode_video(path) is None, path.name


def test_decode_video_transform_is_applied_per_frame_and_can_drop(tmp_path) -> None:
    path = tmp_path / "t.mp4"
    _write_video_for_transform(path, n=12)
    calls: list[tuple[int, ...]] = []

    def half_and_drop_odd(img):
        calls.append(img.shape)
        if len(calls) % 2 == 0:
            return None
        return img[::2, ::2]

    video = decode_video(path, max_frames=10, transform=half_and_drop_odd)
    assert len(calls) == 10  # max_frames counts decoded frames
    assert len(video) == 5 and video.total_frames_seen == 10
    h, w = calls[0][:2]
    assert video.frames[0].shape == ((h + 1) // 2, (w + 1) // 2, 3)
    assert (np.diff(video.timestamps) > 0).all()
    empty = decode_video(path, max_frames=4, transform=lambda img: None)
    assert len(empty) == 0 and empty.total_frames_seen == 4
    uniform = decode_video(path, max_frames=4, policy="uniform", transform=lambda img: img[:8, :8])
    assert len(uniform) == 4 and uniform.frames[0].shape == (8, 8, 3)


def _write_video_for_transform(path, n: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            img = np.full((48, 64, 3), (i * 20) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# ---------------------------------------------------------------- vision sampling rate


@pytest.mark.parametrize("policy", ["first", "uniform"])
@pytest.mark.parametrize("fps", [10, 7, 5, 2.5, 1])
def test_vision_fps_keeps_the_first_frame_of_each_slot(
    gen: dict[str, Path], policy: str, fps: float
) -> None:
    """30 fps for 3 s: at most ``fps`` kept frames per second of real time, each the first
    frame of its 1/fps slot, standing for the frames up to the next kept one."""
    exact = decode_video(gen["video_30fps"], policy=policy)
    fast = decode_video(gen["video_30fps"], policy=policy, vision_fps=fps)
    assert exact is not None and fast is not None and len(exact) == 90
    slots = np.floor(fast.timestamps * fps + 1e-6)  # (n,)
    np.testing.assert_array_equal(slots, np.arange(len(fast)))  # one per slot, none empty
    for second in range(3):  # every second of video holds at most fps kept frames
        inside = ((fast.timestamps >= second) & (fast.timestamps < second + 1)).sum()
        assert inside <= math.ceil(fps)
    kept = [frame_index(f) for f in fast.frames]  # indices into the exact path's frames
    np.testing.assert_allclose(fast.timestamps, exact.timestamps[kept])
    np.testing.assert_array_equal(fast.repeats, np.diff([*kept, len(exact)]))
    assert fast.repeats.sum() == len(exact) and fast.total_frames_seen == exact.total_frames_seen
    rep = rate_representatives(exact.timestamps, fps)  # the same rule, on the timestamps
    np.testing.assert_array_equal(np.unique(rep), kept)
    np.testing.assert_array_equal(np.bincount(rep)[kept], fast.repeats)


def test_vision_fps_uses_timestamps_not_the_containers_fps(gen: dict[str, Path]) -> None:
    # declared 1000 fps, real pts 0, 0.04, 0.1, 0.11, 0.3, 1.0 s -> slots of 0.1 s: 0 0 1 1 3 10
    video = decode_video(gen["vfr"], vision_fps=10)
    assert video is not None
    np.testing.assert_allclose(video.timestamps, [0, 0.1, 0.3, 1.0])
    assert [frame_index(f) for f in video.frames] == [0, 2, 4, 5]
    assert video.repeats.tolist() == [2, 2, 1, 1]


def test_vision_fps_with_max_frames_and_policies(gen: dict[str, Path]) -> None:
    # first: the first 10 frames at 25 fps (0 .. 0.36 s), then slots of 0.1 s
    first = decode_video(gen["video_50"], max_frames=10, vision_fps=10)
    assert first is not None and first.total_frames_seen == 10
    assert [frame_index(f) for f in first.frames] == [0, 3, 5, 8]
    assert first.repeats.tolist() == [3, 2, 3, 2]
    # uniform: the 5 frames it plans (0, 0.48, 0.96, 1.48, 1.96 s), then slots of 1 s
    spread = decode_video(gen["video_50"], max_frames=5, policy="uniform", vision_fps=1)
    assert spread is not None and spread.total_frames_seen == 50
    np.testing.assert_allclose(spread.timestamps, [0, 1.48])
    assert [frame_index(f) for f in spread.frames] == [0, 37]
    assert spread.repeats.tolist() == [3, 2]


def test_vision_fps_skipped_frames_are_never_transformed(gen: dict[str, Path]) -> None:
    seen: list[int] = []

    def drop_every_other_kept(img: np.ndarray) -> np.ndarray | None:
        seen.append(frame_index(img))
        return None if len(seen) % 2 == 0 else img

    video = decode_video(gen["video_30fps"], vision_fps=5, transform=drop_every_other_kept)
    assert seen == list(range(0, 90, 6))  # only the kept frames reach the transform
    assert [frame_index(f) for f in video.frames] == list(range(0, 90, 12))
    assert video.repeats.tolist() == [6] * 8  # a dropped frame's slot goes with it


def test_vision_fps_none_is_the_exact_path(gen: dict[str, Path]) -> None:
    for kw in ({}, {"policy": "uniform", "max_frames": 7}):
        today = decode_video(gen["video_50"], **kw)
        none = decode_video(gen["video_50"], vision_fps=None, **kw)
        assert today is not None and none is not None
        np.testing.assert_array_equal(none.timestamps, today.timestamps)
        assert all(np.array_equal(a, b) for a, b in zip(none.frames, today.frames))
        assert none.repeats.tolist() == [1] * len(today) == today.repeats.tolist()
    with pytest.raises(ValueError, match="vision_fps must be a positive number, got 0"):
        decode_video(gen["video_50"], vision_fps=0)
    with pytest.raises(ValueError, match="vision_fps"):
        rate_representatives(np.zeros(3), float("nan"))
    with pytest.raises(ValueError, match="repeats"):
        Video(
            frames=[np.zeros((2, 2, 3), np.uint8)],
            timestamps=np.zeros(1),
            total_frames_seen=1,
            policy="first",
            repeats=np.array([0]),
        )
