"""Shared fixtures: tiny synthetic feature stores and tiny run configs.

Everything here is sized for seconds-long CPU tests: feature dims (12, 10, 8),
sequences of a few frames, a model with hidden size 16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from taemi.config import RunConfig, build_config, parse_overrides
from taemi.data.labels import Labels, read_labels
from taemi.store import FeatureStore
from taemi.synth.features import SynthConfig, SynthResult, make_synth

#: Feature dims (D_a, D_v, D_t) of every synthetic store made here.
DIMS = (12, 10, 8)

#: Settings that make the paper preset tiny and fast, and fit a store of DIMS.
TINY_OVERRIDES = (
    f"model.audio_dim={DIMS[0]}",
    f"model.vision_dim={DIMS[1]}",
    f"model.text_dim={DIMS[2]}",
    "model.hidden=16",
    "model.heads=2",
    "model.sa_ffn=32",
    "model.head_hidden=16",
    "train.max_epochs=3",
    "train.batch_size=16",
    "train.lr=1e-3",
    "train.device=cpu",
    "train.precision=fp32",  # auto would be bf16 on CPUs with native bf16: keep tests' numerics machine-independent
)

#: Overrides that switch off training's randomness (dropout and modality dropout).
NO_DROPOUT = (
    "model.modality_dropout=0",
    "model.attn_dropout=0",
    "model.sa_dropout=0",
    "model.head_dropout=0",
)

TinyConfig = Callable[..., RunConfig]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (10-100x slower on a
    busy 2-core machine), so the whole session runs torch with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_synth_config(**kw) -> SynthConfig:
    """A SynthConfig with tiny dims and short sequences; ``kw`` overrides fields."""
    base = {
        "clips": 96,
        "dims": DIMS,
        "audio_len": (6, 20),
        "vision_len": (4, 12),
        "text_len": (3, 8),
        "missing_rate": (0.15, 0.15, 0.1),
        "seed": 0,
    }
    return SynthConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """96 clips (72 train, 24 valid), dims (12, 10, 8), float16, some modalities missing.

    Read-only: tests that damage a store must copy it first.
    """
    return make_synth(tmp_path_factory.mktemp("synth"), small_synth_config(), progress=False)


@pytest.fixture(scope="session")
def synth_tokens(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """Like ``synth`` (48 clips) but the store also holds text token states."""
    cfg = small_synth_config(clips=48, text_tokens=True, seed=1)
    return make_synth(tmp_path_factory.mktemp("synth_tokens"), cfg, progress=False)


@pytest.fixture(scope="session")
def store(synth: SynthResult) -> FeatureStore:
    return FeatureStore(synth.store)


@pytest.fixture(scope="session")
def labels(synth: SynthResult) -> tuple[Labels, Labels]:
    """(train, valid) labels of ``synth``."""
    return read_labels(synth.train_csv), read_labels(synth.valid_csv)


@pytest.fixture(scope="session")
def tiny_config() -> TinyConfig:
    """``tiny_config("train.max_epochs=4", ...)``: the paper preset made tiny (see
    TINY_OVERRIDES), then the given ``key=value`` overrides; a fresh, validated config."""

    def make(*overrides: str, preset: str = "paper") -> RunConfig:
        return build_config(preset, parse_overrides([*TINY_OVERRIDES, *overrides]))

    return make


def tiny_cli_sets() -> list[str]:
    """TINY_OVERRIDES as ``--set`` arguments for the command line."""
    out: list[str] = []
    for item in TINY_OVERRIDES:
        out += ["--set", item]
    return out


def split_args(synth: SynthResult, out) -> list[str]:
    """``--store S --train T --valid V --out OUT`` of a synthetic store, for command lines."""
    return [
        "--store",
        str(synth.store),
        "--train",
        str(synth.train_csv),
        "--valid",
        str(synth.valid_csv),
        "--out",
        str(out),
    ]


def tiny_official_model(
    audio_dim: int, vision_dim: int, text_dim: int, *, seed: int = 0, hidden: int = 8
) -> torch.nn.Module:
    """The ``official`` fusion model (the release's architecture, 4 heads) made tiny, every
    parameter (LayerNorm ones too) moved off its initial value; eval mode."""
    import dataclasses

    from taemi import EMI_EMOTIONS
    from taemi.config import preset
    from taemi.model.taemi import TAEMI

    cfg = dataclasses.replace(
        preset("official").model,
        audio_dim=audio_dim,
        vision_dim=vision_dim,
        text_dim=text_dim,
        hidden=hidden,
        heads=4,
        head_hidden=12,
    )
    torch.manual_seed(seed)
    model = TAEMI(cfg, num_outputs=len(EMI_EMOTIONS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def media_run_sets() -> list[str]:
    """``--set`` arguments of a tiny paper model for runs on extracted media features (their
    sizes come from the store), one epoch, on the CPU."""
    overrides = ["model.hidden=16", "model.heads=2", "model.sa_ffn=32", "model.head_hidden=16"]
    overrides += ["train.max_epochs=1", "train.device=cpu"]
    return [a for item in overrides for a in ("--set", item)]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_main(argv: list[str]) -> tuple[int, str]:
    """``taemi`` (``taemi.cli.main.main(argv)``) in-process; (exit code, stdout)."""
    import contextlib
    import io

    from taemi.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def generated_media_corpus(root: Path, *, size: int = 96):
    """4 generated talking-face clips (00000 audio-only) under ``root/media``, for tests that
    extract them with the offline profile; skips when that profile cannot run here (no
    espeakng-loader, PyAV or packaged models). 2-3 s each: long enough that Whisper tiny.en
    hears every sentence (at 1-2 s it dropped the audio-only clip's as no speech, 0.62
    against its 0.6 threshold, on some CPUs)."""
    pytest.importorskip(
        "espeakng_loader", reason="the generated corpus speaks through espeakng-loader ([extract])"
    )
    pytest.importorskip("av", reason="PyAV is not installed ([extract])")
    whisper = pytest.importorskip(
        "taemi.backbones.whisper", reason="offline profile dependencies ([extract])"
    )
    try:
        whisper.load_whisper()
    except whisper.ModelLoadError as e:
        pytest.skip(f"packaged offline models unavailable: {e}")
    from taemi.synth.media import MediaSynthConfig, make_media_corpus

    cfg = MediaSynthConfig(
        clips=4,
        seconds=(2.0, 3.0),
        size=size,
        fps=10,
        missing_video_rate=0.3,
        missing_audio_rate=0.0,
        silent_rate=0.0,
        seed=0,
    )
    return make_media_corpus(root / "media", cfg, progress=False)
