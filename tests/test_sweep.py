"""taemi sweep: the space file, a few trials on the synthetic store, the outputs and the
report, resumption of an interrupted sweep (same study, no finished trial retrained),
pruning of a bad curve, refusals, parallel processes."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from conftest import is_png, run_main, split_args, tiny_cli_sets

from taemi.config import ConfigError, flat_dict, load_config
from taemi.experiments.sweep import read_space

optuna = pytest.importorskip("optuna", reason="taemi sweep needs the [sweep] extra")

SPACE = """\
train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
model.hidden: {choices: [8, 16]}
"""


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch) -> None:
    """`taemi sweep` would set one torch thread per core otherwise (as `taemi train` does)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _argv(synth, out: Path, space: Path, trials: int, *extra: str) -> list[str]:
    return [
        "sweep",
        *split_args(synth, out),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--no-progress",
        *tiny_cli_sets(),
        "--set",
        "train.max_epochs=2",
        *extra,
    ]


def _rows(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- the space


def test_space_entries_are_typed_by_the_config_field(tmp_path, tiny_config) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(
        "train.lr: {low: 1e-5, high: 1.0e-3, log: true}\n"  # YAML 1.1 reads 1e-5 as a string
        "train.batch_size: {low: 16, high: 64, step: 16}\n"
        "model.head_dropout: {low: 0, high: 0.5}\n"  # a float field
        "model.hidden: {choices: [8, 16]}\n"
    )
    lr, batch, dropout, hidden = read_space(space, tiny_config())
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-5, 1e-3, True, False)
    assert (batch.low, batch.high, batch.step, batch.integer) == (16, 64, 16, True)
    assert dropout.integer is False and isinstance(dropout.low, float)
    assert hidden.choices == (8, 16)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("model.hiden: {choices: [8, 16]}", "entry 'model.hiden'.*unknown config key"),
        ("train.lr: {low: 1.0e-2, high: 1.0e-4}", "entry 'train.lr'.*must be below high"),
        ("train.weight_decay: {low: 0.0, high: 0.1, log: true}", "log range must stay above 0"),
        ("train.lr: {lo: 1.0e-4, high: 1.0e-2}", r"entry 'train.lr'.*unknown field\(s\) lo"),
        ("train.batch_size: {low: 8.5, high: 64}", "integer setting; low 8.5 is not"),
        ("train.batch_size: {low: 16, high: 64, step: 10}", "does not divide"),
        ("model.head_dropout: {low: 0.0, high: 1.5}", r"high 1.5.*model.head_dropout"),
        ("model.fusion: {low: 1, high: 2}", "not a number; use choices"),
        ("model.fusion: {choices: [concat, sum]}", "choice 'sum'"),
        ("train.lr: 1.0e-3", "expected a mapping"),
    ],
)
def test_a_bad_space_entry_is_named(tmp_path, tiny_config, entry: str, message: str) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(entry + "\n")
    with pytest.raises(ConfigError, match=message) as e:
        read_space(space, tiny_config())
    assert str(space) in str(e.value)


# --------------------------------------------------------------------------- a sweep


