"""taemi cv: folds (balanced, seeded, grouped), out-of-fold predictions, per-fold and pooled
scores, resumption of finished and interrupted folds, the report of a CV folder."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import is_png, run_main, split_args, tiny_cli_sets

from taemi.data.labels import read_labels
from taemi.eval.metrics import compute_metrics
from taemi.experiments import cv as cvmod
from taemi.experiments.cv import make_folds, read_groups

K = 3


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch) -> None:
    """`taemi cv` would set one torch thread per core otherwise (as `taemi train` does)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _check_partition(ids: list[str], folds: list[list[str]], k: int) -> None:
    assert len(folds) == k
    flat = [i for f in folds for i in f]
    assert sorted(flat) == sorted(ids)  # every id exactly once: disjoint and covering
    for f in folds:  # each fold keeps the order of the ids given
        members = set(f)
        assert f == [i for i in ids if i in members]


# --------------------------------------------------------------------------- make_folds


@pytest.mark.parametrize("n, k", [(103, 5), (10, 3), (6, 6), (96, 3)])
def test_folds_are_a_balanced_partition(n: int, k: int) -> None:
    ids = [f"{i:05d}" for i in range(n)]
    folds = make_folds(ids, k, seed=0)
    _check_partition(ids, folds, k)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_folds_depend_on_the_seed_not_on_the_row_order() -> None:
    ids = [f"{i:05d}" for i in range(50)]
    a = make_folds(ids, 5, seed=7)
    assert make_folds(ids, 5, seed=7) == a
    shuffled = list(reversed(ids))
    assert [sorted(f) for f in make_folds(shuffled, 5, seed=7)] == [sorted(f) for f in a]
    b = make_folds(ids, 5, seed=8)
    assert [set(f) for f in b] != [set(f) for f in a]


