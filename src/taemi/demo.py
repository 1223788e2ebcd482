"""The main job on embedded data: generated media -> features -> train -> evaluate -> predict.

``taemi demo`` needs nothing but the installed package (no download, no dataset):

1. :func:`taemi.synth.media.make_media_corpus` writes short talking-face videos in
   the ABAW layout (``media/raw/{id}.mp4``, ``train_split.csv``, ``valid_split.csv``):
   espeak-ng speech whose words and voice, and a rendered face whose expression, carry
   known parts of the six target intensities;
2. ``taemi extract`` (offline profile: Whisper tiny.en transcripts and encoder frames,
   DINOv2 per frame, MiniLM per transcript) turns them into a feature store. The
   rendered faces are whole frames already, so face detection is off here. The demo
   extracts with the speed settings (:data:`FAST_EXTRACTION`: int8 DINOv2, a 10 s Whisper
   window, one Whisper pass per clip), which make extraction 3.7x faster on 2 cores and
   so let it use three times the clips in the same time; ``exact=True`` (``--exact``)
   extracts on the exact path instead;
3. the ``paper`` model is trained with the paper's recipe (docs/method.md section 6) at
   the demo's size (:data:`DEMO_TRAINING`: hidden 64, feed-forward 256, head 128 and a
   learning rate of 2e-3 instead of the paper's 512 / 2048 / 512 and 1e-4, which are sized
   for the challenge's 8,000 clips; on the demo's few hundred the small model scores
   higher and trains 4-8x faster, so the time goes to more clips), evaluated on the
   valid split and compared with the oracle ceiling: the valid mean Pearson of the
   noise-free generating function against the noisy labels. Ridge regression on the same
   features (per modality and all three) is scored on the same split, and the summary's
   ``limits`` say what bounds the time and the score;
4. valid predictions are written in the ABAW submission format.

``synthetic_features=True`` skips the media and trains on a synthetic feature store at
paper sizes instead (:mod:`taemi.synth.features`), which shows the model alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taemi.data.labels import read_labels, write_predictions
from taemi.eval.metrics import compute_metrics
from taemi.inference import Predictor
from taemi.run import has_run, is_finished
from taemi.store import FeatureStore
from taemi.train.modes import config_for_store
from taemi.train.trainer import train

log = logging.getLogger(__name__)

#: The demo's extraction speed settings (``taemi extract --image-precision int8
#: --whisper-window 10 --share-whisper``); ``--exact`` replaces them with the exact path's.
FAST_EXTRACTION = {"image_precision": "int8", "whisper_window": 10.0, "share_whisper": True}
EXACT_EXTRACTION = {"image_precision": "fp32", "whisper_window": 30.0, "share_whisper": False}
#: Training settings of the demo over the preset (before the user's ``--set``): the
#: paper's model and learning rate are sized for 8,000 clips; trained on 270 of the
#: 480-clip demo's training clips and scored on the other 90 (two seeds each), hidden
#: size 64 at lr 2e-3 reached 0.757 against the paper size's 0.728 at 3e-4, in a quarter
#: of the time (benchmarks/README.md, "The main job at the demo's size").
DEMO_TRAINING = (
    ("train.lr", "2e-3"),
    ("model.hidden", "64"),
    ("model.sa_ffn", "256"),
    ("model.head_hidden", "128"),
)


def _media_data(
    out: Path,
    clips: int,
    seed: int,
    max_frames: int,
    progress: bool,
    *,
    share_whisper: bool = False,
    image_precision: str = "fp32",
    whisper_window: float = 30.0,
    seconds: dict | None = None,
) -> dict:
    """Generate the media corpus and extract its features; paths and the oracle ceiling.
    ``seconds`` gets the wall seconds of the generation (``media``) and the extraction."""
    from taemi.extract.pipeline import ExtractOptions, extract, find_sources, summary_counts
    from taemi.extract.profiles import load_encoders
    from taemi.synth.media import MediaSynthConfig, label_fn, make_media_corpus

    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    mcfg = MediaSynthConfig(clips=clips, seed=seed)
    corpus = make_media_corpus(out / "media", mcfg, progress=progress)
    seconds["media"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    sources, input_errors = find_sources([corpus.raw])
    encoders = load_encoders(
        "offline",
        face=False,
        image_precision=image_precision,
        whisper_window=whisper_window,
        device="auto",
    )
    opts = ExtractOptions(
        max_frames=max_frames, frame_policy="uniform", share_whisper=share_whisper
    )
    summary = extract(
        sources, out / "features", encoders, opts, input_errors=input_errors, progress=progress
    )
    log.info("extraction: %s", summary_counts(summary))
    seconds["extract"] = round(time.perf_counter() - t0, 1)  # models loaded included
    if not summary.ok:
        raise RuntimeError(f"extraction of the demo media failed; see {summary.errors_file}")

    valid = [r.latents for r in corpus.clips if r.latents.split == "valid"]
    clean = np.stack(
        [label_fn(v.text, v.audio, v.face, 0.0, mcfg.weights) for v in valid]
    )  # (N, E)
    noisy = np.stack([v.label for v in valid])
    oracle = compute_metrics(clean, noisy, mcfg.emotions).mean_pearson
    return {
        "store": out / "features",
        "train_csv": corpus.train_csv,
        "valid_csv": corpus.valid_csv,
        "oracle": oracle,
        "extract": {
            "done": summary.done,
            "failed": summary.failed,
            "missing": summary.missing,
            "wall_seconds": summary.wall_seconds,
        },
    }


def _feature_data(out: Path, clips: int, seed: int, progress: bool) -> dict:
    from taemi.synth.features import SynthConfig, make_synth

    synth = make_synth(out / "data", SynthConfig(clips=clips, seed=seed), progress=progress)
    return {
        "store": synth.store,
        "train_csv": synth.train_csv,
        "valid_csv": synth.valid_csv,
        "oracle": synth.oracle["mean_pearson"],
    }


def run_demo(
    out: str | Path,
    *,
    clips: int = 720,
    epochs: int = 30,
    preset: str = "paper",
    seed: int = 0,
    max_frames: int = 8,
    synthetic_features: bool = False,
    resume: bool = False,
    progress: bool = True,
    share_whisper: bool = FAST_EXTRACTION["share_whisper"],
    image_precision: str = FAST_EXTRACTION["image_precision"],
    whisper_window: float = FAST_EXTRACTION["whisper_window"],
    overrides: Sequence[tuple[str, Any]] = (),
) -> dict:
    """Run the whole chain into ``out``; return (and write ``out/summary.json``) the scores.

    ``share_whisper``, ``image_precision`` and ``whisper_window`` are the extraction's
    speed settings (``taemi extract --share-whisper``, ``--image-precision int8``,
    ``--whisper-window S``; by default :data:`FAST_EXTRACTION`); ``overrides`` are
    training config settings over the preset and :data:`DEMO_TRAINING` (``--set``). The
    summary records them, the seconds of each phase, which phase took the longest and
    what limits the result. The encoders run on the GPU when every one of them can
    (``device="auto"``)."""
    from taemi.config import build_config

    out = Path(out)
    t_start = time.perf_counter()
    overrides = [*DEMO_TRAINING, *overrides]  # the user's settings come last and win
    # a bad preset or setting fails here, before the media are made
    build_config(preset, [("train.max_epochs", epochs), *overrides])
    seconds: dict[str, float] = {}
    if synthetic_features:
        data = _feature_data(out, clips, seed, progress)
    else:
        data = _media_data(
            out,
            clips,
            seed,
            max_frames,
            progress,
            share_whisper=share_whisper,
            image_precision=image_precision,
            whisper_window=whisper_window,
            seconds=seconds,
        )
    t_train = time.perf_counter()
    store = FeatureStore(data["store"])
    cfg = config_for_store(
        preset, [("train.max_epochs", epochs), *overrides], store
    )  # input sizes: the store's
    kw = dict(emotions=cfg.data.emotions, store_ids=store)
    train_labels = read_labels(data["train_csv"], **kw)
    valid_labels = read_labels(data["valid_csv"], **kw)
    run_dir = out / "run"
    if not (resume and is_finished(run_dir)):
        train(
            cfg,
            store,
            train_labels,
            valid_labels,
            run_dir,
            resume=resume and has_run(run_dir),
            progress=progress,
        )

    seconds["train"] = round(time.perf_counter() - t_train, 1)
    predictor = Predictor.from_run(run_dir, "best")
    cfg = predictor.cfg
    pred = predictor.predict(predictor.dataset(store, valid_labels), progress=progress)
    metrics = compute_metrics(pred, valid_labels.values, cfg.data.emotions)
    write_predictions(
        out / "valid_predictions.csv", valid_labels.ids, cfg.data.emotions, pred, clip=True
    )
    baselines = _ridge_baselines(out, store, train_labels, valid_labels)
    summary = {
        "data": "synthetic features"
        if synthetic_features
        else "generated media -> taemi extract (offline)",
        "preset": preset,
        "clips": {"train": len(train_labels), "valid": len(valid_labels)},
        "store_dims": store.dims,
        "valid": metrics.to_dict(),
        "oracle_mean_pearson": data["oracle"],
        "share_of_oracle": metrics.mean_pearson / data["oracle"],
        "extract": data.get("extract"),
        "settings": {
            "max_frames": max_frames,
            "share_whisper": share_whisper,
            "image_precision": image_precision,
            "whisper_window": whisper_window,
            "epochs": epochs,
            "overrides": {k: v for k, v in overrides},
        },
        "seconds": {**seconds, "total": round(time.perf_counter() - t_start, 1)},
        "longest_phase": max(seconds, key=seconds.get) if seconds else None,
        "ridge_baselines": baselines,
        "run": str(run_dir),
        "predictions": str(out / "valid_predictions.csv"),
    }
    summary["limits"] = limits(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def _ridge_baselines(out: Path, store: FeatureStore, train_labels, valid_labels) -> dict:
    """Ridge regression on the same split's pooled features, per modality and all three
    (:mod:`taemi.experiments.baselines`, written to ``out/baselines`` so that ``taemi
    report`` shows them): feature set -> valid mean Pearson. A second or two."""
    from taemi.experiments.baselines import BaselineSettings, run_baselines, write_baselines

    settings = BaselineSettings(models=("ridge",))
    results = run_baselines(store, train_labels, valid_labels, settings)
    write_baselines(out / "baselines", results, settings, {"store": str(store.root)})
    return {r.features: r.valid["mean_pearson"] for r in results}


def limits(summary: dict) -> list[str]:
    """What bounds the demo's time and score, in sentences, from its own measurements:
    the longest phase, and the fusion model against ridge regression on the same features
    (close to it: the features carry no more; well below: the training data or recipe)."""
    out = []
    sec = summary["seconds"]
    phase = summary.get("longest_phase")
    if phase:
        out.append(
            f"time: {phase} is the longest phase ({sec[phase]:g} s of {sec['total']:g} s, "
            f"{100 * sec[phase] / max(sec['total'], 1e-9):.0f}%)"
        )
    ridge = summary.get("ridge_baselines") or {}
    if "all" in ridge:
        fusion, oracle = summary["valid"]["mean_pearson"], summary["oracle_mean_pearson"]
        per = ", ".join(f"{m} {ridge[m]:.3f}" for m in ("audio", "vision", "text") if m in ridge)
        gap = fusion - ridge["all"]
        weakest = min((m for m in ("audio", "vision", "text") if m in ridge), key=ridge.get)
        if gap < -0.02:
            verdict = (
                "the fusion model trails a linear model on the same features: more training "
                "clips or another recipe would raise it"
            )
        elif gap <= 0.02:
            verdict = (
                "the features bound the score: a linear model on their clip means does as well"
            )
        else:
            verdict = (
                f"the fusion model learns {gap:.3f} more than a linear model on the features' "
                "clip means; what stays out of reach is what the features lose (the weakest "
                f"modality, {weakest}, scores {ridge[weakest]:.3f} alone) and what more "
                "training clips would teach it"
            )
        out.append(
            f"score: fusion model {fusion:.3f}, ridge regression on the pooled features "
            f"{ridge['all']:.3f} (alone: {per}), oracle {oracle:.3f}; {verdict}. The oracle "
            "knows the generating latents, including those of the modalities a clip lacks "
            "and what speech recognition or the image encoder lose"
        )
    return out
