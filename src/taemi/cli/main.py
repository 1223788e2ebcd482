"""The ``taemi`` command: thin entry points over the library.

Run ``taemi COMMAND --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("taemi")


# --------------------------------------------------------------------------- helpers


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _metrics_table(metrics: dict, title: str) -> str:
    width = max(len(e) for e in metrics["pearson"]) + 2
    lines = [title, f"{'emotion':<{width}}{'Pearson':>9}{'CCC':>9}"]
    for e, r in metrics["pearson"].items():
        lines.append(f"{e:<{width}}{r:>9.4f}{metrics['ccc'][e]:>9.4f}")
    lines.append(f"{'mean':<{width}}{metrics['mean_pearson']:>9.4f}{metrics['mean_ccc']:>9.4f}")
    lines.append(f"MSE {metrics['mse']:.5f} over n={metrics['n']} clips ({'clipped' if metrics['clipped'] else 'raw'} predictions)")
    return "\n".join(lines)


def _output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check an output file path before the work that fills it: not a folder, below a
    folder (created when missing) that can be written; errors name the path."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; give the name of the file to write")
    anc = p.parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{flag} {p}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {p}: the folder {anc} is not writable")
    return p


def _write_output(path: Path, write, flag: str = "--out") -> None:
    """``write(path)``, with a failure to create or write the file (permissions, a full
    disk) reported as the one-line error naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write it: {e.strerror or e}") from None


def _read_ids(path: str, id_column: str) -> list[str]:
    """Clip ids from a CSV's id column (a label file or a plain id list with that header)."""
    import csv

    from taemi.data.clip import check_clip_id

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"id list {p} does not exist")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or id_column not in reader.fieldnames:
            raise ValueError(f"{p}: no {id_column!r} column (columns: {reader.fieldnames})")
        ids = [check_clip_id(row[id_column], source=f"{p} row {i}") for i, row in enumerate(reader, 1)]
    dup = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
    if dup:
        raise ValueError(f"{p}: duplicate ids {sorted(dup)[:5]}")
    return ids


# --------------------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from taemi.config import apply_override, parse_overrides
    from taemi.data.synth import SynthConfig, make_synth

    cfg = SynthConfig(clips=args.clips, seed=args.seed)
    for k, v in parse_overrides(args.set or []):
        apply_override(cfg, k, v)
    res = make_synth(args.out, cfg, progress=not args.no_progress)
    _print(f"wrote {res.n_train} train + {res.n_valid} valid clips to {res.store}")
    _print(f"labels: {res.train_csv}, {res.valid_csv}")
    _print(
        f"oracle ceiling (valid mean Pearson of the generating function): {res.oracle['mean_pearson']:.4f}"
        f" (with missing modalities unknown: {res.oracle['mean_pearson_observable']:.4f})"
    )
    return 0


def _load_config(args: argparse.Namespace, dims_from=None):
    """Preset + --config + --set. With ``dims_from`` (a feature store), the model's input
    sizes follow the store unless the user set them; the choice is logged and lands in
    the run's config.yaml."""
    from taemi.config import build_config, load_yaml, parse_overrides

    user = parse_overrides(args.set or [])
    if dims_from is not None:
        given = {k for k, _ in user}
        if args.config is not None:
            section = load_yaml(args.config).get("model")  # a non-mapping section is refused by build_config
            given |= {f"model.{k}" for k in (section if isinstance(section, dict) else {})}
        auto = [
            (f"model.{m}_dim", d) for m, d in dims_from.dims.items() if f"model.{m}_dim" not in given
        ]
        if auto:
            log.info("model input sizes from the store %s: %s", dims_from.root, ", ".join(f"{k}={v}" for k, v in auto))
        user = auto + user
    return build_config(args.preset, user, args.config)


