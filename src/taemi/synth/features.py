"""Synthetic feature stores with known, learnable structure (tests, demos, benchmarks).

Mimics the shape of the ABAW EMI task (docs/method.md sections 1-2, 7): three modalities,
labels in [0, 1], ids ``00000``.., train/valid label CSVs, missing modalities. The
labels depend on all three modalities in a known way, so a model's score can be put
next to a ceiling:

- text carries a stable prior: a latent ``u_t`` in [0, 1]^E is mapped by a fixed
  random nonlinear map ``t = tanh(A (2 u_t - 1) + b)`` into D_t, plus small noise;
- audio and vision carry time-localised evidence: latents ``u_a``, ``u_v`` in [0, 1]^E.
  Every frame has noise N(0, 1). One short window (``evidence_fraction`` of the
  frames, random position) carries ``m + M (2 u - 1)``: a fixed random marker ``m``
  (what an attention query can look for) plus a fixed random linear mix ``M`` of the
  latent. The other frames carry ``distractor * M (2 z - 1)``: an unrelated per-clip
  latent ``z`` (uniform, independent of the label) through the SAME map, i.e. the
  clip expresses something else most of the time. A mean over frames therefore sees
  about ``f u + (1 - f) z`` (f the window fraction, 0.1-0.2) and cannot tell u from
  z, while attention to the marked frames recovers u. ``distractor=0`` leaves pure
  noise outside the window (mean pooling is then only diluted, not confounded);
- label ``y = clip(w_t u_t + w_a u_a + w_v u_v + N(0, label_noise^2), 0, 1)``;
- transient corruption: with probability ``corrupt_rate`` per clip and sequence
  modality, a span of frames (10-20 %) is replaced with large-amplitude noise
  (N(0, 4^2)). The span is placed AWAY from the evidence window (it never destroys
  evidence; it is a nuisance a robust model should ignore). With no room beside the
  window (very short sequences) the clip is left uncorrupted;
- missing modalities: with probability ``missing_rate`` per modality the modality is
  ``None`` in the store; the label still depends on its latent, so that information
  is genuinely lost.

Oracle ceiling (``synth.json``, :class:`SynthResult`): the mean Pearson on the valid
split of the noise-free ``clip(w . u, 0, 1)`` against the noisy labels, and an
"observable" variant where each missing modality's latent is replaced by its
expectation 0.5.

Every clip is generated from its own seeded streams (``default_rng([seed, i, k])``)
plus fixed global patterns (``default_rng([seed, _PATTERN_STREAM])``), so generation is
deterministic, memory is bounded (clip by clip) and an interrupted run resumes to
identical data.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from taemi import EMI_EMOTIONS, MODALITIES
from taemi.data.labels import write_predictions
from taemi.eval.metrics import compute_metrics
from taemi.store import StoreWriter
from taemi.store.clip import ClipFeatures

__all__ = [
    "SynthConfig",
    "SynthPatterns",
    "SynthResult",
    "SynthTruth",
    "draw_truth",
    "make_patterns",
    "make_synth",
    "oracle_predictions",
    "render_clip",
]

log = logging.getLogger(__name__)

# Fixed stream tags for the seeded generators (arbitrary constants, never change them:
# they define the data a seed produces).
_PATTERN_STREAM = 0x5EED_0001  # global patterns: default_rng([seed, _PATTERN_STREAM])
_TRUTH_STREAM = 0  # per clip latents/labels/layout: default_rng([seed, i, _TRUTH_STREAM])
_FEATURE_STREAM = 1  # per clip feature noise: default_rng([seed, i, _FEATURE_STREAM])

_TEXT_NOISE = 0.1  # std of the noise added to the text vector
_TOKEN_NOISE = 0.3  # std of the per-token variation around the text vector
_BIAS_STD = 0.5  # std of the text map's bias b
_MIX_GAIN = 1.5  # scale of the mixing matrices: entries N(0, _MIX_GAIN^2 / E)
_CORRUPT_STD = 4.0  # std of the corruption noise (background has std 1)
_CORRUPT_FRACTION = (0.1, 0.2)  # corrupted span length, as a fraction of the frames
_MAX_CLIPS = 100_000  # ids are 5 digits


@dataclass
class SynthConfig:
    """What :func:`make_synth` generates."""

    clips: int = 1000  # number of clips (train + valid), ids "00000".."{clips-1:05d}"
    valid_fraction: float = 0.25  # share of clips in valid.csv (the last ids)
    dims: tuple[int, int, int] = (1027, 768, 768)  # feature dims (D_a, D_v, D_t); paper dims
    audio_len: tuple[int, int] = (40, 120)  # audio frames per clip, min and max (inclusive)
    vision_len: tuple[int, int] = (20, 60)  # vision frames per clip, min and max (inclusive)
    emotions: tuple[str, ...] = EMI_EMOTIONS  # label columns (E of them)
    weights: tuple[float, float, float] = (0.3, 0.3, 0.4)  # label weights: audio, vision, text
    label_noise: float = 0.05  # std of the Gaussian label noise before clipping to [0, 1]
    missing_rate: tuple[float, float, float] = (0.05, 0.05, 0.05)  # P(missing): audio, vision, text
    corrupt_rate: float = 0.1  # P(a corrupted span) per clip, for audio and vision each
    text_tokens: bool = False  # also store token states (T_t, D_t); their mean is the text vector
    text_len: tuple[int, int] = (4, 16)  # text tokens per clip, min and max (with text_tokens)
    evidence_fraction: tuple[float, float] = (0.1, 0.2)  # evidence window length / sequence length
    distractor: float = 1.0  # scale of the unrelated expression z outside the window; 0: noise
    seed: int = 0  # everything generated is a function of this seed

    def __post_init__(self) -> None:
        # lists arrive from JSON/YAML: make them tuples so configs compare equal
        for name in (
            "dims",
            "audio_len",
            "vision_len",
            "emotions",
            "weights",
            "missing_rate",
            "text_len",
            "evidence_fraction",
        ):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not isinstance(self.clips, int) or not 2 <= self.clips <= _MAX_CLIPS:
            raise ValueError(
                f"SynthConfig.clips={self.clips!r}: must be an int in [2, {_MAX_CLIPS}]"
            )
        n_valid = self.n_valid
        if not 0.0 < self.valid_fraction < 1.0 or n_valid < 2 or self.clips - n_valid < 2:
            raise ValueError(
                f"SynthConfig.valid_fraction={self.valid_fraction!r} with clips={self.clips}: "
                f"both splits need at least 2 clips (valid would have {n_valid})"
            )
        if len(self.dims) != 3 or any(not isinstance(d, int) or d < 1 for d in self.dims):
            raise ValueError(
                f"SynthConfig.dims={self.dims!r}: must be 3 positive ints (D_a, D_v, D_t)"
            )
        for name in ("audio_len", "vision_len", "text_len"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(
                    f"SynthConfig.{name}={lo_hi!r}: must be (min, max) with 1 <= min <= max"
                )
        if len(self.emotions) < 1 or len(set(self.emotions)) != len(self.emotions):
            raise ValueError(f"SynthConfig.emotions={self.emotions!r}: must be unique, non-empty")
        if (
            len(self.weights) != 3
            or any(w < 0 for w in self.weights)
            or abs(sum(self.weights) - 1.0) > 1e-6
        ):
            raise ValueError(
                f"SynthConfig.weights={self.weights!r}: must be 3 non-negative weights summing to 1"
            )
        if self.label_noise < 0:
            raise ValueError(f"SynthConfig.label_noise={self.label_noise!r}: must be >= 0")
        if len(self.missing_rate) != 3 or any(not 0.0 <= r <= 1.0 for r in self.missing_rate):
            raise ValueError(
                f"SynthConfig.missing_rate={self.missing_rate!r}: must be 3 rates in [0, 1]"
            )
        if not 0.0 <= self.corrupt_rate <= 1.0:
            raise ValueError(f"SynthConfig.corrupt_rate={self.corrupt_rate!r}: must be in [0, 1]")
        lo, hi = self.evidence_fraction
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(
                f"SynthConfig.evidence_fraction={self.evidence_fraction!r}: must be (lo, hi), 0 < lo <= hi <= 0.5"
            )
        if not self.distractor >= 0.0:
            raise ValueError(f"SynthConfig.distractor={self.distractor!r}: must be >= 0")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SynthConfig.seed={self.seed!r}: must be a non-negative int")

    @property
    def n_valid(self) -> int:
        """Clips in the valid split (the last ``n_valid`` ids)."""
        return round(self.clips * self.valid_fraction)


@dataclass
class SynthResult:
    """Where :func:`make_synth` wrote things, and the ceiling numbers."""

    store: Path  # the feature store folder
    train_csv: Path  # ABAW-format labels of the train split
    valid_csv: Path  # ABAW-format labels of the valid split
    n_train: int  # clips in train.csv
    n_valid: int  # clips in valid.csv
    oracle: dict  # {"mean_pearson": full oracle, "mean_pearson_observable": missing latents -> 0.5}


@dataclass
class SynthPatterns:
    """The fixed random maps shared by all clips of a seed."""

    text_map: np.ndarray  # (D_t, E) A in t = tanh(A (2u - 1) + b)
    text_bias: np.ndarray  # (D_t,) b
    audio_marker: np.ndarray  # (D_a,) m_a, added to every evidence frame
    audio_mix: np.ndarray  # (D_a, E) M_a, evidence = m_a + M_a (2u_a - 1)
    vision_marker: np.ndarray  # (D_v,)
    vision_mix: np.ndarray  # (D_v, E)


@dataclass
class SynthTruth:
    """The ground truth of one clip: latents, label, layout (cheap to draw, no features)."""

    index: int  # clip number i
    clip_id: str  # f"{i:05d}"
    u_text: np.ndarray  # (E,) float64 latent in [0, 1]
    u_audio: np.ndarray  # (E,)
    u_vision: np.ndarray  # (E,)
    z_audio: np.ndarray  # (E,) unrelated latent shown outside the audio evidence window
    z_vision: np.ndarray  # (E,) same for vision
    label: np.ndarray  # (E,) float32, in [0, 1]
    missing: tuple[bool, bool, bool]  # per modality, MODALITIES order (audio, vision, text)
    lengths: dict[str, int]  # frames per modality: "audio", "vision", and "text" (tokens)
    window: dict[str, tuple[int, int]]  # evidence frames [start, stop) for "audio", "vision"
    corrupt: dict[str, tuple[int, int] | None] = field(
        default_factory=dict
    )  # corrupted [start, stop)


def make_patterns(cfg: SynthConfig) -> SynthPatterns:
    """The fixed maps of ``cfg.seed`` (independent of the clip count)."""
    d_a, d_v, d_t = cfg.dims
    e = len(cfg.emotions)
    rng = np.random.default_rng([cfg.seed, _PATTERN_STREAM])
    scale = _MIX_GAIN / np.sqrt(e)
    return SynthPatterns(
        text_map=rng.normal(0.0, 1.0 / np.sqrt(e), (d_t, e)),
        text_bias=rng.normal(0.0, _BIAS_STD, d_t),
        audio_marker=rng.normal(0.0, 1.0, d_a),
        audio_mix=rng.normal(0.0, scale, (d_a, e)),
        vision_marker=rng.normal(0.0, 1.0, d_v),
        vision_mix=rng.normal(0.0, scale, (d_v, e)),
    )


def _window(
    rng: np.random.Generator, length: int, fraction: tuple[float, float]
) -> tuple[int, int]:
    """A random [start, stop) span of ``fraction`` (drawn uniformly) of ``length`` frames, >= 1 frame."""
    n = max(1, min(length, round(rng.uniform(*fraction) * length)))
    start = int(rng.integers(0, length - n + 1))
    return start, start + n


def _corrupt_span(
    rng: np.random.Generator, length: int, evidence: tuple[int, int]
) -> tuple[int, int] | None:
    """A span of 10-20 % of the frames that does not overlap ``evidence``; None if none fits."""
    n = max(1, round(rng.uniform(*_CORRUPT_FRACTION) * length))
    # candidate starts left of the window (start + n <= ev_start) or right of it (start >= ev_stop)
    left = max(0, evidence[0] - n + 1)
    right = max(0, length - n + 1 - evidence[1])
    pick = int(rng.integers(0, max(1, left + right)))
    if left + right == 0:
        return None
    start = pick if pick < left else evidence[1] + (pick - left)
    return start, start + n


def draw_truth(cfg: SynthConfig, index: int) -> SynthTruth:
    """Latents, label, missing flags and frame layout of clip ``index`` (no features)."""
    e = len(cfg.emotions)
    rng = np.random.default_rng([cfg.seed, index, _TRUTH_STREAM])
    u_t, u_a, u_v = rng.random((3, e))  # (E,) each
    w_a, w_v, w_t = cfg.weights
    label = np.clip(
        w_t * u_t + w_a * u_a + w_v * u_v + rng.normal(0.0, cfg.label_noise, e), 0.0, 1.0
    )
    # draws below always happen in the same order, whatever their outcome
    missing = tuple(bool(x) for x in rng.random(3) < np.asarray(cfg.missing_rate))
    lengths = {
        "audio": int(rng.integers(cfg.audio_len[0], cfg.audio_len[1] + 1)),
        "vision": int(rng.integers(cfg.vision_len[0], cfg.vision_len[1] + 1)),
        "text": int(rng.integers(cfg.text_len[0], cfg.text_len[1] + 1)),
    }
    window = {m: _window(rng, lengths[m], cfg.evidence_fraction) for m in ("audio", "vision")}
    corrupt: dict[str, tuple[int, int] | None] = {}
    for m in ("audio", "vision"):
        hit = rng.random() < cfg.corrupt_rate
        span = _corrupt_span(rng, lengths[m], window[m])
        corrupt[m] = span if hit else None
    z_a, z_v = rng.random((2, e))  # (E,) each
    return SynthTruth(
        index=index,
        clip_id=f"{index:05d}",
        u_text=u_t,
        u_audio=u_a,
        u_vision=u_v,
        z_audio=z_a,
        z_vision=z_v,
        label=label.astype(np.float32),
        missing=missing,  # type: ignore[arg-type]
        lengths=lengths,
        window=window,
        corrupt=corrupt,
    )


def render_clip(cfg: SynthConfig, truth: SynthTruth, patterns: SynthPatterns) -> ClipFeatures:
    """The features of one clip, float32 (missing modalities are None)."""
    rng = np.random.default_rng([cfg.seed, truth.index, _FEATURE_STREAM])
    d_t = cfg.dims[2]

    # text: t = tanh(A (2u - 1) + b) + noise, (D_t,)
    text = np.tanh(patterns.text_map @ (2.0 * truth.u_text - 1.0) + patterns.text_bias)
    text = text + rng.normal(0.0, _TEXT_NOISE, d_t)
    tokens = None
    if cfg.text_tokens:
        jitter = rng.normal(0.0, _TOKEN_NOISE, (truth.lengths["text"], d_t))  # (T_t, D_t)
        tokens = text[None, :] + (
            jitter - jitter.mean(axis=0, keepdims=True)
        )  # mean over tokens == text

    seqs: dict[str, np.ndarray] = {}
    for m, marker, mix, u, z in (
        ("audio", patterns.audio_marker, patterns.audio_mix, truth.u_audio, truth.z_audio),
        ("vision", patterns.vision_marker, patterns.vision_mix, truth.u_vision, truth.z_vision),
    ):
        x = rng.normal(0.0, 1.0, (truth.lengths[m], marker.shape[0]))  # (T, D) noise
        start, stop = truth.window[m]
        outside = np.ones(len(x), dtype=bool)  # (T,)
        outside[start:stop] = False
        x[outside] += cfg.distractor * (
            mix @ (2.0 * z - 1.0)
        )  # unrelated expression, (D,) per frame
        x[start:stop] += marker + mix @ (2.0 * u - 1.0)  # the evidence, (D,) per frame
        span = truth.corrupt[m]
        noise = rng.normal(0.0, _CORRUPT_STD, x.shape)  # drawn always: keeps the stream aligned
        if span is not None:
            x[span[0] : span[1]] = noise[span[0] : span[1]]
        seqs[m] = x

    miss_a, miss_v, miss_t = truth.missing
    return ClipFeatures(
        clip_id=truth.clip_id,
        audio=None if miss_a else seqs["audio"].astype(np.float32),
        vision=None if miss_v else seqs["vision"].astype(np.float32),
        text=None if miss_t else text.astype(np.float32),
        text_tokens=None if (miss_t or tokens is None) else tokens.astype(np.float32),
    )


def oracle_predictions(
    cfg: SynthConfig, truths: list[SynthTruth], *, observable: bool
) -> np.ndarray:
    """(N, E) noise-free ``clip(w . u, 0, 1)``; ``observable`` puts 0.5 for missing latents."""
    w_a, w_v, w_t = cfg.weights
    rows = []
    for tr in truths:
        miss_a, miss_v, miss_t = tr.missing if observable else (False, False, False)
        u_t = np.full_like(tr.u_text, 0.5) if miss_t else tr.u_text
        u_a = np.full_like(tr.u_audio, 0.5) if miss_a else tr.u_audio
        u_v = np.full_like(tr.u_vision, 0.5) if miss_v else tr.u_vision
        rows.append(np.clip(w_t * u_t + w_a * u_a + w_v * u_v, 0.0, 1.0))
    return np.stack(rows)  # (N, E)


def _config_json(cfg: SynthConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as stored


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_synth(
    out_dir: str | os.PathLike[str], cfg: SynthConfig, *, progress: bool = True
) -> SynthResult:
    """Generate a synthetic dataset into ``out_dir``.

    Writes ``out_dir/store`` (feature store, float16), ``train.csv`` and ``valid.csv``
    (ABAW format; valid is the last ``cfg.n_valid`` ids) and ``synth.json`` (config and
    oracle numbers). Clips already in an existing store are skipped (resume); the
    existing ``synth.json`` must then hold the same config, else ``ValueError``.
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "synth.json"
    config = _config_json(cfg)
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8")).get("config")
        if old != config:
            diff = sorted(
                k for k in set(config) | set(old or {}) if (old or {}).get(k) != config.get(k)
            )
            raise ValueError(
                f"{out} holds synthetic data of another config (fields differ: {diff}); "
                "use a fresh folder"
            )
    elif (out / "store").exists():
        raise ValueError(
            f"{out / 'store'} exists but {meta_path} does not: not made by make_synth; refusing to add to it"
        )
    # written first: marks the folder as ours (the oracle is added at the end)
    _write_json(meta_path, {"config": config, "oracle": None})

    patterns = make_patterns(cfg)
    d_a, d_v, d_t = cfg.dims
    # The generator's recorded name (this module's path before taemi.synth existed): a store
    # refuses to resume under other settings, so it stays what earlier stores hold.
    settings = {"generator": "taemi.data.synth", "seed": cfg.seed}
    truths: list[SynthTruth] = []
    written = skipped = 0
    with StoreWriter(
        out / "store",
        dims={"audio": d_a, "vision": d_v, "text": d_t},
        dtype="float16",
        text_tokens=cfg.text_tokens,
        modalities={m: {"backbone": "synthetic", "settings": settings} for m in MODALITIES},
        shard_size=256,
    ) as writer:
        for i in tqdm(range(cfg.clips), desc="synth clips", disable=not progress, unit="clip"):
            truth = draw_truth(cfg, i)
            truths.append(truth)
            if truth.clip_id in writer:
                skipped += 1
                continue
            writer.add(render_clip(cfg, truth, patterns))
            written += 1
    log.info(
        "synth store %s: %d clips written, %d already present", out / "store", written, skipped
    )

    labels = np.stack([tr.label for tr in truths])  # (N, E) float32
    ids = [tr.clip_id for tr in truths]
    n_train = cfg.clips - cfg.n_valid
    train_csv, valid_csv = out / "train.csv", out / "valid.csv"
    write_predictions(train_csv, ids[:n_train], cfg.emotions, labels[:n_train])
    write_predictions(valid_csv, ids[n_train:], cfg.emotions, labels[n_train:])

    valid = truths[n_train:]
    target = labels[n_train:]
    oracle = {
        "mean_pearson": compute_metrics(
            oracle_predictions(cfg, valid, observable=False), target, cfg.emotions
        ).mean_pearson,
        "mean_pearson_observable": compute_metrics(
            oracle_predictions(cfg, valid, observable=True), target, cfg.emotions
        ).mean_pearson,
    }
    missing = np.asarray([tr.missing for tr in truths])  # (N, 3)
    _write_json(
        meta_path,
        {
            "config": config,
            "oracle": oracle,
            "n_train": n_train,
            "n_valid": cfg.n_valid,
            "missing_fraction": dict(zip(MODALITIES, missing.mean(axis=0).tolist())),
        },
    )
    log.info("synth oracle on valid: %s", oracle)
    return SynthResult(
        store=out / "store",
        train_csv=train_csv,
        valid_csv=valid_csv,
        n_train=n_train,
        n_valid=cfg.n_valid,
        oracle=oracle,
    )
