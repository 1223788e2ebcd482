"""The ``taemi`` command end to end on a tiny synthetic store (seconds on CPU):
synth -> train -> evaluate -> predict, store info/verify, presets, and error exits."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIMS, is_png, run_main, tiny_cli_sets
from safetensors.torch import load_file, save_file

from taemi import EMI_EMOTIONS
from taemi.cli.main import main
from taemi.config import PRESETS, load_config
from taemi.store import FeatureStore

SYNTH_SETS = [
    "--set",
    f"dims={DIMS[0]},{DIMS[1]},{DIMS[2]}",
    "--set",
    "audio_len=6,20",
    "--set",
    "vision_len=4,12",
    "--set",
    "missing_rate=0.15,0.15,0.1",
]


def taemi_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m taemi``."""
    script = Path(sys.executable).with_name("taemi")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "taemi"]


def read_rows(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(header, ids as strings, values float32) of an ABAW CSV."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    values = np.array([r[1:] for r in rows[1:]], dtype=np.float64).astype(np.float32)
    return rows[0], [r[0] for r in rows[1:]], values


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``taemi synth`` as a real subprocess of the installed entry point: 64 clips."""
    out = tmp_path_factory.mktemp("cli") / "synth"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        *taemi_command(),
        "synth",
        "--out",
        str(out),
        "--clips",
        "64",
        *SYNTH_SETS,
        "--no-progress",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 48 train + 16 valid clips" in proc.stdout
    assert "oracle ceiling" in proc.stdout
    for name in ("store/manifest.json", "train.csv", "valid.csv", "synth.json"):
        assert (out / name).is_file(), name
    return out


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--store",
        str(data / "store"),
        "--train",
        str(data / "train.csv"),
        "--valid",
        str(data / "valid.csv"),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(data: Path) -> tuple[Path, str]:
    """A finished 2-epoch tiny training run made with ``taemi train``; (folder, stdout)."""
    out = data.parent / "run"
    code, stdout = run_main(train_args(data, out, *tiny_cli_sets(), "--set", "train.max_epochs=2"))
    assert code == 0
    return out, stdout


def test_synth_in_process(tmp_path, capsys) -> None:
    code = main(
        [
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--clips",
            "12",
            "--seed",
            "3",
            *SYNTH_SETS,
            "--set",
            "text_tokens=true",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "wrote 9 train + 3 valid clips" in capsys.readouterr().out
    store = FeatureStore(tmp_path / "s" / "store")
    assert len(store) == 12 and store.has_text_tokens
    assert store.dims == {"audio": DIMS[0], "vision": DIMS[1], "text": DIMS[2]}
    assert json.loads((tmp_path / "s" / "synth.json").read_text())["config"]["seed"] == 3


def test_train_writes_a_run(run) -> None:
    out, stdout = run
    assert "best epoch" in stdout and "mean" in stdout and str(out) in stdout
    for e in EMI_EMOTIONS:
        assert e in stdout
    for name in (
        "config.yaml",
        "best.safetensors",
        "last.safetensors",
        "history.csv",
        "metrics.json",
        "valid_predictions.csv",
        "state.pt",
    ):
        assert (out / name).is_file(), name
    assert is_png(out / "plots" / "learning_curves.png")
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["finished"] is True
    from taemi.config import load_config

    cfg = load_config(out / "config.yaml")
    assert (cfg.model.hidden, cfg.model.audio_dim, cfg.train.max_epochs) == (16, DIMS[0], 2)


# a 2-epoch model may predict below 0 for every clip of an emotion: clipped, that column is
# constant and its Pearson r is reported as 0 with a warning
@pytest.mark.filterwarnings("ignore:Pearson r for .* is undefined:RuntimeWarning")
def test_evaluate(run, data, tmp_path) -> None:
    out, _ = run
    code, stdout = run_main(
        [
            "evaluate",
            "--run",
            str(out),
            "--store",
            str(data / "store"),
            "--labels",
            str(data / "valid.csv"),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "eval_valid.json").read_text())
    assert report["n"] == 16 and report["weights"] == "best" and report["clipped"] is False
    assert list(report["pearson"]) == list(EMI_EMOTIONS)
    # the best weights on the validation split reproduce the score training selected them by
    best = json.loads((out / "metrics.json").read_text())["valid"]
    assert report["mean_pearson"] == pytest.approx(best["mean_pearson"], abs=1e-9)
    # a table: one line per emotion, then the mean
    lines = stdout.splitlines()
    for e in EMI_EMOTIONS:
        assert any(line.startswith(e) for line in lines), e
    mean_line = next(line for line in lines if line.startswith("mean"))
    assert f"{report['mean_pearson']:.4f}" in mean_line
    assert "eval_valid.json" in stdout

    dst = tmp_path / "clipped.json"
    code, _ = run_main(
        [
            "evaluate",
            "--run",
            str(out),
            "--store",
            str(data / "store"),
            "--which",
            "last",
            "--labels",
            str(data / "train.csv"),
            "--clip",
            "--out",
            str(dst),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads(dst.read_text())
    assert report["clipped"] is True and report["n"] == 48 and report["weights"] == "last"


@pytest.fixture(scope="module")
def shifted_run(run, tmp_path_factory) -> Path:
    """A copy of the run whose output biases push Admiration above 1 and Amusement below 0."""
    src, _ = run
    dst = tmp_path_factory.mktemp("shifted") / "run"
    shutil.copytree(src, dst)
    w = load_file(str(dst / "best.safetensors"))
    w["pred_head.3.bias"][0] += 5.0
    w["pred_head.3.bias"][1] -= 5.0
    save_file(w, str(dst / "best.safetensors"))
    return dst


def test_predict_abaw_csv(shifted_run, data, tmp_path) -> None:
    store = FeatureStore(data / "store")
    common = ["--run", str(shifted_run), "--store", str(data / "store"), "--no-progress"]
    raw_csv, clipped_csv = tmp_path / "raw.csv", tmp_path / "clipped.csv"
    code, stdout = run_main(["predict", *common, "--out", str(raw_csv), "--no-clip"])
    assert code == 0 and "64 predictions" in stdout and "raw, not clipped" in stdout
    # a submission is clipped by default (docs/method.md section 8: clip only when writing a submission)
    code, stdout = run_main(["predict", *common, "--out", str(clipped_csv)])
    assert code == 0 and "clipped to [0, 1]" in stdout
    same_csv = tmp_path / "same.csv"  # --clip: the default, said explicitly
    assert run_main(["predict", *common, "--out", str(same_csv), "--clip"])[0] == 0
    assert same_csv.read_bytes() == clipped_csv.read_bytes()

    header, ids, raw = read_rows(raw_csv)
    assert header == ["Filename", *EMI_EMOTIONS]
    assert ids == sorted(store.ids) and len(ids) == 64  # every clip once, sorted
    assert ids[:2] == ["00000", "00001"]  # string ids keep their leading zeros
    assert (raw[:, 0] > 1).all() and (raw[:, 1] < 0).all()  # raw: not clipped
    header2, ids2, clipped = read_rows(clipped_csv)
    assert header2 == header and ids2 == ids
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0
    np.testing.assert_array_equal(clipped, np.clip(raw, 0.0, 1.0))
    assert (clipped[:, 0] == 1.0).all() and (clipped[:, 1] == 0.0).all()

    # --ids: only the listed clips, still sorted
    id_list = tmp_path / "ids.csv"
    id_list.write_text("Filename\n00042\n00007\n00010\n", encoding="utf-8")
    sub_csv = tmp_path / "sub.csv"
    assert (
        run_main(["predict", *common, "--ids", str(id_list), "--out", str(sub_csv), "--no-clip"])[0]
        == 0
    )
    _, sub_ids, sub = read_rows(sub_csv)
    assert sub_ids == ["00007", "00010", "00042"]
    # same clips, other batch padding: equal up to float rounding
    np.testing.assert_allclose(sub, raw[[ids.index(i) for i in sub_ids]], rtol=1e-5, atol=1e-6)


def test_store_info_and_verify(data, tmp_path, capsys) -> None:
    store = data / "store"
    assert main(["store", "info", str(store)]) == 0
    text = capsys.readouterr().out
    assert "64" in text and "audio 12" in text
    assert main(["store", "info", "--json", str(store)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_clips"] == 64 and info["dims"] == {"audio": 12, "vision": 10, "text": 8}

    assert main(["store", "verify", str(store), "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out

    broken = tmp_path / "store"
    shutil.copytree(store, broken)
    target = broken / "shards" / "00000" / "vision.bin"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    assert main(["store", "verify", str(broken), "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "vision.bin" in report and "sha256" in report


def test_presets(capsys) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    assert "(the paper model)" in lines[0]
    assert "concat" in next(line for line in lines if line.startswith("concat "))


# --------------------------------------------------------------------------- errors


def test_unknown_set_key_exits_2(data, tmp_path, capsys) -> None:
    code = main(train_args(data, tmp_path / "r", "--set", "model.hiddn=32"))
    assert code == 2
    err = capsys.readouterr().err
    assert "model.hiddn" in err and err.startswith("taemi: error:")
    assert not (tmp_path / "r").exists()


def test_wrong_type_exits_2(data, tmp_path, capsys) -> None:
    code = main(train_args(data, tmp_path / "r", "--set", "model.hidden=abc"))
    assert code == 2
    err = capsys.readouterr().err
    assert "model.hidden" in err and "abc" in err


def test_label_file_missing_column_exits_2(data, tmp_path, capsys) -> None:
    bad = tmp_path / "no_joy.csv"
    with open(data / "train.csv", newline="") as src, open(bad, "w", newline="") as dst:
        w = csv.writer(dst)
        for row in csv.reader(src):
            w.writerow(row[:-1])  # drop the last column (Joy)
    args = train_args(data, tmp_path / "r", *tiny_cli_sets())
    args[args.index("--train") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no_joy.csv" in err and "Joy" in err


def test_train_into_existing_run_exits_2(run, data, capsys) -> None:
    out, _ = run
    before = (out / "history.csv").read_bytes()
    assert main(train_args(data, out, *tiny_cli_sets(), "--set", "train.max_epochs=2")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "history.csv").read_bytes() == before


def test_resume_finished_run_does_nothing(run, data, capsys) -> None:
    out, _ = run
    files = ("history.csv", "best.safetensors", "last.safetensors", "state.pt")
    before = {f: (out / f).read_bytes() for f in files}
    assert main(train_args(data, out, "--resume")) == 0  # the run's own config
    assert "best epoch" in capsys.readouterr().out
    assert {f: (out / f).read_bytes() for f in files} == before
    # a different model is refused
    assert (
        main(train_args(data, out, "--resume", *tiny_cli_sets(), "--set", "model.hidden=32")) == 2
    )
    assert "cannot resume" in capsys.readouterr().err


def test_model_input_sizes_follow_the_store_unless_set(data, tmp_path, capsys) -> None:
    from conftest import TINY_OVERRIDES

    sets: list[str] = []
    for item in [*TINY_OVERRIDES, "train.max_epochs=1"]:
        if "_dim=" not in item:
            sets += ["--set", item]
    code, _ = run_main(train_args(data, tmp_path / "auto", *sets))
    assert code == 0
    cfg = load_config(tmp_path / "auto" / "config.yaml")
    assert (cfg.model.audio_dim, cfg.model.vision_dim, cfg.model.text_dim) == DIMS

    code = main(
        train_args(data, tmp_path / "insist", *sets, "--set", f"model.audio_dim={DIMS[0] + 1}")
    )
    assert code == 2
    assert f"--set model.audio_dim={DIMS[0]}" in capsys.readouterr().err


# --------------------------------------------------------------------------- train on all


def test_train_on_all_epochs_from_a_validated_run(run, data, tmp_path, capsys) -> None:
    """The final model: train + valid, as many epochs as the validated run's best epoch,
    with that run's config; no validation, best = last."""
    out, _ = run
    best_epoch = json.loads((out / "metrics.json").read_text())["best_epoch"]
    final = tmp_path / "final"
    code, stdout = run_main(train_args(data, final, "--train-on-all", "--epochs-from", str(out)))
    assert code == 0
    assert "trained on all 64 clips" in stdout and f"for {best_epoch} epoch" in stdout
    assert "best = last" in stdout and str(final) in stdout
    m = json.loads((final / "metrics.json").read_text())
    assert m["train_on_all"] is True and m["valid"] is None and m["fixed_epochs"] == best_epoch
    assert m["best_epoch"] == best_epoch == m["epochs_run"] and m["train_clips"] == 64
    cfg, validated = load_config(final / "config.yaml"), load_config(out / "config.yaml")
    assert cfg.model == validated.model and cfg.train.max_epochs == validated.train.max_epochs
    assert cfg.train.patience == 0
    assert json.loads((final / "features.json").read_text())["dims"] == {
        "audio": 12,
        "vision": 10,
        "text": 8,
    }
    assert (
        run_main(
            [
                "predict",
                "--run",
                str(final),
                "--store",
                str(data / "store"),
                "--out",
                str(tmp_path / "p.csv"),
                "--no-progress",
            ]
        )[0]
        == 0
    )

    # --epochs N, training clips only (no --valid)
    args = train_args(data, tmp_path / "n", *tiny_cli_sets(), "--train-on-all", "--epochs", "1")
    del args[args.index("--valid") : args.index("--valid") + 2]
    code, stdout = run_main(args)
    assert code == 0 and "trained on all 48 clips" in stdout and "for 1 epoch (--epochs)" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train-on-all"], "--epochs N or --epochs-from RUN"),
        (
            ["--train-on-all", "--epochs", "1", "--epochs-from", "x"],
            "--epochs N or --epochs-from RUN",
        ),
        (["--epochs", "2"], "go with --train-on-all"),
        (["--train-on-all", "--epochs-from", "nowhere"], "metrics.json does not exist"),
        (["--train-on-all", "--epochs", "9"], "between 1 and train.max_epochs=3"),
    ],
)
def test_train_on_all_errors(data, tmp_path, capsys, extra, message) -> None:
    assert main(train_args(data, tmp_path / "r", *tiny_cli_sets(), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_train_needs_valid_unless_train_on_all(data, tmp_path, capsys) -> None:
    args = train_args(data, tmp_path / "r", *tiny_cli_sets())
    del args[args.index("--valid") : args.index("--valid") + 2]
    assert main(args) == 2
    assert "--valid is required" in capsys.readouterr().err


def test_train_on_all_refuses_overlapping_splits(data, tmp_path, capsys) -> None:
    args = train_args(data, tmp_path / "r", *tiny_cli_sets(), "--train-on-all", "--epochs", "1")
    args[args.index("--valid") + 1] = str(data / "train.csv")
    assert main(args) == 2
    assert "48 ids are in both" in capsys.readouterr().err
