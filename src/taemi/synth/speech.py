"""Speech for the synthetic media corpus: espeak-ng, through one of two backends.

espeak-ng is a formant synthesiser (https://github.com/espeak-ng/espeak-ng). The two
backends (:data:`TTS_BACKENDS`, chosen by :func:`make_tts`, never one in place of the
other):

- ``"espeakng-loader"`` (:class:`EspeakNGLoader`): the pip package ``espeakng-loader``,
  which bundles libespeak-ng and its data, driven through ctypes (espeak-ng's C API,
  ``speak_lib.h``); nothing else to install.
- ``"espeak-ng"`` (:class:`EspeakNGProgram`): the ``espeak-ng`` program on PATH
  (``apt-get install espeak-ng``), writing WAV to stdout.

The two differ in espeak-ng version, so their audio differs slightly; callers record
which one spoke (:attr:`SpeechSynthesizer.name`, :attr:`SpeechSynthesizer.version`).
Used by :mod:`taemi.synth.media`.
"""

from __future__ import annotations

import ctypes
import io
import shutil
import subprocess
import tempfile
import threading
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "TTS_BACKENDS",
    "EspeakNGLoader",
    "EspeakNGProgram",
    "SpeechSynthesizer",
    "Voice",
    "make_tts",
]

#: TTS backends :func:`make_tts` knows.
TTS_BACKENDS = ("espeakng-loader", "espeak-ng")


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
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
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
                err = lib.espeak_Synth(
                    data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None
                )
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
        cmd = [
            self.program,
            "--stdout",
            "--stdin",
            "-b",
            "1",
            "-v",
            voice.name,
            "-a",
            "100",
            "-s",
            str(voice.rate),
            "-p",
            str(voice.pitch),
            "-g",
            str(voice.wordgap),
        ]
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
