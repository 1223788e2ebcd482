"""The ``taemi`` command: the parser root, logging set-up and the error mapping.

Each command is a thin entry point over the library in its own module
(``taemi.cli.<command>_cmd``: its sub-parser, ``register``, and its ``cmd_*`` function);
shared helpers are in :mod:`taemi.cli.common`. Run ``taemi COMMAND --help`` for each
command's options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from taemi.cli import (
    ablate_cmd,
    baselines_cmd,
    check_submission_cmd,
    compare_cmd,
    cv_cmd,
    demo_cmd,
    ensemble_cmd,
    evaluate_cmd,
    extract_cmd,
    import_cmd,
    import_release_cmd,
    predict_cmd,
    presets_cmd,
    report_cmd,
    robustness_cmd,
    serve_cmd,
    store_cmd,
    sweep_cmd,
    synth_cmd,
    train_cmd,
)
from taemi.cli.common import add_progress_option

#: The command modules, in the order ``taemi --help`` lists them.
COMMANDS = (
    synth_cmd,
    extract_cmd,
    train_cmd,
    evaluate_cmd,
    predict_cmd,
    check_submission_cmd,
    store_cmd,
    import_release_cmd,
    demo_cmd,
    import_cmd,
    ablate_cmd,
    cv_cmd,
    sweep_cmd,
    baselines_cmd,
    ensemble_cmd,
    robustness_cmd,
    compare_cmd,
    report_cmd,
    presets_cmd,
    serve_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    from taemi import __version__

    p = argparse.ArgumentParser(
        prog="taemi", description="TAEMI: text-anchored multimodal emotion intensity."
    )
    p.add_argument("--version", action="version", version=f"taemi {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub, add_progress_option)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix (bad input, a damaged file, a diverging
    run): printed as one line with exit status 2. Anything else is a bug and keeps its
    traceback. The training error is only looked up once the trainer was imported (so a
    light command does not import torch to handle its errors)."""
    from taemi.backbones.base import ModelLoadError
    from taemi.config import ConfigError
    from taemi.store import StoreError

    trainer = sys.modules.get("taemi.train.trainer")
    extra = (trainer.TrainingError,) if trainer is not None else ()
    # RunFolderError (a damaged run-folder file) and LabelError are ValueErrors
    return (
        ConfigError,
        StoreError,
        ModelLoadError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        KeyError,
        *extra,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: the other ranks log warnings only
        logging.getLogger().setLevel(logging.WARNING)
    if not args.verbose:  # per-clip chatter of third-party libraries
        for name in ("faster_whisper", "httpx", "transformers"):
            logging.getLogger(name).setLevel(logging.WARNING)
    loads_models = args.command in ("extract", "import", "predict", "demo", "serve", "ensemble")
    # model-loading bars of transformers / HF hub: off with --no-progress, and in a server's log
    if loads_models and (getattr(args, "no_progress", False) or args.command == "serve"):
        # transformers reads this (through huggingface_hub) when it is imported; importing it
        # here only to switch its bars off would cost a fresh `taemi predict` ~1 s (issue 15)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if args.debug:
        return args.func(args)
    from taemi.signals import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM (a scheduler's stop) cleans up like Ctrl-C
            return args.func(args)
    except _expected_errors() as e:  # evaluated only when an exception arrives
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        msg = " ".join(
            str(msg).split()
        )  # one line, whatever the message (e.g. a DataLoader worker's)
        sys.stderr.write(f"taemi: error: {msg}\n")
        return 2
    except Terminated:
        sys.stderr.write("taemi: terminated (SIGTERM)\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("taemi: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
