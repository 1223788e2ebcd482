"""Waveform augmentation for end-to-end fine-tuning of the audio backbone.

The paper (docs/method.md section 6) fine-tunes the audio backbone on the first 12 s of
each clip but does not describe any augmentation: everything here is off by default and is
an addition of this implementation. Each operation is applied with its own probability,
in this order (the output never exceeds ``max_seconds``):

1. time-stretch: tempo times ``rate`` drawn from [1 - s, 1 + s], pitch unchanged; the
   clip becomes ``S / rate`` samples long. A phase vocoder (Flanagan & Golden, "Phase
   vocoder", Bell System Technical Journal 45, 1966; the phase-propagation form of
   Laroche & Dolson, "Improved phase vocoder time-scale modification of audio", IEEE
   TSAP 7(3), 1999, with their identity phase locking): STFT with a 512-sample (32 ms)
   Hann window and hop 128; output frames interpolate the input magnitudes, advance each
   spectral peak's phase by its measured instantaneous frequency and lock the other bins
   to their nearest peak. Cost: one STFT, one inverse and a loop over output frames.
2. pitch-shift: by ``k`` semitones drawn from [-K, K], duration unchanged: the clip is
   time-stretched by ``2**(k/12)`` (longer for a higher pitch) and then band-limited
   resampled (FFT) back to its length, which multiplies every frequency by ``2**(k/12)``.
   Cost: a stretch plus one long FFT pair.
3. crop to ``max_seconds`` (a slowed-down or the input clip may be longer).
4. time-shift: by ``d`` seconds drawn from [-t, t]; positive ``d`` delays the audio
   (zeros in front, the end falls off), negative advances it (zeros at the end); the
   length is kept. Cost: a copy.
5. additive noise: white or pink (power spectrum ~ 1/f) Gaussian noise, scaled so that
   the signal-to-noise ratio, measured against the clip's own mean power after steps
   1-4, is ``snr`` dB drawn from [lo, hi]. A silent clip gets no noise (any SNR of
   silence is silence). Cost: one Gaussian draw per sample (pink: plus an FFT pair).

Randomness: every draw comes from the ``np.random.Generator`` passed in. The training
data pipeline uses :func:`augment_rng` (seed, epoch, clip position), so the same clip in
the same epoch is augmented identically whatever the number of DataLoader workers or the
batch order. All parameters are drawn first, in a fixed order, then applied
(:meth:`WaveformAugment.sample` / :meth:`WaveformAugment.apply`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taemi.config import NOISE_COLORS, AugmentConfig  # the run config's finetune.augment section
from taemi.store.waveforms import SAMPLE_RATE  # the default: the cached waveforms' rate

__all__ = ["NOISE_COLORS", "AugmentConfig", "AugmentParams", "WaveformAugment", "augment_rng"]

#: Phase vocoder STFT: window length and hop in samples (32 ms and 8 ms at 16 kHz).
N_FFT = 512
HOP = 128


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """``np.random.default_rng([seed, epoch, index])``: the generator for one clip in one
    epoch (``index``: the clip's position in the dataset), the same in any worker."""
    for name, v in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"augment_rng: {name}={v!r} must be a non-negative int")
    return np.random.default_rng([int(seed), int(epoch), int(index)])


@dataclass
class AugmentParams:
    """What one call applies; ``None`` means that operation is skipped."""

    stretch_rate: float | None = None  # tempo factor: output duration = input / rate
    pitch_semitones: float | None = None  # frequencies times 2 ** (k / 12)
    shift_seconds: float | None = None  # > 0 delays, < 0 advances
    noise_snr_db: float | None = None  # SNR of the added noise
    noise_color: str | None = None  # white | pink