@pytest.fixture(scope="module")
def sweep_run(synth, tmp_path_factory):
    """3 trials of a float log range and a choice, 2 epochs each, through the CLI."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    out = tmp / "sweep"
    argv = _argv(synth, out, space, 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        code, stdout = run_main(argv)
    assert code == 0
    return out, argv, stdout


def test_sweep_writes_trials_best_config_and_plots(sweep_run) -> None:
    out, _, stdout = sweep_run
    assert "3 of 3 trials finished" in stdout and "best trial" in stdout
    rows = _rows(out)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert {"value", "train.lr", "model.hidden", "best_epoch", "epochs_run", "run"} <= set(rows[0])
    assert {r["run"] for r in rows} == {f"trials/trial_{k}" for k in range(3)}

    record = json.loads((out / "sweep.json").read_text())
    best = max(rows, key=lambda r: float(r["value"]))
    assert record["best"]["number"] == int(best["number"])
    assert record["counts"] == {"COMPLETE": 3} and record["finished"] == 3
    run = out / best["run"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["finished"] and record["best"]["value"] == pytest.approx(m["valid"]["mean_pearson"])
    # best_config.yaml is the config the best run trained with; the trainer resolves its
    # automatic settings (auto / 0) per device
    best_cfg = load_config(out / "best_config.yaml")
    assert best_cfg.train.lr == pytest.approx(float(best["train.lr"]))
    assert best_cfg.model.hidden == int(best["model.hidden"])
    mine, ran = flat_dict(best_cfg.to_dict()), flat_dict(load_config(run / "config.yaml").to_dict())
    assert mine.keys() == ran.keys()
    assert all(mine[k] in ("auto", 0) for k in mine if mine[k] != ran[k])
    for name in ("objective.png", "importance.png", "parallel.png"):
        assert is_png(out / name), name
    assert (out / "study.db").is_file() and (out / "base_config.yaml").is_file()


def test_report_shows_a_sweep_folder(sweep_run, tmp_path) -> None:
    out, _, _ = sweep_run
    code, _ = run_main(["report", str(out), "--out", str(tmp_path / "r.html")])
    assert code == 0
    html = (tmp_path / "r.html").read_text()
    for text in ("trials.csv (best first)", "best trial", "best_config.yaml vs base_config.yaml"):
        assert text in html
    assert html.count("data:image/png;base64") == 3
    assert "train.lr" in html


def test_a_rerun_with_another_space_or_config_is_refused(sweep_run, tmp_path, capsys) -> None:
    out, argv, _ = sweep_run
    other = tmp_path / "other.yaml"
    other.write_text(
        "train.lr: {low: 1.0e-4, high: 1.0e-1, log: true}\nmodel.hidden: {choices: [8, 16]}\n"
    )
    i = argv.index("--space")
    capsys.readouterr()
    assert run_main([*argv[: i + 1], str(other), *argv[i + 2 :]])[0] == 2
    err = capsys.readouterr().err
    assert "space.yaml holds the space of an earlier sweep" in err and "train.lr.high" in err
    assert run_main([*argv, "--set", "model.head_dropout=0.3"])[0] == 2
    err = capsys.readouterr().err
    assert "base_config.yaml holds the base config" in err and "model.head_dropout" in err
    assert len(_rows(out)) == 3  # nothing was trained


def test_cli_refuses_a_bad_space_before_training(synth, tmp_path, capsys) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("model.hiden: {choices: [8, 16]}\n")
    code, _ = run_main(_argv(synth, tmp_path / "sweep", space, 2))
    assert code == 2
    err = capsys.readouterr().err
    assert f"--space {space}, entry 'model.hiden'" in err and "unknown config key" in err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", ["sweep", "cv"])
def test_out_must_be_a_folder_of_its_own(synth, tmp_path, capsys, command: str) -> None:
    """cv and sweep keep many runs in --out: a file or a training run's folder is refused."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    a_run = tmp_path / "run"
    a_run.mkdir()
    (a_run / "metrics.json").write_text("{}")
    for out, message in ((a_file, "is a file"), (a_run, "is a training run folder")):
        argv = _argv(synth, out, space, 1)
        if command == "cv":
            argv = ["cv", *split_args(synth, out), "--folds", "2", "--no-progress"]
        code, _ = run_main(argv)
        assert code == 2
        assert f"--out {out} {message}" in capsys.readouterr().err


# --------------------------------------------------------------------------- resumption


