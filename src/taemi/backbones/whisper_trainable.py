"""The Whisper encoder as a trainable torch module (docs/method.md section 6): the offline
profile's audio backbone for end-to-end fine-tuning, :class:`WhisperBackbone`.

A torch port of the Whisper encoder (section 2.3 of the paper and openai/whisper
``model.py``), with the weights read from a CTranslate2 ``model.bin``
(:func:`read_ctranslate2_encoder`; the packaged tiny.en of the offline profile), (B, T, 384)
for tiny.en. Each clip is padded to a FIXED window (30 s, or ``max_seconds``) and gets its
own log-mel spectrogram, so no clip's output depends on its batch-mates. Why a port and not
transformers' class: see :mod:`taemi.backbones.whisper`, which holds the frozen roles
(transcripts, encoder features) of the same model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from taemi.backbones.base import (
    SAMPLE_RATE,
    ModelLoadError,
)
from taemi.backbones.trainable import AudioBackbone, frame_mask, freeze, write_architecture
from taemi.backbones.weights import (
    WHISPER_TINY_EN,
    ctranslate2_model_files,
)

log = logging.getLogger(__name__)

WHISPER_WINDOWS = ("clip", "full")


_N_FFT = 400  # Whisper's STFT window (25 ms)
_HOP = 160  # 10 ms hop: 100 mel frames per second
_INPUT_STRIDE = 2  # conv2's stride: one encoder frame per 2 mel frames = 320 samples
_SAMPLES_PER_FRAME = _HOP * _INPUT_STRIDE


def whisper_mel_filters(n_mels: int) -> Tensor:
    """(n_mels, 201) Slaney mel filter bank of faster-whisper's FeatureExtractor."""
    from faster_whisper.feature_extractor import FeatureExtractor

    fe = FeatureExtractor(
        feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=_HOP, n_fft=_N_FFT
    )
    return torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32))  # (n_mels, 201)


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram, as faster-whisper's FeatureExtractor computes it.

    Centred STFT (reflect padding, periodic Hann window of 400, hop 160), the last frame
    dropped, power -> mel filter bank -> log10 (floored at 1e-10) -> clamped to 8 below
    each clip's own maximum -> (x + 4) / 4. Rows are independent: each clip's clamp uses
    its own spectrogram only. Always float32 (autocast off).
    """

    def __init__(self, mel_filters: Tensor):
        super().__init__()
        if mel_filters.ndim != 2 or mel_filters.shape[1] != _N_FFT // 2 + 1:
            raise ValueError(
                f"mel_filters must be (n_mels, {_N_FFT // 2 + 1}), got {tuple(mel_filters.shape)}"
            )
        self.register_buffer("filters", mel_filters.float(), persistent=False)  # (n_mels, 201)
        self.register_buffer("window", torch.hann_window(_N_FFT), persistent=False)  # (400,)

    @property
    def n_mels(self) -> int:
        return int(self.filters.shape[0])

    def forward(self, waves: Tensor) -> Tensor:
        """waves (B, S) -> (B, n_mels, S // 160) log-mel."""
        with torch.autocast(device_type=waves.device.type, enabled=False):
            spec = torch.stft(
                waves.float(),
                _N_FFT,
                _HOP,
                window=self.window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )  # (B, 201, S // 160 + 1)
            power = spec[..., :-1].abs().pow(2)  # (B, 201, F)
            mel = self.filters @ power  # (B, n_mels, F)
            logmel = mel.clamp(min=1e-10).log10()
            floor = logmel.amax(dim=(1, 2), keepdim=True) - 8.0  # (B, 1, 1), per clip
            return (torch.maximum(logmel, floor) + 4.0) / 4.0


class WhisperEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + MLP(LN(x)); GELU (erf)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v (k's bias is zero in Whisper)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, D / heads)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads), no mask
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))  # (B, T, D)


