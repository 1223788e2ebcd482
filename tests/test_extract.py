"""taemi.extract.pipeline and ``taemi extract`` with fast fake encoders.

The fakes below implement the role protocols of :mod:`taemi.backbones.base` in a
few lines of numpy each (audio: per-20 ms RMS/mean/peak features with T_i = ceil(S_i/320);
image: mean colour and size; text: a hashed bag of words; speech recognition: a mapping
from the waveform's dominant frequency to a sentence, "" for silence), and count their
calls. Media are generated here with PyAV (tones and coloured frames), plus the inputs a
real corpus contains: an empty file, random bytes named .mp4, a truncated mp4, a
20-minute recording and a file name that is not valid UTF-8. Every test takes seconds.
The real packaged models are exercised in ``tests/test_extract_real.py``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is not installed (media extra)")

from media_helpers import write_media

from taemi.backbones.base import (
    SAMPLE_RATE,
    AudioEncoder,
    ImageEncoder,
    SpeechRecognizer,
    TextEncoder,
)
from taemi.cli.main import main
from taemi.extract import pipeline
from taemi.extract.media import decode_audio, decode_video
from taemi.extract.pipeline import (
    ERRORS_FILE,
    SUMMARY_FILE,
    TRANSCRIPTS,
    Encoders,
    ExtractOptions,
    ExtractSummary,
    Source,
    extract,
    find_sources,
)
from taemi.store import FeatureStore, StoreError, verify_store

HOP = 320  # samples per fake audio frame: 20 ms at 16 kHz (50 frames/s)
DIMS = {"audio": 4, "vision": 5, "text": 8}
#: What the fake recogniser "hears" in a tone of this many Hz (rounded to 10 Hz).
SPEECH = {
    440: "hello there my friend",
    330: "only a voice",
    550: "a very long recording",
    660: "six six zero",
    770: "seven seven zero",
    880: "eight eight zero",
}
UNKNOWN_SPEECH = "unknown words"


# ---------------------------------------------------------------- fake encoders


def dominant_hz(waveform: np.ndarray) -> int:
    """Frequency of the strongest FFT bin of a 16 kHz waveform, rounded to 10 Hz."""
    spectrum = np.abs(np.fft.rfft(waveform))  # (S // 2 + 1,)
    spectrum[0] = 0.0
    return int(round(np.argmax(spectrum) * SAMPLE_RATE / waveform.shape[0], -1))


class FakeRecognizer:
    name = "fake-asr"
    settings: ClassVar[dict[str, str]] = {"rule": "dominant frequency -> SPEECH"}

    def __init__(self) -> None:
        self.calls = 0

    def transcribe(self, waveform: np.ndarray) -> str:
        self.calls += 1
        if np.abs(waveform).max() < 1e-3:
            return ""
        return SPEECH.get(dominant_hz(waveform), UNKNOWN_SPEECH)


class FakeAudioEncoder:
    """(T_i, 4) per clip: RMS, mean, peak of each 20 ms hop and the hop's relative position.

    ``reject_hz``: a batch holding a tone of that frequency raises ValueError.
    ``interrupt_on_call``: that call (1-based) raises KeyboardInterrupt (a crash).
    ``scale``: multiplies the features (a different model with the same provenance).
    """

    name = "fake-audio"
    settings: ClassVar[dict[str, str]] = {"frames": "rms/mean/peak per 20 ms"}
    dim = DIMS["audio"]
    frame_rate = SAMPLE_RATE / HOP

    def __init__(
        self,
        *,
        reject_hz: int | None = None,
        interrupt_on_call: int | None = None,
        scale: float = 1.0,
        on_call=None,
    ) -> None:
        self.reject_hz, self.interrupt_on_call, self.scale = reject_hz, interrupt_on_call, scale
        self.on_call = on_call
        self.calls = 0
        self.batch_sizes: list[int] = []

    def encode(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        self.batch_sizes.append(len(waveforms))
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        out = []
        for w in waveforms:
            if (
                self.reject_hz is not None
                and np.abs(w).max() > 1e-3
                and dominant_hz(w) == self.reject_hz
            ):
                raise ValueError(f"fake audio encoder rejects {self.reject_hz} Hz tones")
            out.append(self.scale * audio_frames(w))
        return out


def audio_frames(w: np.ndarray) -> np.ndarray:
    """The fake audio features of one waveform: (ceil(S / HOP), 4) float32."""
    t = math.ceil(w.shape[0] / HOP)
    hops = np.zeros(t * HOP, dtype=np.float32)
    hops[: w.shape[0]] = w
    hops = hops.reshape(t, HOP)  # (T, HOP)
    pos = np.arange(t, dtype=np.float32) / t  # (T,)
    feats = [np.sqrt((hops**2).mean(1)), hops.mean(1), np.abs(hops).max(1), pos]
    return np.stack(feats, axis=1).astype(np.float32)  # (T, 4)


class FakeImageEncoder:
    """(N, 5): mean R, G, B in [0, 1], height / 100, width / 100."""

    name = "fake-image"
    settings: ClassVar[dict[str, str]] = {"vector": "mean colour + size"}
    dim = DIMS["vision"]

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        self.calls += 1
        return np.stack([image_vector(im) for im in images]).astype(np.float32)  # (N, 5)


def image_vector(im: np.ndarray) -> np.ndarray:
    h, w = im.shape[:2]
    return np.concatenate([im.reshape(-1, 3).mean(0) / 255.0, [h / 100.0, w / 100.0]])


class FakeTextEncoder:
    """A hashed bag of words (8 buckets); token states: one one-hot row per word."""

    name = "fake-text"
    settings: ClassVar[dict[str, str]] = {"vector": "hashed bag of words"}
    dim = DIMS["text"]
    max_tokens = 16

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str], *, token_states: bool = False):
        self.calls += 1
        toks = [np.stack([self._one_hot(w) for w in t.lower().split()]) for t in texts]  # (T_i, 8)
        vecs = np.stack([t.sum(0) for t in toks]).astype(np.float32)  # (N, 8)
        return vecs, (toks if token_states else None)

    def _one_hot(self, word: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        v[zlib.crc32(word.encode()) % self.dim] = 1.0
        return v


def fake_encoders(**audio_kw) -> Encoders:
    """Fresh fakes (call counts at zero); whole frames, no face detection."""
    return Encoders(
        asr=FakeRecognizer(),
        audio=FakeAudioEncoder(**audio_kw),
        image=FakeImageEncoder(),
        text=FakeTextEncoder(),
        face=None,
        profile="fake",
    )


def calls(enc: Encoders) -> dict[str, int]:
    return {
        "asr": enc.asr.calls,
        "audio": enc.audio.calls,
        "image": enc.image.calls,
        "text": enc.text.calls,
    }


def test_fakes_implement_the_role_protocols():
    enc = fake_encoders()
    assert isinstance(enc.asr, SpeechRecognizer)
    assert isinstance(enc.audio, AudioEncoder)
    assert isinstance(enc.image, ImageEncoder)
    assert isinstance(enc.text, TextEncoder)
    w = tone(1.0, 440)
    assert enc.asr.transcribe(w) == SPEECH[440]
    assert enc.asr.transcribe(np.zeros(16000, np.float32)) == ""
    assert [a.shape for a in enc.audio.encode([w, w[:321]])] == [(50, 4), (2, 4)]


# ---------------------------------------------------------------- generated media


def tone(seconds: float, hz: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_clip(
    path: Path | bytes,
    *,
    hz: float | None = 440.0,
    amplitude: float = 0.5,
    seconds: float = 1.0,
    rate: int = 44100,
    frames: list[np.ndarray] | None = None,
    fps: int = 25,
) -> Path | bytes:
    """A clip: ``frames`` as video when given, and a mono sine tone of ``hz`` when ``hz``
    is not None, generated block by block so long recordings stay cheap."""

    def tone_block(start: int, stop: int) -> np.ndarray:
        return amplitude * np.sin(2 * np.pi * hz * np.arange(start, stop) / rate)

    return write_media(
        path,
        samples=None if hz is None else tone_block,
        n_samples=round(seconds * rate),
        rate=rate,
        frames=frames,
        fps=fps,
    )


def colour_frames(n: int = 25, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    """``n`` frames of one colour each, drifting from frame to frame; (H, W, 3) uint8."""
    return [np.full((*size, 3), (200 - 4 * i, 40 + 3 * i, 90), dtype=np.uint8) for i in range(n)]


def noise_frames(n: int = 8, size: tuple[int, int] = (96, 96), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


#: The mixed corpus: clip id -> what happens to it.
DONE = ("audio_only", "av", "long", "silent", "video_only")
DECODE_FAILS = ("empty", "garbage", "truncated")
BAD_NAME = b"bad_\xff.wav"
LONG_SECONDS = 20 * 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """media/ with sub/ (recursion): every kind of input a real corpus holds."""
    root = tmp_path_factory.mktemp("corpus") / "media"
    (root / "sub").mkdir(parents=True)
    write_clip(root / "av.mp4", hz=440, frames=colour_frames())
    write_clip(root / "audio_only.wav", hz=330)
    write_clip(root / "sub" / "video_only.mp4", hz=None, frames=colour_frames(10))
    write_clip(root / "sub" / "silent.wav", hz=440, amplitude=0.0)
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    )
    whole = write_clip(root.parent / "whole.mp4", hz=440, frames=colour_frames()).read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # the index (moov) is lost
    write_clip(root / "long.wav", hz=550, seconds=LONG_SECONDS, rate=8000)  # 20 min at 8 kHz
    write_clip(os.fsencode(root) + b"/" + BAD_NAME, hz=440)
    (root / "notes.txt").write_text("not media\n")  # ignored: not a media extension
    return root


@pytest.fixture(scope="module")
def mixed(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """One extraction of the mixed corpus: (summary, store path, encoders used)."""
    store = tmp_path_factory.mktemp("mixed") / "store"
    sources, input_errors = find_sources([corpus])
    enc = fake_encoders()
    summary = extract(
        sources,
        store,
        enc,
        ExtractOptions(batch_size=3, workers=2),
        input_errors=input_errors,
        progress=False,
    )
    return summary, store, enc


def good_corpus(root: Path, hz: tuple[int, ...] = (330, 440, 550)) -> Path:
    """A folder of short wav tones c{hz}.wav plus one audio+video mp4 (av.mp4)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in hz:
        write_clip(root / f"c{f}.wav", hz=f, seconds=0.5)
    write_clip(root / "av.mp4", hz=660, seconds=0.5, frames=colour_frames(5))
    return root


