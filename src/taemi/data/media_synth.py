"""Synthetic MEDIA corpus: short talking-face videos whose words, voice and face carry
known emotion intensities, written in the ABAW EMI layout (spec section 2).

It lets the whole path media -> features -> train -> predict run on a CPU in minutes
and learn something measurable. Unlike :mod:`taemi.data.synth` (feature stores), this
module writes real media that the extractors decode, transcribe and encode.

Layout written under ``out_dir``:

- ``raw/{id}.mp4``: H.264 video (libx264, yuv420p, ``fps``, ``size`` x ``size``) with a
  mono AAC audio track at ``sample_rate``. A clip drawn as "no audio" is an ``.mp4``
  with a video stream only. A clip drawn as "no video" is an audio-only AAC file
  ``raw/{id}.m4a`` (an MP4 without a video stream would be unusual; ``.m4a`` is what
  such a file is called, and the extract pipeline takes ``.m4a`` inputs);
- ``train_split.csv``, ``valid_split.csv``: ``Filename,<emotions>``, 5-digit ids
  (``00000``...), written with :func:`taemi.data.labels.write_predictions`;
- ``corpus.json``: the config, the generating function's constants, generator
  versions (taemi, TTS backend and its espeak-ng version, PyAV/FFmpeg, OpenCV) and one
  record per clip (latents, label, sentence, voice and face parameters, missing
  modalities, duration, speech onset).

Generating function (E emotions; every clip ``i`` has its own random streams
``numpy.random.default_rng([seed, i, stream])``, so clips are independent of each other
and of the order in which they are made):

1. Sparse intensities. ``D``: with probability ``active_rate`` uniform on [0.3, 1]
   ("the emotion is there"), otherwise uniform on [0, 0.15]. A shared latent
   ``z ~ D^E`` and, per modality m in (text, audio, face), an own ``x_m ~ D^E``;
   ``u_m = c z + (1 - c) x_m`` with ``c = coherence``: the modalities agree partly
   and each also carries something the others do not.
2. Text: levels ``l_e = min(floor(4 u_text,e), 3)`` (0 none, 1 a mild word, 2 a strong
   word, 3 an intensifier + a strong word, see :data:`EMOTION_WORDS`); only the
   ``max_phrases`` largest (by ``u_text``) keep their level, the rest are set to 0. The
   EXPRESSED text latent is ``t_e = l_e / 3``. The sentence is an opener ("I am", "I
   feel", ...) + the phrases joined with commas and "and" (+ a neutral tail when
   shorter than 4 words), 4-10 common words; with no level > 0 it is a neutral sentence.
3. Voice: knobs ``k = base + P_audio^T u_audio + speaker jitter``, clipped
   (:data:`VOICE_BASE`, :data:`VOICE_PROTOTYPES`, :data:`VOICE_LIMITS`): espeak-ng pitch
   (0-99), pitch range (0-100), rate (words/min), word gap (10 ms units); after the TTS,
   a gain in dB and a 5 Hz tremolo (amplitude modulation depth). Speaker: one of
   :data:`SPEAKERS` (nuisance, independent of the labels), pitch jitter N(0, 4^2) and
   rate jitter N(0, 8^2).
4. Face: knobs ``f = base + P_face^T u_face``, clipped (:data:`FACE_BASE`,
   :data:`FACE_PROTOTYPES`, :data:`FACE_LIMITS`): smile, mouth width, talking gain,
   eyebrow raise, eyebrow tilt (inner end up = sad, down = frown), eye openness, gaze
   up, blush. A cartoon face is drawn per frame with OpenCV; its mouth opens with the
   speech envelope (times the talking gain); it blinks, sways and sits on a random
   background, skin and hair colour (nuisances).
5. Label ``y = clip(w_t t + w_a u_audio + w_f u_face + N(0, label_noise^2), 0, 1)``
   with ``(w_t, w_a, w_f) = weights``. The label does not change when a modality is
   missing: its information is then genuinely lost.
6. Missing modalities (one uniform draw per clip, exclusive cases): with probability
   ``missing_audio_rate`` no audio track (audio and text missing; the face still
   talks); ``missing_video_rate`` audio only (vision missing); ``silent_rate`` the audio
   track is silence (text missing, the mouth stays closed).
7. Duration: the speech is synthesised first; the clip lasts ``T ~ U(max(lo, need),
   hi)`` seconds, ``need`` = speech + 0.25 s of silence on each side, rounded to a whole
   number of AAC frames (1024 samples, 64 ms at 16 kHz) inside [lo, hi], so that the
   decoded audio track is exactly T long; the video has ``round(T * fps)`` frames. The
   speech starts at a uniform onset in the silence left. Speech too long for ``hi`` is re-
   synthesised faster (the rate used is recorded), and cut with a fade as a last resort
   (``trimmed`` in corpus.json, logged).

TTS: espeak-ng (formant synthesis, https://github.com/espeak-ng/espeak-ng), through
``tts="espeakng-loader"`` (the pip package ``espeakng-loader``, which bundles
libespeak-ng and its data; driven through ctypes, nothing else to install) or
``tts="espeak-ng"`` (the ``espeak-ng`` program on PATH, e.g. ``apt-get install
espeak-ng``). The two differ in espeak-ng version, so their audio differs slightly; the
corpus records which one made it. Speech is resampled to ``sample_rate`` by FFmpeg's
swresample (PyAV) and padded with silence to the clip length.

The face is a cartoon shaded like a frontal face (dark eye sockets, light nose bridge
and cheeks): OpenCV's Haar frontal-face detector (:mod:`taemi.extract.face`, default
settings) finds it in about 90 % of the frames (it misses some blinks), so these videos
can be extracted with face cropping on or off.

Generation is deterministic: the same config, TTS backend and library versions give
byte-identical files. It resumes: a clip whose file exists is skipped (files are
written to a hidden temporary name and renamed into place, so an existing file is
complete), and an existing ``corpus.json`` made with a different config is refused.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from taemi import EMI_EMOTIONS, __version__
from taemi.data.labels import write_predictions

try:
    import av
    import cv2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.data.media_synth needs PyAV and OpenCV: pip install 'taemi[extract]' "
        "(av==18.1.0, opencv-python-headless)"
    ) from exc

__all__ = [
    "EMOTION_WORDS",
    "FACE_BASE",
    "FACE_LIMITS",
    "FACE_PROTOTYPES",
    "SPEAKERS",
    "TTS_BACKENDS",
    "VOICE_BASE",
    "VOICE_LIMITS",
    "VOICE_PROTOTYPES",
    "ClipLatents",
    "ClipPlan",
    "ClipRecord",
    "EspeakNGLoader",
    "EspeakNGProgram",
    "FaceStyle",
    "MediaCorpus",
    "MediaSynthConfig",
    "SpeechSynthesizer",
    "Voice",
    "draw_latents",
    "face_frames",
    "face_knobs",
    "label_fn",
    "make_media_corpus",
    "make_sentence",
    "make_tts",
    "plan_clip",
    "render_face",
    "static_face",
    "text_levels",
    "valid_indices",
    "voice_knobs",
]

log = logging.getLogger(__name__)

CORPUS_FORMAT = "taemi-media-synth"
CORPUS_VERSION = 1  # bump when the generating function changes what a seed produces

#: TTS backends :func:`make_tts` knows.
TTS_BACKENDS = ("espeakng-loader", "espeak-ng")

# Stream tags of the per-clip generators (never change them: they define the data).
_LATENT_STREAM = 0  # latents, label noise, sentence, voice, face, layout
_RENDER_STREAM = 1  # duration, onset, face nuisances, blinks, sway
_SPLIT_STREAM = 0x5EED_5917  # the train/valid permutation: default_rng([seed, _SPLIT_STREAM])

_PAD_SECONDS = 0.25  # silence kept on each side of the speech
_TREMOLO_HZ = 5.0  # tremolo (amplitude modulation) frequency
_AAC_FRAME = 1024  # samples per AAC frame

# ---------------------------------------------------------------------------------------
# The generating function's constants
# ---------------------------------------------------------------------------------------

#: Per emotion: (mild words, strong words). Level 1 uses a mild word, 2 a strong word,
#: 3 an intensifier + a strong word. Common English adjectives a speaker says of
#: themselves ("I am ..."), chosen among candidates by how often Whisper tiny.en
#: recognised them in espeak-ng's speech (e.g. "amused", "sad", "glad", "hilarious" and
#: "devastated" were often misheard and were left out).
EMOTION_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Admiration": (("proud", "impressed"), ("inspired", "amazed")),
    "Amusement": (("playful", "entertained"), ("laughing", "funny")),
    "Determination": (("ready", "focused"), ("determined", "unstoppable")),
    "Empathic Pain": (("sorry", "lonely"), ("miserable", "crushed")),
    "Excitement": (("excited", "eager"), ("thrilled", "electric")),
    "Joy": (("happy", "content"), ("delighted", "joyful")),
}
_INTENSIFIERS = ("so", "very", "really", "truly")
_OPENERS = ("I am", "I feel", "We are", "We feel", "Honestly I am", "Right now I feel")
_TAILS = ("today", "right now", "about this", "about it", "again", "this morning")
_NEUTRAL_SENTENCES = (
    "I went to the store today.",
    "We talked about the weather.",
    "The meeting starts at noon.",
    "She put the book on the table.",
    "Please close the door behind you.",
    "He walked home after work.",
    "The train leaves at seven.",
    "I need to buy some bread.",
)

#: espeak-ng voices (language + variant) a clip's speaker is drawn from (a nuisance).
SPEAKERS = ("en-us", "en-us+m3", "en-us+m7", "en-us+f2")

#: Voice knobs: espeak-ng pitch (0-99) and pitch range (0-100), rate (words per minute),
#: word gap (10 ms units), then applied to the waveform: gain (dB) and tremolo depth.
VOICE_BASE: dict[str, float] = {
    "pitch": 45.0,
    "range": 50.0,
    "rate": 165.0,
    "wordgap": 0.0,
    "gain_db": -2.0,
    "tremolo": 0.0,
}
#: Change of each voice knob per unit of an emotion's audio latent.
VOICE_PROTOTYPES: dict[str, dict[str, float]] = {
    "Admiration": {"pitch": 6, "range": 25, "rate": -25, "wordgap": 3, "gain_db": -2},
    "Amusement": {"pitch": 12, "range": 30, "rate": 10, "gain_db": 1, "tremolo": 0.35},
    "Determination": {"pitch": -14, "range": -30, "rate": -10, "wordgap": 2, "gain_db": 4},
    "Empathic Pain": {"pitch": -16, "range": -15, "rate": -45, "wordgap": 4, "gain_db": -7, "tremolo": 0.25},
    "Excitement": {"pitch": 22, "range": 25, "rate": 55, "gain_db": 4},
    "Joy": {"pitch": 18, "range": 15, "rate": 15, "gain_db": 2, "tremolo": 0.1},
}  # fmt: skip
#: Inclusive bounds each voice knob is clipped to.
VOICE_LIMITS: dict[str, tuple[float, float]] = {
    "pitch": (5.0, 95.0),
    "range": (0.0, 100.0),
    "rate": (100.0, 320.0),
    "wordgap": (0.0, 12.0),
    "gain_db": (-14.0, 5.0),
    "tremolo": (0.0, 0.6),
}

#: Face knobs: smile (mouth corners up; < 0 down), mouth width, talking gain (how far the
#: mouth opens at the loudest speech), eyebrow raise, eyebrow tilt (> 0 inner ends up, as
#: in sadness; < 0 inner ends down, a frown), eye openness, gaze up, blush.
FACE_BASE: dict[str, float] = {
    "smile": 0.0,
    "mouth_width": 0.0,
    "talk": 0.6,
    "brow_raise": 0.0,
    "brow_tilt": 0.0,
    "eye_open": 1.0,
    "gaze_up": 0.0,
    "blush": 0.0,
}
#: Change of each face knob per unit of an emotion's face latent (action-unit-like).
FACE_PROTOTYPES: dict[str, dict[str, float]] = {
    "Admiration": {"smile": 0.25, "brow_raise": 0.45, "eye_open": 0.15, "gaze_up": 0.8, "blush": 0.5},
    "Amusement": {"smile": 0.6, "mouth_width": 0.5, "talk": 0.2, "eye_open": -0.45, "blush": 0.2},
    "Determination": {"smile": -0.2, "mouth_width": -0.5, "brow_raise": -0.4, "brow_tilt": -0.9, "eye_open": -0.2},
    "Empathic Pain": {"smile": -0.8, "brow_raise": 0.2, "brow_tilt": 0.9, "eye_open": -0.25, "gaze_up": -0.5},
    "Excitement": {"smile": 0.25, "mouth_width": 0.2, "talk": 0.5, "brow_raise": 0.6, "eye_open": 0.55},
    "Joy": {"smile": 0.9, "mouth_width": 0.3, "eye_open": -0.1, "blush": 0.3},
}  # fmt: skip
#: Inclusive bounds each face knob is clipped to.
FACE_LIMITS: dict[str, tuple[float, float]] = {
    "smile": (-1.0, 1.0),
    "mouth_width": (-1.0, 1.0),
    "talk": (0.2, 1.3),
    "brow_raise": (-1.0, 1.0),
    "brow_tilt": (-1.0, 1.0),
    "eye_open": (0.3, 1.6),
    "gaze_up": (-1.0, 1.0),
    "blush": (0.0, 1.0),
}

_SKIN_RGB = ((236, 188, 160), (224, 172, 135), (198, 140, 105), (160, 110, 80), (110, 72, 50))
_HAIR_RGB = ((35, 25, 20), (70, 45, 30), (120, 85, 50), (180, 150, 100), (90, 90, 95))


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass
class MediaSynthConfig:
    """What :func:`make_media_corpus` writes (see the module docstring for the exact
    generating function)."""

    clips: int = 120  # number of clips (ids 00000 ..)
    valid_fraction: float = 0.25  # fraction of clips in valid_split.csv (random, by seed)
    seconds: tuple[float, float] = (2.0, 4.0)  # clip length range in seconds
    fps: int = 15  # video frames per second
    size: int = 160  # frame side in pixels (even: yuv420p)
    sample_rate: int = 16000  # audio track sample rate (Hz)
    emotions: tuple[str, ...] = EMI_EMOTIONS  # label columns; each must be in EMOTION_WORDS
    weights: tuple[float, float, float] = (0.45, 0.3, 0.25)  # label weights (text, audio, face)
    coherence: float = 0.5  # share c of the latent common to all modalities
    active_rate: float = 0.35  # probability that an emotion is "there" in a latent draw
    max_phrases: int = 3  # emotions a sentence names at most
    label_noise: float = 0.05  # std of the Gaussian noise added to labels
    missing_audio_rate: float = 0.05  # clips written without an audio track (raw/{id}.mp4)
    missing_video_rate: float = 0.05  # clips written audio-only (raw/{id}.m4a)
    silent_rate: float = 0.05  # clips whose audio is silence (empty transcript: text missing)
    tts: str = "espeakng-loader"  # "espeakng-loader" (pip) or "espeak-ng" (program on PATH)
    crf: int = 20  # libx264 constant rate factor (quality; lower is better)
    seed: int = 0  # everything generated follows from it

    def __post_init__(self) -> None:
        if isinstance(self.emotions, str):
            raise TypeError(
                f"emotions must be a sequence of names, not the string {self.emotions!r}"
            )
        self.seconds = tuple(float(s) for s in self.seconds)  # type: ignore[assignment]
        self.emotions = tuple(self.emotions)
        self.weights = tuple(float(w) for w in self.weights)  # type: ignore[assignment]
        if self.clips < 1:
            raise ValueError(f"clips must be >= 1, got {self.clips}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        lo, hi = self.seconds if len(self.seconds) == 2 else (None, None)
        if lo is None or not 0.5 <= lo <= hi <= 60.0:
            raise ValueError(
                f"seconds must be (low, high) with 0.5 <= low <= high <= 60, got {self.seconds}"
            )
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if self.size < 64 or self.size % 2:
            raise ValueError(f"size must be an even number >= 64, got {self.size}")
        if not 8000 <= self.sample_rate <= 48000:
            raise ValueError(f"sample_rate must be in [8000, 48000] Hz, got {self.sample_rate}")
        if not self.emotions:
            raise ValueError("emotions is empty")
        unknown = [e for e in self.emotions if e not in EMOTION_WORDS]
        if unknown:
            raise ValueError(
                f"emotions {unknown} have no words, voice or face prototypes; "
                f"known: {list(EMOTION_WORDS)}"
            )
        if len(set(self.emotions)) != len(self.emotions):
            raise ValueError(f"emotions repeat: {list(self.emotions)}")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(
                f"weights must be 3 non-negative numbers (text, audio, face), got {self.weights}"
            )
        for name in (
            "coherence",
            "active_rate",
            "missing_audio_rate",
            "missing_video_rate",
            "silent_rate",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        total = self.missing_audio_rate + self.missing_video_rate + self.silent_rate
        if total > 1.0:
            raise ValueError(
                f"missing_audio_rate + missing_video_rate + silent_rate = {total} > 1 "
                "(the cases are exclusive)"
            )
        if self.max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1, got {self.max_phrases}")
        if self.label_noise < 0:
            raise ValueError(f"label_noise must be >= 0, got {self.label_noise}")
        if self.tts not in TTS_BACKENDS:
            raise ValueError(f"unknown tts {self.tts!r}; expected one of {TTS_BACKENDS}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")

    @property
    def valid_count(self) -> int:
        """Number of clips in the valid split."""
        return round(self.valid_fraction * self.clips)


# ---------------------------------------------------------------------------------------
# Latents, labels and what each modality carries (cheap: no media)
# ---------------------------------------------------------------------------------------


@dataclass
class ClipLatents:
    """Everything about one clip that follows from (config, index) without any media."""

    index: int
    clip_id: str  # 5-digit id, "00042"
    split: str  # "train" or "valid"
    shared: np.ndarray  # (E,) z: the latent common to all modalities
    text: np.ndarray  # (E,) t = level / 3: the intensities the sentence expresses
    audio: np.ndarray  # (E,) u_audio: what the voice carries
    face: np.ndarray  # (E,) u_face: what the face carries
    label: np.ndarray  # (E,) y in [0, 1]
    levels: list[int]  # (E,) text levels 0..3
    sentence: str  # the words spoken (unless silent / no audio)
    speaker: str  # espeak-ng voice name
    voice: dict[str, float]  # voice knobs (VOICE_BASE keys)
    face_params: dict[str, float]  # face knobs (FACE_BASE keys)
    layout: str  # "av" (video + audio), "no_audio", "no_video" or "silent"

    @property
    def missing(self) -> dict[str, bool]:
        """Which modalities an extractor should find missing (audio, vision, text)."""
        return {
            "audio": self.layout == "no_audio",
            "vision": self.layout == "no_video",
            "text": self.layout in ("no_audio", "silent"),
        }

    @property
    def filename(self) -> str:
        """File name under ``raw/``."""
        return f"{self.clip_id}.m4a" if self.layout == "no_video" else f"{self.clip_id}.mp4"


def _sparse(rng: np.random.Generator, n: int, active_rate: float) -> np.ndarray:
    """(n,) draws of D: U(0.3, 1) with probability ``active_rate``, else U(0, 0.15)."""
    active = rng.random(n) < active_rate
    on = rng.uniform(0.3, 1.0, n)
    off = rng.uniform(0.0, 0.15, n)
    return np.where(active, on, off)


def text_levels(u_text: np.ndarray, max_phrases: int) -> np.ndarray:
    """(E,) int levels 0..3 from the text latent: ``min(floor(4 u), 3)``, only the
    ``max_phrases`` largest latents keep theirs (ties: the earlier emotion)."""
    levels = np.minimum(np.floor(4.0 * np.asarray(u_text)), 3).astype(np.int64)  # (E,)
    order = np.argsort(-np.asarray(u_text), kind="stable")
    levels[order[max_phrases:]] = 0
    return levels


def label_fn(
    text: np.ndarray,
    audio: np.ndarray,
    face: np.ndarray,
    noise: np.ndarray,
    weights: tuple[float, float, float],
) -> np.ndarray:
    """``clip(w_t text + w_a audio + w_f face + noise, 0, 1)``; any matching shapes."""
    w_t, w_a, w_f = weights
    y = (
        w_t * np.asarray(text)
        + w_a * np.asarray(audio)
        + w_f * np.asarray(face)
        + np.asarray(noise)
    )
    return np.clip(y, 0.0, 1.0)


def make_sentence(levels: np.ndarray, emotions: tuple[str, ...], rng: np.random.Generator) -> str:
    """The sentence for text ``levels`` (E,): see the module docstring (step 2)."""
    phrases: list[str] = []
    for e in np.argsort(-np.asarray(levels), kind="stable"):
        level = int(levels[e])
        if level == 0:
            break
        mild, strong = EMOTION_WORDS[emotions[e]]
        word = str(rng.choice(mild if level == 1 else strong))
        if level == 3:
            word = f"{rng.choice(_INTENSIFIERS)} {word}"
        phrases.append(word)
    if not phrases:
        return str(rng.choice(_NEUTRAL_SENTENCES))
    order = rng.permutation(len(phrases))
    phrases = [phrases[k] for k in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    words = f"{rng.choice(_OPENERS)} {body}"
    tail = str(rng.choice(_TAILS))
    n, n_tail = len(words.split()), len(tail.split())
    if n < 4 or (n + n_tail <= 10 and rng.random() < 0.5):
        words = f"{words} {tail}"
    return words + "."


def _apply_prototypes(
    latent: np.ndarray,
    emotions: tuple[str, ...],
    base: dict[str, float],
    prototypes: dict[str, dict[str, float]],
) -> dict[str, float]:
    knobs = dict(base)
    for e, name in enumerate(emotions):
        for key, delta in prototypes[name].items():
            knobs[key] += float(latent[e]) * delta
    return knobs


def voice_knobs(
    u_audio: np.ndarray, emotions: tuple[str, ...], jitter: tuple[float, float] = (0.0, 0.0)
) -> dict[str, float]:
    """Voice knobs for an audio latent (E,): ``base + P^T u``, + (pitch, rate) jitter,
    clipped to :data:`VOICE_LIMITS`."""
    knobs = _apply_prototypes(u_audio, emotions, VOICE_BASE, VOICE_PROTOTYPES)
    knobs["pitch"] += jitter[0]
    knobs["rate"] += jitter[1]
    return {k: float(np.clip(v, *VOICE_LIMITS[k])) for k, v in knobs.items()}


def face_knobs(u_face: np.ndarray, emotions: tuple[str, ...]) -> dict[str, float]:
    """Face knobs for a face latent (E,): ``base + P^T u``, clipped to :data:`FACE_LIMITS`."""
    knobs = _apply_prototypes(u_face, emotions, FACE_BASE, FACE_PROTOTYPES)
    return {k: float(np.clip(v, *FACE_LIMITS[k])) for k, v in knobs.items()}


def valid_indices(cfg: MediaSynthConfig) -> frozenset[int]:
    """Indices of the clips in the valid split (a seeded random subset)."""
    order = np.random.default_rng([cfg.seed, _SPLIT_STREAM]).permutation(cfg.clips)
    return frozenset(int(i) for i in order[: cfg.valid_count])


def draw_latents(
    cfg: MediaSynthConfig, i: int, *, valid: frozenset[int] | None = None
) -> ClipLatents:
    """Clip ``i``'s latents, label, sentence, voice and face knobs and layout, without
    making any media (cheap). ``valid``: the valid indices, if already computed."""
    if not 0 <= i < cfg.clips:
        raise IndexError(f"clip index {i} out of range for {cfg.clips} clips")
    valid = valid_indices(cfg) if valid is None else valid
    rng = np.random.default_rng([cfg.seed, i, _LATENT_STREAM])
    n = len(cfg.emotions)
    z = _sparse(rng, n, cfg.active_rate)  # (E,)
    own = [_sparse(rng, n, cfg.active_rate) for _ in range(3)]  # text, audio, face
    c = cfg.coherence
    u_text, u_audio, u_face = (c * z + (1.0 - c) * x for x in own)  # (E,) each
    levels = text_levels(u_text, cfg.max_phrases)
    t = levels / 3.0  # (E,)
    noise = rng.normal(0.0, cfg.label_noise, n) if cfg.label_noise > 0 else np.zeros(n)
    label = label_fn(t, u_audio, u_face, noise, cfg.weights)
    sentence = make_sentence(levels, cfg.emotions, rng)
    speaker = str(rng.choice(SPEAKERS))
    jitter = (float(rng.normal(0.0, 4.0)), float(rng.normal(0.0, 8.0)))
    r = rng.random()
    a, v, s = cfg.missing_audio_rate, cfg.missing_video_rate, cfg.silent_rate
    layout = (
        "no_audio" if r < a else "no_video" if r < a + v else "silent" if r < a + v + s else "av"
    )
    return ClipLatents(
        index=i,
        clip_id=f"{i:05d}",
        split="valid" if i in valid else "train",
        shared=z,
        text=t,
        audio=u_audio,
        face=u_face,
        label=label.astype(np.float64),
        levels=[int(x) for x in levels],
        sentence=sentence,
        speaker=speaker,
        voice=voice_knobs(u_audio, cfg.emotions, jitter),
        face_params=face_knobs(u_face, cfg.emotions),
        layout=layout,
    )


# ---------------------------------------------------------------------------------------
# Speech synthesis (espeak-ng)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """espeak-ng settings for one utterance."""

    name: str  # voice name with optional variant, e.g. "en-us+f2"
    rate: int  # words per minute (80..450)
    pitch: int  # 0..99, 50 normal
    range: int  # pitch range 0..100, 0 monotone, 50 normal
    wordgap: int  # pause between words, 10 ms units


class SpeechSynthesizer(Protocol):
    """Text + voice -> speech samples."""

    name: str  # backend name ("espeakng-loader", "espeak-ng")
    version: str  # espeak-ng version string
    sample_rate: int  # Hz of the returned samples

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        """(S,) int16 mono speech at ``sample_rate``."""
        ...


# espeak-ng's C API (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakNGLoader:
    """libespeak-ng from the ``espeakng-loader`` pip package, through ctypes.

    libespeak-ng keeps state between utterances in static variables (pitch flutter
    phase, waveform phase, ...) that neither ``espeak_Terminate`` nor a new
    ``espeak_Initialize`` resets, so the same text comes out a few samples different
    depending on what was said before; and ``espeak_Initialize`` seeds its random
    generator from the clock (reset here with ``espeak_ng_SetRandSeed(0)``). For
    reproducible speech every utterance uses a freshly loaded library: a private copy of
    the ``.so`` (its own file, so no other user of the package shares it) is loaded,
    initialised, used once and unloaded (``dlclose``), about 6 ms per utterance. On
    first use a probe sentence is spoken twice and must come out identical, else
    ``RuntimeError``.
    """

    name = "espeakng-loader"
    _instance: EspeakNGLoader | None = None
    _create_lock = threading.Lock()  # guards _instance
    _lock = threading.Lock()  # one utterance at a time (the library's state is global)

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise RuntimeError(
                "tts='espeakng-loader' needs the espeakng-loader package: "
                "pip install espeakng-loader==0.2.4 (it bundles libespeak-ng); "
                "or use tts='espeak-ng' with the espeak-ng program installed "
                "(apt-get install espeak-ng)"
            ) from exc
        import _ctypes

        self._unload = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary
        source = Path(espeakng_loader.get_library_path())
        self._data = str(
            Path(espeakng_loader.get_data_path()).parent
        ).encode()  # holds espeak-ng-data
        self._dir = tempfile.TemporaryDirectory(prefix="taemi-espeak-")
        self._library = Path(self._dir.name) / f"private-{source.name}"
        try:
            shutil.copyfile(source, self._library)
        except OSError as exc:
            raise RuntimeError(f"espeakng-loader: cannot copy {source}: {exc}") from exc
        self.sample_rate = 0
        self.version = ""
        probe = Voice("en-us", 175, 50, 50, 0)
        first = self.synthesize("Testing one two three.", probe)
        if first.size == 0 or not np.array_equal(
            first, self.synthesize("Testing one two three.", probe)
        ):
            raise RuntimeError(
                f"espeakng-loader: libespeak-ng {self.version} from {source} does not give the "
                "same speech twice even when reloaded; use tts='espeak-ng' (the program)"
            )

    @classmethod
    def get(cls) -> EspeakNGLoader:
        """The process's instance (created on first use)."""
        with cls._create_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _open(self) -> ctypes.CDLL:
        try:
            lib = ctypes.CDLL(str(self._library))
        except OSError as exc:
            raise RuntimeError(f"espeakng-loader: cannot load {self._library}: {exc}") from exc
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        try:
            lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        except AttributeError:
            self._unload(lib._handle)
            raise RuntimeError(
                f"espeakng-loader: {self._library} has no espeak_ng_SetRandSeed (espeak-ng < "
                "1.52), so its speech is not reproducible: pip install espeakng-loader==0.2.4"
            ) from None
        return lib

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        chunks: list[np.ndarray] = []

        def collect(wav, count, events) -> int:
            if wav and count > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0  # 0: go on

        callback = _SYNTH_CALLBACK(collect)
        with self._lock:
            lib = self._open()
            try:
                rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data, 0)
                if rate <= 0:
                    raise RuntimeError(
                        f"espeakng-loader: espeak_Initialize failed ({rate}), data {self._data!r}"
                    )
                self.sample_rate = int(rate)
                self.version = lib.espeak_Info(None).decode()
                lib.espeak_ng_SetRandSeed(0)  # Initialize seeds it from the clock
                lib.espeak_SetSynthCallback(callback)
                if lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                    raise ValueError(f"espeak-ng has no voice {voice.name!r}")
                settings = {**asdict(voice), "volume": 100}
                for key in ("rate", "pitch", "range", "wordgap", "volume"):
                    value = settings[key]
                    if lib.espeak_SetParameter(_PARAM[key], int(value), 0) != 0:
                        raise ValueError(f"espeak-ng refused {key}={value}")
                data = text.encode("utf-8")
                err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                                       _CHARS_UTF8 | _ENDPAUSE, None, None)  # fmt: skip
                if err != 0 or lib.espeak_Synchronize() != 0:
                    raise RuntimeError(f"espeak-ng failed ({err}) on {text!r}")
                lib.espeak_Terminate()
            finally:
                self._unload(lib._handle)
        if not chunks:
            return np.zeros(0, np.int16)
        return np.concatenate(chunks).astype(np.int16)  # (S,)