def whisper_sinusoids(length: int, dim: int) -> Tensor:
    """(length, dim) Whisper's encoder position table: [sin | cos], log-spaced timescales."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    increment = math.log(10000) / (dim // 2 - 1)
    inv = torch.exp(-increment * torch.arange(dim // 2, dtype=torch.float32))  # (dim / 2,)
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]  # (L, dim / 2)
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)  # (L, dim)


class WhisperAudioEncoder(nn.Module):
    """Whisper's audio encoder on a log-mel window of any length up to 2 x positions.

    conv1 (k3, pad 1) + GELU, conv2 (k3, stride 2, pad 1) + GELU, + the first T rows of the
    fixed position table (a buffer, not trained, as in openai/whisper), pre-norm layers,
    final LayerNorm. Parameter names: ``conv1``, ``conv2``, ``positions`` (buffer),
    ``layers.N.{attn_norm,qkv,out,ffn_norm,fc1,fc2}``, ``norm``.
    """

    def __init__(self, *, n_mels: int, dim: int, heads: int, layers: int, positions: int, ffn: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=_INPUT_STRIDE, padding=1)
        self.register_buffer("positions", whisper_sinusoids(positions, dim))  # (P, D)
        self.layers = nn.ModuleList(WhisperEncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.gradient_checkpointing = False
        self.arch = {
            "n_mels": n_mels,
            "dim": dim,
            "heads": heads,
            "layers": layers,
            "positions": positions,
            "ffn": ffn,
        }

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, F) -> (B, ceil(F / 2), D) last hidden states."""
        x = F.gelu(self.conv1(mel))  # (B, D, F)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, D)
        if x.shape[1] > self.positions.shape[0]:
            raise ValueError(
                f"{x.shape[1]} encoder frames exceed the {self.positions.shape[0]} positions "
                f"({mel.shape[-1]} mel frames given)"
            )
        x = x + self.positions[: x.shape[1]].to(x.dtype)  # (B, T, D)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm(x)  # (B, T, D)


# CTranslate2 model.bin data type ids (ctranslate2/specs/model_spec.py, _dtype_to_type_id)
_CT2_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_CT2_BINARY_VERSION = 6


class _HashingReader:
    """Reads files as one byte stream (a model.bin, or its parts in order), hashing every
    byte read: the digest is that of the bytes parsed."""

    def __init__(self, files: list[BinaryIO], paths: list[Path]):
        self.files, self.paths, self.sha = list(files), paths, hashlib.sha256()

    def _raw(self, n: int) -> bytes:
        chunks = []
        while n and self.files:
            data = self.files[0].read(n)
            if not data:  # this part is exhausted: go on with the next
                self.files.pop(0)
                continue
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def read(self, n: int) -> bytes:
        data = self._raw(n)
        if len(data) != n:
            raise ModelLoadError(
                "whisper (CTranslate2)",
                " + ".join(str(p) for p in self.paths),
                f"the file ends early (wanted {n} bytes, got {len(data)}): truncated or not a "
                "CTranslate2 model.bin",
            )
        self.sha.update(data)
        return data

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        return self.read(n).rstrip(b"\0").decode("utf-8")

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read(min(n, 1 << 20)))

    def rest(self) -> None:
        for block in iter(lambda: self._raw(1 << 20), b""):
            self.sha.update(block)


