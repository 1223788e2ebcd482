"""``taemi train``: train a model on a feature store (see :mod:`taemi.train.trainer`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from taemi.cli.common import add_config_options, metrics_table, print_line

log = logging.getLogger("taemi")


def register(
    sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add the command to ``sub``; ``common`` adds the shared options."""
    sp = sub.add_parser("train", help="train a model on a feature store")
    sp.add_argument("--store", required=True)
    sp.add_argument("--train", required=True, help="training label CSV")
    sp.add_argument(
        "--valid",
        help="validation label CSV (model selection, early stopping); with --train-on-all "
        "its clips are trained on too",
    )
    sp.add_argument("--out", required=True, help="run folder")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    sp.add_argument(
        "--train-on-all",
        action="store_true",
        help="final model: train on --train + --valid for a fixed number of epochs, no validation, "
        "no early stopping (best = last)",
    )
    sp.add_argument(
        "--mode",
        choices=("frozen", "finetune"),
        help="frozen (default): train the fusion model on stored features; finetune: also train the "
        "audio and text backbones end to end on raw audio (the store's waveform cache, "
        "`taemi extract --waveforms`) and transcripts, vision from the store; backbones and "
        "their controls: --set finetune.audio_backbone=offline|paper|ID|DIR, "
        "finetune.text_backbone=..., finetune.backbone_lr=..., finetune.freeze_audio_layers=N, "
        "finetune.gradient_checkpointing=true, finetune.augment.noise_prob=0.5, "
        "train.grad_accum_steps=N (see `taemi presets` and the README)",
    )
    sp.add_argument("--epochs", type=int, help="with --train-on-all: train exactly N epochs")
    sp.add_argument(
        "--epochs-from",
        metavar="RUN",
        help="with --train-on-all: as many epochs as RUN's best epoch (its metrics.json); "
        "RUN's config too, unless --preset/--config/--set are given",
    )
    add_config_options(sp, None)
    common(sp)
    sp.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from taemi.config import load_config
    from taemi.data.labels import concat_labels, read_labels
    from taemi.run import CONFIG_FILE
    from taemi.store import FeatureStore
    from taemi.train.trainer import train

    fixed_epochs = None
    if args.train_on_all:
        if (args.epochs is None) == (args.epochs_from is None):
            raise ValueError(
                "--train-on-all needs the number of epochs: --epochs N or --epochs-from RUN (one of them)"
            )
        fixed_epochs = args.epochs if args.epochs is not None else _epochs_from(args.epochs_from)
    else:
        if args.epochs is not None or args.epochs_from is not None:
            raise ValueError(
                "--epochs and --epochs-from go with --train-on-all (validated runs stop early on --valid)"
            )
        if args.valid is None:
            raise ValueError(
                "--valid is required (model selection and early stopping), unless --train-on-all"
            )
    if (
        "OMP_NUM_THREADS" not in os.environ
    ):  # one intra-op thread per core this process may use (torchrun sets 1)
        from taemi.runtime import configure_threads

        configure_threads()
    store = FeatureStore(args.store)
    own = not args.set and args.config is None and args.preset is None
    if args.resume and own:
        cfg = load_config(Path(args.out) / CONFIG_FILE)  # resume with the run's own config
    elif args.epochs_from and own:
        cfg = load_config(Path(args.epochs_from) / CONFIG_FILE)  # the validated run's recipe
        log.info(
            "train on all: the config of %s (give --preset/--set/--config to change it)",
            args.epochs_from,
        )
    else:
        args.preset = args.preset or "paper"
        if args.mode is not None:
            args.set = [f"mode={args.mode}", *(args.set or [])]
        cfg = _load_config(args, dims_from=store)
    if args.mode is not None and cfg.mode != args.mode:
        raise ValueError(
            f"--mode {args.mode}, but the run's own config ({args.out if args.resume else args.epochs_from}) "
            f"has mode={cfg.mode}"
        )
    kw = dict(emotions=cfg.data.emotions, id_column=cfg.data.id_column, store_ids=store)
    train_labels = read_labels(args.train, **kw)
    valid_labels = read_labels(args.valid, **kw) if args.valid else None
    if args.train_on_all:
        if valid_labels is not None:
            train_labels = concat_labels(train_labels, valid_labels)
        valid_labels = None
    try:
        res = train(
            cfg,
            store,
            train_labels,
            valid_labels,
            args.out,
            fixed_epochs=fixed_epochs,
            resume=args.resume,
            progress=not args.no_progress,
        )
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    if res.best is None:
        origin = f"the best epoch of {args.epochs_from}" if args.epochs_from else "--epochs"
        print_line(
            f"trained on all {len(train_labels)} clips ({train_labels.source}) for {fixed_epochs} "
            f"epoch{'' if fixed_epochs == 1 else 's'} "
            f"({origin}); no validation: the final weights are best = last"
        )
    else:
        print_line(
            metrics_table(
                res.best.to_dict(), f"best epoch {res.best_epoch} of {len(res.history)} (valid):"
            )
        )
    print_line(f"run folder: {res.run_dir}")
    return 0


def _load_config(args: argparse.Namespace, dims_from=None):
    """Preset + --config + --set. With ``dims_from`` (a feature store), the model's input
    sizes follow the store unless the user set them (:func:`taemi.train.modes.config_for_store`)."""
    from taemi.config import build_config, parse_overrides

    user = parse_overrides(args.set or [])
    if dims_from is not None:
        from taemi.train.modes import config_for_store

        return config_for_store(args.preset, user, dims_from, args.config)
    return build_config(args.preset, user, args.config)


def _epochs_from(run: str) -> int:
    """The best epoch a finished validated run chose (its metrics.json)."""
    from taemi.run import METRICS_FILE, read_metrics

    path = Path(run) / METRICS_FILE
    m = read_metrics(run)
    if m is None:
        raise FileNotFoundError(
            f"--epochs-from {run}: {path} does not exist (not a trained run folder?)"
        )
    epoch = m.get("best_epoch")
    if not isinstance(epoch, int) or epoch < 1:
        raise ValueError(
            f"--epochs-from {run}: {path} has best_epoch={epoch!r}, not a positive epoch number"
        )
    if not m.get("finished"):
        log.warning(
            "--epochs-from %s: that run has not finished; using its best epoch so far (%d)",
            run,
            epoch,
        )
    return epoch


def _leave_process_group() -> None:
    """Under torchrun, the trainer joined a process group: leave it before the process exits."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