class EspeakNGProgram:
    """The ``espeak-ng`` program (``--stdout`` WAV). Pitch range is set with espeak's
    embedded command ``\\x01<n>R`` (the program has no option for it)."""

    name = "espeak-ng"

    def __init__(self, program: str = "espeak-ng") -> None:
        path = shutil.which(program)
        if path is None:
            raise RuntimeError(
                f"tts='espeak-ng' needs the {program!r} program on PATH: apt-get install "
                "espeak-ng (Debian/Ubuntu) or brew install espeak-ng (macOS); or use "
                "tts='espeakng-loader' (pip install espeakng-loader==0.2.4)"
            )
        self.program = path
        out = subprocess.run(
            [path, "--version"], check=False, capture_output=True, text=True, timeout=30
        )
        # "eSpeak NG text-to-speech: 1.51  Data at: ..."
        words = out.stdout.split()
        self.version = (
            words[words.index("text-to-speech:") + 1]
            if "text-to-speech:" in words
            else out.stdout.strip()
        )
        self.sample_rate = 22050

    def synthesize(self, text: str, voice: Voice) -> np.ndarray:
        cmd = [self.program, "--stdout", "--stdin", "-b", "1", "-v", voice.name, "-a", "100",
               "-s", str(voice.rate), "-p", str(voice.pitch), "-g", str(voice.wordgap)]  # fmt: skip
        # \x01<n>R: espeak's embedded command for the pitch range
        text_in = f"\x01{voice.range}R {text}".encode()
        done = subprocess.run(cmd, check=False, input=text_in, capture_output=True, timeout=60)
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {why}")
        with wave.open(io.BytesIO(done.stdout)) as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise RuntimeError(
                    f"espeak-ng wrote {w.getnchannels()} channel(s) of {8 * w.getsampwidth()} "
                    "bit, expected mono 16-bit"
                )
            self.sample_rate = w.getframerate()
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def make_tts(name: str) -> SpeechSynthesizer:
    """The TTS backend ``name`` (one of :data:`TTS_BACKENDS`); raises ``RuntimeError``
    saying how to install it when it is absent (never another backend instead)."""
    if name == "espeakng-loader":
        return EspeakNGLoader.get()
    if name == "espeak-ng":
        return EspeakNGProgram()
    raise ValueError(f"unknown tts {name!r}; expected one of {TTS_BACKENDS}")


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """(S,) int16 at rate_in -> (S',) float32 in [-1, 1] at rate_out (FFmpeg swresample)."""
    if samples.size == 0:
        return np.zeros(0, np.float32)
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------
# Clip plan: speech, duration, onset (needs the TTS, no rendering)
# ---------------------------------------------------------------------------------------