def read_ctranslate2_encoder(
    path: str | os.PathLike[str] | list[Path],
) -> tuple[dict[str, Tensor], str]:
    """The ``encoder/...`` variables of a CTranslate2 Whisper ``model.bin`` (or of the list
    of its split parts, read in order as one file), and the SHA-256 of the bytes read.

    Format (CTranslate2 binary version 6, little-endian): uint32 version; spec name
    (uint16 length incl. NUL, bytes) = "WhisperSpec"; uint32 revision; uint32 count; per
    variable: name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 n_bytes, raw bytes;
    then the aliases. Float tensors are returned as float32; int8-quantised models are
    refused (their weights need scales this port does not apply).
    """
    paths = [Path(p) for p in path] if isinstance(path, list) else [Path(path)]
    out: dict[str, Tensor] = {}
    with ExitStack() as stack:
        r = _HashingReader([stack.enter_context(open(p, "rb")) for p in paths], paths)

        def fail(why: str) -> ModelLoadError:
            return ModelLoadError("whisper (CTranslate2)", " + ".join(map(str, paths)), why)

        (version,) = r.unpack("I")
        if version != _CT2_BINARY_VERSION:
            raise fail(
                f"CTranslate2 binary version {version}; this reader knows version "
                f"{_CT2_BINARY_VERSION} (re-convert the model with ctranslate2>=3)"
            )
        spec = r.string()
        if spec != "WhisperSpec":
            raise fail(f"the model spec is {spec!r}, not 'WhisperSpec'")
        r.unpack("I")  # spec revision
        (count,) = r.unpack("I")
        for _ in range(count):
            name = r.string()
            (rank,) = r.unpack("B")
            dims = r.unpack("I" * rank) if rank else ()
            (type_id,) = r.unpack("B")
            (n_bytes,) = r.unpack("I")
            if not name.startswith("encoder/"):
                r.skip(n_bytes)
                continue
            if type_id not in _CT2_DTYPES:
                raise fail(f"variable {name}: unknown data type id {type_id}")
            dtype = _CT2_DTYPES[type_id]
            if name.endswith("weight_scale") or (dtype == torch.int8 and rank > 0):
                raise fail(
                    f"variable {name} is int8-quantised; convert the model with --quantization "
                    "float32 or float16 for fine-tuning"
                )
            raw = bytearray(r.read(n_bytes))
            tensor = torch.frombuffer(raw, dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
            if tensor.numel() != math.prod(dims):
                raise fail(f"variable {name}: {n_bytes} bytes do not hold {dims} of {dtype}")
            tensor = tensor.reshape(dims)
            out[name] = tensor.float() if tensor.is_floating_point() else tensor.clone()
        r.rest()
    return out, r.sha.hexdigest()


def whisper_encoder_from_ctranslate2(
    variables: dict[str, Tensor], source: str
) -> WhisperAudioEncoder:
    """Build :class:`WhisperAudioEncoder` from :func:`read_ctranslate2_encoder` variables.

    Name mapping (CTranslate2 -> here): ``encoder/conv{1,2}/{weight,bias}`` -> ``conv*``;
    ``encoder/position_encodings/encodings`` -> ``positions``; per layer N
    ``self_attention/layer_norm/{gamma,beta}`` -> ``attn_norm``, ``self_attention/linear_0``
    (fused q, k, v) -> ``qkv``, ``self_attention/linear_1`` -> ``out``,
    ``ffn/layer_norm`` -> ``ffn_norm``, ``ffn/linear_{0,1}`` -> ``fc{1,2}``;
    ``encoder/layer_norm`` -> ``norm``. Every variable must be used and every parameter
    filled.
    """
    v = dict(variables)

    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(source, "its model.bin encoder variables", why)

    try:
        heads = int(v.pop("encoder/num_heads"))
        dim, n_mels, _ = v["encoder/conv1/weight"].shape
        positions = v["encoder/position_encodings/encodings"].shape[0]
        ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    except KeyError as exc:
        raise fail(f"variable {exc} missing: not a Whisper encoder") from exc
    layers = 1 + max(
        (
            int(k.split("/")[1].removeprefix("layer_"))
            for k in v
            if k.startswith("encoder/layer_") and k.split("/")[1] != "layer_norm"
        ),
        default=-1,
    )
    encoder = WhisperAudioEncoder(
        n_mels=n_mels, dim=dim, heads=heads, layers=layers, positions=positions, ffn=ffn
    )
    names = {
        "conv1.weight": "encoder/conv1/weight",
        "conv1.bias": "encoder/conv1/bias",
        "conv2.weight": "encoder/conv2/weight",
        "conv2.bias": "encoder/conv2/bias",
        "positions": "encoder/position_encodings/encodings",
        "norm.weight": "encoder/layer_norm/gamma",
        "norm.bias": "encoder/layer_norm/beta",
    }
    parts = {
        "attn_norm": "self_attention/layer_norm",
        "qkv": "self_attention/linear_0",
        "out": "self_attention/linear_1",
        "ffn_norm": "ffn/layer_norm",
        "fc1": "ffn/linear_0",
        "fc2": "ffn/linear_1",
    }
    for i in range(layers):
        for ours, theirs in parts.items():
            norm = ours.endswith("norm")
            names[f"layers.{i}.{ours}.weight"] = (
                f"encoder/layer_{i}/{theirs}/{'gamma' if norm else 'weight'}"
            )
            names[f"layers.{i}.{ours}.bias"] = (
                f"encoder/layer_{i}/{theirs}/{'beta' if norm else 'bias'}"
            )
    state = encoder.state_dict()
    missing = sorted(theirs for theirs in names.values() if theirs not in v)
    unused = sorted(set(v) - set(names.values()))
    if missing or unused:
        raise fail(
            f"missing variables {missing[:8]}, unexpected variables {unused[:8]}: not the "
            "Whisper encoder layout this port knows"
        )
    loaded = {}
    for ours, theirs in names.items():
        if v[theirs].shape != state[ours].shape:
            raise fail(
                f"{theirs} has shape {tuple(v[theirs].shape)}, expected {tuple(state[ours].shape)}"
            )
        loaded[ours] = v[theirs]
    encoder.load_state_dict(loaded, strict=True)
    return encoder


class WhisperBackbone(AudioBackbone):
    """Whisper encoder states with gradients: (B, T, D) at 50 frames/s.

    ``window="full"``: each clip (cropped to ``max_seconds``) is zero-padded to Whisper's
    30 s window, exactly as the frozen
    :class:`~taemi.backbones.whisper.WhisperEncoder` does, so the features equal
    frozen extraction up to numerics. ``window="clip"`` (the fine-tuning default, 2.5x
    cheaper at 12 s): each clip is zero-padded to ``max_seconds`` (rounded up to a
    multiple of 320 samples) and the encoder uses the first rows of its position table;
    the window is fixed, so a clip's output never depends on its batch-mates, but the
    features differ from frozen extraction's (attention sees a shorter padded tail).
    Either way the log-mel is computed per clip and clip i owns ceil(S_i / 320) frames.
    """

    def __init__(
        self,
        encoder: WhisperAudioEncoder,
        log_mel: LogMel,
        *,
        window: str = "clip",
        max_seconds: float = 12.0,
        name: str,
        settings: dict[str, Any] | None = None,
    ):
        super().__init__()
        if window not in WHISPER_WINDOWS:
            raise ValueError(f"window must be one of {WHISPER_WINDOWS}, got {window!r}")
        if log_mel.n_mels != encoder.conv1.in_channels:
            raise ValueError(
                f"log_mel has {log_mel.n_mels} mel bins, the encoder takes "
                f"{encoder.conv1.in_channels}"
            )
        full = encoder.positions.shape[0] * _SAMPLES_PER_FRAME  # 480000 samples = 30 s
        if not 0 < max_seconds <= full / SAMPLE_RATE:
            raise ValueError(
                f"max_seconds must be in (0, {full / SAMPLE_RATE:g}] (the encoder's window), "
                f"got {max_seconds!r}"
            )
        self.encoder, self.log_mel = encoder, log_mel
        self.window, self.max_seconds = window, float(max_seconds)
        per = _SAMPLES_PER_FRAME
        self.window_samples = full if window == "full" else math.ceil(self.max_samples / per) * per
        self.dim = encoder.arch["dim"]
        self.frame_rate = SAMPLE_RATE / per
        self.num_layers = encoder.arch["layers"]
        self.name = name
        self.settings = {
            "backbone": "whisper encoder (torch port of the CTranslate2 weights)",
            "output": "encoder last hidden state",
            "window": window,
            "window_s": self.window_samples / SAMPLE_RATE,
            "max_seconds": self.max_seconds,
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "n_mels": log_mel.n_mels,
            "padding": "waveform zero-padded to the window before log-mel",
            **(settings or {}),
        }

    def num_frames(self, lengths: Tensor) -> Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long).clamp(min=0, max=self.max_samples)
        return (lengths + _SAMPLES_PER_FRAME - 1) // _SAMPLES_PER_FRAME  # ceil(S / 320)

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """waves (B, S), lengths (B,) -> features (B, T, D), mask (B, T) bool."""
        waves, lengths, _ = self._prepare(waves, lengths)
        frames = self.num_frames(lengths)  # (B,)
        padded = F.pad(waves, (0, self.window_samples - waves.shape[1]))  # (B, W)
        mel = self.log_mel(padded)  # (B, n_mels, W / 160)
        states = self.encoder(mel)  # (B, W / 320, D)
        width = max(1, int(frames.max()))
        mask = frame_mask(frames, width)  # (B, T)
        return states[:, :width] * mask[..., None].to(states.dtype), mask  # (B, T, D)

    def freeze_feature_encoder(self) -> None:
        freeze(self.encoder.conv1)
        freeze(self.encoder.conv2)  # the position table is a buffer: never trained

    def freeze_layers(self, n: int) -> None:
        if self._check_n(n) == 0:
            return
        self.freeze_feature_encoder()
        for layer in self.encoder.layers[:n]:
            freeze(layer)

    def set_gradient_checkpointing(self, on: bool) -> None:
        self.encoder.gradient_checkpointing = bool(on)

    def save_architecture(self, folder: Path) -> None:
        write_architecture(
            Path(folder),
            "whisper",
            {
                "name": self.name,
                "settings": self.settings,
                "encoder": self.encoder.arch,
                "window": self.window,
                "max_seconds": self.max_seconds,
            },
        )