def _groups(n_groups: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Ids and their groups, groups of 1 to 9 clips."""
    rng = np.random.default_rng(seed)
    ids, groups = [], []
    for g in range(n_groups):
        for _ in range(int(rng.integers(1, 10))):
            ids.append(f"{len(ids):05d}")
            groups.append(f"speaker{g:02d}")
    return ids, groups


def test_grouped_folds_keep_groups_whole_and_balanced() -> None:
    ids, groups = _groups(20)
    group_of = dict(zip(ids, groups))
    folds = make_folds(ids, 4, seed=0, groups=groups)
    _check_partition(ids, folds, 4)
    fold_of_group: dict[str, set[int]] = {}
    for j, f in enumerate(folds):
        for i in f:
            fold_of_group.setdefault(group_of[i], set()).add(j)
    assert all(len(s) == 1 for s in fold_of_group.values())  # no group in two folds
    sizes = [len(f) for f in folds]
    largest = max(groups.count(g) for g in set(groups))
    assert max(sizes) - min(sizes) <= largest  # the greedy (LPT) bound
    assert make_folds(ids, 4, seed=0, groups=groups) == folds
    assert [set(f) for f in make_folds(ids, 4, seed=1, groups=groups)] != [set(f) for f in folds]


def test_grouped_folds_are_as_equal_as_the_groups_allow() -> None:
    sizes = [3, 3, 2, 2, 1, 1]  # 12 clips: 4 + 4 + 4 is reachable
    ids, groups = [], []
    for g, size in enumerate(sizes):
        for _ in range(size):
            ids.append(f"{len(ids):05d}")
            groups.append(f"g{g}")
    for seed in range(5):
        assert sorted(len(f) for f in make_folds(ids, 3, seed, groups)) == [4, 4, 4]
    # one group per clip gives the ungrouped sizes
    folds = make_folds(ids, 5, 0, groups=ids)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_too_few_groups_or_clips_are_refused() -> None:
    ids = [f"{i:05d}" for i in range(12)]
    with pytest.raises(ValueError, match=r"3 groups \(12 clips\) cannot fill 5 folds"):
        make_folds(ids, 5, 0, groups=[f"g{i % 3}" for i in range(12)])
    with pytest.raises(ValueError, match="12 clips cannot fill 13 folds"):
        make_folds(ids, 13, 0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        make_folds(ids, 1, 0)
    with pytest.raises(ValueError, match="repeated"):
        make_folds([*ids, ids[0]], 3, 0)


# --------------------------------------------------------------------------- groups


def _with_column(src: Path, dst: Path, column: str, value) -> None:
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    rows[0].append(column)
    for r in rows[1:]:
        r.append(value(r[0]))
    with open(dst, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def test_groups_from_a_label_column_or_a_file(synth, tmp_path) -> None:
    tr, va = tmp_path / "train.csv", tmp_path / "valid.csv"

    def speaker(clip_id: str) -> str:
        return f"spk{int(clip_id) % 7}"

    _with_column(synth.train_csv, tr, "speaker", speaker)
    _with_column(synth.valid_csv, va, "speaker", speaker)
    labels = read_labels(tr)  # the label reader ignores the extra column
    assert labels.values.shape[1] == 6
    ids = labels.ids + read_labels(va).ids
    assert read_groups("speaker", [tr, va], ids) == [speaker(i) for i in ids]
    with pytest.raises(ValueError, match="has no column 'actor'.*names a column"):
        read_groups("actor", [tr, va], ids)

    table = tmp_path / "groups.csv"
    table.write_text("Filename,group\n" + "".join(f"{i},{speaker(i)}\n" for i in ids))
    assert read_groups(str(table), [synth.train_csv, synth.valid_csv], ids) == [
        speaker(i) for i in ids
    ]
    table.write_text("Filename,group\n" + "".join(f"{i},{speaker(i)}\n" for i in ids[1:]))
    with pytest.raises(ValueError, match=f"1 of {len(ids)} clip\\(s\\) have no group"):
        read_groups(str(table), [], ids)
    table.write_text(f"Filename,group\n{ids[0]}, \n")
    with pytest.raises(ValueError, match="empty 'group'"):
        read_groups(str(table), [], ids)


def test_cli_refuses_too_few_groups_before_training(synth, tmp_path, capsys) -> None:
    ids = read_labels(synth.train_csv).ids + read_labels(synth.valid_csv).ids
    table = tmp_path / "groups.csv"
    table.write_text("Filename,group\n" + "".join(f"{i},g{int(i) % 2}\n" for i in ids))
    code, _ = run_main(_argv(synth, tmp_path / "cv", "--group-by", str(table)))
    assert code == 2
    assert "2 groups (96 clips) cannot fill 3 folds" in capsys.readouterr().err
    assert not (tmp_path / "cv" / "fold_0").exists()


# --------------------------------------------------------------------------- the command


def _argv(synth, out: Path, *extra: str) -> list[str]:
    return [
        "cv",
        *split_args(synth, out),
        "--folds",
        str(K),
        "--no-progress",
        *tiny_cli_sets(),
        "--set",
        "train.max_epochs=2",
        *extra,
    ]


def _group(clip_id: str) -> str:
    return f"spk{int(clip_id) % 11}"


@pytest.fixture(scope="module")
def cv_run(synth, tmp_path_factory):
    """A 3-fold grouped CV of the tiny model, 2 epochs, folds trained 2 at a time."""
    tmp = tmp_path_factory.mktemp("cv")
    ids = read_labels(synth.train_csv).ids + read_labels(synth.valid_csv).ids
    table = tmp / "groups.csv"
    table.write_text("Filename,group\n" + "".join(f"{i},{_group(i)}\n" for i in ids))
    out = tmp / "exp" / "cv"
    # lr 0.03: some folds select epoch 1 of 2, so best and last weights differ
    argv = _argv(synth, out, "--group-by", str(table), "--set", "train.lr=0.03", "--jobs", "2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # also each worker's threads
        code, stdout = run_main(argv)
    assert code == 0
    return out, argv, stdout


def _pooled(synth):
    tr, va = read_labels(synth.train_csv), read_labels(synth.valid_csv)
    return {**dict(zip(tr.ids, tr.values)), **dict(zip(va.ids, va.values))}


@pytest.mark.slow
def test_cv_writes_folds_oof_predictions_and_scores(cv_run, synth) -> None:
    out, _, stdout = cv_run
    assert "pooled" in stdout and "fold mean" in stdout
    target = _pooled(synth)

    with open(out / "folds.csv", newline="", encoding="utf-8") as fh:
        folds = list(csv.DictReader(fh))
    assert sorted(r["Filename"] for r in folds) == sorted(target)
    assert all(r["group"] == _group(r["Filename"]) for r in folds)
    fold_of_group: dict[str, set[str]] = {}
    for r in folds:
        fold_of_group.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(s) == 1 for s in fold_of_group.values())

    oof = read_labels(out / "oof_predictions.csv", emotions=None, value_range=None)
    assert sorted(oof.ids) == sorted(target) and len(oof.ids) == len(set(oof.ids)) == 96
    record = json.loads((out / "cv.json").read_text())
    emotions = record["emotions"]
    assert list(oof.emotions) == emotions
    t = np.stack([target[i] for i in oof.ids])
    pooled = compute_metrics(oof.values, t, emotions).to_dict()
    assert record["pooled"]["mean_pearson"] == pytest.approx(pooled["mean_pearson"], abs=1e-12)
    assert record["pooled"]["pearson"] == pytest.approx(pooled["pearson"], abs=1e-12)
    assert record["pooled"]["ccc"] == pytest.approx(pooled["ccc"], abs=1e-12)

    # the check below tells the best weights from the last only where they differ
    assert any(f["best_epoch"] < f["epochs_run"] for f in record["per_fold"])
    fold_col = {r["Filename"]: int(r["fold"]) for r in folds}
    row = oof.index()
    for f in record["per_fold"]:
        j = f["fold"]
        run = out / f"fold_{j}"
        for name in ("config.yaml", "best.safetensors", "history.csv", "valid_predictions.csv"):
            assert (run / name).is_file(), (run, name)
        assert is_png(run / "plots" / "learning_curves.png")
        m = json.loads((run / "metrics.json").read_text())
        assert m["finished"] and m["epochs_run"] == 2
        # the OOF rows of fold j are its best weights' predictions on its validation clips
        mine = [i for i in oof.ids if fold_col[i] == j]
        assert f["valid_clips"] == len(mine) and f["train_clips"] == 96 - len(mine)
        assert f["valid"]["mean_pearson"] == pytest.approx(m["valid"]["mean_pearson"], abs=1e-5)
        vp = read_labels(run / "valid_predictions.csv", emotions=emotions, value_range=None)
        assert sorted(vp.ids) == sorted(mine)
        np.testing.assert_allclose(
            oof.values[[row[i] for i in vp.ids]], vp.values, rtol=0, atol=1e-5
        )
    for key, stat in (("fold_mean", statistics.fmean), ("fold_std", statistics.stdev)):
        vals = [f["valid"]["mean_pearson"] for f in record["per_fold"]]
        assert record[key]["mean_pearson"] == pytest.approx(stat(vals))

    with open(out / "cv.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [r["fold"] for r in table] == ["0", "1", "2", "mean", "std", "pooled"]
    assert float(table[-1]["mean_pearson"]) == pytest.approx(pooled["mean_pearson"])
    assert is_png(out / "cv.png")
    assert (out / "config.yaml").is_file() and (out / "pooled_labels.csv").is_file()
    assert record["groups"] == 11 and record["folds"] == K


@pytest.mark.slow
def test_rerun_reuses_finished_folds_and_refuses_other_settings(
    cv_run, monkeypatch, caplog, capsys
) -> None:
    out, argv, _ = cv_run
    weights = sorted(out.glob("fold_*/*.safetensors"))
    assert len(weights) == 2 * K
    before = {p: p.stat().st_mtime_ns for p in weights}
    pooled = json.loads((out / "cv.json").read_text())["pooled"]

    def no_training(job):
        raise AssertionError(f"retrained {job['run']}")

    monkeypatch.setattr(cvmod, "_train_fold", no_training)
    caplog.set_level(logging.INFO, logger="taemi")
    code, _ = run_main([*argv[:-2], "--jobs", "1"])  # the same command (--jobs 2 -> 1)
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    assert caplog.text.count("finished earlier") == K
    again = json.loads((out / "cv.json").read_text())["pooled"]
    assert again["mean_pearson"] == pytest.approx(pooled["mean_pearson"], abs=1e-9)
    assert again["pearson"] == pytest.approx(pooled["pearson"], abs=1e-9)

    capsys.readouterr()
    assert run_main([*argv, "--seed", "1"])[0] == 2  # other folds
    assert "folds.csv assigns the clips to folds differently" in capsys.readouterr().err
    assert run_main([*argv, "--set", "train.lr=0.01"])[0] == 2  # another config
    err = capsys.readouterr().err
    assert "config.yaml holds the config of an earlier cross-validation" in err
    assert "train.lr" in err


@pytest.mark.slow
def test_report_shows_a_cv_folder(cv_run, tmp_path) -> None:
    from taemi.experiments.report import build_report

    out, _, _ = cv_run
    html = build_report([out], tmp_path / "r.html", tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    for text in (html, md):
        assert "cv.csv" in text and "fold_0" in text and "pooled" in text
        assert "3-fold cross-validation over 96 clips" in text
    assert "oof_predictions.csv" not in md  # per-clip tables are left out
    parent = build_report([out.parent])  # a folder holding the CV folder: its folds are runs
    assert "cv/fold_2" in parent


@pytest.mark.slow
def test_an_interrupted_fold_is_resumed(synth, tmp_path, monkeypatch, caplog) -> None:
    from taemi.train import trainer

    out = tmp_path / "cv"
    overrides = [tuple(s.split("=", 1)) for s in tiny_cli_sets()[1::2]]
    overrides.append(("train.max_epochs", "2"))
    kw = {"folds": K, "seed": 3, "overrides": overrides, "progress": False}
    real_train = trainer.train

    def interrupted(*args, **kwargs):
        def stop(epoch: int, row: dict) -> None:
            if Path(args[4]).name == "fold_1" and epoch == 1:
                raise KeyboardInterrupt  # Ctrl-C after fold 1's first epoch was saved

        return real_train(*args, callbacks=[stop], **kwargs)

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cvmod.run_cv(synth.store, synth.train_csv, synth.valid_csv, out, **kw)
    assert json.loads((out / "fold_0" / "metrics.json").read_text())["finished"]
    m1 = json.loads((out / "fold_1" / "metrics.json").read_text())
    assert not m1["finished"] and m1["epochs_run"] == 1
    assert not (out / "fold_2").exists() and not (out / "cv.json").exists()
    fold0 = (out / "fold_0" / "best.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(trainer, "train", real_train)
    caplog.set_level(logging.INFO, logger="taemi")
    record = cvmod.run_cv(synth.store, synth.train_csv, synth.valid_csv, out, **kw)
    assert "fold 1: resuming the interrupted run" in caplog.text
    assert "fold 0: finished earlier" in caplog.text
    assert "are the training labels" not in caplog.text  # each fold's splits are told apart
    assert (out / "fold_0" / "best.safetensors").stat().st_mtime_ns == fold0
    history = (out / "fold_1" / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in history[1:]] == ["1", "2"]  # epoch 2 continued epoch 1
    for j in range(K):
        assert json.loads((out / f"fold_{j}" / "metrics.json").read_text())["finished"]
    assert len(read_labels(out / "oof_predictions.csv", value_range=None).ids) == 96
    assert record["clips"] == 96 and len(record["per_fold"]) == K
