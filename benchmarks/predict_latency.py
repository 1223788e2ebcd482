"""Latency of ``taemi predict --run RUN VIDEO`` on a 10-second video with the offline profile:
seconds per stage, real-time factor, and the first clip vs later clips of one process.

Setup (not timed): a few short generated talking-face clips (``taemi.synth.media``,
espeak-ng speech, 30 fps) are extracted with the offline profile (``taemi extract``
defaults: 12 s of audio, the first 400 frames, face crops) and a tiny run is trained on
them for one epoch (the fusion model's size matters little here: the encoders dominate).
Then ``--videos`` different 10-second clips are generated.

Measured, in this order:

1. in one process, ``taemi.predict_media.predict_media(RUN, [video_k])`` for each video,
   then the first video again: the first call loads the models (``load``); later calls
   reuse them (the repeat does the same work as call 1 without loading). Per call: face
   crops found (vision steps), seconds
   per stage from ``MediaPredictions.timings`` (``decode`` incl. face cropping, ``asr``,
   ``audio``, ``vision``, ``text``, ``write`` are summed over the extraction's threads and
   overlap: decoding runs ahead of the encoders), ``fusion`` (the fusion model), ``total``
   and real-time factor = media seconds / total seconds (> 1: faster than real time);
2. face cropping alone: the video decoded once, ``FaceCropper.crop_frame`` on every frame
   (single thread), to split the ``decode`` stage;
3. the CLI end to end, one fresh process per video (``--cli-repeats N``: N per video,
   in turns, the median printed with each figure): ``python -m taemi predict --run RUN
   VIDEO`` (imports, model loading, extraction, prediction), wall time;
4. with ``--vision-fps N`` (the run's features, and so every prediction, are extracted with
   at most N vision features per second, ``taemi extract --vision-fps N``), fidelity on
   real face crops (``--fidelity-media``, default the CREMA-D sample: ``$TAEMI_CREMA_D/media``
   or ``../shared/data/crema-d-sample/media``): every video frame of the exact path (the
   first 400 frames, Haar face crops, the profile's image encoder in fp32) is compared,
   by cosine similarity, with the feature that stands for it at N per second (the exact
   feature of its slot's first frame, :func:`taemi.extract.media.rate_representatives`;
   ``tests/test_extract.py`` checks the pipeline stores exactly that); frames whose
   stand-in has no face (or the reverse) are counted apart.

Usage::

    python benchmarks/predict_latency.py                     # ~4 min on 2 cores
    python benchmarks/predict_latency.py --videos 3 --seconds 10 --workdir /work/tmp-bench/predict
    python benchmarks/predict_latency.py --videos 2 --no-cli --vision-fps 10
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _paper_store import work_folder

STAGES = ("load", "decode", "asr", "audio", "vision", "text", "write", "extract", "fusion", "total")


def quiet() -> None:
    for name in ("taemi", "transformers", "faster_whisper", "ctranslate2", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_run(
    work: Path,
    vision_fps: float | None = None,
    image_precision: str = "fp32",
    detect_every: int = 1,
    share_whisper: bool = False,
    whisper_window: float = 30.0,
) -> Path:
    """Generated training clips -> offline features (at ``vision_fps``, with the image
    encoder at ``image_precision`` and face detection every ``detect_every`` frames) -> a
    1-epoch tiny run (not timed). Predictions extract as the run's features were made."""
    from taemi.cli.main import main as taemi_main
    from taemi.synth.media import MediaSynthConfig, make_media_corpus

    tag = "" if vision_fps is None else f"_vfps{vision_fps:g}"
    extra = [] if vision_fps is None else ["--vision-fps", str(vision_fps)]
    if image_precision != "fp32":
        tag += f"_{image_precision}"
        extra += ["--image-precision", image_precision]
    if detect_every != 1:
        tag += f"_det{detect_every}"
        extra += ["--detect-every", str(detect_every)]
    if share_whisper:
        tag += "_sharew"
        extra += ["--share-whisper"]
    if whisper_window != 30.0:
        tag += f"_win{whisper_window:g}"
        extra += ["--whisper-window", str(whisper_window)]
    run, store = work / f"run{tag}", work / f"store{tag}"
    if (run / "best.safetensors").is_file():
        return run
    cfg = MediaSynthConfig(
        clips=6,
        seconds=(1.5, 2.5),
        size=160,
        fps=30,
        missing_video_rate=0.0,
        missing_audio_rate=0.0,
        silent_rate=0.0,
        valid_fraction=0.34,
        seed=1,
    )
    corpus = make_media_corpus(work / "train_media", cfg, progress=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = taemi_main(
            ["extract", "--input", str(corpus.raw), "--out", str(store), "--no-progress", *extra]
        )
        if code != 0:
            raise SystemExit(f"taemi extract failed ({code}):\n{out.getvalue()}")
        sets = [
            "model.hidden=64",
            "model.sa_ffn=128",
            "model.head_hidden=64",
            "train.max_epochs=1",
            "train.device=cpu",
            "train.batch_size=4",
        ]
        code = taemi_main(
            [
                "train",
                "--store",
                str(store),
                "--train",
                str(corpus.train_csv),
                "--valid",
                str(corpus.valid_csv),
                "--out",
                str(run),
                "--train-on-all",
                "--epochs",
                "1",
                "--no-progress",
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        if code != 0:
            raise SystemExit(f"taemi train failed ({code}):\n{out.getvalue()}")
    return run


def make_videos(work: Path, n: int, seconds: float) -> list[Path]:
    from taemi.synth.media import MediaSynthConfig, make_media_corpus

    cfg = MediaSynthConfig(
        clips=n,
        seconds=(seconds, seconds),
        size=160,
        fps=30,
        missing_video_rate=0.0,
        missing_audio_rate=0.0,
        silent_rate=0.0,
        valid_fraction=0.0,
        seed=7,
    )
    corpus = make_media_corpus(work / "videos", cfg, progress=False)
    return sorted(corpus.raw.glob("*.mp4"))


def face_alone(
    video: Path, max_frames: int, vision_fps: float | None = None
) -> tuple[float, int, int, float]:
    """(seconds of crop_frame over every kept decoded frame, frames, crops, decode seconds)."""
    from taemi.extract.face import FaceCropper
    from taemi.extract.media import decode_video

    t0 = time.perf_counter()
    v = decode_video(video, max_frames=max_frames, policy="first", vision_fps=vision_fps)
    decode_s = time.perf_counter() - t0
    cropper = FaceCropper()
    t0 = time.perf_counter()
    crops = [c for c in map(cropper.crop_frame, v.frames) if c is not None]
    return time.perf_counter() - t0, len(v.frames), len(crops), decode_s


def crema_d_media() -> Path:
    root = os.environ.get("TAEMI_CREMA_D")
    base = (
        Path(root) if root else Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample"
    )
    return base / "media"


def fidelity(vision_fps: float, media: Path | None) -> None:
    """4. of the module docstring: exact-path frame features vs their stand-ins at vision_fps."""
    import numpy as np

    from taemi import predict_media as pm
    from taemi.extract.abaw import MEDIA_EXTENSIONS
    from taemi.extract.media import decode_video, rate_representatives

    media = media or crema_d_media()
    if not media.is_dir():
        print(f"fidelity: skipped, no media folder at {media} (--fidelity-media, TAEMI_CREMA_D)")
        return
    enc = pm.load_encoders_once("offline", face=True, device="cpu")  # the predictions' models
    t0 = time.perf_counter()
    sims, lost, gained, videos, frames = [], 0, 0, 0, 0
    for path in sorted(p for p in media.iterdir() if p.suffix.lower() in MEDIA_EXTENSIONS):
        video = decode_video(path, max_frames=400, policy="first")  # every frame, no crop yet
        if video is None:
            continue
        videos += 1
        frames += len(video)
        crops = [enc.face.crop_frame(f) for f in video.frames]  # the exact path's crops
        have = np.array([c is not None for c in crops])  # (n,)
        if not have.any():
            continue
        feats = np.zeros((len(crops), enc.image.dim), dtype=np.float32)  # (n, D) fp32
        faces = [c for c in crops if c is not None]
        feats[have] = np.concatenate(  # in chunks of 64, as extraction does
            [enc.image.encode(faces[i : i + 64]) for i in range(0, len(faces), 64)]
        )
        rep = rate_representatives(video.timestamps, vision_fps)  # (n,) each frame's stand-in
        both = have & have[rep]
        lost += int((have & ~have[rep]).sum())  # a face, but its stand-in has none
        gained += int((~have & have[rep]).sum())  # no face, its stand-in has one
        a, b = feats[both], feats[rep[both]]  # (m, D) each
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # (m,)
        sims.append(cos)
    if not sims:
        print(f"fidelity: no face found in any video of {media}")
        return
    cos = np.concatenate(sims)
    print(
        f"fidelity at vision_fps {vision_fps:g} on {media} ({videos} videos, {frames} frames, "
        f"{cos.size} frames with a face on both paths; {time.perf_counter() - t0:.0f} s): per-frame "
        f"cosine similarity, exact fp32 feature vs its stand-in: mean {cos.mean():.4f}, "
        f"min {cos.min():.4f}, 5th percentile {np.percentile(cos, 5):.4f}; "
        f"{lost} frames lose their face (stand-in without one), {gained} gain one"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--videos", type=int, default=3, help="different videos predicted one after the other"
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    ap.add_argument("--workdir", type=Path, help="keep the run and media here (reused)")
    ap.add_argument("--no-cli", action="store_true", help="skip the fresh-process CLI timing")
    ap.add_argument(
        "--cli-repeats",
        type=int,
        default=1,
        metavar="N",
        help="fresh CLI processes per video, taken in turns over the videos (median and range printed)",
    )
    ap.add_argument(
        "--vision-fps",
        type=float,
        metavar="N",
        help="extract the run's features (and so every prediction) at most N vision features per "
        "second (taemi extract --vision-fps); then also measure fidelity (4.)",
    )
    ap.add_argument(
        "--image-precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="the image encoder's precision for the run's features (taemi extract --image-precision)",
    )
    ap.add_argument(
        "--detect-every",
        type=int,
        default=1,
        metavar="K",
        help="face detection on every K-th frame for the run's features (taemi extract --detect-every)",
    )
    ap.add_argument(
        "--share-whisper",
        action="store_true",
        help="transcripts from the audio features' Whisper pass for the run's features "
        "(taemi extract --share-whisper)",
    )
    ap.add_argument(
        "--whisper-window",
        type=float,
        default=30.0,
        metavar="S",
        help="the Whisper audio window for the run's features (taemi extract --whisper-window)",
    )
    ap.add_argument(
        "--fidelity-media",
        type=Path,
        help="real face videos for the fidelity check (default: the CREMA-D sample's media)",
    )
    args = ap.parse_args()
    quiet()
    with work_folder(args.workdir, "taemi-predict-latency-") as work:
        t0 = time.perf_counter()
        run = make_run(
            work,
            args.vision_fps,
            args.image_precision,
            args.detect_every,
            args.share_whisper,
            args.whisper_window,
        )
        videos = make_videos(work, args.videos, args.seconds)
        print(
            f"setup (media, features, tiny run) {time.perf_counter() - t0:.0f} s; {len(videos)} videos of "
            f"{args.seconds:g} s, 160x160 at 30 fps; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        # the models of setup are cached in this process: forget them, so call 1 loads as a fresh process would
        from taemi import predict_media as pm

        pm._ENCODERS.clear()
        pm._RUNS.clear()
        from taemi.extract import pipeline as extract_pipeline
        from taemi.store import FeatureStore

        encoded = [0]  # crops through the image encoder in a call (fewer than rows at --vision-fps)
        real_encode_images = extract_pipeline._encode_images

        def counting_encode_images(encoder, images, chunk):
            encoded[0] += len(images)
            return real_encode_images(encoder, images, chunk)

        extract_pipeline._encode_images = counting_encode_images
        rows = []
        for k, video in enumerate(
            [*videos, videos[0]]
        ):  # the first video again last: same work, models warm
            feats = work / f"features_call{k + 1}"
            shutil.rmtree(feats, ignore_errors=True)
            encoded[0] = 0
            res = pm.predict_media(run, [video], device="cpu", features_dir=feats)
            if res.failures or len(res.clips) != 1:
                raise SystemExit(f"prediction of {video} failed: {res.failures}")
            crops = int(FeatureStore(feats).lengths["vision"][0])
            rows.append(
                (k + 1, video.name, res.media_seconds, dict(res.timings), crops, encoded[0])
            )
        face_s, frames, crops, dec_s = face_alone(
            videos[-1], res.options["max_frames"], args.vision_fps
        )
        cli: dict[str, list[float]] = {}  # video name -> wall seconds of fresh processes
        turns = [] if args.no_cli else [v for _ in range(max(1, args.cli_repeats)) for v in videos]
        for video in turns:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "taemi",
                    "predict",
                    "--run",
                    str(run),
                    str(video),
                    "--no-progress",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            cli.setdefault(video.name, []).append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise SystemExit(f"taemi predict failed ({proc.returncode}):\n{proc.stderr}")

    print(
        "\nper call of predict_media in one process (seconds; stages summed over threads, they overlap)"
    )
    print(
        f"{'call':<5} {'video':<10} {'media s':>7} {'rows':>5} {'crops':>5} "
        + " ".join(f"{s:>7}" for s in STAGES)
        + f" {'RTF':>6}"
    )
    for k, name, media, t, n_rows, n_crops in rows:
        vals = " ".join(f"{t.get(s, float('nan')):>7.2f}" for s in STAGES)
        print(
            f"{k:<5} {name:<10} {media:>7.1f} {n_rows:>5} {n_crops:>5} {vals} {media / t['total']:>6.2f}"
        )
    first, again = rows[0][3], rows[-1][3]
    print(
        f"{rows[0][1]}: first call {first['total']:.2f} s (models loaded in it: {first['load']:.2f} s), the same "
        f"video again last {again['total']:.2f} s (load {again['load']:.3f} s): first / again "
        f"{first['total'] / again['total']:.2f}x; vision (DINOv2) per crop "
        f"{sum(r[3]['vision'] for r in rows) / max(1, sum(r[5] for r in rows)) * 1e3:.0f} ms"
    )
    warm = "; ".join(
        f"{name} {t['total']:.2f} s ({n_rows} rows, {n_crops} crops encoded)"
        for _, name, _, t, n_rows, n_crops in rows[1:]
    )
    print(
        f"vision_fps {args.vision_fps if args.vision_fps is not None else 'None (every frame)'}, "
        f"image encoder {args.image_precision}, face detection every {args.detect_every} frame(s), "
        f"share_whisper {args.share_whisper}, whisper window {args.whisper_window:g} s, "
        f"warm calls (models loaded): {warm}; load average now {os.getloadavg()[0]:.2f}"
    )
    print(
        f"face cropping alone (last video, 1 thread): {face_s:.2f} s for {frames} frames "
        f"({face_s / max(frames, 1) * 1e3:.1f} ms/frame), {crops} crops; video decode alone {dec_s:.2f} s"
    )
    for name, walls in cli.items():
        wall = statistics.median(walls)
        spread = (
            ""
            if len(walls) == 1
            else f" (median of {len(walls)}: {', '.join(f'{w:.2f}' for w in walls)})"
        )
        print(
            f"CLI, fresh process (`python -m taemi predict --run RUN {name}`): {wall:.2f} s wall"
            f"{spread}, real-time factor {args.seconds / wall:.2f}"
        )
    if args.vision_fps is not None:
        fidelity(args.vision_fps, args.fidelity_media)


if __name__ == "__main__":
    main()