def test_an_interrupted_sweep_resumes_the_same_study(synth, tmp_path, monkeypatch, caplog) -> None:
    from taemi.train import trainer

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    argv = _argv(synth, out, space, 3)
    real_train = trainer.train
    calls: list[tuple[str, bool]] = []

    def interrupted(*args, **kwargs):
        calls.append((Path(args[4]).name, kwargs["resume"]))

        def stop(epoch: int, row: dict) -> None:
            if Path(args[4]).name == "trial_1" and epoch == 1:
                raise KeyboardInterrupt  # Ctrl-C after trial 1's first epoch was saved

        return real_train(*args, **{**kwargs, "callbacks": [*kwargs["callbacks"], stop]})

    monkeypatch.setattr(trainer, "train", interrupted)
    assert run_main(argv)[0] == 130
    assert calls == [("trial_0", False), ("trial_1", False)]
    db = out / "study.db"
    study = optuna.load_study(study_name="taemi-sweep", storage=f"sqlite:///{db}")
    study_id = study._study_id
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["error"] == "interrupted"
    m1 = json.loads((out / "trials/trial_1/metrics.json").read_text())
    assert not m1["finished"] and m1["epochs_run"] == 1
    trial0 = {p: p.stat().st_mtime_ns for p in (out / "trials/trial_0").rglob("*") if p.is_file()}

    calls.clear()
    monkeypatch.setattr(
        trainer,
        "train",
        lambda *a, **kw: calls.append((Path(a[4]).name, kw["resume"])) or real_train(*a, **kw),
    )
    caplog.set_level(logging.INFO, logger="taemi")
    code, stdout = run_main(argv)  # the same command
    assert code == 0
    assert calls == [("trial_1", True), ("trial_3", False)]  # trial 2 retries trial 1's run
    assert "trial 1 did not finish (interrupted)" in caplog.text
    assert "resuming the interrupted run" in caplog.text
    study = optuna.load_study(study_name="taemi-sweep", storage=f"sqlite:///{db}")
    assert study._study_id == study_id
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params == study.trials[1].params
    assert study.trials[2].user_attrs["retry_of"] == 1
    assert {p: p.stat().st_mtime_ns for p in trial0} == trial0  # trial 0 was not retrained
    history = (out / "trials/trial_1/history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in history[1:]] == ["1", "2"]  # epoch 2 continued epoch 1
    rows = _rows(out)
    assert [(r["state"], r["retry_of"], r["run"]) for r in rows] == [
        ("COMPLETE", "", "trials/trial_0"),
        ("FAIL", "", "trials/trial_1"),
        ("COMPLETE", "1", "trials/trial_1"),
        ("COMPLETE", "", "trials/trial_3"),
    ]
    assert "3 of 3 trials finished" in stdout

    calls.clear()
    assert run_main(argv)[0] == 0  # a finished sweep trains nothing, rewrites its outputs
    assert calls == []


# --------------------------------------------------------------------------- pruning


def test_a_bad_curve_is_pruned(synth, tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {choices: [1.0e-9, 3.0e-3]}\n")
    out = tmp_path / "sweep"
    out.mkdir()
    study = optuna.create_study(
        storage=f"sqlite:///{out / 'study.db'}", study_name="taemi-sweep", direction="maximize"
    )
    for lr in (3e-3, 3e-3, 1e-9):  # two good curves, then one that cannot learn
        study.enqueue_trial({"train.lr": lr})
    argv = _argv(synth, out, space, 3, "--prune-startup", "2", "--prune-warmup", "0")
    argv[argv.index("train.max_epochs=2")] = "train.max_epochs=3"
    code, stdout = run_main(argv)
    assert code == 0
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert float(rows[2]["train.lr"]) == 1e-9 and "below the median" in rows[2]["note"]
    m = json.loads((out / "trials/trial_2/metrics.json").read_text())
    assert m["epochs_run"] == int(rows[2]["epochs_run"]) == 1  # of 3: stopped after epoch 1
    assert not m["finished"]
    record = json.loads((out / "sweep.json").read_text())
    assert record["counts"] == {"COMPLETE": 2, "PRUNED": 1}
    assert "1 pruned" in stdout
    assert is_png(out / "objective.png")


# --------------------------------------------------------------------------- parallel


def test_the_cv_objective_scores_each_trial_by_its_cross_validation(synth, tmp_path) -> None:
    """--objective cv: each trial is a `taemi cv` folder whose folds train exactly the
    trial's config, and its value is the pooled out-of-fold mean Pearson of cv.json."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    code, _ = run_main(_argv(synth, out, space, 2, "--objective", "cv", "--folds", "2"))
    assert code == 0
    rows = _rows(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for r in rows:
        folder = out / r["run"]
        cv = json.loads((folder / "cv.json").read_text())
        assert float(r["value"]) == pytest.approx(cv["pooled"]["mean_pearson"], abs=1e-12)
        for fold in (0, 1):
            cfg = load_config(folder / f"fold_{fold}" / "config.yaml")
            assert cfg.train.lr == pytest.approx(float(r["train.lr"]))
            assert cfg.model.hidden == int(r["model.hidden"])
    record = json.loads((out / "sweep.json").read_text())
    assert record["objective"]["kind"] == "cv" and record["objective"]["folds"] == 2


@pytest.mark.slow
def test_two_processes_share_the_study(synth, tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    code, _ = run_main(_argv(synth, out, space, 2, "--jobs", "2"))
    assert code == 0
    rows = _rows(out)
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)
    assert {r["run"] for r in rows} == {"trials/trial_0", "trials/trial_1"}
    for r in rows:
        assert json.loads((out / r["run"] / "metrics.json").read_text())["finished"]
