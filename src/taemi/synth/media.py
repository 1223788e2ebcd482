"""Synthetic MEDIA corpus: short talking-face videos whose words, voice and face carry
known emotion intensities, written in the ABAW EMI layout (docs/method.md section 2).

It lets the whole path media -> features -> train -> predict run on a CPU in minutes
and learn something measurable. Unlike :mod:`taemi.synth.features` (feature stores), this
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

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from taemi import EMI_EMOTIONS, __version__
from taemi.data.labels import write_predictions
from taemi.synth.face import FaceStyle, render_face, static_face
from taemi.synth.speech import TTS_BACKENDS, SpeechSynthesizer, Voice, make_tts

try:
    import av
    import cv2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.synth.media needs PyAV and OpenCV: pip install 'taemi[extract]' "
        "(av==18.1.0, opencv-python-headless)"
    ) from exc

__all__ = [
    "EMOTION_WORDS",
    "FACE_BASE",
    "FACE_LIMITS",
    "FACE_PROTOTYPES",
    "SPEAKERS",
    "VOICE_BASE",
    "VOICE_LIMITS",
    "VOICE_PROTOTYPES",
    "ClipLatents",
    "ClipPlan",
    "ClipRecord",
    "MediaCorpus",
    "MediaSynthConfig",
    "draw_latents",
    "face_frames",
    "face_knobs",
    "label_fn",
    "make_media_corpus",
    "make_sentence",
    "plan_clip",
    "text_levels",
    "valid_indices",
    "voice_knobs",
]

log = logging.getLogger(__name__)

CORPUS_FORMAT = "taemi-media-synth"
CORPUS_VERSION = 1  # bump when the generating function changes what a seed produces

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
    "Empathic Pain": {
        "pitch": -16,
        "range": -15,
        "rate": -45,
        "wordgap": 4,
        "gain_db": -7,
        "tremolo": 0.25,
    },
    "Excitement": {"pitch": 22, "range": 25, "rate": 55, "gain_db": 4},
    "Joy": {"pitch": 18, "range": 15, "rate": 15, "gain_db": 2, "tremolo": 0.1},
}
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
    "Admiration": {
        "smile": 0.25,
        "brow_raise": 0.45,
        "eye_open": 0.15,
        "gaze_up": 0.8,
        "blush": 0.5,
    },
    "Amusement": {"smile": 0.6, "mouth_width": 0.5, "talk": 0.2, "eye_open": -0.45, "blush": 0.2},
    "Determination": {
        "smile": -0.2,
        "mouth_width": -0.5,
        "brow_raise": -0.4,
        "brow_tilt": -0.9,
        "eye_open": -0.2,
    },
    "Empathic Pain": {
        "smile": -0.8,
        "brow_raise": 0.2,
        "brow_tilt": 0.9,
        "eye_open": -0.25,
        "gaze_up": -0.5,
    },
    "Excitement": {
        "smile": 0.25,
        "mouth_width": 0.2,
        "talk": 0.5,
        "brow_raise": 0.6,
        "eye_open": 0.55,
    },
    "Joy": {"smile": 0.9, "mouth_width": 0.3, "eye_open": -0.1, "blush": 0.3},
}
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
# Speech: resampling (the speech itself comes from :mod:`taemi.synth.speech`)
# ---------------------------------------------------------------------------------------


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
# Face frames (the drawing itself is :mod:`taemi.synth.face`)
# ---------------------------------------------------------------------------------------


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
                root,
                before.get("espeak_ng"),
                generator["espeak_ng"],
            )
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
            "timing": {
                "made": made,
                "skipped": skipped,
                "seconds": round(wall, 3),
                "seconds_per_clip": None if not made else round(per_clip, 4),
            },
            "clips": [r.to_json(emotions) for r in records],
        },
    )
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
