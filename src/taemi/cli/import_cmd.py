"""``taemi import``: the organisers' pre-extracted features -> a feature store.

A thin entry point over :func:`taemi.extract.organiser.import_organiser_features`; the text
encoder (which turns each transcript into the text vector) is loaded here:

- ``offline`` (default): all-MiniLM-L6-v2, 384-d (the packaged model, or ``--model text=DIR``);
- ``paper``: ``Alibaba-NLP/gte-en-mlm-base``, 768-d (needs ``--trust-remote-code``; a hub
  id or ``--model text=DIR``; downloads only with ``--allow-download``);
- ``none``: no text (missing for every clip).

A new store's audio and vision feature sizes are those most of the files agree on (see
:mod:`taemi.extract.organiser`), or ``--dims audio=1024,vision=768``. Exit status: 0 when every
clip was imported (absent files leave a modality missing, which is not an error), 1 when a
file was rejected or a clip failed (each is in ``STORE/extract_errors.jsonl``; fix the file
and run again: failed clips are retried), 2 on an error that stops the import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

TEXT_PROFILES = ("offline", "paper", "none")


def _folder_arg(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _text_model(items: list[str] | None) -> str | None:
    """The ``--model text=DIR`` value (the only role this command loads)."""
    model = None
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--model {item!r} is not of the form text=ID_OR_DIR")
        role, value = (s.strip() for s in item.split("=", 1))
        if role != "text":
            raise ValueError(
                f"--model {item!r}: taemi import loads only a text model (text=ID_OR_DIR)"
            )
        model = value
    return model


def _dims(items: list[str] | None) -> dict[str, int]:
    """``--dims audio=1024,vision=768`` (repeatable) as ``{"audio": 1024, "vision": 768}``."""
    dims: dict[str, int] = {}
    for item in items or []:
        for part in item.split(","):
            m, sep, value = (s.strip() for s in part.partition("="))
            if not sep or not value.isascii() or not value.isdigit() or int(value) < 1:
                raise ValueError(
                    f"--dims {item!r} is not of the form audio=D,vision=D (D a positive int)"
                )
            if m in dims and dims[m] != int(value):
                raise ValueError(f"--dims gives {m} twice: {dims[m]} and {value}")
            dims[m] = int(value)
    return dims


def load_text_encoder(
    profile: str,
    model: str | None = None,
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_download: bool = False,
):
    """The text encoder of ``profile`` (see the module docstring); None for ``none``."""
    if profile == "none":
        if model is not None:
            raise ValueError("--model text=... was given with --text-profile none")
        return None
    if profile == "offline":
        from taemi.backbones.minilm import MiniLMTextEncoder

        return MiniLMTextEncoder(model, device=device)
    if profile == "paper":
        from taemi.backbones.profiles import PAPER_MODELS
        from taemi.backbones.text import GTETextEncoder

        return GTETextEncoder(
            model or PAPER_MODELS["text"].model,
            trust_remote_code=trust_remote_code,
            device=device,
            allow_download=allow_download,
        )
    raise ValueError(f"unknown text profile {profile!r}; expected one of {TEXT_PROFILES}")


def cmd_import(args: argparse.Namespace) -> int:
    from taemi.data.labels import read_ids
    from taemi.extract.organiser import import_organiser_features, summary_line

    model = _text_model(args.model)
    dims = _dims(args.dims)
    ids = read_ids(args.ids, what="split file", allow_empty=False) if args.ids else None
    encoder = load_text_encoder(
        args.text_profile,
        model,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download,
    )
    summary = import_organiser_features(
        args.root,
        args.out,
        text_encoder=encoder,
        audio_dir=args.audio_dir,
        vision_dir=args.vision_dir,
        text_dir=args.text_dir,
        ids=ids,
        dims=dims,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    sys.stdout.write(f"{args.out}: {summary_line(summary)}\n")
    sys.stdout.write(f"report: {summary.report_file}\n")
    if not summary.ok:
        sys.stdout.write(
            f"rejected files and failed clips: {summary.errors_file} "
            "(fix them and run again: failed clips are retried)\n"
        )
    return 0 if summary.ok else 1


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the ``import`` subcommand to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser(
        "import", help="import the organisers' pre-extracted features into a feature store"
    )
    sp.add_argument("--root", required=True, help="folder holding wav2vec2/, vit/ and text/")
    sp.add_argument(
        "--out", required=True, help="feature store folder (created, or extended: resumable)"
    )
    sp.add_argument(
        "--text-profile",
        default="offline",
        choices=TEXT_PROFILES,
        help="transcript encoder: offline (MiniLM, 384), paper (GTE, 768) or none",
    )
    sp.add_argument(
        "--model", action="append", metavar="text=ID_OR_DIR", help="replace the text model"
    )
    sp.add_argument(
        "--trust-remote-code", action="store_true", help="paper profile: allow GTE's model code"
    )
    sp.add_argument(
        "--allow-download", action="store_true", help="paper profile: let Hugging Face download it"
    )
    sp.add_argument("--device", default="cpu", help="text encoder device")
    sp.add_argument(
        "--ids", help="CSV whose Filename column lists the clips (default: every clip found)"
    )
    sp.add_argument(
        "--audio-dir",
        type=_folder_arg,
        default="wav2vec2",
        help="audio folder under --root ('none': skip)",
    )
    sp.add_argument(
        "--vision-dir",
        type=_folder_arg,
        default="vit",
        help="vision folder under --root ('none': skip)",
    )
    sp.add_argument(
        "--text-dir",
        type=_folder_arg,
        default="text",
        help="transcript folder under --root ('none': skip)",
    )
    sp.add_argument(
        "--dims",
        action="append",
        metavar="MODALITY=D[,...]",
        help="feature sizes of a new store, e.g. audio=1024,vision=768 (default: the "
        "size most files agree on); a file of another size is rejected",
    )
    sp.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "float32"),
        help="dtype of a new store (default float16)",
    )
    common(sp)
    sp.set_defaults(func=cmd_import)
