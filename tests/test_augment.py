"""taemi.data.augment: waveform augmentation for fine-tuning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from taemi.config import ConfigError
from taemi.data.augment import (
    AugmentConfig,
    AugmentParams,
    WaveformAugment,
    augment_rng,
    noise_at_snr,
    pitch_shift,
    time_shift,
    time_stretch,
)

SR = 16_000
ALL_ON = AugmentConfig(
    noise_prob=1.0, stretch_prob=1.0, pitch_prob=1.0, shift_prob=1.0, noise_color="random"
)


def sine(hz: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)  # (S,)


def peak_hz(y: np.ndarray) -> float:
    """Frequency of the strongest FFT bin (Hann-windowed), in Hz; resolution SR / len(y)."""
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))  # (S // 2 + 1,)
    return float(np.argmax(spectrum) * SR / len(y))


def speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Noise with a slow envelope: (S,) float32, peak below 1."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SR)
    env = 0.5 + 0.4 * np.sin(2 * np.pi * 3 * np.arange(n) / SR)
    return (0.2 * env * rng.standard_normal(n)).astype(np.float32)


# ------------------------------------------------------------------ randomness


def test_augment_rng_is_the_documented_generator() -> None:
    a, b = augment_rng(3407, 2, 17), np.random.default_rng([3407, 2, 17])
    assert a.random(5).tolist() == b.random(5).tolist()
    assert (
        augment_rng(1, 0, 0).random()
        != augment_rng(1, 1, 0).random()
        != augment_rng(1, 0, 1).random()
    )
    for bad in ((-1, 0, 0), (0, 1.5, 0), (0, 0, True)):
        with pytest.raises(ValueError, match="non-negative int"):
            augment_rng(*bad)


def test_same_generator_seed_same_output_other_seeds_differ() -> None:
    aug = WaveformAugment(ALL_ON)
    x = speechlike()
    first = aug(x, augment_rng(0, 1, 5))
    again = aug(x, augment_rng(0, 1, 5))
    np.testing.assert_array_equal(first, again)
    for other in (augment_rng(0, 2, 5), augment_rng(0, 1, 6), augment_rng(1, 1, 5)):
        y = aug(x, other)
        assert y.shape != first.shape or not np.allclose(y, first)
    # a copy of the augmenter (as in another DataLoader worker) gives the same result
    np.testing.assert_array_equal(WaveformAugment(ALL_ON)(x, augment_rng(0, 1, 5)), first)


def test_defaults_are_off_and_leave_the_waveform_alone() -> None:
    cfg = AugmentConfig()
    assert not cfg.enabled and ALL_ON.enabled
    x = speechlike(1.0)
    aug = WaveformAugment(cfg)
    assert aug.sample(augment_rng(0, 0, 0)) == AugmentParams()
    y = aug(x, augment_rng(0, 0, 0))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x)


def test_probabilities_select_operations() -> None:
    cfg = AugmentConfig(noise_prob=0.5, stretch_prob=0.25)
    aug = WaveformAugment(cfg)
    params = [aug.sample(augment_rng(0, 0, i)) for i in range(2000)]
    noise = np.mean([p.noise_snr_db is not None for p in params])
    stretch = np.mean([p.stretch_rate is not None for p in params])
    assert abs(noise - 0.5) < 0.05 and abs(stretch - 0.25) < 0.05
    assert all(p.pitch_semitones is None and p.shift_seconds is None for p in params)
    rates = [p.stretch_rate for p in params if p.stretch_rate is not None]
    assert 0.9 <= min(rates) < 0.92 and 1.08 < max(rates) <= 1.1


# ------------------------------------------------------------------ noise


@pytest.mark.parametrize("color", ["white", "pink"])
def test_noise_has_the_drawn_snr(color: str) -> None:
    aug = WaveformAugment(
        AugmentConfig(noise_prob=1.0, noise_snr_db=(0.0, 30.0), noise_color=color)
    )
    x = speechlike(3.0)
    for i in range(5):
        params = aug.sample(augment_rng(0, 0, i))
        assert params.noise_color == color and 0 <= params.noise_snr_db <= 30
        y = aug.apply(x, params, augment_rng(9, 9, i))
        n = y.astype(np.float64) - x
        snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(n**2))
        assert snr == pytest.approx(params.noise_snr_db, abs=0.05)


def test_pink_noise_falls_with_frequency_white_is_flat() -> None:
    x = speechlike(4.0)
    rng = np.random.default_rng(0)
    bands = {}
    for color in ("white", "pink"):
        spectrum = np.abs(np.fft.rfft(noise_at_snr(x, 10.0, color, rng))) ** 2  # (F,)
        hz = np.fft.rfftfreq(x.shape[0], 1 / SR)
        low = spectrum[(hz > 100) & (hz < 200)].mean()
        high = spectrum[(hz > 4000) & (hz < 8000)].mean()
        bands[color] = low / high
    assert 0.7 < bands["white"] < 1.4
    assert bands["pink"] > 15  # 1/f: about 4000 / 150 = 27


def test_silence_gets_no_noise() -> None:
    aug = WaveformAugment(AugmentConfig(noise_prob=1.0))
    y = aug(np.zeros(1600, np.float32), augment_rng(0, 0, 0))
    assert not y.any()


# ------------------------------------------------------------------ time-stretch, pitch-shift


@pytest.mark.parametrize("rate", [0.9, 0.95, 1.07, 1.1])
def test_time_stretch_changes_duration_not_frequency(rate: float) -> None:
    x = sine(440.0, 2.0)
    y = time_stretch(x, rate)
    assert y.shape == (round(x.shape[0] / rate),)
    assert peak_hz(y) == pytest.approx(440.0, abs=2.0)
    middle = np.abs(y[4000:-4000])
    assert middle.max() == pytest.approx(0.5, abs=0.01)  # phase locking: no amplitude loss


def test_time_stretch_through_the_augmenter_uses_the_drawn_rate() -> None:
    aug = WaveformAugment(AugmentConfig(stretch_prob=1.0, stretch_max=0.1))
    x = sine(330.0, 2.0)
    for i in range(4):
        params = aug.sample(augment_rng(0, 0, i))
        y = aug.apply(x, params, augment_rng(0, 0, i))
        assert y.shape == (round(x.shape[0] / params.stretch_rate),)
        assert peak_hz(y) == pytest.approx(330.0, abs=2.0)


@pytest.mark.parametrize("semitones", [-2.0, -0.5, 1.0, 2.0])
def test_pitch_shift_keeps_duration_and_moves_frequency(semitones: float) -> None:
    x = sine(440.0, 2.0)
    y = pitch_shift(x, semitones)
    assert y.shape == x.shape
    assert peak_hz(y) == pytest.approx(440.0 * 2 ** (semitones / 12), rel=0.003)
    assert np.abs(y[4000:-4000]).max() == pytest.approx(0.5, abs=0.01)


def test_time_shift_moves_an_impulse() -> None:
    x = np.zeros(1000, np.float32)
    x[300] = 1.0
    assert np.flatnonzero(time_shift(x, 120)).tolist() == [420]
    assert np.flatnonzero(time_shift(x, -250)).tolist() == [50]
    assert not time_shift(x, 800).any() and not time_shift(x, -301).any()
    aug = WaveformAugment(AugmentConfig(shift_prob=1.0, shift_seconds=0.02))
    for i in range(5):
        params = aug.sample(augment_rng(0, 0, i))
        y = aug.apply(x, params, augment_rng(0, 0, i))
        assert y.shape == x.shape
        assert np.flatnonzero(y).tolist() == [300 + round(params.shift_seconds * SR)]


# ------------------------------------------------------------------ outputs and configs


@pytest.mark.parametrize("seconds", [0.0001, 0.01, 0.7, 1.0, 1.3])
def test_outputs_are_finite_float32_and_at_most_max_seconds(seconds: float) -> None:
    cfg = dataclasses.replace(ALL_ON, stretch_max=0.3, pitch_semitones=4.0)
    aug = WaveformAugment(cfg, max_seconds=1.0)
    x = speechlike(seconds, seed=1)
    for i in range(6):
        y = aug(x, augment_rng(0, 0, i))
        assert y.dtype == np.float32 and y.ndim == 1
        assert 1 <= y.shape[0] <= SR and np.isfinite(y).all()


def test_rejects_bad_waveforms() -> None:
    aug = WaveformAugment(ALL_ON)
    for bad in (np.zeros(0, np.float32), np.zeros((2, 5), np.float32), np.zeros(5, np.int16)):
        with pytest.raises(ValueError, match=r"non-empty \(S,\) float"):
            aug(bad, augment_rng(0, 0, 0))
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        aug(np.array([0.0, np.nan], np.float32), augment_rng(0, 0, 0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"noise_prob": 1.5}, r"finetune.augment.noise_prob=1.5: must be in \[0, 1\]"),
        ({"shift_prob": -0.1}, "finetune.augment.shift_prob"),
        ({"noise_snr_db": (20.0, 10.0)}, "min above max"),
        ({"noise_snr_db": (20.0,)}, r"expected \[min, max\]"),
        ({"noise_color": "brown"}, "noise_color='brown'"),
        ({"stretch_max": 0.5}, r"stretch_max=0.5: must be in \[0, 0.5\)"),
        ({"pitch_semitones": 13.0}, "pitch_semitones=13.0"),
        ({"shift_seconds": -1.0}, "shift_seconds=-1.0"),
        ({"stretch_prob": float("nan")}, "must be a finite number"),
    ],
)
def test_bad_config_values_are_config_errors(change: dict, message: str) -> None:
    cfg = dataclasses.replace(AugmentConfig(), **change)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    with pytest.raises(ConfigError, match=message):
        WaveformAugment(cfg)


def test_accepts_the_run_config_section() -> None:
    import taemi.config

    cfg = taemi.config.AugmentConfig(noise_prob=1.0, shift_prob=1.0)
    aug = WaveformAugment(cfg, max_seconds=1.0)
    assert aug(speechlike(), augment_rng(cfg.seed, 0, 3)).shape == (SR,)