@dataclass
class ClipPlan:
    """What a clip's media hold, before encoding."""

    seconds: float  # clip length
    audio: np.ndarray  # (round(seconds * sample_rate),) float32: speech placed in silence
    envelope: np.ndarray  # (n_frames,) speech loudness per video frame, in [0, 1]
    speech_seconds: float  # 0 for silent clips
    onset: float  # speech start, seconds
    rate: int  # espeak-ng rate used (after any speed-up)
    trimmed: bool  # True when the speech was cut to fit


def _speech(lat: ClipLatents, tts: SpeechSynthesizer, rate: int, sample_rate: int) -> np.ndarray:
    k = lat.voice
    voice = Voice(lat.speaker, rate, round(k["pitch"]), round(k["range"]), round(k["wordgap"]))
    raw = tts.synthesize(lat.sentence, voice)
    x = _resample(raw, tts.sample_rate, sample_rate)  # (S,) float32
    nz = np.flatnonzero(np.abs(x) > 1e-3)  # drop espeak's leading/trailing silence
    x = x[nz[0] : nz[-1] + 1] if nz.size else x[:0]
    if k["tremolo"] > 0:
        t = np.arange(x.size) / sample_rate
        x = x * (1.0 - k["tremolo"] * 0.5 * (1.0 + np.sin(2 * np.pi * _TREMOLO_HZ * t)))
    return (x * 10.0 ** (k["gain_db"] / 20.0)).astype(np.float32)