def run(
    media: Path | list[Path], store: Path, enc: Encoders | None = None, **opts
) -> ExtractSummary:
    sources, errors = find_sources(media if isinstance(media, list) else [media])
    return extract(
        sources,
        store,
        enc or fake_encoders(),
        ExtractOptions(**opts),
        input_errors=errors,
        progress=False,
    )


def shard_names(store: Path) -> list[str]:
    return [s["name"] for s in json.loads((store / "manifest.json").read_text())["shards"]]


def error_lines(store: Path) -> list[dict]:
    path = store / ERRORS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- find_sources


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_sources_recurses_and_filters_extensions(tmp_path):
    touch(tmp_path / "b.wav")
    touch(tmp_path / "sub" / "a.MP4")  # extensions are matched case-insensitively
    touch(tmp_path / "sub" / "deeper" / "c.flac")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "frame.jpg")
    sources, errors = find_sources([tmp_path])
    assert errors == []
    assert [s.clip_id for s in sources] == ["a", "b", "c"]  # sorted by id, not by folder
    assert sources[0].media == tmp_path / "sub" / "a.MP4"
    assert all(s.face_dir is None for s in sources)


def test_find_sources_list_file(tmp_path):
    a = touch(tmp_path / "media" / "a.wav")
    b = touch(tmp_path / "elsewhere" / "b.mp4")
    lst = tmp_path / "lists" / "clips.txt"
    lst.parent.mkdir()
    lst.write_text(
        f"# clips of the test\n\n  ../media/a.wav  \n{b}\n   # indented comment\nnope.wav\n"
    )
    sources, errors = find_sources([lst])
    assert [s.clip_id for s in sources] == ["a", "b"]
    assert sources[0].media.resolve() == a.resolve()  # relative to the list's folder, not the cwd
    assert sources[1].media == b
    assert len(errors) == 1
    assert errors[0]["stage"] == "input" and errors[0]["clip_id"] == "nope"
    assert errors[0]["reason"] == "file does not exist"
    assert errors[0]["path"] == str(lst.parent / "nope.wav")