def load_whisper_backbone(
    folder: Path, *, packaged: bool, window: str, max_seconds: float
) -> WhisperBackbone:
    files = ctranslate2_model_files(folder)
    if not files:
        raise ModelLoadError(
            "whisper (CTranslate2)",
            str(folder),
            "neither model.bin nor model.bin.part1 + .part2 found",
        )
    variables, digest = read_ctranslate2_encoder(files)  # parts: read as one model.bin
    provenance: dict[str, Any] = {"split": "model.bin.part1+part2"} if len(files) > 1 else {}
    pin = WHISPER_TINY_EN
    if packaged:
        if digest != pin.weights_sha256:  # the bytes parsed are the bytes verified
            raise ModelLoadError(pin.model, str(files[0]), "the file changed while being loaded")
        name = f"{pin.requirement}:{pin.module}/{pin.folder} (whisper tiny.en)"
        provenance = pin.provenance(sha256=False)
    else:
        name = str(folder)
        provenance = {"dir": str(folder), **provenance}
        log.info(
            "whisper %s: a local model, sha256 %s recorded, not checked against a pin",
            folder,
            digest[:16],
        )
    provenance["sha256"] = digest[:16]
    encoder = whisper_encoder_from_ctranslate2(variables, name)
    log_mel = LogMel(whisper_mel_filters(encoder.arch["n_mels"]))
    return WhisperBackbone(
        encoder, log_mel, window=window, max_seconds=max_seconds, name=name, settings=provenance
    )


def rebuild_whisper_backbone(record: dict[str, Any]) -> WhisperBackbone:
    """The backbone a :meth:`WhisperBackbone.save_architecture` record describes, randomly
    initialised (load the checkpoint's state_dict after)."""
    encoder = WhisperAudioEncoder(**record["encoder"])
    return WhisperBackbone(
        encoder,
        LogMel(whisper_mel_filters(encoder.arch["n_mels"])),
        window=record["window"],
        max_seconds=record["max_seconds"],
        name=record["name"],
        settings=record["settings"],
    )