def plan_clip(lat: ClipLatents, cfg: MediaSynthConfig, tts: SpeechSynthesizer | None) -> ClipPlan:
    """Synthesise the speech and place it in the clip (``tts`` may be ``None`` for silent
    clips only)."""
    sr, (lo, hi) = cfg.sample_rate, cfg.seconds
    rng = np.random.default_rng([cfg.seed, lat.index, _RENDER_STREAM])
    u_len, u_onset = rng.random(), rng.random()
    rate, trimmed = round(lat.voice["rate"]), False
    if lat.layout == "silent":
        speech = np.zeros(0, np.float32)
    else:
        if tts is None:
            raise ValueError(f"clip {lat.clip_id} has speech: a TTS is needed")
        longest = _AAC_FRAME * math.floor(hi * sr / _AAC_FRAME) / sr  # longest clip allowed
        room = max(longest - 2 * _PAD_SECONDS, 0.25)
        speech = _speech(lat, tts, rate, sr)
        for _ in range(3):  # too long for the longest clip: speak faster
            if speech.size / sr <= room or rate >= 450:
                break
            rate = min(450, math.ceil(rate * speech.size / sr / room * 1.05))
            speech = _speech(lat, tts, rate, sr)
        if speech.size / sr > room:
            trimmed = True
            keep = int(room * sr)
            log.warning("clip %s: speech %.2f s cut to %.2f s", lat.clip_id, speech.size / sr, room)
            fade = min(keep, int(0.05 * sr))
            speech = speech[:keep].copy()
            speech[keep - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    speech_s = speech.size / sr
    need = max(lo, speech_s + 2 * _PAD_SECONDS)
    seconds = need + u_len * (hi - need)
    # A whole number of AAC frames, so that the decoded track is exactly this long
    # (the encoder pads the last frame and decoders return it whole).
    n = _AAC_FRAME * round(seconds * sr / _AAC_FRAME)
    while n / sr > hi and n > _AAC_FRAME:
        n -= _AAC_FRAME
    while n / sr < need and (n + _AAC_FRAME) / sr <= hi:
        n += _AAC_FRAME
    n = max(n, _AAC_FRAME * math.ceil(speech.size / _AAC_FRAME))  # degenerate ranges only
    seconds = n / sr
    start = round(sr * (_PAD_SECONDS + u_onset * (seconds - speech_s - 2 * _PAD_SECONDS)))
    start = min(max(start, 0), n - speech.size)
    audio = np.zeros(n, np.float32)
    audio[start : start + speech.size] = np.clip(speech, -1.0, 1.0)
    return ClipPlan(
        seconds=seconds,
        audio=audio,
        envelope=_envelope(audio, sr, cfg.fps, _frame_count(seconds, cfg.fps)),
        speech_seconds=speech_s,
        onset=start / sr,
        rate=rate,
        trimmed=trimmed,
    )


def _frame_count(seconds: float, fps: int) -> int:
    return max(1, round(seconds * fps))


def _envelope(audio: np.ndarray, sr: int, fps: int, frames: int) -> np.ndarray:
    """(frames,) RMS of ``audio`` in a 1/fps window around each frame time, / its 95th
    percentile over the speech frames, clipped to [0, 1] (0 everywhere for silence)."""
    half = max(1, int(sr / fps / 2))
    centres = (np.arange(frames) / fps * sr).astype(np.int64)  # (frames,)
    windows = [audio[max(0, c - half) : c + half] for c in centres]
    rms = np.array([np.sqrt(np.mean(w**2)) if w.size else 0.0 for w in windows])  # (frames,)
    loud = rms[rms > 1e-4]
    if loud.size == 0:
        return np.zeros(frames)
    return np.clip(rms / np.percentile(loud, 95), 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# Face rendering
# ---------------------------------------------------------------------------------------


@dataclass
class FaceStyle:
    """Per-clip nuisances of the face drawing (independent of the labels)."""

    skin: tuple[float, float, float]  # RGB in [0, 1]
    hair: tuple[float, float, float]  # RGB in [0, 1]
    background: tuple[float, float, float]  # RGB in [0, 1]
    centre: tuple[float, float]  # face centre, fraction of the frame side
    scale: float  # face size factor
    sway: tuple[float, float, float]  # sway amplitude (pixels), rotation (degrees), Hz
    phase: float  # sway phase, radians
    blinks: tuple[float, ...]  # blink start times, seconds

    @classmethod
    def draw(cls, rng: np.random.Generator, seconds: float) -> FaceStyle:
        def jitter(rgb: tuple[int, ...], amount: float) -> tuple[float, float, float]:
            bright = rng.uniform(1.0 - 3 * amount, 1.0 + 3 * amount)
            c = np.clip(np.asarray(rgb) / 255.0 * bright + rng.normal(0.0, amount, 3), 0.0, 1.0)
            return (float(c[0]), float(c[1]), float(c[2]))

        grey = rng.uniform(0.35, 0.8)
        bg = np.clip(grey + rng.normal(0.0, 0.08, 3), 0.0, 1.0)
        blinks, t = [], rng.uniform(0.3, 2.0)
        while t < seconds:
            blinks.append(float(t))
            t += rng.uniform(1.5, 4.0)
        return cls(
            skin=jitter(_SKIN_RGB[rng.integers(len(_SKIN_RGB))], 0.015),
            hair=jitter(_HAIR_RGB[rng.integers(len(_HAIR_RGB))], 0.03),
            background=(float(bg[0]), float(bg[1]), float(bg[2])),
            centre=(float(rng.uniform(0.46, 0.54)), float(rng.uniform(0.5, 0.56))),
            scale=float(rng.uniform(0.92, 1.06)),
            sway=(
                float(rng.uniform(0.5, 2.5)),
                float(rng.uniform(0.5, 3.0)),
                float(rng.uniform(0.2, 0.6)),
            ),
            phase=float(rng.uniform(0, 2 * np.pi)),
            blinks=tuple(blinks),
        )


_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

Point = tuple[float, float]


def _pts(points: list[Point]) -> np.ndarray:
    """(n, 2) int32 fixed-point coordinates for cv2 (``_SHIFT`` fractional bits)."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


Colour = float | tuple[float, ...]  # a mask value, or RGB in [0, 1]


def _cv(colour: Colour) -> float | tuple[float, ...]:
    """A colour as cv2 takes it: Python floats."""
    return float(colour) if np.isscalar(colour) else tuple(float(c) for c in colour)


def _ellipse(canvas: np.ndarray, centre: Point, axes: Point, colour: Colour, arc=(0, 360)) -> None:
    """Fill an (arc of an) axis-aligned ellipse, anti-aliased, in place."""
    c, a = _pts([centre, axes])
    cv2.ellipse(canvas, c, a, 0, arc[0], arc[1], _cv(colour), -1, _AA, _SHIFT)


def _disc(canvas: np.ndarray, centre: Point, radius: float, colour: Colour) -> None:
    cv2.circle(canvas, _pts([centre])[0], int(radius * _ONE), _cv(colour), -1, _AA, _SHIFT)


def _stroke(canvas: np.ndarray, points: list[Point], colour: Colour, width: float) -> None:
    cv2.polylines(canvas, [_pts(points)], False, _cv(colour), max(1, int(width)), _AA, _SHIFT)


def _bezier(p0: Point, mid: Point, p2: Point, n: int = 12) -> list[Point]:
    """A quadratic curve from p0 to p2 passing through ``mid`` at its middle."""
    ctrl = np.asarray(mid) * 2 - (np.asarray(p0) + np.asarray(p2)) / 2
    s = np.linspace(0.0, 1.0, n)[:, None]  # (n, 1)
    curve = (1 - s) ** 2 * np.asarray(p0) + 2 * (1 - s) * s * ctrl + s**2 * np.asarray(p2)
    return [(float(x), float(y)) for x, y in curve]


def _over(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``img`` (H, W, 3) with ``colour`` ((3,) or (H, W, 3)) laid over it with ``alpha`` (H, W)."""
    return img * (1 - alpha[..., None]) + alpha[..., None] * colour


def static_face(style: FaceStyle, knobs: dict[str, float], size: int) -> np.ndarray:
    """(size, size, 3) float32 RGB: background, shoulders, hair, shaded skin (eye sockets,
    nose, cheeks), blush. The Haar detector relies on this shading (dark sockets, light
    nose bridge and cheeks)."""
    s = size * style.scale
    cx, cy = style.centre[0] * size, style.centre[1] * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (size, size) each

    def gauss(x0: float, y0: float, sx: float, sy: float) -> np.ndarray:
        return np.exp(-(((xx - x0) / (sx * s)) ** 2 + ((yy - y0) / (sy * s)) ** 2) / 2.0)

    def mask_of(draw: Callable[[np.ndarray], None]) -> np.ndarray:
        m = np.zeros((size, size), np.float32)
        draw(m)
        return m

    skin = np.asarray(style.skin, np.float32)
    vertical = 1.0 - 0.25 * yy / size  # light from above
    img = np.asarray(style.background, np.float32) * vertical[..., None]  # (size, size, 3)
    # shoulders (shirt) and neck (skin)
    body = mask_of(lambda m: _ellipse(m, (cx, cy + 0.62 * s), (0.45 * s, 0.22 * s), 1.0))
    neck = ((np.abs(xx - cx) < 0.1 * s) & (yy > cy + 0.2 * s)).astype(np.float32)
    shirt = np.asarray(style.hair, np.float32) * 0.5 + 0.25
    img = _over(
        img, np.maximum(body, neck), _over(np.broadcast_to(shirt, img.shape), neck, skin * 0.8)
    )
    # hair behind the head
    hair = mask_of(lambda m: _ellipse(m, (cx, cy - 0.06 * s), (0.34 * s, 0.4 * s), 1.0))
    hair[yy > cy + 0.05 * s] = 0.0
    hair_rgb = (
        np.asarray(style.hair, np.float32)
        * (0.8 + 0.2 * gauss(cx - 0.1 * s, cy - 0.3 * s, 0.2, 0.1))[..., None]
    )
    img = _over(img, hair, hair_rgb)
    # face: a skin ellipse, darker towards the rim, with sockets, nose and cheeks shaded
    a, b = 0.29 * s, 0.38 * s
    face = mask_of(lambda m: _ellipse(m, (cx, cy), (a, b), 1.0))
    shade = 1.05 - 0.3 * np.clip(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2, 0, 1) ** 2
    for side in (-1, 1):
        shade -= 0.3 * gauss(cx + side * 0.12 * s, cy - 0.08 * s, 0.08, 0.05)  # eye socket
        shade += 0.08 * gauss(cx + side * 0.14 * s, cy + 0.08 * s, 0.07, 0.06)  # cheek
        shade -= 0.22 * gauss(cx + side * 0.045 * s, cy + 0.02 * s, 0.015, 0.06)  # nose side
    shade += 0.12 * gauss(cx, cy - 0.01 * s, 0.02, 0.08)  # nose bridge
    shade -= 0.3 * gauss(cx, cy + 0.085 * s, 0.035, 0.012)  # under the nose
    shade -= 0.15 * gauss(cx, cy + 0.3 * s, 0.1, 0.03)  # under the lip
    face_rgb = skin * shade[..., None]
    if knobs["blush"] > 0:
        red = np.asarray((0.86, 0.35, 0.38), np.float32)
        for side in (-1, 1):
            g = 0.55 * knobs["blush"] * gauss(cx + side * 0.15 * s, cy + 0.09 * s, 0.05, 0.035)
            face_rgb = _over(face_rgb, g, red)
    img = _over(img, face, face_rgb)
    # fringe over the forehead, nostrils
    fringe = mask_of(
        lambda m: _ellipse(m, (cx, cy - 0.3 * s), (0.3 * s, 0.13 * s), 1.0, (180, 360))
    )
    img = _over(img, fringe * face, hair_rgb)
    for side in (-1, 1):
        _ellipse(
            img, (cx + side * 0.025 * s, cy + 0.07 * s), (0.012 * s, 0.007 * s), tuple(skin * 0.35)
        )
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_face(
    static: np.ndarray,
    style: FaceStyle,
    knobs: dict[str, float],
    mouth_open: float,
    t: float,
) -> np.ndarray:
    """One frame: (size, size, 3) uint8 RGB. ``static`` from the clip's static layer,
    ``mouth_open`` in [0, 1] (the speech envelope at ``t`` times the talking gain)."""
    size = static.shape[0]
    s = size * style.scale
    cx, cy = style.centre[0] * size, style.centre[1] * size
    img = static.copy()  # (size, size, 3) float32
    hair = tuple(float(c) * 0.8 for c in style.hair)
    blink = any(0.0 <= t - b < 0.15 for b in style.blinks)
    eye_y, ew = cy - 0.08 * s, 0.055 * s
    eh = 0.028 * s * knobs["eye_open"] * (0.08 if blink else 1.0)  # half the lid aperture
    for side in (-1, 1):
        ex = cx + side * 0.12 * s
        # eye: sclera, iris and pupil (clipped to the sclera), upper lid
        sclera = np.zeros((size, size), np.float32)
        _ellipse(sclera, (ex, eye_y), (ew, max(eh, 0.3)), 1.0)
        eye = np.empty_like(img)
        eye[:] = (0.92, 0.92, 0.9)
        iris_y = eye_y - knobs["gaze_up"] * 0.01 * s
        _disc(eye, (ex, iris_y), 0.024 * s, (0.3, 0.22, 0.15))
        _disc(eye, (ex, iris_y), 0.011 * s, (0.03, 0.03, 0.03))
        img = _over(img, sclera, eye)
        lid = _bezier((ex - ew, eye_y), (ex, eye_y - eh), (ex + ew, eye_y))
        _stroke(img, lid, (0.1, 0.07, 0.06), 0.012 * s)
        # eyebrow through its inner end, arch and outer end
        by = eye_y - 0.075 * s - knobs["brow_raise"] * 0.03 * s
        tilt = knobs["brow_tilt"] * 0.03 * s  # > 0: inner end up
        inner = (cx + side * 0.045 * s, by - tilt)
        arch = (cx + side * 0.11 * s, by - 0.015 * s - 0.3 * tilt)
        outer = (cx + side * 0.18 * s, by + 0.3 * tilt + 0.01 * s)
        _stroke(img, _bezier(inner, arch, outer), hair, max(2.0, 0.028 * s))
    # mouth: two curves through the corners, the opening between them
    my = cy + 0.2 * s
    mw = 0.085 * s * (1.0 + 0.35 * knobs["mouth_width"] + 0.15 * max(knobs["smile"], 0.0))
    lift = knobs["smile"] * 0.04 * s  # corners up (smile) or down
    gap = mouth_open * 0.075 * s
    left, right = (cx - mw, my - lift), (cx + mw, my - lift)
    upper = _bezier(left, (cx, my - 0.3 * gap), right)
    lower = _bezier(left, (cx, my + 0.7 * gap + 0.2 * max(lift, 0.0)), right)
    if gap > 0.5:
        cv2.fillPoly(img, [_pts(upper + lower[::-1])], (0.22, 0.05, 0.06), _AA, _SHIFT)
    _stroke(img, upper, (0.62, 0.3, 0.3), 0.018 * s)
    _stroke(img, lower, (0.62, 0.3, 0.3), 0.024 * s)
    # head sway: a small rotation and shift of the whole frame
    amp, deg, hz = style.sway
    phase = 2 * np.pi * hz * t + style.phase
    rot = cv2.getRotationMatrix2D((cx, cy), deg * math.sin(phase), 1.0)  # (2, 3)
    rot[0, 2] += amp * math.sin(phase * 1.3)
    rot[1, 2] += 0.5 * amp * math.cos(phase)
    img = cv2.warpAffine(
        img, rot, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def face_frames(lat: ClipLatents, plan: ClipPlan, cfg: MediaSynthConfig) -> list[np.ndarray]:
    """The clip's frames, each (size, size, 3) uint8 RGB."""
    rng = np.random.default_rng([cfg.seed, lat.index, _RENDER_STREAM])
    rng.random(2)  # the plan's two draws (duration, onset)
    style = FaceStyle.draw(rng, plan.seconds)
    static = static_face(style, lat.face_params, cfg.size)
    talk = lat.face_params["talk"]
    return [
        render_face(static, style, lat.face_params, float(plan.envelope[k]) * talk, k / cfg.fps)
        for k in range(plan.envelope.shape[0])
    ]


# ---------------------------------------------------------------------------------------
# Writing media
# ---------------------------------------------------------------------------------------


def _write_media(
    path: Path,
    frames: list[np.ndarray] | None,
    audio: np.ndarray | None,
    cfg: MediaSynthConfig,
) -> None:
    """Encode to a temporary file next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            vstream = astream = None
            if frames is not None:
                vstream = out.add_stream("libx264", rate=cfg.fps)
                vstream.width = vstream.height = cfg.size
                vstream.pix_fmt = "yuv420p"
                # Reproducible bytes: one thread, mbtree off, and RGB frames converted by
                # FFmpeg's scaler (whose output buffers are padded). Fed unpadded yuv420p
                # arrays, x264 (core 165, PyAV 18.1) with mbtree gave different bytes for
                # the same frames from call to call.
                vstream.options = {"crf": str(cfg.crf), "preset": "veryfast", "mbtree": "0"}
                vstream.codec_context.thread_count = 1
            if audio is not None:
                astream = out.add_stream("aac", rate=cfg.sample_rate, layout="mono")
                astream.bit_rate = 64000
            if astream is not None:
                block = 1024
                for k in range(0, audio.shape[0], block):
                    chunk = np.ascontiguousarray(audio[k : k + block].reshape(1, -1))  # (1, n)
                    frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                    frame.sample_rate = cfg.sample_rate
                    frame.pts = k
                    out.mux(astream.encode(frame))
                out.mux(astream.encode(None))
            if vstream is not None:
                for k, image in enumerate(frames):
                    frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts = k
                    out.mux(vstream.encode(frame))
                out.mux(vstream.encode(None))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------


@dataclass
class ClipRecord:
    """One clip as made (``corpus.json``'s per-clip entry, plus its path)."""

    latents: ClipLatents  # what was drawn
    path: Path  # raw/{id}.mp4 or raw/{id}.m4a
    seconds: float  # clip length
    speech_seconds: float  # length of the speech in it (0: silent)
    onset: float  # speech start, seconds
    rate: int  # espeak-ng rate used
    trimmed: bool  # speech cut to fit

    def to_json(self, emotions: tuple[str, ...]) -> dict:
        """The clip's entry in ``corpus.json``."""
        lat = self.latents

        def per_emotion(v: np.ndarray) -> dict[str, float]:
            return {e: round(float(x), 6) for e, x in zip(emotions, v)}

        return {
            "id": lat.clip_id,
            "split": lat.split,
            "file": f"raw/{self.path.name}",
            "layout": lat.layout,
            "missing": lat.missing,
            "seconds": round(self.seconds, 6),
            "sentence": lat.sentence,
            "spoken": lat.layout in ("av", "no_video"),
            "speech_seconds": round(self.speech_seconds, 6),
            "speech_onset": round(self.onset, 6),
            "label": per_emotion(lat.label),
            "latents": {
                "shared": per_emotion(lat.shared),
                "text": per_emotion(lat.text),
                "audio": per_emotion(lat.audio),
                "face": per_emotion(lat.face),
            },
            "text_levels": dict(zip(emotions, lat.levels)),
            "speaker": lat.speaker,
            "voice": {**{k: round(v, 4) for k, v in lat.voice.items()}, "rate_used": self.rate},
            "face": {k: round(v, 4) for k, v in lat.face_params.items()},
            "trimmed": self.trimmed,
        }


@dataclass
class MediaCorpus:
    """What :func:`make_media_corpus` wrote."""

    root: Path
    raw: Path  # media folder
    train_csv: Path
    valid_csv: Path
    corpus_json: Path
    config: MediaSynthConfig
    clips: list[ClipRecord]  # in id order
    made: int  # clips written by this call
    skipped: int  # clips already present (resumed)
    seconds: float  # wall time of this call
    seconds_per_clip: float  # wall time per clip written (NaN when none was)
    generator: dict[str, str] = field(default_factory=dict)

    def record(self, clip_id: str) -> ClipRecord:
        """The clip ``clip_id``; ``KeyError`` if there is none."""
        for r in self.clips:
            if r.latents.clip_id == clip_id:
                return r
        raise KeyError(f"no clip {clip_id!r} in {self.root}")


def _generator_versions(tts: SpeechSynthesizer | None, cfg: MediaSynthConfig) -> dict[str, str]:
    return {
        "taemi": __version__,
        "corpus_version": str(CORPUS_VERSION),
        "tts": cfg.tts,
        "espeak_ng": tts.version if tts is not None else "unused",
        "av": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }


def _config_json(cfg: MediaSynthConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _constants() -> dict:
    return {
        "emotion_words": {k: [list(m), list(s)] for k, (m, s) in EMOTION_WORDS.items()},
        "intensifiers": list(_INTENSIFIERS),
        "speakers": list(SPEAKERS),
        "voice_base": VOICE_BASE,
        "voice_prototypes": VOICE_PROTOTYPES,
        "voice_limits": VOICE_LIMITS,
        "face_base": FACE_BASE,
        "face_prototypes": FACE_PROTOTYPES,
        "face_limits": FACE_LIMITS,
        "label": "clip(w_t * level/3 + w_a * u_audio + w_f * u_face + N(0, label_noise^2), 0, 1)",
    }


def make_media_corpus(
    out_dir: str | os.PathLike[str], cfg: MediaSynthConfig, *, progress: bool = True
) -> MediaCorpus:
    """Write the corpus of ``cfg`` under ``out_dir`` (see the module docstring).

    Resumes: clips whose file exists are kept (not rewritten); ``corpus.json`` and the
    label CSVs are rewritten. Raises ``ValueError`` if ``out_dir/corpus.json`` exists
    and was made with a different config, ``RuntimeError`` if the TTS backend is absent.
    """
    t0 = time.perf_counter()
    root = Path(out_dir)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    corpus_json = root / "corpus.json"
    if corpus_json.is_file():
        old = json.loads(corpus_json.read_text(encoding="utf-8"))
        if old.get("config") != _config_json(cfg):
            raise ValueError(
                f"{corpus_json} was made with another config ({old.get('config')}); "
                f"use a new folder for {_config_json(cfg)}"
            )
    for stale in raw.glob(".*.partial"):  # an interrupted earlier run
        stale.unlink()

    valid = valid_indices(cfg)
    latents = [draw_latents(cfg, i, valid=valid) for i in range(cfg.clips)]
    speaks = any(lat.layout != "silent" for lat in latents)
    tts = make_tts(cfg.tts) if speaks else None
    generator = _generator_versions(tts, cfg)
    if corpus_json.is_file():
        before = json.loads(corpus_json.read_text(encoding="utf-8")).get("generator", {})
        if before and before.get("espeak_ng") != generator["espeak_ng"]:
            log.warning(
                "%s: earlier clips were made with espeak-ng %s, new ones with %s",
                root, before.get("espeak_ng"), generator["espeak_ng"],
            )  # fmt: skip
    header = {
        "format": CORPUS_FORMAT,
        "version": CORPUS_VERSION,
        "config": _config_json(cfg),
        "generator": generator,
        "constants": _constants(),
    }
    _write_json(corpus_json, {**header, "complete": False, "clips": []})

    records: list[ClipRecord] = []
    made = skipped = 0
    make_seconds = 0.0
    for lat in tqdm(latents, desc="media synth", unit="clip", disable=not progress):
        path = raw / lat.filename
        exists = path.is_file() and path.stat().st_size > 0
        t1 = time.perf_counter()
        plan = plan_clip(lat, cfg, tts)
        if exists:
            skipped += 1
        else:
            frames = None if lat.layout == "no_video" else face_frames(lat, plan, cfg)
            audio = None if lat.layout == "no_audio" else plan.audio
            _write_media(path, frames, audio, cfg)
            made += 1
            make_seconds += time.perf_counter() - t1
        records.append(
            ClipRecord(
                lat, path, plan.seconds, plan.speech_seconds, plan.onset, plan.rate, plan.trimmed
            )
        )

    emotions = cfg.emotions
    train_csv, valid_csv = root / "train_split.csv", root / "valid_split.csv"
    for split, csv_path in (("train", train_csv), ("valid", valid_csv)):
        rows = [r.latents for r in records if r.latents.split == split]
        values = np.stack([r.label for r in rows]) if rows else np.zeros((0, len(emotions)))
        write_predictions(csv_path, [r.clip_id for r in rows], emotions, values)
    wall = time.perf_counter() - t0
    per_clip = make_seconds / made if made else float("nan")
    _write_json(
        corpus_json,
        {
            **header,
            "complete": True,
            "timing": {"made": made, "skipped": skipped, "seconds": round(wall, 3),
                       "seconds_per_clip": None if not made else round(per_clip, 4)},
            "clips": [r.to_json(emotions) for r in records],
        },
    )  # fmt: skip
    log.info(
        "media synth: %d clips made, %d kept, %.1f s (%.3f s/clip) in %s",
        made,
        skipped,
        wall,
        per_clip,
        root,
    )
    return MediaCorpus(
        root=root,
        raw=raw,
        train_csv=train_csv,
        valid_csv=valid_csv,
        corpus_json=corpus_json,
        config=cfg,
        clips=records,
        made=made,
        skipped=skipped,
        seconds=wall,
        seconds_per_clip=per_clip,
        generator=generator,
    )