def _epochs_from(run: str) -> int:
    """The best epoch a finished validated run chose (its metrics.json)."""
    from taemi.model.checkpoint import METRICS_FILE, read_metrics

    path = Path(run) / METRICS_FILE
    m = read_metrics(run)
    if m is None:
        raise FileNotFoundError(f"--epochs-from {run}: {path} does not exist (not a trained run folder?)")
    epoch = m.get("best_epoch")
    if not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"--epochs-from {run}: {path} has best_epoch={epoch!r}, not a positive epoch number")
    if not m.get("finished"):
        log.warning("--epochs-from %s: that run has not finished; using its best epoch so far (%d)", run, epoch)
    return epoch


def _concat_labels(a, b):
    """Labels of two disjoint splits, one after the other (train on all)."""
    import numpy as np

    from taemi.data.labels import Labels

    both = sorted(set(a.ids) & set(b.ids))
    if both:
        raise ValueError(f"{len(both)} ids are in both {a.source} and {b.source}, e.g. {both[:5]}")
    return Labels(a.ids + b.ids, a.emotions, np.concatenate([a.values, b.values]), f"{a.source} + {b.source}")


def cmd_train(args: argparse.Namespace) -> int:
    from taemi.config import load_config
    from taemi.data.labels import read_labels
    from taemi.data.store import FeatureStore
    from taemi.model.checkpoint import CONFIG_FILE
    from taemi.train.trainer import train

    fixed_epochs = None
    if args.train_on_all:
        if (args.epochs is None) == (args.epochs_from is None):
            raise ValueError("--train-on-all needs the number of epochs: --epochs N or --epochs-from RUN (one of them)")
        fixed_epochs = args.epochs if args.epochs is not None else _epochs_from(args.epochs_from)
    else:
        if args.epochs is not None or args.epochs_from is not None:
            raise ValueError("--epochs and --epochs-from go with --train-on-all (validated runs stop early on --valid)")
        if args.valid is None:
            raise ValueError("--valid is required (model selection and early stopping), unless --train-on-all")
    if "OMP_NUM_THREADS" not in os.environ:  # one intra-op thread per core this process may use (torchrun sets 1)
        from taemi.train.runtime import configure_threads

        configure_threads()
    store = FeatureStore(args.store)
    own = not args.set and args.config is None and args.preset is None
    if args.resume and own:
        cfg = load_config(Path(args.out) / CONFIG_FILE)  # resume with the run's own config
    elif args.epochs_from and own:
        cfg = load_config(Path(args.epochs_from) / CONFIG_FILE)  # the validated run's recipe
        log.info("train on all: the config of %s (give --preset/--set/--config to change it)", args.epochs_from)
    else:
        args.preset = args.preset or "paper"
        if args.mode is not None:
            args.set = [f"mode={args.mode}", *(args.set or [])]
        cfg = _load_config(args, dims_from=store)
    if args.mode is not None and cfg.mode != args.mode:
        raise ValueError(f"--mode {args.mode}, but the run's own config ({args.out if args.resume else args.epochs_from}) "
                         f"has mode={cfg.mode}")  # fmt: skip
    kw = dict(emotions=cfg.data.emotions, id_column=cfg.data.id_column, store_ids=store)
    train_labels = read_labels(args.train, **kw)
    valid_labels = read_labels(args.valid, **kw) if args.valid else None
    if args.train_on_all:
        if valid_labels is not None:
            train_labels = _concat_labels(train_labels, valid_labels)
        valid_labels = None
    try:
        res = train(cfg, store, train_labels, valid_labels, args.out, fixed_epochs=fixed_epochs, resume=args.resume,
                    progress=not args.no_progress)  # fmt: skip
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    if res.best is None:
        origin = f"the best epoch of {args.epochs_from}" if args.epochs_from else "--epochs"
        _print(
            f"trained on all {len(train_labels)} clips ({train_labels.source}) for {fixed_epochs} "
            f"epoch{'' if fixed_epochs == 1 else 's'} "
            f"({origin}); no validation: the final weights are best = last"
        )
    else:
        _print(_metrics_table(res.best.to_dict(), f"best epoch {res.best_epoch} of {len(res.history)} (valid):"))
    _print(f"run folder: {res.run_dir}")
    return 0


