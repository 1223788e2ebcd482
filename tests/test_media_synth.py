"""The synthetic media corpus (``taemi.synth.media``, ``.speech``, ``.face``).

Written media (files, streams, durations, moving mouths, missing modalities), label CSVs,
determinism, resuming, that Whisper tiny.en understands the speech, that the cartoon face
is found by OpenCV's Haar detector, and the generating function on latents alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")

from taemi import EMI_EMOTIONS
from taemi.data.labels import read_labels
from taemi.extract.media import decode_audio, decode_video, probe
from taemi.synth import face, speech
from taemi.synth import media as ms

LAYOUTS = ("av", "no_audio", "no_video", "silent")


def _backend() -> str:
    """The TTS backend the tests use: the pip one when installed, else the program."""
    try:
        import espeakng_loader  # noqa: F401

        return "espeakng-loader"
    except ImportError:
        pass
    if shutil.which("espeak-ng"):
        return "espeak-ng"
    pytest.skip("no TTS: pip install espeakng-loader==0.2.4 (or apt-get install espeak-ng)")


def _small_config(**kw) -> ms.MediaSynthConfig:
    """6 clips covering the four layouts (the first seed that does, found on latents
    alone), with at least one valid clip."""
    base = {
        "clips": 6,
        "valid_fraction": 0.34,
        "missing_audio_rate": 0.2,
        "missing_video_rate": 0.2,
        "silent_rate": 0.2,
        "tts": _backend(),
    }
    base.update(kw)
    for seed in range(200):
        cfg = ms.MediaSynthConfig(**{**base, "seed": seed})
        if {ms.draw_latents(cfg, i).layout for i in range(cfg.clips)} == set(LAYOUTS):
            return cfg
    raise AssertionError("no seed below 200 gives all four layouts")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> ms.MediaCorpus:
    """Read-only: tests that change files copy it first."""
    return ms.make_media_corpus(tmp_path_factory.mktemp("media"), _small_config(), progress=False)


def _by_layout(corpus: ms.MediaCorpus, layout: str) -> list[ms.ClipRecord]:
    return [r for r in corpus.clips if r.latents.layout == layout]


# ---------------------------------------------------------------------------------------
# Files, streams, durations
# ---------------------------------------------------------------------------------------


def test_files_and_streams_follow_the_layout(corpus):
    raw = corpus.root / "raw"
    names = sorted(p.name for p in raw.iterdir())
    assert names == sorted(r.path.name for r in corpus.clips)  # no temporary leftovers
    for r in corpus.clips:
        lat = r.latents
        assert r.path.parent == raw and r.path.stem == lat.clip_id
        assert r.path.suffix == (".m4a" if lat.layout == "no_video" else ".mp4")
        info = probe(r.path)
        assert info["video"] == (lat.layout != "no_video"), lat
        assert info["audio"] == (lat.layout != "no_audio"), lat
    data = json.loads(corpus.corpus_json.read_text())
    assert data["complete"] is True and data["format"] == "taemi-media-synth"
    assert data["config"] == json.loads(json.dumps(dataclasses.asdict(corpus.config)))
    assert data["generator"]["tts"] == corpus.config.tts
    assert [c["id"] for c in data["clips"]] == [f"{i:05d}" for i in range(6)]
    for c, r in zip(data["clips"], corpus.clips):
        assert c["missing"] == r.latents.missing
        assert c["file"] == f"raw/{r.path.name}"


def test_media_decode_with_the_recorded_durations(corpus):
    cfg = corpus.config
    lo, hi = cfg.seconds
    for r in corpus.clips:
        assert lo <= r.seconds <= hi
        audio, video = decode_audio(r.path, max_seconds=None), decode_video(r.path)
        if r.latents.layout == "no_audio":
            assert audio is None
        else:
            assert audio.samples.shape[0] == round(r.seconds * 16000)  # whole AAC frames
            peak = float(np.abs(audio.samples).max())
            if r.latents.layout == "silent":
                assert peak < 1e-4 and r.speech_seconds == 0
            else:
                assert peak > 0.05 and 0.5 < r.speech_seconds <= hi - 0.5
                assert (
                    r.onset >= 0.25 - 1e-9 and r.onset + r.speech_seconds <= r.seconds - 0.25 + 1e-3
                )
        if r.latents.layout == "no_video":
            assert video is None
        else:
            assert len(video) == round(r.seconds * cfg.fps)
            assert video.frames[0].shape == (cfg.size, cfg.size, 3)
            assert abs(video.timestamps[-1] - (len(video) - 1) / cfg.fps) < 1e-3


def test_frames_change_and_the_mouth_talks(corpus):
    (talking,) = _by_layout(corpus, "av")[:1]
    frames = np.stack(decode_video(talking.path).frames).astype(np.float32)  # (T, H, W, 3)
    assert np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)).max() > 1.0
    # The renderer: the same face at the same instant, mouth shut vs open, differs only
    # around the mouth (lower middle of the face).
    rng = np.random.default_rng(0)
    style = face.FaceStyle.draw(rng, 3.0)
    knobs = ms.face_knobs(np.zeros(6), EMI_EMOTIONS)
    static = face.static_face(style, knobs, 160)
    shut = face.render_face(static, style, knobs, 0.0, 1.0).astype(np.int16)
    wide = face.render_face(static, style, knobs, 1.0, 1.0).astype(np.int16)
    changed = np.argwhere(np.abs(wide - shut).max(axis=2) > 30)  # (n, 2) rows, cols
    assert len(changed) > 20
    cy, cx = style.centre[1] * 160, style.centre[0] * 160
    assert changed[:, 0].min() > cy + 0.05 * 160  # below the nose
    assert np.abs(changed[:, 1] - cx).max() < 0.2 * 160


def test_label_csvs(corpus):
    train, valid = read_labels(corpus.train_csv), read_labels(corpus.valid_csv)
    assert train.emotions == valid.emotions == EMI_EMOTIONS
    assert len(valid) == corpus.config.valid_count == 2 and len(train) == 4
    assert sorted(train.ids + valid.ids) == [f"{i:05d}" for i in range(6)]
    assert all(re.fullmatch(r"[0-9]{5}", i) for i in train.ids + valid.ids)
    header = corpus.train_csv.read_text().splitlines()[0]
    assert header == "Filename,Admiration,Amusement,Determination,Empathic Pain,Excitement,Joy"
    for labels, split in ((train, "train"), (valid, "valid")):
        for clip_id, row in zip(labels.ids, labels.values):
            lat = corpus.record(clip_id).latents
            assert lat.split == split
            np.testing.assert_allclose(row, lat.label, atol=1e-6)


def test_missing_modalities_as_configured(corpus):
    flags = {r.latents.layout: r.latents.missing for r in corpus.clips}
    assert flags["av"] == {"audio": False, "vision": False, "text": False}
    assert flags["no_audio"] == {"audio": True, "vision": False, "text": True}
    assert flags["no_video"] == {"audio": False, "vision": True, "text": False}
    assert flags["silent"] == {"audio": False, "vision": False, "text": True}
    # A clip without an audio track still talks on screen.
    (mute,) = _by_layout(corpus, "no_audio")[:1]
    frames = np.stack(decode_video(mute.path).frames).astype(np.float32)
    assert np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)).max() > 1.0


# ---------------------------------------------------------------------------------------
# Determinism and resuming
# ---------------------------------------------------------------------------------------


def test_same_seed_same_corpus(corpus, tmp_path):
    again = ms.make_media_corpus(tmp_path, corpus.config, progress=False)
    assert again.train_csv.read_bytes() == corpus.train_csv.read_bytes()
    assert again.valid_csv.read_bytes() == corpus.valid_csv.read_bytes()
    for a, b in zip(corpus.clips, again.clips):
        assert a.latents.sentence == b.latents.sentence and a.seconds == b.seconds
        if a.latents.layout != "no_audio":
            np.testing.assert_array_equal(
                decode_audio(a.path).samples, decode_audio(b.path).samples
            )
        if a.latents.layout != "no_video":
            for fa, fb in zip(decode_video(a.path).frames, decode_video(b.path).frames):
                np.testing.assert_array_equal(fa, fb)
    other = dataclasses.replace(corpus.config, seed=corpus.config.seed + 1)
    labels = [ms.draw_latents(other, i).label for i in range(6)]
    assert not np.allclose(labels, [r.latents.label for r in corpus.clips])


def test_resume_recreates_only_what_is_missing(corpus, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(corpus.root, root)
    files = sorted((root / "raw").iterdir())
    victim = files[1]
    before = victim.read_bytes()
    victim.unlink()
    (root / "raw" / ".00003.mp4.partial").write_bytes(b"interrupted")
    mtimes = {p.name: p.stat().st_mtime_ns for p in files if p != victim}
    redo = ms.make_media_corpus(root, corpus.config, progress=False)
    assert (redo.made, redo.skipped) == (1, 5)
    assert victim.read_bytes() == before
    assert {p.name: p.stat().st_mtime_ns for p in files if p != victim} == mtimes
    assert not (root / "raw" / ".00003.mp4.partial").exists()
    assert (
        json.loads(redo.corpus_json.read_text())["clips"]
        == json.loads(corpus.corpus_json.read_text())["clips"]
    )


def test_resume_refuses_another_config(corpus, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(corpus.root, root)
    with pytest.raises(ValueError, match="another config"):
        ms.make_media_corpus(root, dataclasses.replace(corpus.config, fps=10), progress=False)


# ---------------------------------------------------------------------------------------
# Speech recognition, face detection
# ---------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    text = text.lower().replace("i'm", "i am").replace("we're", "we are")
    return re.sub(r"[^a-z' ]+", " ", text).split()


def _word_errors(reference: str, hypothesis: str) -> int:
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


@pytest.mark.slow
def test_whisper_tiny_understands_the_speech(corpus):
    whisper = pytest.importorskip("taemi.backbones.whisper")
    try:
        recognizer = whisper.WhisperRecognizer(whisper.load_whisper())
    except whisper.ModelLoadError as e:
        pytest.skip(f"packaged Whisper tiny.en unavailable: {e}")
    spoken = [r for r in corpus.clips if r.latents.layout in ("av", "no_video")][:2]
    assert len(spoken) == 2
    errors = words = 0
    for r in spoken:
        text = recognizer.transcribe(decode_audio(r.path).samples)
        errors += _word_errors(r.latents.sentence, text)
        words += len(_words(r.latents.sentence))
    assert errors / words < 0.5, (errors, words)
    (silent,) = _by_layout(corpus, "silent")[:1]
    assert recognizer.transcribe(decode_audio(silent.path).samples) == ""  # text missing


def test_haar_detector_finds_the_cartoon_face(corpus):
    from taemi.extract.face import FaceCropper

    cropper = FaceCropper()
    found = total = 0
    for r in corpus.clips:
        if r.latents.layout != "no_video":
            frames = decode_video(r.path).frames
            found += sum(cropper.detect(f) is not None for f in frames[::3])
            total += len(frames[::3])
    assert found / total > 0.5, (found, total)  # measured ~0.9 over 40 clips


# ---------------------------------------------------------------------------------------
# The generating function (latents only: no media)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many() -> tuple[ms.MediaSynthConfig, list[ms.ClipLatents]]:
    cfg = ms.MediaSynthConfig(clips=3000, seed=3)
    valid = ms.valid_indices(cfg)
    return cfg, [ms.draw_latents(cfg, i, valid=valid) for i in range(cfg.clips)]


def test_labels_follow_the_known_function(many):
    cfg, lats = many
    y = np.stack([lat.label for lat in lats])  # (N, E)
    t, a, f = (np.stack([getattr(lat, m) for lat in lats]) for m in ("text", "audio", "face"))
    assert y.min() >= 0 and y.max() <= 1
    for e in range(len(cfg.emotions)):
        for latent in (t, a, f):
            assert np.corrcoef(y[:, e], latent[:, e])[0, 1] > 0.5
    # Least squares on the unclipped labels recovers the weights; residual = label noise.
    inside = (y > 0.01) & (y < 0.99)
    x = np.stack([t[inside], a[inside], f[inside]], axis=1)  # (M, 3)
    w, *_ = np.linalg.lstsq(x, y[inside], rcond=None)
    np.testing.assert_allclose(w, cfg.weights, atol=0.03)
    assert abs(np.std(y[inside] - x @ w) - cfg.label_noise) < 0.01
    np.testing.assert_allclose(
        ms.label_fn(t, a, f, 0.0, cfg.weights), np.clip(0.45 * t + 0.3 * a + 0.25 * f, 0, 1)
    )


def test_text_levels_and_sentences(many):
    cfg, lats = many
    for lat in lats[:500]:
        words = lat.sentence.rstrip(".").replace(",", "").split()
        assert 4 <= len(words) <= 10, lat.sentence
        levels = np.asarray(lat.levels)
        assert (levels > 0).sum() <= cfg.max_phrases
        np.testing.assert_allclose(lat.text, levels / 3)
        for e, name in enumerate(cfg.emotions):
            mild, strong = ms.EMOTION_WORDS[name]
            said = [w for w in words if w in mild + strong]
            if levels[e] == 0:
                assert not said, (name, lat.sentence)
            else:
                assert len(said) == 1 and (said[0] in strong) == (levels[e] >= 2), (
                    name,
                    lat.sentence,
                )
                before = words[words.index(said[0]) - 1]
                assert (before in ("so", "very", "really", "truly")) == (levels[e] == 3), (
                    lat.sentence
                )
    assert ms.text_levels(np.array([0.1, 0.3, 0.6, 0.9, 0.8, 0.5]), 3).tolist() == [
        0,
        0,
        2,
        3,
        3,
        0,
    ]


def test_layouts_and_splits_follow_the_rates(many):
    cfg, lats = many
    counts = {k: sum(lat.layout == k for lat in lats) for k in LAYOUTS}
    for k in ("no_audio", "no_video", "silent"):
        assert abs(counts[k] / cfg.clips - 0.05) < 0.015, counts
    assert sum(lat.split == "valid" for lat in lats) == cfg.valid_count == 750


def test_voice_and_face_carry_the_emotions():
    one = {e: np.eye(6)[k] for k, e in enumerate(EMI_EMOTIONS)}
    zero = np.zeros(6)
    neutral_voice, neutral_face = (
        ms.voice_knobs(zero, EMI_EMOTIONS),
        ms.face_knobs(zero, EMI_EMOTIONS),
    )
    assert ms.voice_knobs(one["Excitement"], EMI_EMOTIONS)["rate"] > neutral_voice["rate"] + 40
    assert ms.voice_knobs(one["Excitement"], EMI_EMOTIONS)["pitch"] > neutral_voice["pitch"] + 15
    assert ms.voice_knobs(one["Empathic Pain"], EMI_EMOTIONS)["rate"] < neutral_voice["rate"] - 40
    assert ms.voice_knobs(one["Amusement"], EMI_EMOTIONS)["tremolo"] > 0.3
    assert ms.face_knobs(one["Joy"], EMI_EMOTIONS)["smile"] > neutral_face["smile"] + 0.5
    assert ms.face_knobs(one["Empathic Pain"], EMI_EMOTIONS)["brow_tilt"] > 0.5
    assert ms.face_knobs(one["Determination"], EMI_EMOTIONS)["brow_tilt"] < -0.5
    assert ms.face_knobs(one["Admiration"], EMI_EMOTIONS)["gaze_up"] > 0.5
    # The prototype maps are full rank: every emotion moves voice and face differently.
    for protos, base in ((ms.VOICE_PROTOTYPES, ms.VOICE_BASE), (ms.FACE_PROTOTYPES, ms.FACE_BASE)):
        mat = np.array([[protos[e].get(k, 0.0) for k in base] for e in EMI_EMOTIONS])
        assert np.linalg.matrix_rank(mat) == 6


def test_a_subset_of_emotions():
    cfg = ms.MediaSynthConfig(clips=20, emotions=("Joy", "Excitement"))
    lat = ms.draw_latents(cfg, 0)
    assert lat.label.shape == lat.text.shape == (2,) and set(lat.missing) == {
        "audio",
        "vision",
        "text",
    }


def test_long_speech_is_sped_up_or_cut_to_fit():
    cfg = ms.MediaSynthConfig(
        clips=30,
        seconds=(1.0, 1.5),
        tts=_backend(),
        missing_audio_rate=0,
        missing_video_rate=0,
        silent_rate=0,
    )
    tts = speech.make_tts(cfg.tts)
    plans = [ms.plan_clip(ms.draw_latents(cfg, i), cfg, tts) for i in range(8)]
    for p in plans:
        assert 1.0 - 1e-9 <= p.seconds <= 1.5 and p.speech_seconds <= 1.0 + 1e-9
        assert p.audio.shape == (round(p.seconds * 16000),)
    assert any(p.rate > 200 for p in plans)


# ---------------------------------------------------------------------------------------
# Configuration and backends
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("emotions", ("Joy", "Anger"), r"\['Anger'\] have no words.*known"),
        ("missing_audio_rate", 0.6, "exclusive"),
        ("size", 161, "even"),
        ("seconds", (3.0, 2.0), "low <= high"),
        ("tts", "festival", "unknown tts 'festival'"),
        ("weights", (1.0, -0.1, 0.1), "non-negative"),
    ],
)
def test_bad_configs_are_refused(field, value, message):
    kw = {field: value}
    if field == "missing_audio_rate":
        kw["missing_video_rate"] = 0.5
    with pytest.raises(ValueError, match=message):
        ms.MediaSynthConfig(**kw)


def test_missing_backends_say_how_to_install(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        speech.make_tts("espeak-ng")
    monkeypatch.setattr(speech.EspeakNGLoader, "_instance", None)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    with pytest.raises(RuntimeError, match=r"pip install espeakng-loader==0\.2\.4"):
        speech.make_tts("espeakng-loader")


def test_both_backends_say_the_same_thing():
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng program not on PATH")
    pytest.importorskip("espeakng_loader")
    voice = speech.Voice("en-us+m3", 160, 45, 50, 0)
    a = speech.make_tts("espeakng-loader").synthesize("I am happy and ready today.", voice)
    b = speech.make_tts("espeak-ng").synthesize("I am happy and ready today.", voice)
    assert abs(a.size - b.size) < 0.05 * a.size  # versions differ: close, not equal
    np.testing.assert_array_equal(
        a, speech.make_tts("espeakng-loader").synthesize("I am happy and ready today.", voice)
    )
