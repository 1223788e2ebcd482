"""``taemi import-release``: the authors' released checkpoint -> a run folder (the fusion
weights alone, or with ``--model`` the fine-tuned backbones too; :mod:`taemi.release`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from taemi.cli.common import key_value, print_line


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub`` (it takes none of the shared options ``common`` adds)."""
    sp = sub.add_parser(
        "import-release",
        help="convert the authors' released checkpoint into a run folder (fusion only, or "
        "with --model the fine-tuned backbones too)",
    )
    sp.add_argument("checkpoint")
    sp.add_argument("--out", required=True, help="run folder to write")
    sp.add_argument("--emotions", help="comma-separated output names (default: the EMI six)")
    sp.add_argument(
        "--model",
        action="append",
        nargs="+",
        metavar="ROLE=DIR",
        help="import the fine-tuned backbones too, as a fine-tuning run: audio=DIR text=DIR, "
        "the folders (or hub ids) whose architectures they have (the paper profile's "
        "wav2vec2 emotion model and GTE); their own weights are replaced by the checkpoint's",
    )
    sp.add_argument(
        "--features",
        metavar="STORE",
        help="with --model: a feature store extracted as the release's vision features were "
        "(taemi extract --profile paper); its record becomes RUN/features.json so that "
        "taemi predict --run RUN MEDIA needs no --profile",
    )
    sp.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="with --model: allow the model code shipped with the text model (GTE needs it)",
    )
    sp.add_argument(
        "--allow-download",
        action="store_true",
        help="with --model: let Hugging Face download the model folders given as hub ids",
    )
    sp.set_defaults(func=cmd_import_release)


def cmd_import_release(args: argparse.Namespace) -> int:
    from taemi.release import import_release

    emotions = tuple(e.strip() for e in args.emotions.split(",")) if args.emotions else None
    kw: dict = {"emotions": emotions} if emotions else {}
    given = [item for group in (args.model or []) for item in group]
    models: dict[str, str] = {}
    for item in given:
        role, value = key_value(item, "--model")
        if role in models:
            raise ValueError(f"--model {role}= is given twice ({models[role]!r}, {value!r})")
        models[role] = value
    if not given and (args.features or args.trust_remote_code or args.allow_download):
        raise ValueError(
            "--features, --trust-remote-code and --allow-download apply to importing the "
            "backbones: add --model audio=DIR text=DIR"
        )
    out = import_release(
        args.checkpoint,
        args.out,
        models=models or None,
        features=args.features,
        trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download,
        **kw,
    )
    if models:
        print_line(
            f"imported {args.checkpoint} into run folder {out} (preset 'official', mode "
            "finetune: backbones and fusion); use it with evaluate/predict on a store with "
            "waveforms and transcripts (taemi extract --waveforms)"
            + ("" if args.features else ", or predict from media with --profile paper")
        )
    else:
        print_line(
            f"imported {args.checkpoint} into run folder {out} (preset 'official'); use it with evaluate/predict"
        )
    return 0
