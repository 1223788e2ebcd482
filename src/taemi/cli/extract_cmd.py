"""``taemi extract``: media files (or an ABAW root) -> a feature store (see
:mod:`taemi.extract.pipeline`); the distributed options are in :mod:`taemi.cli.distributed_cmd`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from taemi.cli import distributed_cmd
from taemi.cli.common import key_value, print_line

log = logging.getLogger("taemi")


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser("extract", help="extract features from media files into a feature store")
    sp.add_argument(
        "--input", required=True, nargs="+", help="media folder(s), list file(s) or media files"
    )
    sp.add_argument("--out", required=True, help="feature store folder (created or extended)")
    sp.add_argument("--profile", default="offline", choices=("offline", "paper"))
    sp.add_argument(
        "--model",
        action="append",
        metavar="ROLE=ID_OR_DIR",
        help="replace a profile model: asr, audio, vision or text (repeatable)",
    )
    sp.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the encoders run; auto (default): the GPU when every model of the profile "
        "can use it (torch, CTranslate2, and for the offline profile onnxruntime's CUDA "
        "provider), else the CPU with the reason logged",
    )
    sp.add_argument(
        "--encoder-precision",
        default="fp32",
        choices=("fp32", "fp16"),
        help="GPU only: fp16 runs the paper profile's wav2vec2, ViT and GTE in float16 and "
        "Whisper (both profiles) in CTranslate2 float16 (recorded in the store's settings)",
    )
    sp.add_argument("--batch-size", type=int, default=8, help="clips per model batch")
    sp.add_argument("--workers", type=int, default=2, help="decoding threads")
    sp.add_argument("--max-audio-seconds", type=float, default=12.0)
    sp.add_argument("--max-frames", type=int, default=400)
    sp.add_argument("--frame-policy", default="first", choices=("first", "uniform"))
    sp.add_argument(
        "--vision-fps",
        type=float,
        default=None,
        metavar="N",
        help="at most N vision features per second of video, each repeated over the frames it "
        "stands for (default: every frame)",
    )
    sp.add_argument(
        "--share-whisper",
        action="store_true",
        help="offline profile: decode the transcript from the audio features' Whisper encoder "
        "pass (one pass per clip instead of two; audio features unchanged, some transcripts "
        "differ by punctuation or a word)",
    )
    sp.add_argument(
        "--whisper-window",
        type=float,
        default=30.0,
        metavar="S",
        help="offline profile: pad each clip to the next multiple of S seconds for the Whisper "
        "encoder's audio features instead of Whisper's 30 s window (faster for short clips; "
        "the features differ a little; default 30: exact)",
    )
    sp.add_argument("--no-face", action="store_true", help="use whole frames (no face detection)")
    sp.add_argument(
        "--image-precision",
        default="fp32",
        choices=("fp32", "int8"),
        help="offline profile: run DINOv2 in fp32 (exact, default) or int8 (dynamic "
        "quantisation, faster on CPU; recorded in the store's vision settings)",
    )
    sp.add_argument(
        "--detect-every",
        type=int,
        default=1,
        metavar="K",
        help="run the face detector on every K-th frame, boxes interpolated between "
        "(default 1: every frame)",
    )
    sp.add_argument(
        "--split", default="all", help="ABAW root: train | valid | test | all (default)"
    )
    sp.add_argument(
        "--no-face-images",
        action="store_true",
        help="ABAW root: decode video frames, not face_images/",
    )
    sp.add_argument(
        "--no-audio-files",
        action="store_true",
        help="ABAW root: use the video's audio, not audio/*.mp3",
    )
    sp.add_argument("--text-tokens", action="store_true", help="also store text token states")
    sp.add_argument("--force", action="store_true", help="recompute clips already in the store")
    sp.add_argument(
        "--commit-clips",
        type=int,
        default=32,
        help="commit finished clips to the store every N clips (a killed run keeps them)",
    )
    sp.add_argument(
        "--commit-seconds",
        type=float,
        default=10.0,
        help="... or every S seconds, whichever comes first",
    )
    sp.add_argument(
        "--waveforms",
        action="store_true",
        help="also cache the decoded 16 kHz audio (STORE/waveforms/) for end-to-end fine-tuning; "
        "clips already in the store only get their audio decoded and cached",
    )
    sp.add_argument(
        "--trust-remote-code", action="store_true", help="paper profile: allow GTE's model code"
    )
    sp.add_argument(
        "--allow-download",
        action="store_true",
        help="paper profile: let Hugging Face download models",
    )
    distributed_cmd.add_extract_options(sp)
    common(sp)
    sp.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from taemi.extract.abaw import is_abaw_root, open_abaw
    from taemi.extract.pipeline import (
        ExtractOptions,
        extract,
        find_sources,
        summary_counts,
    )
    from taemi.extract.profiles import load_encoders
    from taemi.store import check_writable

    # options and the output store are checked before any model loads or anything is written
    opts = ExtractOptions(
        max_audio_seconds=args.max_audio_seconds,
        max_frames=args.max_frames,
        frame_policy=args.frame_policy,
        vision_fps=args.vision_fps,
        share_whisper=args.share_whisper,
        batch_size=args.batch_size,
        workers=args.workers,
        text_tokens=args.text_tokens,
        force=args.force,
        waveforms=args.waveforms,
        commit_clips=args.commit_clips,
        commit_seconds=args.commit_seconds,
    )
    check_writable(args.out)
    models = dict(key_value(m, "--model") for m in (args.model or []))
    if args.share_whisper and (args.profile != "offline" or {"asr", "audio"} & set(models)):
        raise ValueError(
            "--share-whisper needs one Whisper model that transcribes and encodes the audio: "
            f"the offline profile's (here --profile {args.profile}"
            f"{', --model ' + '/'.join(sorted({'asr', 'audio'} & set(models))) if {'asr', 'audio'} & set(models) else ''})"
        )
    sources, input_errors = [], []
    plain = [i for i in args.input if not is_abaw_root(i)]
    for root in (i for i in args.input if is_abaw_root(i)):
        layout = open_abaw(root)
        s, e = layout.sources(
            None if args.split == "all" else args.split,
            use_face_images=not args.no_face_images,
            use_audio_files=not args.no_audio_files,
        )
        log.info("%s: ABAW layout, %s: %d clips", root, args.split, len(s))
        sources, input_errors = sources + s, input_errors + e
    if plain:
        s, e = find_sources(plain)
        sources, input_errors = sources + s, input_errors + e
    if not sources and not input_errors:
        raise FileNotFoundError(f"no media files found in {', '.join(map(str, args.input))}")
    if args.distributed is not None or args.shard is not None:  # docs/distributed_extraction.md
        if args.distributed is not None:
            return distributed_cmd.run_distributed(args, sources, input_errors)
        sources, input_errors = distributed_cmd.this_shard(args, sources, input_errors)
    if args.encoders:
        from taemi.extract.factory import encoders_from_factory

        if models:
            raise ValueError(
                "--model and --encoders exclude each other (the factory builds every model)"
            )
        if args.image_precision != "fp32":
            raise ValueError(
                "--image-precision and --encoders exclude each other (the factory builds every model)"
            )
        if args.whisper_window != 30.0:
            raise ValueError(
                "--whisper-window and --encoders exclude each other (the factory builds every model)"
            )
        if args.encoder_precision != "fp32":
            raise ValueError(
                "--encoder-precision and --encoders exclude each other (the factory builds every model)"
            )
        if args.detect_every != 1:
            raise ValueError(
                "--detect-every and --encoders exclude each other (the factory builds the face cropper)"
            )
        enc = encoders_from_factory(args.encoders)
    else:
        enc = load_encoders(
            args.profile,
            device=args.device,
            batch_size=args.batch_size,
            models=models,
            face=not args.no_face,
            face_detect_every=args.detect_every,
            image_precision=args.image_precision,
            encoder_precision=args.encoder_precision,
            whisper_window=args.whisper_window,
            trust_remote_code=args.trust_remote_code,
            allow_download=args.allow_download,
        )
    from taemi.signals import Terminated

    try:  # main() runs every command under sigterm_raises: finished clips committed, summary written
        summary = extract(
            sources, args.out, enc, opts, input_errors=input_errors, progress=not args.no_progress
        )
    except Terminated:
        sys.stderr.write(
            f"taemi: terminated (SIGTERM): the finished clips are committed in {args.out}; "
            "run the same command again to extract the rest\n"
        )
        return 143
    print_line(f"{args.out}: {summary_counts(summary)}")
    if summary.errors_file:
        print_line(f"failures and their reasons: {summary.errors_file}")
    return 0 if summary.ok else 1
