"""Hostile inputs to the ``taemi`` command: damaged, truncated, tampered or foreign files,
YAML of the wrong shape, unusable output paths, non-finite settings and data, a locked
run folder, and the inputs that used to pass silently (a validation split that is the
training split, a deleted ``state.pt``).

One table, :data:`CASES`. Each :class:`Case` builds its inputs in ``tmp_path`` (damaged
copies of a tiny run trained once for the module, of its store or label files) and
returns the command line; :func:`test_hostile_input` runs it in-process and asserts, for
every case:

- the exit status (2 for an error);
- for an error, exactly one line on stderr, ``taemi: error: ...``, holding every string
  of ``names`` (the file or the config key, and what is wrong); for a warning, a
  WARNING log record holding them; for an ``output`` case, stdout holding them;
- no traceback: ``main`` returns instead of raising, and no output says "Traceback";
- what was good before is still good after: the module's store still verifies
  (:func:`taemi.store.verify_store`) and the module's run folder's files have the
  hashes they had (and ``after``, when given, checks the case's own promises, e.g. that
  a failed start left no folder behind).

To add a case (extraction, import, ...), append a ``Case`` to :data:`CASES`: ``argv`` gets
the :class:`Ctx` (paths of the good store, labels and run; ``tmp`` for the case's own
files; ``copy_run`` and ``hold_lock`` helpers) and returns the arguments of ``taemi``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, small_synth_config, split_args, tiny_cli_sets
from safetensors.torch import load_file, save_file

from taemi.cli.main import main
from taemi.data.labels import read_labels
from taemi.run import RunFolderLock
from taemi.store import verify_store
from taemi.synth.features import make_synth

#: The module's run validates in bf16, as train.precision=auto does on CPUs with native bf16,
#: so evaluate's default precision has something to reproduce.
RUN_SETS = [*tiny_cli_sets(), "--set", "train.max_epochs=2", "--set", "train.precision=bf16"]


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder``, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclasses.dataclass
class Good:
    """What the module trains once: a store, its label files and a finished run."""

    store: Path
    train_csv: Path
    valid_csv: Path
    run: Path
    run_hashes: dict[str, str]


@pytest.fixture(scope="module")
def good(synth, tmp_path_factory) -> Good:
    """A tiny 2-epoch run (bf16 validation) on the session's synthetic store, via the CLI."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # `taemi train` would set one thread per core otherwise
        code, _ = run_main(
            [
                "train",
                *split_args(synth, run),
                "--no-progress",
                *RUN_SETS,
            ]
        )
    assert code == 0
    return Good(
        Path(synth.store), Path(synth.train_csv), Path(synth.valid_csv), run, file_hashes(run)
    )