def test_find_sources_single_files_and_mixed_inputs(tmp_path):
    a = touch(tmp_path / "one" / "a.wav")
    touch(tmp_path / "two" / "b.wav")
    sources, errors = find_sources([a, tmp_path / "two"])
    assert errors == [] and [s.media for s in sources] == [a, tmp_path / "two" / "b.wav"]


def test_duplicate_ids_are_input_errors(tmp_path):
    first = touch(tmp_path / "f1" / "x.wav")
    second = touch(tmp_path / "f2" / "x.mp3")
    touch(tmp_path / "f2" / "y.wav")
    sources, errors = find_sources([tmp_path / "f1", tmp_path / "f2"])
    assert [(s.clip_id, s.media) for s in sources] == [
        ("x", first),
        ("y", tmp_path / "f2" / "y.wav"),
    ]
    assert len(errors) == 1
    e = errors[0]
    assert (e["clip_id"], e["path"], e["stage"]) == ("x", str(second), "input")
    assert (
        "'x' also comes from" in e["reason"]
        and str(first) in e["reason"]
        and "unique" in e["reason"]
    )


def test_non_utf8_file_name_is_an_input_error(tmp_path):
    touch(tmp_path / "good.wav")
    with open(os.fsencode(tmp_path) + b"/" + BAD_NAME, "wb") as fh:
        fh.write(b"x")
    sources, errors = find_sources([tmp_path])  # does not raise
    assert [s.clip_id for s in sources] == ["good"]
    assert len(errors) == 1
    e = errors[0]
    assert e["clip_id"] is None and e["stage"] == "input"
    assert "not valid UTF-8" in e["reason"] and "rename" in e["reason"]
    assert e["path"].endswith("bad_\\xff.wav")  # printable: the byte as an escape
    json.dumps(e, ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere


@pytest.mark.parametrize("name", ["a..b.wav", ".hidden.wav", "tab\there.wav"])
def test_unsafe_clip_id_is_an_input_error(tmp_path, name):
    touch(tmp_path / "ok.wav")
    touch(tmp_path / name)
    sources, errors = find_sources([tmp_path])
    assert [s.clip_id for s in sources] == ["ok"]
    assert len(errors) == 1 and errors[0]["stage"] == "input" and errors[0]["clip_id"] is None
    assert "clip id" in errors[0]["reason"] and name in errors[0]["path"]


def test_missing_input_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a media file, a list file nor a folder"):
        find_sources([tmp_path / "no_such_folder"])


# ---------------------------------------------------------------- the mixed corpus


def test_mixed_corpus_summary_counts(mixed):
    summary, store, _ = mixed
    assert (summary.done, summary.skipped, summary.failed) == (5, 0, 4)
    assert summary.total == 9  # 8 media files + 1 file name rejected before decoding
    assert summary.done + summary.skipped + summary.failed == summary.total
    # audio: video_only; vision: audio_only, silent, long; text: video_only, silent
    assert summary.missing == {"audio": 1, "vision": 3, "text": 2}
    assert summary.ok
    assert summary.errors_file == str(store / ERRORS_FILE)
    assert set(summary.stage_seconds) == set(pipeline.STAGES)
    assert all(v >= 0 for v in summary.stage_seconds.values())
    assert summary.media_seconds == pytest.approx(1 + 1 + 12 + 1 + 0.36, abs=0.2)


def test_mixed_corpus_calls_models_in_batches(mixed):
    _, _, enc = mixed
    assert enc.asr.calls == 4  # every decoded clip with audio: not video_only
    assert sum(enc.audio.batch_sizes) == 4 and max(enc.audio.batch_sizes) <= 3
    assert enc.image.calls >= 1 and enc.text.calls >= 1


def test_mixed_corpus_error_report(mixed):
    _, store, _ = mixed
    lines = error_lines(store)
    assert len(lines) == 4  # one line per failed file
    by_name = {Path(e["path"]).name: e for e in lines}
    assert set(by_name) == {"empty.mp4", "garbage.mp4", "truncated.mp4", "bad_\\xff.wav"}
    for e in lines:
        assert set(e) == {"clip_id", "path", "stage", "exception", "reason", "time", "run"}
    for cid in DECODE_FAILS:
        e = by_name[f"{cid}.mp4"]
        assert e["clip_id"] == cid and e["stage"] == "decode"
        assert e["exception"] == "taemi.extract.media.MediaError"
        assert e["reason"].startswith(f"{e['path']}: ")  # the reason names the file
    assert "is empty (0 bytes)" in by_name["empty.mp4"]["reason"]
    assert "FFmpeg cannot read it as media" in by_name["garbage.mp4"]["reason"]
    assert "corrupt" in by_name["truncated.mp4"]["reason"]
    bad = by_name["bad_\\xff.wav"]
    assert (bad["clip_id"], bad["stage"], bad["exception"]) == (None, "input", None)
    assert "not valid UTF-8" in bad["reason"]


def test_mixed_corpus_summary_file(mixed):
    summary, store, _ = mixed
    on_disk = json.loads((store / SUMMARY_FILE).read_text())
    assert on_disk == json.loads(json.dumps(asdict(summary)))
    assert on_disk["done"] == 5 and on_disk["failed"] == 4


def test_mixed_corpus_transcripts(mixed):
    _, store, _ = mixed
    written = sorted(p.stem for p in (store / TRANSCRIPTS).iterdir())
    assert written == sorted(DONE)  # one per done clip, none for failed ones
    text = {cid: (store / TRANSCRIPTS / f"{cid}.txt").read_text(encoding="utf-8") for cid in DONE}
    assert text["av"] == SPEECH[440] + "\n"
    assert text["audio_only"] == SPEECH[330] + "\n"
    assert text["long"] == SPEECH[550] + "\n"
    assert text["silent"] == "\n" and text["video_only"] == "\n"


def test_mixed_corpus_store(mixed, corpus):
    _, store, _ = mixed
    assert verify_store(store) == []
    fs = FeatureStore(store)
    assert sorted(fs.ids) == sorted(DONE)
    assert json.loads((store / "manifest.json").read_text())["dims"] == DIMS
    missing = {cid: fs.get(cid).missing for cid in DONE}
    assert missing == {
        "av": (False, False, False),
        "audio_only": (False, True, False),
        "long": (False, True, False),
        "silent": (False, True, True),
        "video_only": (True, False, True),
    }
    # audio: T_i from the clip's own samples; the 20-minute file is cut at 12 s
    assert fs.get("long").audio.shape == (math.ceil(12 * 16000 / 320), 4) == (600, 4)
    assert fs.get("audio_only").audio.shape == (50, 4)
    for cid, path in (("av", corpus / "av.mp4"), ("silent", corpus / "sub" / "silent.wav")):
        wave = decode_audio(path, sample_rate=SAMPLE_RATE, max_seconds=12.0).samples
        np.testing.assert_allclose(fs.get(cid).audio, audio_frames(wave), atol=2e-3)
    # vision: one vector per frame, whole frames (no face cropper)
    for cid, path, n in (
        ("av", corpus / "av.mp4", 25),
        ("video_only", corpus / "sub" / "video_only.mp4", 10),
    ):
        frames = decode_video(path, max_frames=400).frames
        want = np.stack([image_vector(f) for f in frames])
        assert fs.get(cid).vision.shape == (n, 5)
        np.testing.assert_allclose(fs.get(cid).vision, want, atol=2e-3)
    # text: the vector of the transcript
    np.testing.assert_allclose(fs.get("av").text, FakeTextEncoder().encode([SPEECH[440]])[0][0])


def test_mixed_corpus_provenance(mixed):
    _, store, _ = mixed
    mods = json.loads((store / "manifest.json").read_text())["modalities"]
    assert mods["audio"] == {
        "backbone": "fake-audio",
        "settings": {
            "profile": "fake",
            "frames": "rms/mean/peak per 20 ms",
            "max_seconds": 12.0,
            "sample_rate": 16000,
        },
    }
    assert mods["vision"] == {
        "backbone": "fake-image",
        "settings": {
            "profile": "fake",
            "vector": "mean colour + size",
            "max_frames": 400,
            "frame_policy": "first",
            "face": None,
        },
    }
    assert mods["text"] == {
        "backbone": "fake-text",
        "settings": {
            "profile": "fake",
            "vector": "hashed bag of words",
            "asr": "fake-asr",
            "asr_settings": {"rule": "dominant frequency -> SPEECH"},
            "token_states": False,
        },
    }


# ---------------------------------------------------------------- faces, options


def test_no_face_found_makes_vision_missing(tmp_path):
    face = pytest.importorskip("taemi.extract.face", reason="OpenCV is not installed")
    media = tmp_path / "media"
    media.mkdir()
    write_clip(media / "noise.mp4", hz=440, frames=noise_frames())
    enc = fake_encoders()
    enc.face = face.FaceCropper()
    s = run(media, tmp_path / "store", enc)
    assert (s.done, s.failed, s.missing) == (1, 0, {"audio": 0, "vision": 1, "text": 0})
    assert enc.image.calls == 0
    assert FeatureStore(tmp_path / "store").get("noise").missing == (False, True, False)
    face_settings = json.loads((tmp_path / "store" / "manifest.json").read_text())["modalities"][
        "vision"
    ]
    assert face_settings["settings"]["face"] == enc.face.settings


def test_frame_options_and_text_tokens(tmp_path):
    media = good_corpus(tmp_path / "media", hz=(440,))
    write_clip(media / "quiet.wav", hz=440, amplitude=0.0, seconds=0.5)
    store = tmp_path / "store"
    s = run(media, store, max_frames=3, frame_policy="uniform", text_tokens=True)
    assert (s.done, s.failed) == (3, 0)
    fs = FeatureStore(store)
    assert fs.get("av").vision.shape == (3, 5)
    assert fs.get("c440").text_tokens.shape == (len(SPEECH[440].split()), 8)
    assert fs.get("quiet").text is None and fs.get("quiet").text_tokens is None
    vision = json.loads((store / "manifest.json").read_text())["modalities"]["vision"]["settings"]
    assert (vision["max_frames"], vision["frame_policy"]) == (3, "uniform")
    with pytest.raises(ValueError, match="frame_policy='middle'"):
        run(media, tmp_path / "other", frame_policy="middle")


def test_mixing_options_in_one_store_is_refused(tmp_path):
    media = good_corpus(tmp_path / "media", hz=(440,))
    store = tmp_path / "store"
    assert run(media, store).done == 2
    before = (store / "manifest.json").read_text()
    with pytest.raises(StoreError) as info:
        run(media, store, max_frames=10, force=True)
    msg = str(info.value)
    assert (
        "must not be mixed" in msg and "write to a new store" in msg and "'max_frames': 10" in msg
    )
    enc = fake_encoders()
    enc.profile = "other"
    with pytest.raises(StoreError, match="must not be mixed"):
        run(media, store, enc)
    assert (store / "manifest.json").read_text() == before
    assert verify_store(store) == []


# ---------------------------------------------------------------- resume, force, crashes


def test_rerun_skips_done_clips_and_force_replaces(tmp_path):
    media = good_corpus(tmp_path / "media")
    store = tmp_path / "store"
    first = run(media, store)
    assert (first.done, first.skipped, first.failed) == (4, 0, 0)
    shards = shard_names(store)
    transcript = (store / TRANSCRIPTS / "c440.txt").stat().st_mtime_ns

    enc = fake_encoders()
    again = run(media, store, enc)
    assert (again.total, again.done, again.skipped, again.failed) == (4, 0, 4, 0)
    assert again.ok
    assert calls(enc) == {"asr": 0, "audio": 0, "image": 0, "text": 0}
    assert shard_names(store) == shards  # nothing written
    assert (store / TRANSCRIPTS / "c440.txt").stat().st_mtime_ns == transcript
    assert json.loads((store / SUMMARY_FILE).read_text())["skipped"] == 4

    old = FeatureStore(store).get("c440").audio
    enc = fake_encoders(scale=2.0)  # same provenance, different numbers: shows the replacement
    forced = run(media, store, enc, force=True)
    assert (forced.done, forced.skipped) == (4, 0)
    assert enc.audio.calls >= 1 and enc.asr.calls == 4
    # the new versions went into a second shard; at the end of the run the two small
    # shards were compacted into one holding each clip once (its newest version)
    (shard,) = json.loads((store / "manifest.json").read_text())["shards"]
    assert shard["name"] not in shards and shard["clips"] == 4
    fs = FeatureStore(store)
    assert len(fs) == 4 and sorted(fs.ids) == ["av", "c330", "c440", "c550"]  # each id once
    np.testing.assert_allclose(fs.get("c440").audio, 2 * old, rtol=2e-3, atol=1e-3)
    assert verify_store(store) == []


def test_crash_mid_run_keeps_committed_clips_and_rerun_completes(tmp_path):
    media = good_corpus(tmp_path / "media", hz=(330, 440, 550, 770))  # 5 clips
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        run(media, store, fake_encoders(interrupt_on_call=3), batch_size=1, workers=1)
    # the two clips encoded before the crash are committed (the writer flushes on exit)
    assert verify_store(store) == []
    fs = FeatureStore(store)
    assert sorted(fs.ids) == ["av", "c330"]
    assert sorted(p.stem for p in (store / TRANSCRIPTS).iterdir()) == ["av", "c330"]
    assert not (store / ".lock").exists()  # the lock is released

    enc = fake_encoders()
    s = run(media, store, enc, batch_size=1, workers=1)
    assert (s.done, s.skipped, s.failed) == (3, 2, 0)
    assert enc.audio.calls == 3
    fs = FeatureStore(store)
    assert len(fs) == 5 and sorted(fs.ids) == ["av", "c330", "c440", "c550", "c770"]
    assert verify_store(store) == []


def test_encoder_error_fails_only_that_clip(tmp_path):
    media = good_corpus(tmp_path / "media")
    store = tmp_path / "store"
    enc = fake_encoders(reject_hz=440)
    s = run(media, store, enc, batch_size=4)
    assert (s.done, s.failed) == (3, 1)
    assert enc.audio.batch_sizes == [4, 1, 1, 1, 1]  # the batch, then clip by clip
    assert sorted(FeatureStore(store).ids) == ["av", "c330", "c550"]
    (e,) = error_lines(store)
    assert (e["clip_id"], e["stage"]) == ("c440", "encode")
    assert e["path"] == str(media / "c440.wav")
    assert e["reason"] == "ValueError: fake audio encoder rejects 440 Hz tones"
    assert not (store / TRANSCRIPTS / "c440.txt").exists()
    assert verify_store(store) == []


# ---------------------------------------------------------------- decoding threads


def test_decoding_runs_on_worker_threads_ahead_of_the_models(tmp_path, monkeypatch):
    media = good_corpus(tmp_path / "media", hz=(330, 440, 550))  # 4 clips
    real = pipeline.decode_source
    threads: list[str] = []
    decoded: list[str] = []
    both_decoding = threading.Barrier(2, timeout=30)
    second_decoded = threading.Event()

    def decode(src: Source, opts, face):
        threads.append(threading.current_thread().name)
        if len(threads) <= 2:
            both_decoding.wait()  # only passes if two decodes run at the same time
        out = real(src, opts, face)
        decoded.append(src.clip_id)
        if len(decoded) == 2:
            second_decoded.set()
        return out

    def first_batch_waits(n: int) -> None:
        # the models get clip 1 while clip 2 decodes: it must finish without the models
        if n == 1:
            assert second_decoded.wait(timeout=30), "decoding does not run ahead of the models"

    monkeypatch.setattr(pipeline, "decode_source", decode)
    s = run(
        media, tmp_path / "store", fake_encoders(on_call=first_batch_waits), batch_size=1, workers=2
    )
    assert s.done == 4
    assert len(threads) == 4
    assert all(name.startswith("taemi-decode") for name in threads), threads
    assert threading.current_thread().name not in threads


# ---------------------------------------------------------------- ExtractSummary.ok and the CLI


@pytest.mark.parametrize(
    ("done", "skipped", "failed", "ok"),
    [
        (0, 0, 0, True),
        (1, 0, 0, True),
        (0, 3, 0, True),
        (1, 0, 5, True),
        (0, 1, 5, True),
        (0, 0, 1, False),
    ],
)
def test_summary_ok(done, skipped, failed, ok):
    assert ExtractSummary(store="s", done=done, skipped=skipped, failed=failed).ok is ok


@pytest.fixture
def cli_fakes(monkeypatch):
    """``load_encoders`` replaced by the fakes; returns the list of its calls' arguments."""
    from taemi.extract import profiles

    seen: list[tuple[tuple, dict]] = []

    def load(*args, **kw):
        seen.append((args, kw))
        return fake_encoders()

    monkeypatch.setattr(profiles, "load_encoders", load)
    return seen


def test_cli_extract_partial_success_exits_0(tmp_path, cli_fakes, capsys):
    media = good_corpus(tmp_path / "media", hz=(440,))
    (media / "garbage.mp4").write_bytes(b"\x00garbage" * 100)
    store = tmp_path / "store"
    code = main(
        [
            "extract",
            "--input",
            str(media),
            "--out",
            str(store),
            "--no-progress",
            "--batch-size",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"{store}: 2 done, 0 skipped, 1 failed; missing: audio 0, vision 1, text 0;" in out
    assert f"failures and their reasons: {store / ERRORS_FILE}" in out
    ((args, kw),) = cli_fakes
    assert args == ("offline",) and kw["face"] is True and kw["batch_size"] == 2
    assert verify_store(store) == []

    code = main(["extract", "--input", str(media), "--out", str(store), "--no-progress"])
    assert code == 0  # nothing new, one file still failing: still a usable store
    assert "0 done, 2 skipped, 1 failed" in capsys.readouterr().out


def test_cli_extract_all_failed_exits_1(tmp_path, cli_fakes, capsys):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.mp4").write_bytes(b"")
    (media / "b.wav").write_bytes(b"RIFF nonsense")
    code = main(
        ["extract", "--input", str(media), "--out", str(tmp_path / "store"), "--no-progress"]
    )
    assert code == 1
    assert "0 done, 0 skipped, 2 failed" in capsys.readouterr().out
    assert len(error_lines(tmp_path / "store")) == 2


def test_cli_extract_bad_input_exits_2(tmp_path, cli_fakes, capsys):
    code = main(["extract", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2
    nope = tmp_path / "nope"
    assert err == f"taemi: error: input {nope} is neither a media file, a list file nor a folder\n"
    (tmp_path / "empty").mkdir()
    assert (
        main(["extract", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "store")]) == 2
    )
    assert "no media files found" in capsys.readouterr().err
    assert not cli_fakes  # nothing was loaded
    assert not (tmp_path / "store").exists()


def test_cli_extract_refuses_mixed_settings(tmp_path, cli_fakes, capsys):
    media = good_corpus(tmp_path / "media", hz=(440,))
    store = str(tmp_path / "store")
    assert main(["extract", "--input", str(media), "--out", store, "--no-progress"]) == 0
    capsys.readouterr()
    assert (
        main(
            ["extract", "--input", str(media), "--out", store, "--no-progress", "--max-frames", "7"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("taemi: error: ") and "must not be mixed" in err and err.count("\n") == 1


def test_interrupted_run_still_reports_its_failures(tmp_path) -> None:
    """Ctrl-C during a run: this run's failures and the summary (interrupted) are written."""
    import wave

    from taemi.extract import pipeline

    media = tmp_path / "media"
    media.mkdir()
    (media / "a_bad.mp4").write_bytes(b"not a video at all" * 10)
    with wave.open(str(media / "b_good.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 5.0) * 8000).astype("<i2").tobytes())
    sources, _ = pipeline.find_sources([media])

    class Boom:
        name, settings, dim, frame_rate, max_tokens = "boom", {}, 4, 50.0, 8

        def transcribe(self, wave):
            raise KeyboardInterrupt

    boom = Boom()
    enc = pipeline.Encoders(asr=boom, audio=boom, image=boom, text=boom, face=None)
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        pipeline.extract(
            sources, store, enc, pipeline.ExtractOptions(batch_size=1, workers=1), progress=False
        )
    summary = json.loads((store / pipeline.SUMMARY_FILE).read_text())
    assert summary["interrupted"] and summary["failed"] == 1 and summary["done"] == 0
    (line,) = (store / pipeline.ERRORS_FILE).read_text().splitlines()
    rec = json.loads(line)
    assert rec["clip_id"] == "a_bad" and rec["run"] == summary["started"]


def test_separate_audio_file_replaces_the_media_track(tmp_path):
    """ABAW ships audio/{id}.mp3 beside raw/{id}.mp4: Source.audio is decoded instead."""
    from taemi.extract.pipeline import Source

    video = write_clip(tmp_path / "00007.mp4", hz=None, frames=colour_frames(5))
    audio = write_clip(tmp_path / "00007.wav", hz=550.0, seconds=1.0)
    enc = fake_encoders()
    store = tmp_path / "store"
    summary = extract(
        [Source("00007", video, audio=audio)], store, enc, ExtractOptions(), progress=False
    )
    assert summary.done == 1 and summary.missing == {"audio": 0, "vision": 0, "text": 0}
    clip = FeatureStore(store).get("00007")
    assert clip.audio is not None and clip.vision is not None
    # without it the same video has no audio track
    summary = extract([Source("00008", video)], store, enc, ExtractOptions(), progress=False)
    assert summary.missing["audio"] == 1


# ---------------------------------------------------------------- vision sampling rate


class CountingImageEncoder(FakeImageEncoder):
    """The fake image encoder, counting the images it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        self.images += len(images)
        return super().encode(images)


def test_vision_fps_repeats_each_feature_over_its_frames(tmp_path):
    """25 fps for 1 s at vision_fps=10: 10 frames encoded, 25 rows stored, each the exact
    path's row of the frame that stands for it; recorded in the provenance only when set."""
    from taemi.extract.media import rate_representatives

    media = tmp_path / "media"
    media.mkdir()
    write_clip(media / "av.mp4", hz=440, frames=colour_frames(25))
    stores, images = {}, {}
    for fps in (None, 10):
        enc = fake_encoders()
        enc.image = CountingImageEncoder()
        stores[fps] = tmp_path / f"store_{fps}"
        assert run(media, stores[fps], enc, vision_fps=fps).done == 1
        images[fps] = enc.image.images
    exact = FeatureStore(stores[None]).get("av").vision  # (25, 5)
    fast = FeatureStore(stores[10]).get("av").vision  # (25, 5)
    times = decode_video(media / "av.mp4").timestamps  # (25,)
    rep = rate_representatives(times, 10)  # (25,) the frame standing for each frame
    assert (images[None], images[10]) == (25, 10) and len(np.unique(rep)) == 10
    assert exact.shape == fast.shape == (25, 5)
    np.testing.assert_array_equal(fast, exact[rep])
    vision = {
        fps: json.loads((stores[fps] / "manifest.json").read_text())["modalities"]["vision"][
            "settings"
        ]
        for fps in stores
    }
    assert "vision_fps" not in vision[None]  # the exact path's provenance is as it was
    assert vision[10] == {**vision[None], "vision_fps": 10.0}


def test_vision_fps_stores_refuse_mixing_and_runs_extract_the_same_way(tmp_path):
    """A store of one rate refuses features of another (or of every frame); the run's
    features.json (taemi.run.features_record) carries the rate, and predict's extraction
    plan takes it from there, making features the store takes."""
    from taemi.predict_media import extraction_plan
    from taemi.run import features_record

    media = good_corpus(tmp_path / "media", hz=(440,))
    store = tmp_path / "store"
    assert run(media, store, vision_fps=5).done == 2
    before = (store / "manifest.json").read_text()
    for other in (None, 10):
        with pytest.raises(StoreError, match="must not be mixed"):
            run(media, store, vision_fps=other, force=True)
    assert (store / "manifest.json").read_text() == before
    record = json.loads(json.dumps(features_record(FeatureStore(store))))  # as features.json
    assert record["modalities"]["vision"]["settings"]["vision_fps"] == 5.0
    profile, opts, face = extraction_plan(record, None)
    assert (profile, opts.vision_fps, face) == ("fake", 5.0, False)
    sources, _ = find_sources([media])
    s = extract(sources, store, fake_encoders(), opts, progress=False)
    assert s.done == 0 and s.skipped == 2  # the same settings: the store takes them
    exact = tmp_path / "exact"
    assert run(media, exact).done == 2
    record = features_record(FeatureStore(exact))
    assert extraction_plan(record, None)[1].vision_fps is None  # absent: every frame


def test_vision_fps_refuses_face_images(tmp_path):
    from PIL import Image

    media = good_corpus(tmp_path / "media", hz=(440,))
    faces = tmp_path / "faces"
    faces.mkdir()
    for k in range(3):
        Image.fromarray(colour_frames(1)[0]).save(faces / f"{k}.jpg")
    src = Source("av", media / "av.mp4", face_dir=faces)
    s = extract(
        [src], tmp_path / "store", fake_encoders(), ExtractOptions(vision_fps=5), progress=False
    )
    assert (s.done, s.failed) == (0, 1)
    (line,) = error_lines(tmp_path / "store")
    assert line["stage"] == "decode" and "numbered by frame index" in line["reason"]


def test_cli_vision_fps(tmp_path, cli_fakes, capsys):
    media = good_corpus(tmp_path / "media", hz=(440,))
    store = tmp_path / "store"
    for bad in ("0", "-1", "nan"):
        assert (
            main(["extract", "--input", str(media), "--out", str(store), "--vision-fps", bad]) == 2
        )
        err = capsys.readouterr().err
        assert "vision_fps must be a positive number" in err and "(--vision-fps)" in err
    assert not cli_fakes and not store.exists()  # refused before any model loads
    argv = ["extract", "--input", str(media), "--out", str(store), "--no-progress"]
    assert main([*argv, "--vision-fps", "7.5"]) == 0
    vision = json.loads((store / "manifest.json").read_text())["modalities"]["vision"]
    assert vision["settings"]["vision_fps"] == 7.5
