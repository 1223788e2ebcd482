"""``taemi predict``: predictions of a run from a feature store (an ABAW submission CSV)
or from media files (their features extracted as the run's were, :mod:`taemi.predict_media`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from taemi.cli.common import (
    add_run_options,
    key_value,
    output_file,
    print_line,
    write_output,
)


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "predict", help="predictions from a feature store (ABAW submission CSV) or from media files"
    )
    add_run_options(sp)
    sp.add_argument(
        "inputs",
        nargs="*",
        metavar="MEDIA",
        help="video/audio files or folders: extract their features as the run's were, then predict",
    )
    sp.add_argument("--store", help="feature store to predict from (instead of MEDIA)")
    sp.add_argument(
        "--ids",
        help="with --store: CSV whose id column lists the clips (default: every clip in the store)",
    )
    sp.add_argument(
        "--out",
        help="predictions CSV (ABAW format); with MEDIA also a JSON next to it (same name, .json)",
    )
    sp.add_argument(
        "--clip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip predictions to [0, 1] as a submission needs (default); --no-clip writes raw values",
    )
    sp.add_argument(
        "--features",
        metavar="DIR",
        help="MEDIA: keep the extracted features in this store (default: a temporary one)",
    )
    sp.add_argument(
        "--profile",
        choices=("offline", "paper"),
        help="MEDIA: extraction profile; needed when the run has no features.json (e.g. imported weights)",
    )
    sp.add_argument(
        "--model",
        action="append",
        metavar="ROLE=ID_OR_DIR",
        help="MEDIA: the model of a role (asr, audio, vision, text) when it is not the profile's",
    )
    sp.add_argument(
        "--batch-size", type=int, default=8, help="MEDIA: clips per extraction model batch"
    )
    sp.add_argument("--workers", type=int, default=2, help="MEDIA: decoding threads")
    sp.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="MEDIA, paper profile: allow GTE's model code",
    )
    sp.add_argument(
        "--allow-download",
        action="store_true",
        help="MEDIA, paper profile: let Hugging Face download",
    )
    common(sp)
    sp.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.inputs:
        if args.store or args.ids:
            raise ValueError("predict takes media files (positional) or --store [--ids], not both")
        if args.out:
            output_file(args.out)  # before the extraction, not after it
        return _predict_media(args)
    if not args.store:
        raise ValueError(
            "predict needs --store STORE (features) or media files/folders to extract features from"
        )
    if not args.out:
        raise ValueError("predict --store needs --out (the submission CSV)")
    for flag, given in (
        ("--features", args.features),
        ("--profile", args.profile),
        ("--model", args.model),
    ):
        if given:
            raise ValueError(f"{flag} is for predicting from media files, not from --store")
    from taemi.data.labels import read_ids
    from taemi.eval.submission import write_submission
    from taemi.inference import Predictor
    from taemi.runtime import resolve_device, resolve_precision
    from taemi.store import FeatureStore

    out = output_file(args.out)
    predictor = Predictor.from_run(args.run, args.which)
    cfg = predictor.cfg
    store = FeatureStore(args.store)
    predictor.check_store(store)
    ids = read_ids(args.ids, cfg.data.id_column) if args.ids else list(store.ids)
    ds = predictor.dataset(store, ids=ids)
    device = resolve_device(args.device)
    pred = predictor.on(device, resolve_precision(args.precision, device)).predict(
        ds, progress=not args.no_progress, check=f"predict {args.run} on {args.store}"
    )
    write_output(out, lambda p: write_submission(p, ids, cfg.data.emotions, pred, clip=args.clip))
    print_line(f"wrote {len(ids)} predictions ({_clip_words(args.clip)}) to {args.out}")
    return 0


def _predict_media(args: argparse.Namespace) -> int:
    from taemi.predict_media import format_table, predict_media

    models = dict(key_value(m, "--model") for m in (args.model or []))
    res = predict_media(
        args.run,
        args.inputs,
        which=args.which,
        features_dir=args.features,
        profile=args.profile,
        models=models,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        clip=args.clip,
        trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download,
        progress=not args.no_progress,
    )
    print_line(format_table(res))
    if args.out:
        out = Path(args.out)
        res.write(out)
        print_line(
            f"wrote {len(res.clips)} predictions ({_clip_words(args.clip)}) to {out} and {out.with_suffix('.json')}"
        )
    else:
        print_line(
            f"predictions {_clip_words(args.clip)}; --out FILE.csv also writes them (and FILE.json)"
        )
    return 1 if res.failures else 0


def _clip_words(clip: bool) -> str:
    return "clipped to [0, 1]" if clip else "raw, not clipped (--no-clip)"