class WaveformAugment:
    """Random waveform augmentation; see the module docstring for the operations.

    Args:
        config: :class:`taemi.config.AugmentConfig` (the run config's ``finetune.augment``);
            validated here.
        max_seconds: outputs are cropped to this duration.
        sample_rate: of the waveforms (16 kHz for cached waveforms).

    ``aug(waveform, rng)``: ``waveform`` (S,) float, finite -> (S',) float32 with
    S' <= round(max_seconds * sample_rate); S' = min(S, max) unless a time-stretch ran.
    """

    def __init__(
        self, config: AugmentConfig, max_seconds: float = 12.0, sample_rate: int = SAMPLE_RATE
    ) -> None:
        config.validate()
        if not (
            isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds) and max_seconds > 0
        ):
            raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
        self.config = config
        self.noise_color: str = config.noise_color
        self.sample_rate = sample_rate
        self.max_samples = max(1, round(max_seconds * sample_rate))

    def sample(self, rng: np.random.Generator) -> AugmentParams:
        """Draw which operations run and their parameters (always the same 9 draws)."""
        c = self.config
        u = rng.random(4)  # (4,) one per operation: stretch, pitch, shift, noise
        rate = rng.uniform(1.0 - c.stretch_max, 1.0 + c.stretch_max)
        semitones = rng.uniform(-c.pitch_semitones, c.pitch_semitones)
        shift = rng.uniform(-c.shift_seconds, c.shift_seconds)
        snr = rng.uniform(*c.noise_snr_db)
        pink = rng.random() < 0.5
        color = self.noise_color if self.noise_color != "random" else ("pink" if pink else "white")
        return AugmentParams(
            stretch_rate=float(rate) if u[0] < c.stretch_prob else None,
            pitch_semitones=float(semitones) if u[1] < c.pitch_prob else None,
            shift_seconds=float(shift) if u[2] < c.shift_prob else None,
            noise_snr_db=float(snr) if u[3] < c.noise_prob else None,
            noise_color=color if u[3] < c.noise_prob else None,
        )

    def apply(
        self, waveform: np.ndarray, params: AugmentParams, rng: np.random.Generator
    ) -> np.ndarray:
        """Apply ``params`` to ``waveform`` (S,); ``rng`` draws the noise samples."""
        x = _check_waveform(waveform).astype(np.float64)  # (S,)
        if params.stretch_rate is not None:
            x = time_stretch(x, params.stretch_rate)  # (round(S / rate),)
        if params.pitch_semitones is not None:
            x = pitch_shift(x, params.pitch_semitones)  # (S,)
        x = x[: self.max_samples]
        if params.shift_seconds is not None:
            x = time_shift(x, round(params.shift_seconds * self.sample_rate))
        if params.noise_snr_db is not None:
            x = x + noise_at_snr(x, params.noise_snr_db, params.noise_color or "white", rng)
        return x.astype(np.float32)

    def __call__(self, waveform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(waveform, self.sample(rng), rng)


# --------------------------------------------------------------------------- operations


def _check_waveform(waveform: np.ndarray) -> np.ndarray:
    x = np.asarray(waveform)
    if x.dtype.kind != "f" or x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"waveform must be a non-empty (S,) float array, got {x.dtype} of shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"waveform has {int(np.count_nonzero(~np.isfinite(x)))} NaN/Inf samples")
    return x


def _window() -> np.ndarray:
    """Periodic Hann window, (N_FFT,)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)


def _stft(x: np.ndarray) -> np.ndarray:
    """(S,) -> (T, F) complex, T = S // HOP + 1 frames, F = N_FFT // 2 + 1 bins; frame t
    is centred on sample t * HOP (the signal is zero-padded by N_FFT // 2 at both ends)."""
    pad = N_FFT // 2
    xp = np.pad(x, (pad, pad))  # (S + N_FFT,)
    frames = np.lib.stride_tricks.sliding_window_view(xp, N_FFT)[::HOP]  # (T, N_FFT) view
    return np.fft.rfft(frames * _window(), axis=1)  # (T, F)


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`_stft` by weighted overlap-add: (T, F) -> (length,)."""
    n_frames = spec.shape[0]
    win = _window()
    frames = np.fft.irfft(spec, n=N_FFT, axis=1) * win  # (T, N_FFT)
    k = N_FFT // HOP  # frames overlapping each hop-sized block
    out = np.zeros((n_frames + k - 1, HOP))  # (T + k - 1, HOP) blocks of the output
    norm = np.zeros_like(out)
    for j in range(k):
        out[j : j + n_frames] += frames[:, j * HOP : (j + 1) * HOP]
        norm[j : j + n_frames] += (win[j * HOP : (j + 1) * HOP] ** 2)[None, :]
    out, norm = out.reshape(-1), norm.reshape(-1)  # ((T + k - 1) * HOP,)
    out = out / np.where(norm > 1e-8, norm, 1.0)
    out = out[N_FFT // 2 : N_FFT // 2 + length]
    return np.pad(out, (0, length - out.shape[0]))  # (length,)


def _nearest_peaks(mag: np.ndarray) -> np.ndarray:
    """For each frame of ``mag`` (T, F) and each bin, the index of the nearest spectral
    peak (local maximum over frequency) of that frame: (T, F) int. A frame without a peak
    (all bins equal, e.g. silence) maps every bin to itself."""
    n_bins = mag.shape[1]
    idx = np.arange(n_bins)  # (F,)
    peak = np.zeros(mag.shape, dtype=bool)  # (T, F)
    peak[:, 1:-1] = (mag[:, 1:-1] > mag[:, :-2]) & (mag[:, 1:-1] >= mag[:, 2:])
    peak[:, 0] = mag[:, 0] >= mag[:, 1]
    peak[:, -1] = mag[:, -1] > mag[:, -2]
    peak &= mag > 0
    below = np.maximum.accumulate(np.where(peak, idx, -1), axis=1)  # nearest peak at or below
    above = np.minimum.accumulate(np.where(peak, idx, n_bins)[:, ::-1], axis=1)[
        :, ::-1
    ]  # at or above
    use_above = (below < 0) | ((above < n_bins) & (above - idx < idx - below))
    nearest = np.where(use_above, above, below)
    return np.where(nearest >= n_bins, idx, nearest)  # no peak at all: the bin itself


def time_stretch(x: np.ndarray, rate: float) -> np.ndarray:
    """Phase-vocoder time-stretch of (S,) -> (round(S / rate),); ``rate`` > 1 is faster
    (shorter), pitch unchanged.

    Output frame j (hop HOP) sits at input frame position ``j * rate``: its magnitudes
    interpolate the two input frames around it; the phase of each spectral peak advances
    by the peak bin's measured instantaneous frequency, and the other bins keep their input
    phase offset to their nearest peak (identity phase locking, Laroche & Dolson 1999), which
    keeps the bins of one partial coherent (no "phasiness", no amplitude loss).
    """
    if not rate > 0:
        raise ValueError(f"time_stretch: rate must be positive, got {rate}")
    if rate == 1.0:
        return np.array(x, dtype=np.float64)
    length = max(1, round(x.shape[0] / rate))
    spec = _stft(np.asarray(x, dtype=np.float64))  # (T, F)
    n_in = spec.shape[0]
    n_out = length // HOP + 1
    steps = np.arange(n_out) * rate  # (T',) input frame position of each output frame
    i0 = np.minimum(np.floor(steps).astype(np.int64), n_in - 1)  # (T',)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = np.clip(steps - i0, 0.0, 1.0)[:, None]  # (T', 1)
    absolute, angle = np.abs(spec), np.angle(spec)  # (T, F) each
    mag = (1 - frac) * absolute[i0] + frac * absolute[i1]  # (T', F)
    omega = 2 * np.pi * HOP * np.arange(spec.shape[1]) / N_FFT  # (F,) expected advance per hop
    dphi = angle[i1] - angle[i0] - omega  # (T', F)
    dphi -= 2 * np.pi * np.round(dphi / (2 * np.pi))  # wrapped to [-pi, pi]
    advance = omega + dphi  # (T', F) measured phase advance per hop from output frame j to j + 1
    ref = angle[
        np.where(frac[:, 0] < 0.5, i0, i1)
    ]  # (T', F) input phases nearest each output frame
    peaks = _nearest_peaks(mag)  # (T', F)
    offset = ref - np.take_along_axis(ref, peaks, axis=1)  # (T', F) phase relative to the peak
    phase = np.empty_like(mag)  # (T', F)
    phase[0] = ref[0]
    for j in range(1, n_out):  # the recursion over frames; each step is a few (F,) vector ops
        propagated = phase[j - 1] + advance[j - 1]  # (F,)
        phase[j] = propagated[peaks[j]] + offset[j]
    return _istft(mag * np.exp(1j * phase), length)  # (length,)


def resample_to(x: np.ndarray, length: int) -> np.ndarray:
    """Band-limited (FFT) resampling of (S,) to (length,) samples over the same span."""
    n = x.shape[0]
    if length == n:
        return np.array(x, dtype=np.float64)
    spec = np.fft.rfft(x)  # (n // 2 + 1,)
    out = np.zeros(length // 2 + 1, dtype=complex)  # (length // 2 + 1,)
    keep = min(spec.shape[0], out.shape[0])
    out[:keep] = spec[:keep]
    return np.fft.irfft(out, n=length) * (length / n)  # (length,)


def pitch_shift(x: np.ndarray, semitones: float) -> np.ndarray:
    """Shift every frequency of (S,) by ``2 ** (semitones / 12)``, duration kept: (S,)."""
    if semitones == 0:
        return np.array(x, dtype=np.float64)
    factor = 2.0 ** (semitones / 12.0)
    longer = time_stretch(x, 1.0 / factor)  # (round(S * factor),), same pitch
    return resample_to(longer, x.shape[0])  # (S,), frequencies times factor


def time_shift(x: np.ndarray, samples: int) -> np.ndarray:
    """Delay (``samples`` > 0) or advance (< 0) (S,) with zero fill; (S,)."""
    out = np.zeros_like(x)
    n = x.shape[0]
    if samples >= n or -samples >= n:
        return out
    if samples >= 0:
        out[samples:] = x[: n - samples]
    else:
        out[: n + samples] = x[-samples:]
    return out


def noise_at_snr(x: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (S,) whose power is the mean power of ``x`` divided by 10**(snr/10)."""
    power = float(np.mean(np.square(x)))
    n = x.shape[0]
    if power == 0.0:
        return np.zeros(n)
    if color == "white":
        noise = rng.standard_normal(n)  # (S,)
    elif color == "pink":
        spec = rng.standard_normal(n // 2 + 1) + 1j * rng.standard_normal(n // 2 + 1)  # (F,)
        f = np.arange(n // 2 + 1, dtype=np.float64)
        spec[0] = 0.0
        spec[1:] /= np.sqrt(f[1:])  # power ~ 1 / f
        noise = np.fft.irfft(spec, n=n)  # (S,)
    else:
        raise ValueError(f"noise colour {color!r}: expected 'white' or 'pink'")
    noise_power = float(np.mean(np.square(noise)))
    if noise_power == 0.0:  # n == 1 pink noise has only the (removed) DC bin
        return np.zeros(n)
    return noise * math.sqrt(power / (10.0 ** (snr_db / 10.0)) / noise_power)