def _leave_process_group() -> None:
    """Under torchrun, the trainer joined a process group: leave it before the process exits."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from taemi.data.labels import read_labels
    from taemi.data.store import FeatureStore
    from taemi.eval.metrics import compute_metrics
    from taemi.eval.predict import check_finite_predictions, predict_dataset
    from taemi.model.checkpoint import load_run
    from taemi.train.runtime import resolve_device
    from taemi.train.trainer import check_store_fits, make_dataset

    out = _output_file(args.out) if args.out else None  # checked before the work
    model, cfg = load_run(args.run, args.which)
    out = out or _output_file(Path(args.run) / f"eval_{Path(args.labels).stem}.json")
    store = FeatureStore(args.store)
    check_store_fits(cfg, store, run=args.run)
    labels = read_labels(args.labels, emotions=cfg.data.emotions, id_column=cfg.data.id_column, store_ids=store)
    labels.check_scorable("labelled")
    device = resolve_device(args.device)
    precision, why = _evaluation_precision(args.run, args.precision, device)
    ds = make_dataset(cfg, store, labels)
    pred, _ = predict_dataset(
        model.to(device), ds, batch_size=cfg.train.eval_batch_size, device=device, precision=precision,
        progress=not args.no_progress,
    )  # fmt: skip
    check_finite_predictions(pred, labels.ids, f"evaluate {args.run} on {args.store}", cause=_features_cause(store))
    metrics = compute_metrics(pred, labels.values, cfg.data.emotions, clipped=args.clip).to_dict()
    report = {"run": str(args.run), "weights": args.which, "store": str(args.store), "labels": str(args.labels),
              "precision": precision, "device": str(device), **metrics}  # fmt: skip
    _write_output(out, lambda p: p.write_text(json.dumps(report, indent=2), encoding="utf-8"))
    _print(_metrics_table(metrics, f"{args.labels} ({args.which} weights):"))
    _print(f"scored in {precision}: {why}")
    _print(f"metrics written to {out}")
    return 0


def _features_cause(store) -> str:
    """Why predictions of a loaded run can be NaN/Inf: its weights were checked finite on
    load (taemi.model.checkpoint.load_weights), so the clips' features are not."""
    return f"the run's weights are finite, so these clips' features hold NaN/Inf (taemi store verify {store.root})"


def _evaluation_precision(run: str, asked: str, device) -> tuple[str, str]:
    """The precision evaluate scores in, and why. ``run`` (the default): the one the run
    validated in (its metrics.json), so the figure reproduces metrics.json; fp32 where
    that one cannot run here (fp16 off CUDA) or the run records none."""
    from taemi.config import ConfigError
    from taemi.model.checkpoint import METRICS_FILE, read_metrics
    from taemi.train.runtime import resolve_precision

    validated = (read_metrics(run) or {}).get("precision")
    validated = validated if validated in ("fp32", "bf16", "fp16") else None
    source = Path(run) / METRICS_FILE
    if asked != "run":
        precision = resolve_precision(asked, device)
        if validated is not None and validated != precision:
            return precision, (f"--precision {asked}; {run} validated in {validated} ({source}), so these figures "
                               f"can differ slightly from its metrics (--precision run scores as it did)")  # fmt: skip
        return precision, f"--precision {asked}"
    if validated is None:
        return "fp32", f"{run} records no validation precision ({source}): fp32"
    try:
        return resolve_precision(validated, device), f"the precision {run} validated in ({source})"
    except ConfigError:
        return "fp32", (f"{run} validated in {validated}, which needs CUDA: fp32 here, so these figures can "
                        f"differ slightly from its metrics ({source})")  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> int:
    if args.inputs:
        if args.store or args.ids:
            raise ValueError("predict takes media files (positional) or --store [--ids], not both")
        if args.out:
            _output_file(args.out)  # before the extraction, not after it
        return _predict_media(args)
    if not args.store:
        raise ValueError("predict needs --store STORE (features) or media files/folders to extract features from")
    if not args.out:
        raise ValueError("predict --store needs --out (the submission CSV)")
    for flag, given in (("--features", args.features), ("--profile", args.profile), ("--model", args.model)):
        if given:
            raise ValueError(f"{flag} is for predicting from media files, not from --store")
    from taemi.data.store import FeatureStore
    from taemi.eval.predict import check_finite_predictions, predict_dataset
    from taemi.eval.submission import write_submission
    from taemi.model.checkpoint import load_run
    from taemi.train.runtime import resolve_device, resolve_precision
    from taemi.train.trainer import check_store_fits, make_dataset

    out = _output_file(args.out)
    model, cfg = load_run(args.run, args.which)
    store = FeatureStore(args.store)
    check_store_fits(cfg, store, run=args.run)
    ids = _read_ids(args.ids, cfg.data.id_column) if args.ids else list(store.ids)
    ds = make_dataset(cfg, store, None, ids=ids)
    device = resolve_device(args.device)
    pred, _ = predict_dataset(
        model.to(device), ds, batch_size=cfg.train.eval_batch_size, device=device,
        precision=resolve_precision(args.precision, device), progress=not args.no_progress,
    )  # fmt: skip
    check_finite_predictions(pred, ids, f"predict {args.run} on {args.store}", cause=_features_cause(store))
    _write_output(out, lambda p: write_submission(p, ids, cfg.data.emotions, pred, clip=args.clip))
    _print(f"wrote {len(ids)} predictions ({_clip_words(args.clip)}) to {args.out}")
    return 0