@dataclasses.dataclass
class Ctx:
    """What a case builds its inputs from. ``tmp`` is the case's own folder."""

    good: Good
    tmp: Path
    cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    nan_clip: str = ""  # set by _store_with_nan
    other_valid: Path | None = None  # set by _store_of_other_sizes

    @property
    def store(self) -> Path:
        return self.good.store

    @property
    def run(self) -> Path:
        return self.good.run

    def copy_run(self, name: str = "run") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.good.run, dst)
        return dst

    def hold_lock(self, run: Path) -> Path:
        """Lock ``run`` as a training process does, until the case is over."""
        lock = RunFolderLock(run).acquire()
        self.cleanups.append(lock.release)
        return run

    def train(self, out: Path | str, *extra: str, valid: Path | None = None) -> list[str]:
        """``taemi train`` of the tiny config into ``out``."""
        return [
            "train",
            "--store",
            str(self.store),
            "--train",
            str(self.good.train_csv),
            "--valid",
            str(valid or self.good.valid_csv),
            "--out",
            str(out),
            "--no-progress",
            *tiny_cli_sets(),
            "--set",
            "train.max_epochs=2",
            *extra,
        ]

    def resume(self, run: Path) -> list[str]:
        """``taemi train --resume`` of ``run`` with its own config."""
        return [
            "train",
            "--store",
            str(self.store),
            "--train",
            str(self.good.train_csv),
            "--valid",
            str(self.good.valid_csv),
            "--out",
            str(run),
            "--resume",
            "--no-progress",
        ]

    def evaluate(
        self, run: Path, *extra: str, store: Path | None = None, labels: Path | None = None
    ) -> list[str]:
        return [
            "evaluate",
            "--run",
            str(run),
            "--store",
            str(store or self.store),
            "--labels",
            str(labels or self.good.valid_csv),
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]

    def predict(self, run: Path, out: Path | str, store: Path | None = None) -> list[str]:
        return [
            "predict",
            "--run",
            str(run),
            "--store",
            str(store or self.store),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    warnings: list[str]  # WARNING (and above) log messages


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile input. ``names``: strings the message must hold (the file, the key,
    the problem), computed from the :class:`Ctx` once ``argv`` has built the inputs."""

    id: str
    argv: Callable[[Ctx], list[str]]
    names: Callable[[Ctx], list[str]]
    code: int = 2
    kind: str = "error"  # error: one stderr line | warning: a WARNING log record | output: stdout
    after: Callable[[Ctx, Result], None] | None = None


# --------------------------------------------------------------------------- building damaged inputs


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _damaged_weights(ctx: Ctx, how: str) -> Path:
    run = ctx.copy_run()
    path = run / "best.safetensors"
    if how == "truncated":
        _truncate(path, path.stat().st_size // 2)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "header":  # the 8-byte header length says more than the file holds
        data = bytearray(path.read_bytes())
        data[:8] = (2**40).to_bytes(8, "little")
        path.write_bytes(bytes(data))
    elif how == "nan":
        w = load_file(str(path))
        w[min(w)].view(-1)[0] = float("nan")
        save_file(w, str(path), metadata={"format": "taemi"})
    elif how == "foreign":  # valid safetensors of another model
        save_file({"encoder.weight": torch.zeros(3, 4)}, str(path))
    return run


class _Evil:
    """Pickles as a call of os.system: loading state.pt must refuse it, never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damaged_state(ctx: Ctx, how: str) -> Path:
    run = ctx.copy_run()
    path = run / "state.pt"
    if how == "truncated":
        _truncate(path, path.stat().st_size // 2)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"not a torch file\n")
    elif how == "pickled object":
        torch.save({"model": _Evil(ctx.tmp / "PWNED")}, path)
    elif how == "deleted":
        path.unlink()
    return run


def _write(ctx: Ctx, name: str, text: str) -> Path:
    path = ctx.tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def _run_with(ctx: Ctx, name: str, text: str) -> Path:
    """A copy of the good run whose file ``name`` holds ``text``."""
    run = ctx.copy_run()
    (run / name).write_text(text, encoding="utf-8")
    return run


def _first_rows(ctx: Ctx, name: str, labels: Path, extra: Path | None = None) -> Path:
    """A label file of ``labels``' header and first row (plus ``extra``'s first two rows)."""
    lines = labels.read_text(encoding="utf-8").splitlines()
    rows = lines if extra is not None else lines[:2]
    if extra is not None:
        rows = rows + extra.read_text(encoding="utf-8").splitlines()[1:3]
    return _write(ctx, name, "\n".join(rows) + "\n")


def _store_with_nan(ctx: Ctx, split: Path) -> tuple[Path, str]:
    """A copy of the store in which the first clip of ``split`` with audio holds one NaN,
    its checksums updated (a store written so, not a corrupted one); (store, clip id)."""
    dst = ctx.tmp / "nan_store"
    shutil.copytree(ctx.store, dst)
    ids = set(read_labels(split).ids)
    manifest = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    dtype = np.dtype(manifest["dtype"])
    for shard in manifest["shards"]:
        folder = dst / "shards" / shard["name"]
        with np.load(folder / "index.npz", allow_pickle=False) as index:
            rows = [
                (str(c), int(o))
                for c, o, n in zip(index["ids"], index["audio_offset"], index["audio_length"])
                if str(c) in ids and n > 0
            ]
        if not rows:
            continue
        clip_id, offset = rows[0]
        data = bytearray((folder / "audio.bin").read_bytes())
        pos = (
            offset * manifest["dims"]["audio"] * dtype.itemsize
        )  # first value of the clip's first row
        data[pos : pos + dtype.itemsize] = np.array([np.nan], dtype=dtype).tobytes()
        (folder / "audio.bin").write_bytes(bytes(data))
        shard["files"]["audio.bin"] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        ctx.nan_clip = clip_id
        return dst, clip_id
    raise AssertionError(f"no clip of {split} has audio")


def _store_of_other_sizes(ctx: Ctx) -> Path:
    res = make_synth(
        ctx.tmp / "other", small_synth_config(clips=8, dims=(13, 10, 8), seed=5), progress=False
    )
    ctx.other_valid = Path(res.valid_csv)
    return Path(res.store)


def _unwritable(ctx: Ctx) -> Path:
    """A folder this process cannot create anything in (root ignores permissions: /sys)."""
    if os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("running as root without /sys: no folder that refuses writes")
        return Path("/sys")
    folder = ctx.tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    ctx.cleanups.append(lambda: folder.chmod(0o700))
    return folder


def _no_folder(*parts: str) -> Callable[[Ctx, Result], None]:
    """After a failed start: the --out folder (ctx.tmp / parts) does not exist."""

    def check(ctx: Ctx, res: Result) -> None:
        assert not ctx.tmp.joinpath(*parts).exists(), f"{ctx.tmp.joinpath(*parts)} was left behind"

    return check


def _new_folder(ctx: Ctx, name: str) -> Path:
    folder = ctx.tmp / name
    folder.mkdir()
    return folder


def _only_the_lock_in(name: str) -> Callable[[Ctx, Result], None]:
    """The refused process wrote nothing in the folder (only the holder's lock file is there)."""

    def check(ctx: Ctx, res: Result) -> None:
        assert [p.name for p in (ctx.tmp / name).iterdir()] == [".lock"]

    return check


def _unchanged_copy(ctx: Ctx, res: Result) -> None:
    """The run copy the case used is still byte-identical to the good run (besides the
    lock file of the process holding it)."""
    hashes = file_hashes(ctx.tmp / "run")
    assert hashes.pop(".lock", None) is not None
    assert hashes == ctx.good.run_hashes


def _eval_reproduces_metrics(ctx: Ctx, res: Result) -> None:
    report = json.loads((ctx.tmp / "eval.json").read_text(encoding="utf-8"))
    metrics = json.loads((ctx.run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["precision"] == "bf16" and report["precision"] == "bf16"
    assert report["mean_pearson"] == pytest.approx(metrics["valid"]["mean_pearson"], abs=1e-9)


# --------------------------------------------------------------------------- the table


# --------------------------------------------------------------------------- extraction and import inputs


def _media_folder(ctx: Ctx) -> Path:
    """A folder with one (unreadable) file named like media: enough for the option checks,
    which must refuse before any model loads or anything is written."""
    folder = ctx.tmp / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(b"not a video")
    return folder


def _nothing_written(name: str) -> Callable[[Ctx, Result], None]:
    def check(ctx: Ctx, res: Result) -> None:
        assert not (ctx.tmp / name).exists(), f"{name} was created"

    return check


def _organiser_root(ctx: Ctx, first: bytes | None = None) -> Path:
    """Organiser features of six clips (audio D=16, vision D=12); with ``first``, clip
    00000's audio and vision files hold those bytes instead."""
    root = ctx.tmp / "organiser"
    for sub, dim in (("wav2vec2", 16), ("vit", 12)):
        (root / sub).mkdir(parents=True)
        for k in range(6):
            data = pickle.dumps(np.ones((3 + k, dim), np.float32))
            (root / sub / f"{k:05d}.pkl").write_bytes(
                first if (k == 0 and first is not None) else data
            )
    (root / "text").mkdir()
    for k in range(6):
        (root / "text" / f"{k:05d}.txt").write_text("I am happy to see you.\n", encoding="utf-8")
    return root


#: 50 bytes that declare a (1, 2**26) float64 array: numpy.ndarray((1, 2**26), dtype('f8')).
_HUGE_PICKLE = (
    b"\x80\x02cnumpy\nndarray\nK\x01J\x00\x00\x00\x04\x86"
    b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85R\x86R."
)


def _import(ctx: Ctx, root: Path, *extra: str) -> list[str]:
    return [
        "import",
        "--root",
        str(root),
        "--out",
        str(ctx.tmp / "imported"),
        "--text-profile",
        "none",
        "--no-progress",
        *extra,
    ]


def _imported_without(clip: str) -> Callable[[Ctx, Result], None]:
    """The good clips were imported at the sizes most files agree on; ``clip`` was not."""

    def check(ctx: Ctx, res: Result) -> None:
        from taemi.store import FeatureStore

        store = FeatureStore(ctx.tmp / "imported")
        assert store.dims["audio"] == 16 and store.dims["vision"] == 12, store.dims
        assert clip not in store and len(store) == 5
        assert verify_store(ctx.tmp / "imported") == []

    return check


CASES = [
    # -- weights (best.safetensors): evaluate and predict
    Case(
        "evaluate-truncated-weights",
        lambda c: c.evaluate(_damaged_weights(c, "truncated")),
        lambda c: [str(c.tmp / "run" / "best.safetensors"), "cannot be read"],
    ),
    Case(
        "evaluate-empty-weights",
        lambda c: c.evaluate(_damaged_weights(c, "empty")),
        lambda c: [str(c.tmp / "run" / "best.safetensors"), "cannot be read"],
    ),
    Case(
        "evaluate-corrupted-weights-header",
        lambda c: c.evaluate(_damaged_weights(c, "header")),
        lambda c: [str(c.tmp / "run" / "best.safetensors"), "cannot be read"],
    ),
    Case(
        "evaluate-foreign-weights",
        lambda c: c.evaluate(_damaged_weights(c, "foreign")),
        lambda c: [str(c.tmp / "run" / "best.safetensors"), "do not fit the model"],
    ),
    Case(
        "predict-truncated-weights",
        lambda c: c.predict(_damaged_weights(c, "truncated"), c.tmp / "p.csv"),
        lambda c: [str(c.tmp / "run" / "best.safetensors"), "cannot be read"],
        after=_no_folder("p.csv"),
    ),
    Case(
        "predict-nan-weights",
        lambda c: c.predict(_damaged_weights(c, "nan"), c.tmp / "p.csv"),
        lambda c: [str(c.tmp / "run" / "best.safetensors"), "NaN/Inf"],
        after=_no_folder("p.csv"),
    ),
    # -- training state (state.pt): train --resume
    Case(
        "resume-truncated-state",
        lambda c: c.resume(_damaged_state(c, "truncated")),
        lambda c: [str(c.tmp / "run" / "state.pt"), "cannot be read"],
    ),
    Case(
        "resume-empty-state",
        lambda c: c.resume(_damaged_state(c, "empty")),
        lambda c: [str(c.tmp / "run" / "state.pt"), "cannot be read"],
    ),
    Case(
        "resume-garbage-state",
        lambda c: c.resume(_damaged_state(c, "garbage")),
        lambda c: [str(c.tmp / "run" / "state.pt"), "cannot be read"],
    ),
    Case(
        "resume-pickled-object-state",
        lambda c: c.resume(_damaged_state(c, "pickled object")),
        lambda c: [str(c.tmp / "run" / "state.pt"), "refused without running"],
        after=_no_folder("PWNED"),
    ),
    Case(
        "resume-deleted-state",
        lambda c: c.resume(_damaged_state(c, "deleted")),
        lambda c: [str(c.tmp / "run" / "state.pt"), "is missing"],
    ),
    # -- other run-folder files
    Case(
        "resume-damaged-features-json",
        lambda c: c.resume(_run_with(c, "features.json", "{not json")),
        lambda c: [str(c.tmp / "run" / "features.json")],
    ),
    Case(
        "evaluate-run-config-is-a-list",
        lambda c: c.evaluate(_run_with(c, "config.yaml", "- 1\n- 2\n")),
        lambda c: [str(c.tmp / "run" / "config.yaml"), "mapping"],
    ),
    Case(
        "evaluate-damaged-metrics-json",
        lambda c: c.evaluate(_run_with(c, "metrics.json", "[1,")),
        lambda c: [str(c.tmp / "run" / "metrics.json")],
    ),
    Case(
        "epochs-from-invalid-metrics-json",
        lambda c: c.train(
            c.tmp / "final",
            "--train-on-all",
            "--epochs-from",
            str(_run_with(c, "metrics.json", '{"best_epoch": ')),
        ),
        lambda c: [str(c.tmp / "run" / "metrics.json")],
        after=_no_folder("final"),
    ),
    Case(
        "epochs-from-metrics-json-not-an-object",
        lambda c: c.train(
            c.tmp / "final",
            "--train-on-all",
            "--epochs-from",
            str(_run_with(c, "metrics.json", "[2]")),
        ),
        lambda c: [str(c.tmp / "run" / "metrics.json"), "JSON object"],
        after=_no_folder("final"),
    ),
    # -- --config files
    Case(
        "config-top-level-list",
        lambda c: c.train(c.tmp / "out", "--config", str(_write(c, "c.yaml", "- a\n- b\n"))),
        lambda c: [str(c.tmp / "c.yaml"), "mapping"],
        after=_no_folder("out"),
    ),
    Case(
        "config-duplicate-key",
        lambda c: c.train(
            c.tmp / "out", "--config", str(_write(c, "c.yaml", "train:\n  lr: 1e-3\n  lr: 1e-2\n"))
        ),
        lambda c: [str(c.tmp / "c.yaml"), "duplicate key 'lr'", "line 3"],
        after=_no_folder("out"),
    ),
    Case(
        "config-not-yaml",
        lambda c: c.train(c.tmp / "out", "--config", str(_write(c, "c.yaml", "train: [\n"))),
        lambda c: [str(c.tmp / "c.yaml"), "not valid YAML"],
        after=_no_folder("out"),
    ),
    Case(
        "config-section-not-a-mapping",
        lambda c: c.train(c.tmp / "out", "--config", str(_write(c, "c.yaml", "model: 3\n"))),
        lambda c: [str(c.tmp / "c.yaml"), "'model'"],
        after=_no_folder("out"),
    ),
    Case(
        "config-non-finite-lr",
        lambda c: c.train(
            c.tmp / "out", "--config", str(_write(c, "c.yaml", "train:\n  lr: .inf\n"))
        ),
        lambda c: [str(c.tmp / "c.yaml"), "train.lr=inf: must be finite and > 0"],
        after=_no_folder("out"),
    ),
    # -- settings that are not finite or not positive, refused when the config is built
    Case(
        "set-lr-inf",
        lambda c: c.train(c.tmp / "out", "--set", "train.lr=inf"),
        lambda c: ["train.lr=inf: must be finite and > 0"],
        after=_no_folder("out"),
    ),
    Case(
        "set-lr-nan",
        lambda c: c.train(c.tmp / "out", "--set", "train.lr=nan"),
        lambda c: ["train.lr=nan: must be finite and > 0"],
        after=_no_folder("out"),
    ),
    Case(
        "set-weight-decay-negative",
        lambda c: c.train(c.tmp / "out", "--set", "train.weight_decay=-0.1"),
        lambda c: ["train.weight_decay=-0.1: must be finite and >= 0"],
        after=_no_folder("out"),
    ),
    Case(
        "set-max-audio-len-0",
        lambda c: c.train(c.tmp / "out", "--set", "data.max_audio_len=0"),
        lambda c: ["data.max_audio_len=0: must be > 0"],
        after=_no_folder("out"),
    ),
    # -- a finite but absurd learning rate: stopped at the step the loss turns NaN/Inf, no stub left
    Case(
        "set-lr-1e30",
        lambda c: c.train(c.tmp / "out", "--set", "train.lr=1e30"),
        lambda c: ["epoch 1, step", "training loss", "train.lr"],
        after=_no_folder("out"),
    ),
    # -- data
    Case(
        "nan-in-a-training-clip",
        lambda c: [
            "train",
            "--store",
            str(_store_with_nan(c, c.good.train_csv)[0]),
            *c.train(c.tmp / "out")[3:],
        ],
        lambda c: [c.nan_clip],
        after=_no_folder("out"),
    ),
    Case(
        "nan-in-a-validation-clip",
        lambda c: [
            "train",
            "--store",
            str(_store_with_nan(c, c.good.valid_csv)[0]),
            *c.train(c.tmp / "out")[3:],
        ],
        lambda c: [c.nan_clip],
        after=_no_folder("out"),
    ),
    Case(
        "evaluate-nan-in-a-clip",
        lambda c: c.evaluate(
            c.run, "--out", str(c.tmp / "e.json"), store=_store_with_nan(c, c.good.valid_csv)[0]
        ),
        lambda c: [c.nan_clip],
        after=_no_folder("e.json"),
    ),
    Case(
        "one-row-validation-csv",
        lambda c: c.train(c.tmp / "out", valid=_first_rows(c, "one.csv", c.good.valid_csv)),
        lambda c: [str(c.tmp / "one.csv"), "at least 2"],
        after=_no_folder("out"),
    ),
    Case(
        "evaluate-one-row-labels",
        lambda c: c.evaluate(
            c.run,
            "--out",
            str(c.tmp / "e.json"),
            labels=_first_rows(c, "one.csv", c.good.valid_csv),
        ),
        lambda c: [str(c.tmp / "one.csv"), "at least 2"],
        after=_no_folder("e.json"),
    ),
    Case(
        "evaluate-store-of-other-sizes",
        lambda c: c.evaluate(c.run, store=_store_of_other_sizes(c), labels=c.other_valid),
        lambda c: [str(c.tmp / "other" / "store"), "size 13", "features.json"],
        after=lambda c, r: (
            None if "--set" not in r.stderr else pytest.fail(f"suggests --set: {r.stderr}")
        ),
    ),
    Case(
        "predict-store-of-other-sizes",
        lambda c: c.predict(c.run, c.tmp / "p.csv", store=_store_of_other_sizes(c)),
        lambda c: [str(c.tmp / "other" / "store"), "size 13", "features.json"],
        after=lambda c, r: (
            None if "--set" not in r.stderr else pytest.fail(f"suggests --set: {r.stderr}")
        ),
    ),
    # -- output paths
    Case(
        "train-out-below-a-file",
        lambda c: c.train(_write(c, "afile", "x") / "run"),
        lambda c: [str(c.tmp / "afile"), "is a file"],
    ),
    Case(
        "train-out-is-a-file",
        lambda c: c.train(_write(c, "afile", "x")),
        lambda c: [str(c.tmp / "afile"), "is a file"],
    ),
    Case(
        "train-out-unwritable",
        lambda c: c.train(_unwritable(c) / "taemi-hostile-run"),
        lambda c: ["taemi-hostile-run", "cannot create the run folder"],
    ),
    Case(
        "evaluate-out-is-a-folder",
        lambda c: c.evaluate(c.run, "--out", str(c.tmp)),
        lambda c: [str(c.tmp), "is a folder"],
    ),
    Case(
        "evaluate-out-below-a-file",
        lambda c: c.evaluate(c.run, "--out", str(_write(c, "afile", "x") / "e.json")),
        lambda c: [str(c.tmp / "afile"), "is a file"],
    ),
    Case(
        "evaluate-out-unwritable",
        lambda c: c.evaluate(c.run, "--out", str(_unwritable(c) / "taemi-hostile.json")),
        lambda c: ["taemi-hostile.json"],
    ),
    Case(
        "predict-out-is-a-folder",
        lambda c: c.predict(c.run, c.tmp),
        lambda c: [str(c.tmp), "is a folder"],
    ),
    # -- run-folder lock: a second training process on a folder being trained fails at once
    Case(
        "resume-while-training",
        lambda c: c.resume(c.hold_lock(c.copy_run())),
        lambda c: [str(c.tmp / "run"), "being trained by another process"],
        after=_unchanged_copy,
    ),
    Case(
        "train-while-training",
        lambda c: c.train(c.hold_lock(_new_folder(c, "new"))),
        lambda c: [str(c.tmp / "new"), "being trained by another process"],
        after=_only_the_lock_in("new"),
    ),
    # -- said, not refused
    Case(
        "valid-is-the-train-file",
        lambda c: c.train(c.tmp / "out", valid=c.good.train_csv),
        lambda c: [str(c.good.train_csv), "are the training labels"],
        code=0,
        kind="warning",
    ),
    Case(
        "valid-overlaps-train",
        lambda c: c.train(
            c.tmp / "out",
            valid=_first_rows(c, "mixed.csv", c.good.valid_csv, extra=c.good.train_csv),
        ),
        lambda c: [str(c.tmp / "mixed.csv"), "2 of the", "also training clips"],
        code=0,
        kind="warning",
    ),
    Case(
        "evaluate-scores-in-the-run-precision",
        lambda c: c.evaluate(c.run, "--out", str(c.tmp / "eval.json")),
        lambda c: ["scored in bf16", "the precision", "validated in"],
        code=0,
        kind="output",
        after=_eval_reproduces_metrics,
    ),
    Case(
        "evaluate-in-another-precision-says-so",
        lambda c: c.evaluate(c.run, "--precision", "fp32", "--out", str(c.tmp / "eval.json")),
        lambda c: ["scored in fp32", "validated in bf16", "can differ slightly"],
        code=0,
        kind="output",
    ),
    # -- extraction: refused before any model loads, nothing written
    Case(
        "extract-max-frames-0",
        lambda c: [
            "extract",
            "--input",
            str(_media_folder(c)),
            "--out",
            str(c.tmp / "feats"),
            "--max-frames",
            "0",
            "--no-progress",
        ],
        lambda c: ["--max-frames", "0"],
        after=_nothing_written("feats"),
    ),
    Case(
        "extract-workers-0",
        lambda c: [
            "extract",
            "--input",
            str(_media_folder(c)),
            "--out",
            str(c.tmp / "feats"),
            "--workers",
            "0",
            "--no-progress",
        ],
        lambda c: ["--workers"],
        after=_nothing_written("feats"),
    ),
    Case(
        "extract-out-is-a-file",
        lambda c: [
            "extract",
            "--input",
            str(_media_folder(c)),
            "--out",
            str(_write(c, "afile", "x")),
            "--no-progress",
        ],
        lambda c: [str(c.tmp / "afile")],
        after=lambda c, r: (
            (c.tmp / "afile").read_text() == "x" or pytest.fail("the file was changed")
        ),
    ),
    # -- import: sizes by agreement, hostile sizes refused before allocation, exit 1 when files are rejected
    Case(
        "import-huge-pickle-first",
        lambda c: _import(c, _organiser_root(c, first=_HUGE_PICKLE)),
        lambda c: [
            str(c.tmp / "organiser" / "wav2vec2" / "00000.pkl"),
            "refused before being allocated",
        ],
        code=1,
        kind="warning",
        after=_imported_without("00000"),
    ),
    Case(
        "import-odd-size-first",
        lambda c: _import(c, _organiser_root(c, first=pickle.dumps(np.ones((4, 31), np.float32)))),
        lambda c: [str(c.tmp / "organiser" / "wav2vec2" / "00000.pkl"), "31"],
        code=1,
        kind="warning",
        after=_imported_without("00000"),
    ),
    Case(
        "import-dims-malformed",
        lambda c: _import(c, _organiser_root(c), "--dims", "audio=sixteen"),
        lambda c: ["--dims", "audio=sixteen"],
        after=_nothing_written("imported"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, good: Good, tmp_path, capsys, caplog, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = Ctx(good, tmp_path)
    try:
        argv = case.argv(ctx)
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            try:
                code = main(argv)
            except Exception:  # noqa: BLE001 - any exception is a traceback: the input was not mapped to its error
                pytest.fail(
                    f"taemi {' '.join(argv)} raised instead of exiting:\n{traceback.format_exc()}"
                )
        out = capsys.readouterr()
        res = Result(
            code,
            out.out,
            out.err,
            [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING],
        )
        names = case.names(ctx)
        assert "Traceback" not in res.stdout + res.stderr
        assert res.code == case.code, f"exit {res.code}, stderr: {res.stderr!r}"
        if case.kind == "error":
            lines = res.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("taemi: error: "), res.stderr
            for name in names:
                assert name in lines[0], f"{name!r} not in {lines[0]!r}"
        elif case.kind == "warning":
            assert any(all(n in w for n in names) for w in res.warnings), (names, res.warnings)
        else:
            for name in names:
                assert name in res.stdout, f"{name!r} not in {res.stdout!r}"
        if case.after is not None:
            case.after(ctx, res)
    finally:
        for undo in reversed(ctx.cleanups):
            undo()
    assert verify_store(good.store) == []
    assert file_hashes(good.run) == good.run_hashes, "the good run folder changed"