def _clip_words(clip: bool) -> str:
    return "clipped to [0, 1]" if clip else "raw, not clipped (--no-clip)"


def _predict_media(args: argparse.Namespace) -> int:
    from taemi.predict_media import format_table, predict_media

    models = dict(_key_value(m, "--model") for m in (args.model or []))
    res = predict_media(
        args.run, args.inputs, which=args.which, features_dir=args.features, profile=args.profile,
        models=models, device=args.device, precision=args.precision, batch_size=args.batch_size,
        workers=args.workers, clip=args.clip, trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download, progress=not args.no_progress,
    )  # fmt: skip
    _print(format_table(res))
    if args.out:
        out = Path(args.out)
        res.write(out)
        _print(f"wrote {len(res.clips)} predictions ({_clip_words(args.clip)}) to {out} and {out.with_suffix('.json')}")
    else:
        _print(f"predictions {_clip_words(args.clip)}; --out FILE.csv also writes them (and FILE.json)")
    return 1 if res.failures else 0


def cmd_check_submission(args: argparse.Namespace) -> int:
    from taemi import EMI_EMOTIONS
    from taemi.eval.submission import check_submission

    emotions = tuple(e.strip() for e in args.emotions.split(",")) if args.emotions else EMI_EMOTIONS
    ids = _read_ids(args.ids, args.id_column)
    report = check_submission(args.file, ids, emotions, id_column=args.id_column, max_listed=args.show)
    if report.ok:
        _print(f"{args.file}: valid submission ({report.rows} rows = the {len(ids)} test ids, sorted; "
               f"columns {args.id_column},{','.join(emotions)}; values in [0, 1])")  # fmt: skip
    else:
        _print(f"{args.file}: NOT a valid submission for {args.ids} ({len(report.problems)} kind(s) of problem, "
               f"{report.rows} rows read, {len(ids)} test ids)")  # fmt: skip
        for p in report.problems:
            _print(f"  - {p}")
    for w in report.warnings:
        _print(f"  warning: {w}")
    return 0 if report.ok else 1


def cmd_store_info(args: argparse.Namespace) -> int:
    from taemi.data.store import format_info, store_info

    info = store_info(args.store)
    _print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from taemi.data.store import verify_store

    problems = verify_store(args.store, progress=not args.no_progress)
    if problems:
        _print(f"{args.store}: {len(problems)} problem(s)")
        for p in problems:
            _print(f"  - {p}")
        return 1
    _print(f"{args.store}: OK (checksums, shapes, finite values)")
    return 0


def cmd_import_release(args: argparse.Namespace) -> int:
    from taemi.model.release import import_release

    emotions = tuple(e.strip() for e in args.emotions.split(",")) if args.emotions else None
    kw = {"emotions": emotions} if emotions else {}
    out = import_release(args.checkpoint, args.out, **kw)
    _print(f"imported {args.checkpoint} into run folder {out} (preset 'official'); use it with evaluate/predict")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from taemi.demo import run_demo

    s = run_demo(args.out, clips=args.clips, epochs=args.epochs, preset=args.preset, seed=args.seed,
                 max_frames=args.max_frames, synthetic_features=args.synthetic_features, resume=args.resume,
                 progress=not args.no_progress)  # fmt: skip
    _print(_metrics_table(s["valid"], f"{args.preset} preset, {s['data']}, valid split:"))
    _print(
        f"valid mean Pearson {s['valid']['mean_pearson']:.4f} vs oracle ceiling {s['oracle_mean_pearson']:.4f} "
        f"({100 * s['share_of_oracle']:.0f}% of the ceiling); details in {Path(args.out) / 'summary.json'}"
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from taemi.data.abaw import is_abaw_root, open_abaw
    from taemi.data.store import check_writable
    from taemi.extract.pipeline import (
        ExtractOptions,
        extract,
        find_sources,
        summary_counts,
    )
    from taemi.extract.profiles import load_encoders

    # options and the output store are checked before any model loads or anything is written
    opts = ExtractOptions(
        max_audio_seconds=args.max_audio_seconds, max_frames=args.max_frames, frame_policy=args.frame_policy,
        batch_size=args.batch_size, workers=args.workers, text_tokens=args.text_tokens, force=args.force,
        waveforms=args.waveforms, commit_clips=args.commit_clips, commit_seconds=args.commit_seconds,
    )  # fmt: skip
    check_writable(args.out)
    models = dict(_key_value(m, "--model") for m in (args.model or []))
    sources, input_errors = [], []
    plain = [i for i in args.input if not is_abaw_root(i)]
    for root in (i for i in args.input if is_abaw_root(i)):
        layout = open_abaw(root)
        s, e = layout.sources(None if args.split == "all" else args.split, use_face_images=not args.no_face_images,
                              use_audio_files=not args.no_audio_files)  # fmt: skip
        log.info("%s: ABAW layout, %s: %d clips", root, args.split, len(s))
        sources, input_errors = sources + s, input_errors + e
    if plain:
        s, e = find_sources(plain)
        sources, input_errors = sources + s, input_errors + e
    if not sources and not input_errors:
        raise FileNotFoundError(f"no media files found in {', '.join(map(str, args.input))}")
    if args.distributed is not None or args.shard is not None:  # docs/distributed_extraction.md
        from taemi.cli import distributed_cmd

        if args.distributed is not None:
            return distributed_cmd.run_distributed(args, sources, input_errors)
        sources, input_errors = distributed_cmd.this_shard(args, sources, input_errors)
    if args.encoders:
        from taemi.extract.factory import encoders_from_factory

        if models:
            raise ValueError("--model and --encoders exclude each other (the factory builds every model)")
        enc = encoders_from_factory(args.encoders)
    else:
        enc = load_encoders(
            args.profile, device=args.device, batch_size=args.batch_size, models=models, face=not args.no_face,
            trust_remote_code=args.trust_remote_code, allow_download=args.allow_download,
        )  # fmt: skip
    from taemi.signals import Terminated

    try:  # main() runs every command under sigterm_raises: finished clips committed, summary written
        summary = extract(sources, args.out, enc, opts, input_errors=input_errors, progress=not args.no_progress)
    except Terminated:
        sys.stderr.write(f"taemi: terminated (SIGTERM): the finished clips are committed in {args.out}; "
                         "run the same command again to extract the rest\n")  # fmt: skip
        return 143
    _print(f"{args.out}: {summary_counts(summary)}")
    if summary.errors_file:
        _print(f"failures and their reasons: {summary.errors_file}")
    return 0 if summary.ok else 1


def _key_value(item: str, flag: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"{flag} {item!r} is not of the form role=value")
    k, v = item.split("=", 1)
    return k.strip(), v.strip()


def cmd_presets(args: argparse.Namespace) -> int:
    from taemi.config import PRESETS, preset

    paper = preset("paper").to_dict()["model"]
    for name in PRESETS:
        m = preset(name).to_dict()["model"]
        diff = {k: v for k, v in m.items() if v != paper[k]}
        _print(f"{name:<22}{diff if diff else '(the paper model)'}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from taemi import __version__

    p = argparse.ArgumentParser(prog="taemi", description="TAEMI: text-anchored multimodal emotion intensity.")
    p.add_argument("--version", action="version", version=f"taemi {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def config_opts(sp: argparse.ArgumentParser, preset_default: str | None) -> None:
        sp.add_argument("--preset", default=preset_default, help="paper | official | an ablation variant (see `taemi presets`)")
        sp.add_argument("--config", help="YAML file of settings applied over the preset")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, e.g. model.hidden=256 (repeatable)")

    sp = sub.add_parser("synth", help="write a synthetic feature store and label files")
    sp.add_argument("--out", required=True, help="output folder (store/, train.csv, valid.csv, synth.json)")
    sp.add_argument("--clips", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="SynthConfig field, e.g. dims=64,48,32")
    common(sp)
    sp.set_defaults(func=cmd_synth)

    sp = sub.add_parser("extract", help="extract features from media files into a feature store")
    sp.add_argument("--input", required=True, nargs="+", help="media folder(s), list file(s) or media files")
    sp.add_argument("--out", required=True, help="feature store folder (created or extended)")
    sp.add_argument("--profile", default="offline", choices=("offline", "paper"))
    sp.add_argument("--model", action="append", metavar="ROLE=ID_OR_DIR",
                    help="replace a profile model: asr, audio, vision or text (repeatable)")  # fmt: skip
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--batch-size", type=int, default=8, help="clips per model batch")
    sp.add_argument("--workers", type=int, default=2, help="decoding threads")
    sp.add_argument("--max-audio-seconds", type=float, default=12.0)
    sp.add_argument("--max-frames", type=int, default=400)
    sp.add_argument("--frame-policy", default="first", choices=("first", "uniform"))
    sp.add_argument("--no-face", action="store_true", help="use whole frames (no face detection)")
    sp.add_argument("--split", default="all", help="ABAW root: train | valid | test | all (default)")
    sp.add_argument("--no-face-images", action="store_true", help="ABAW root: decode video frames, not face_images/")
    sp.add_argument("--no-audio-files", action="store_true", help="ABAW root: use the video's audio, not audio/*.mp3")
    sp.add_argument("--text-tokens", action="store_true", help="also store text token states")
    sp.add_argument("--force", action="store_true", help="recompute clips already in the store")
    sp.add_argument("--commit-clips", type=int, default=32,
                    help="commit finished clips to the store every N clips (a killed run keeps them)")  # fmt: skip
    sp.add_argument("--commit-seconds", type=float, default=10.0,
                    help="... or every S seconds, whichever comes first")  # fmt: skip
    sp.add_argument("--waveforms", action="store_true",
                    help="also cache the decoded 16 kHz audio (STORE/waveforms/) for end-to-end fine-tuning; "
                         "clips already in the store only get their audio decoded and cached")  # fmt: skip
    sp.add_argument("--trust-remote-code", action="store_true", help="paper profile: allow GTE's model code")
    sp.add_argument("--allow-download", action="store_true", help="paper profile: let Hugging Face download models")
    from taemi.cli import distributed_cmd

    distributed_cmd.add_extract_options(sp)
    common(sp)
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("train", help="train a model on a feature store")
    sp.add_argument("--store", required=True)
    sp.add_argument("--train", required=True, help="training label CSV")
    sp.add_argument("--valid", help="validation label CSV (model selection, early stopping); with --train-on-all "
                    "its clips are trained on too")  # fmt: skip
    sp.add_argument("--out", required=True, help="run folder")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    sp.add_argument("--train-on-all", action="store_true",
                    help="final model: train on --train + --valid for a fixed number of epochs, no validation, "
                         "no early stopping (best = last)")  # fmt: skip
    sp.add_argument("--mode", choices=("frozen", "finetune"),
                    help="frozen (default): train the fusion model on stored features; finetune: also train the "
                         "audio and text backbones end to end on raw audio (the store's waveform cache, "
                         "`taemi extract --waveforms`) and transcripts, vision from the store; backbones and "
                         "their controls: --set finetune.audio_backbone=offline|paper|ID|DIR, "
                         "finetune.text_backbone=..., finetune.backbone_lr=..., finetune.freeze_audio_layers=N, "
                         "finetune.gradient_checkpointing=true, finetune.augment.noise_prob=0.5, "
                         "train.grad_accum_steps=N (see `taemi presets` and the README)")  # fmt: skip
    sp.add_argument("--epochs", type=int, help="with --train-on-all: train exactly N epochs")
    sp.add_argument("--epochs-from", metavar="RUN",
                    help="with --train-on-all: as many epochs as RUN's best epoch (its metrics.json); "
                         "RUN's config too, unless --preset/--config/--set are given")  # fmt: skip
    config_opts(sp, None)
    common(sp)
    sp.set_defaults(func=cmd_train)

    def run_opts(sp: argparse.ArgumentParser, precision_default: str = "fp32") -> None:
        sp.add_argument("--run", required=True, help="run folder (from train or import-release)")
        sp.add_argument("--which", default="best", choices=("best", "last"), help="which weights")
        sp.add_argument("--device", default="auto")
        choices = ("run",) * (precision_default == "run") + ("auto", "fp32", "fp16", "bf16")
        sp.add_argument("--precision", default=precision_default, choices=choices,
                        help="autocast precision" + (" (default run: the one the run validated in, its "
                                                     "metrics.json, so the score reproduces it; fp32 when the run "
                                                     "records none or it cannot run here)"
                                                     if precision_default == "run" else ""))  # fmt: skip

    sp = sub.add_parser("evaluate", help="score a run on labelled clips")
    run_opts(sp, precision_default="run")
    sp.add_argument("--store", required=True)
    sp.add_argument("--clip", action="store_true", help="clip predictions to [0, 1] before scoring (default: raw)")
    sp.add_argument("--labels", required=True, help="label CSV")
    sp.add_argument("--out", help="metrics JSON (default: RUN/eval_<labels>.json)")
    common(sp)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("predict", help="predictions from a feature store (ABAW submission CSV) or from media files")
    run_opts(sp)
    sp.add_argument("inputs", nargs="*", metavar="MEDIA",
                    help="video/audio files or folders: extract their features as the run's were, then predict")  # fmt: skip
    sp.add_argument("--store", help="feature store to predict from (instead of MEDIA)")
    sp.add_argument("--ids", help="with --store: CSV whose id column lists the clips (default: every clip in the store)")
    sp.add_argument("--out", help="predictions CSV (ABAW format); with MEDIA also a JSON next to it (same name, .json)")
    sp.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="clip predictions to [0, 1] as a submission needs (default); --no-clip writes raw values")  # fmt: skip
    sp.add_argument("--features", metavar="DIR",
                    help="MEDIA: keep the extracted features in this store (default: a temporary one)")  # fmt: skip
    sp.add_argument("--profile", choices=("offline", "paper"),
                    help="MEDIA: extraction profile; needed when the run has no features.json (e.g. imported weights)")  # fmt: skip
    sp.add_argument("--model", action="append", metavar="ROLE=ID_OR_DIR",
                    help="MEDIA: the model of a role (asr, audio, vision, text) when it is not the profile's")  # fmt: skip
    sp.add_argument("--batch-size", type=int, default=8, help="MEDIA: clips per extraction model batch")
    sp.add_argument("--workers", type=int, default=2, help="MEDIA: decoding threads")
    sp.add_argument("--trust-remote-code", action="store_true", help="MEDIA, paper profile: allow GTE's model code")
    sp.add_argument("--allow-download", action="store_true", help="MEDIA, paper profile: let Hugging Face download")
    common(sp)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("check-submission", help="validate a submission CSV against the test id list")
    sp.add_argument("file", help="the submission CSV")
    sp.add_argument("--ids", required=True, help="CSV whose id column lists every test id")
    sp.add_argument("--emotions", help="comma-separated value columns, in order (default: the EMI six)")
    sp.add_argument("--id-column", default="Filename", help="id column of both files (default: Filename)")
    sp.add_argument("--show", type=int, default=5, help="examples listed per kind of problem (default: 5)")
    sp.set_defaults(func=cmd_check_submission)

    sp = sub.add_parser("store", help="inspect a feature store")
    ssub = sp.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    s2 = ssub.add_parser("info", help="summary of a store")
    s2.add_argument("store")
    s2.add_argument("--json", action="store_true")
    s2.set_defaults(func=cmd_store_info)
    s2 = ssub.add_parser("verify", help="check checksums, shapes and values")
    s2.add_argument("store")
    common(s2)
    s2.set_defaults(func=cmd_store_verify)
    distributed_cmd.register_store_merge(ssub, common)

    sp = sub.add_parser("import-release", help="convert the authors' released fusion weights into a run folder")
    sp.add_argument("checkpoint")
    sp.add_argument("--out", required=True, help="run folder to write")
    sp.add_argument("--emotions", help="comma-separated output names (default: the EMI six)")
    sp.set_defaults(func=cmd_import_release)

    sp = sub.add_parser("demo", help="the main job: generated media -> extract -> train -> evaluate -> predict")
    sp.add_argument("--out", default="demo", help="output folder (default: ./demo)")
    sp.add_argument("--clips", type=int, default=160)
    sp.add_argument("--epochs", type=int, default=30)
    sp.add_argument("--preset", default="paper")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-frames", type=int, default=8, help="video frames per clip (uniform policy)")
    sp.add_argument("--synthetic-features", action="store_true",
                    help="skip media: train on a synthetic feature store at paper sizes")  # fmt: skip
    sp.add_argument("--resume", action="store_true", help="reuse finished steps in --out")
    common(sp)
    sp.set_defaults(func=cmd_demo)

    from taemi.cli import ablate_cmd, compare_cmd, import_cmd, report_cmd, robustness_cmd

    import_cmd.register(sub, common)
    ablate_cmd.register(sub, common)
    robustness_cmd.register(sub, common)
    compare_cmd.register(sub, common)
    report_cmd.register(sub, common)

    sp = sub.add_parser("presets", help="list the named presets and how they differ from the paper model")
    sp.set_defaults(func=cmd_presets)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix (bad input, a damaged file, a diverging
    run): printed as one line with exit status 2. Anything else is a bug and keeps its
    traceback. The training error is only looked up once the trainer was imported (so a
    light command does not import torch to handle its errors)."""
    from taemi.config import ConfigError
    from taemi.data.store import StoreError
    from taemi.extract.encoders.base import ModelLoadError

    trainer = sys.modules.get("taemi.train.trainer")
    extra = (trainer.TrainingError,) if trainer is not None else ()
    # RunFolderError (a damaged run-folder file) and LabelError are ValueErrors
    return (ConfigError, StoreError, ModelLoadError, FileNotFoundError, FileExistsError, ValueError, KeyError, *extra)


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
    loads_models = args.command in ("extract", "import", "predict", "demo")
    if loads_models and getattr(args, "no_progress", False):  # model-loading bars of transformers / HF hub
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
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
        msg = " ".join(str(msg).split())  # one line, whatever the message (e.g. a DataLoader worker's)
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
