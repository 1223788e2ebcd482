"""The training recipe (docs/method.md section 6) on tiny synthetic stores: outputs, learning,
early stopping, exact resume, clipping, precision, config checks, determinism."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import is_png, small_synth_config
from safetensors.torch import load_file

from taemi import EMI_EMOTIONS
from taemi import run as run_folder
from taemi.config import ConfigError, build_config, load_config
from taemi.data.labels import Labels, read_labels
from taemi.eval.metrics import compute_metrics
from taemi.run import LOCK_FILE, STATE_FILE, RunFolderError, RunFolderLock
from taemi.synth.features import make_synth
from taemi.train import modes, trainer
from taemi.train import step as step_engine
from taemi.train.trainer import TrainingError, TrainResult, train

HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "lr",
    "valid_loss",
    "valid_mean_pearson",
    *(f"pearson_{e}" for e in EMI_EMOTIONS),
    "seconds",
]


def read_history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def numeric_history(run: Path) -> list[dict[str, float]]:
    """history.csv without the wall-clock column, as floats."""
    return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in read_history(run)]


def read_csv_values(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [r[0] for r in rows[1:]], np.array([r[1:] for r in rows[1:]], dtype=np.float64)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, store, labels, tiny_config) -> tuple[TrainResult, object]:
    cfg = tiny_config("train.max_epochs=3", "train.patience=0")
    res = train(cfg, store, *labels, tmp_path_factory.mktemp("short") / "run", progress=False)
    return res, cfg


def test_run_folder_outputs(short_run, labels) -> None:
    res, cfg = short_run
    run = res.run_dir
    for name in (
        "config.yaml",
        "history.csv",
        "metrics.json",
        "best.safetensors",
        "last.safetensors",
        STATE_FILE,
        "valid_predictions.csv",
    ):
        assert (run / name).is_file(), name
    assert is_png(run / "plots" / "learning_curves.png")
    assert is_png(run / "plots" / "per_emotion_pearson.png")
    assert not list(run.rglob("*.tmp"))  # atomic writes leave nothing behind

    # the fully resolved config: text_tokens "auto" became "no" (the store has none), the
    # length quantum "0" (auto) 1 on the CPU
    saved = load_config(run / "config.yaml")
    assert saved == dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, text_tokens="no", length_quantum=1)
    )

    rows = read_history(run)
    assert list(rows[0]) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(float(v)) for v in r.values())
    assert [float(r["valid_mean_pearson"]) for r in rows] == [
        h["valid_mean_pearson"] for h in res.history
    ]

    m = json.loads((run / "metrics.json").read_text())
    assert isinstance(m["best_epoch"], int) and 1 <= m["best_epoch"] <= 3
    assert m["best_epoch"] == res.best_epoch
    best_row = rows[m["best_epoch"] - 1]
    assert float(best_row["valid_mean_pearson"]) == max(
        float(r["valid_mean_pearson"]) for r in rows
    )
    v = m["valid"]
    assert {"mean_pearson", "pearson", "ccc", "mse", "n"} <= set(v)
    assert list(v["pearson"]) == list(EMI_EMOTIONS) and list(v["ccc"]) == list(EMI_EMOTIONS)
    assert v["n"] == len(labels[1])
    assert v["mean_pearson"] == pytest.approx(float(best_row["valid_mean_pearson"]), abs=1e-12)
    for e in EMI_EMOTIONS:
        assert v["pearson"][e] == pytest.approx(float(best_row[f"pearson_{e}"]), abs=1e-12)
    assert m["epochs_run"] == 3 and m["stopped_early"] is False and m["finished"] is True


def test_valid_predictions_are_those_of_the_best_weights(short_run, store, labels) -> None:
    """valid_predictions.csv = the best weights' raw predictions; rescoring them gives
    metrics.json's valid block."""
    from taemi.eval.predict import predict_dataset
    from taemi.inference import load_run

    res, _ = short_run
    header, ids, values = read_csv_values(res.run_dir / "valid_predictions.csv")
    assert header == ["Filename", *EMI_EMOTIONS]
    assert ids == sorted(labels[1].ids)
    model, cfg = load_run(res.run_dir, "best")
    ds = modes.make_dataset(cfg, store, labels[1])
    pred, _ = predict_dataset(model, ds)
    order = [labels[1].ids.index(i) for i in ids]
    np.testing.assert_array_equal(values.astype(np.float32), pred[order])  # float32, exactly
    m = json.loads((res.run_dir / "metrics.json").read_text())["valid"]
    rescored = compute_metrics(values.astype(np.float32), labels[1].values[order], EMI_EMOTIONS)
    assert rescored.mean_pearson == pytest.approx(m["mean_pearson"], abs=1e-12)
    assert rescored.mse == pytest.approx(m["mse"], rel=1e-6)


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """320 clips (80 valid): enough for a stable validation score."""
    res = make_synth(
        tmp_path_factory.mktemp("learn"), small_synth_config(clips=320, seed=3), progress=False
    )
    return res, read_labels(res.train_csv), read_labels(res.valid_csv)


def test_training_learns(tmp_path, learnable, tiny_config) -> None:
    """Checked while writing this test: over 5 data seeds x 3 training seeds, the best
    valid mean Pearson of this setting was 0.29-0.46 (first epoch -0.04-0.26)."""
    synth, train_labels, valid_labels = learnable
    cfg = tiny_config("train.max_epochs=6", "train.lr=1e-2", "train.patience=0")
    res = train(cfg, synth.store, train_labels, valid_labels, tmp_path / "run", progress=False)
    scores = [h["valid_mean_pearson"] for h in res.history]
    assert res.best.mean_pearson > 0.15, scores
    assert res.best.mean_pearson > scores[0] + 0.05, scores
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[-1]["valid_loss"] < res.history[0]["valid_loss"]
    assert synth.oracle["mean_pearson"] > res.best.mean_pearson  # the ceiling is a ceiling


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_on_a_flat_score(tmp_path, store, labels, tiny_config) -> None:
    """lr 1e-12 leaves the float32 weights unchanged, so the score repeats exactly; an
    equal score is no improvement (the rule is strictly greater)."""
    cfg = tiny_config("train.lr=1e-12", "train.patience=1", "train.max_epochs=5")
    res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    scores = [h["valid_mean_pearson"] for h in res.history]
    assert len(scores) == 2 and scores[0] == scores[1]
    assert res.stopped_early and res.best_epoch == 1
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["best_epoch"] == 1 and m["stopped_early"] is True and m["epochs_run"] == 2


@pytest.fixture
def scripted_scores(monkeypatch):
    """Make the trainer see the given validation mean Pearson sequence (one per epoch)."""

    def install(scores: list[float]) -> None:
        it = iter(scores)
        real = trainer.compute_metrics

        def fake(*args, **kw):
            return dataclasses.replace(real(*args, **kw), mean_pearson=next(it))

        monkeypatch.setattr(trainer, "compute_metrics", fake)

    return install


@pytest.mark.parametrize(
    ("patience", "scores", "epochs_run", "best_epoch", "stopped"),
    [
        (2, [0.1, 0.3, 0.3, 0.2, 0.9, 0.9], 4, 2, True),  # equal, then worse: stop after 2 + 2
        (2, [0.1, 0.3, 0.2, 0.4, 0.35, 0.3], 6, 4, True),  # an improvement resets the count
        (2, [0.1, 0.3, 0.2, 0.4, 0.5, 0.3], 6, 5, False),  # never 2 bad epochs in a row
        (0, [0.5, 0.4, 0.3, 0.2, 0.1, 0.0], 6, 1, False),  # patience 0: no early stopping
    ],
)
def test_early_stopping_rule(
    tmp_path,
    store,
    labels,
    tiny_config,
    scripted_scores,
    patience,
    scores,
    epochs_run,
    best_epoch,
    stopped,
) -> None:
    scripted_scores(scores)
    cfg = tiny_config(f"train.patience={patience}", "train.max_epochs=6")
    run = tmp_path / "run"
    res = train(cfg, store, *labels, run, progress=False)
    assert len(res.history) == epochs_run
    assert res.best_epoch == best_epoch and res.stopped_early is stopped
    assert res.best.mean_pearson == scores[best_epoch - 1]
    m = json.loads((run / "metrics.json").read_text())
    assert (m["best_epoch"], m["stopped_early"], m["epochs_run"]) == (
        best_epoch,
        stopped,
        epochs_run,
    )


def test_patience_zero_runs_every_epoch_on_a_flat_score(tmp_path, store, labels, tiny_config):
    cfg = tiny_config("train.lr=1e-12", "train.patience=0", "train.max_epochs=3")
    res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert len(res.history) == 3 and not res.stopped_early and res.best_epoch == 1


# --------------------------------------------------------------------------- resume


class Interrupt:
    """Callback raising KeyboardInterrupt once ``after`` epochs have finished."""

    def __init__(self, after: int):
        self.after = after

    def __call__(self, epoch: int, row: dict) -> None:
        if epoch == self.after:
            raise KeyboardInterrupt


def test_resume_reproduces_an_uninterrupted_run(tmp_path, store, labels, tiny_config) -> None:
    cfg = tiny_config("train.max_epochs=4", "train.patience=0")
    assert cfg.model.modality_dropout == 0.1  # random per step: the RNG state must be restored
    a, b = tmp_path / "a", tmp_path / "b"
    res_a = train(cfg, store, *labels, a, progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, *labels, b, progress=False, callbacks=[Interrupt(after=2)])
    assert len(read_history(b)) == 2
    assert json.loads((b / "metrics.json").read_text())["finished"] is False
    torch.manual_seed(12345)  # the global RNG is disturbed in between; resume must not care
    torch.rand(100)
    res_b = train(cfg, store, *labels, b, resume=True, progress=False)

    assert numeric_history(a) == numeric_history(b)
    assert len(res_b.history) == 4 and [r["epoch"] for r in res_b.history] == [1, 2, 3, 4]
    assert_same_weights(a / "best.safetensors", b / "best.safetensors")
    assert_same_weights(a / "last.safetensors", b / "last.safetensors")
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["valid"] == mb["valid"] and ma["best_epoch"] == mb["best_epoch"]
    assert mb["finished"] is True
    assert (a / "valid_predictions.csv").read_bytes() == (b / "valid_predictions.csv").read_bytes()
    assert res_a.best_epoch == res_b.best_epoch

    # resuming a finished run changes nothing
    before = {p: (b / p).read_bytes() for p in ("history.csv", "best.safetensors", STATE_FILE)}
    res_c = train(cfg, store, *labels, b, resume=True, progress=False)
    assert len(res_c.history) == 4
    assert {p: (b / p).read_bytes() for p in before} == before


def test_resume_and_new_run_guards(tmp_path, store, labels, tiny_config) -> None:
    cfg = tiny_config("train.max_epochs=2")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, *labels, run, progress=False, callbacks=[Interrupt(after=1)])

    other = tiny_config("train.max_epochs=2", "model.hidden=32")
    with pytest.raises(ConfigError, match="cannot resume"):
        train(other, store, *labels, run, resume=True, progress=False)
    assert load_config(run / "config.yaml").model.hidden == 16  # not overwritten

    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, store, *labels, run, progress=False)

    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        train(cfg, store, *labels, empty, resume=True, progress=False)

    # runtime settings may change on resume
    res = train(
        tiny_config("train.max_epochs=2", "train.eval_batch_size=7"),
        store,
        *labels,
        run,
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in res.history] == [1, 2]


# --------------------------------------------------------------------------- clipping


def _module_with_grads() -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.grad = torch.tensor([[5.0, -0.2, 0.1], [-3.0, 0.4, 2.0]])
        m.bias.grad = torch.tensor([0.3, -7.0])
    return m


def test_clip_gradients_by_value_and_norm(tiny_config) -> None:
    m = _module_with_grads()
    step_engine.clip_gradients(m, tiny_config("train.grad_clip=0.5", "train.grad_clip_mode=value"))
    assert torch.equal(m.weight.grad, torch.tensor([[0.5, -0.2, 0.1], [-0.5, 0.4, 0.5]]))
    assert torch.equal(m.bias.grad, torch.tensor([0.3, -0.5]))

    m = _module_with_grads()
    before = torch.cat([m.weight.grad.flatten(), m.bias.grad])
    step_engine.clip_gradients(m, tiny_config("train.grad_clip=2.0", "train.grad_clip_mode=norm"))
    after = torch.cat([m.weight.grad.flatten(), m.bias.grad])
    assert after.norm().item() == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(after, before * (2.0 / before.norm()), rtol=1e-5, atol=0)

    for setting in ("train.grad_clip=0", "train.grad_clip=100"):  # disabled / far above
        for mode in ("value", "norm"):
            m = _module_with_grads()
            before = torch.cat([m.weight.grad.flatten(), m.bias.grad])
            step_engine.clip_gradients(m, tiny_config(setting, f"train.grad_clip_mode={mode}"))
            assert torch.equal(torch.cat([m.weight.grad.flatten(), m.bias.grad]), before)


# --------------------------------------------------------------------------- precision


def test_bf16_autocast_on_cpu(tmp_path, store, labels, tiny_config, monkeypatch) -> None:
    dtypes = set()
    real = step_engine.autocast

    def spy(device, precision, **kw):
        ctx = real(device, precision, **kw)
        dtypes.add(getattr(ctx, "fast_dtype", None))
        return ctx

    monkeypatch.setattr(step_engine, "autocast", spy)
    cfg = tiny_config("train.precision=bf16", "train.max_epochs=1")
    res = train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert dtypes == {torch.bfloat16}  # every training forward ran under bf16 autocast
    assert len(res.history) == 1
    row = res.history[0]
    assert all(math.isfinite(v) for v in row.values())
    assert math.isfinite(res.best.mean_pearson) and math.isfinite(res.best.mse)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["precision"], m["device"]) == ("bf16", "cpu")


def test_fp16_on_cpu_is_refused(tmp_path, store, labels, tiny_config) -> None:
    cfg = tiny_config("train.precision=fp16")
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run folder is written


# --------------------------------------------------------------------------- config checks


def test_model_store_dim_mismatch(tmp_path, store, labels, tiny_config) -> None:
    cfg = tiny_config("model.audio_dim=13")
    with pytest.raises(ConfigError, match=r"--set model\.audio_dim=12"):
        train(cfg, store, *labels, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_label_emotions_must_match_the_config(tmp_path, store, labels, tiny_config) -> None:
    train_labels, valid_labels = labels
    renamed = Labels(
        train_labels.ids, ("a", "b", "c", "d", "e", "f"), train_labels.values, "renamed.csv"
    )
    with pytest.raises(ConfigError, match=r"renamed\.csv.*data\.emotions"):
        train(tiny_config(), store, renamed, valid_labels, tmp_path / "run", progress=False)
    reordered = Labels(
        valid_labels.ids, tuple(reversed(EMI_EMOTIONS)), valid_labels.values, "rev.csv"
    )
    with pytest.raises(ConfigError, match="rev.csv"):
        train(tiny_config(), store, train_labels, reordered, tmp_path / "run", progress=False)
    # a failed start leaves no run behind: the corrected command can use the same folder
    res = train(tiny_config("train.max_epochs=1"), store, *labels, tmp_path / "run", progress=False)
    assert len(res.history) == 1


# --------------------------------------------------------------------------- determinism


@pytest.fixture
def restore_determinism(monkeypatch):
    """train.deterministic=True flips process-wide switches; put them back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored on teardown
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]


def test_deterministic_runs_are_identical(
    tmp_path, store, labels, tiny_config, restore_determinism
):
    cfg = tiny_config("train.deterministic=true", "train.max_epochs=2")
    train(cfg, store, *labels, tmp_path / "a", progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    train(cfg, store, *labels, tmp_path / "b", progress=False)
    assert numeric_history(tmp_path / "a") == numeric_history(tmp_path / "b")
    assert_same_weights(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")


def test_resume_of_a_run_interrupted_in_its_first_epoch_starts_it_afresh(
    store, labels, tiny_config, tmp_path, monkeypatch
):
    """config.yaml but no state.pt (killed during epoch 1): --resume trains from epoch 1.

    A kill (here a BaseException, as KeyboardInterrupt is) leaves the folder resumable; a
    failure (an Exception) would remove it, see test_failed_first_epoch_leaves_no_stub."""
    cfg = tiny_config("train.max_epochs=1")
    run = tmp_path / "run"

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(step_engine, "clip_gradients", killed)
        with pytest.raises(Killed):
            train(cfg, store, *labels, run, progress=False)
    assert (run / "config.yaml").is_file() and not (run / STATE_FILE).exists()
    res = train(cfg, store, *labels, run, resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [1]


class Fails(Exception):
    """A failure inside training (not an interruption)."""


def _fail(*args, **kwargs):
    raise Fails


def test_failed_first_epoch_leaves_no_stub(
    tmp_path, store, labels, tiny_config, monkeypatch
) -> None:
    """A run that fails before its first epoch is saved removes what it created (folders
    too), so a plain rerun is not blocked; what was there before stays; a failure after
    a saved epoch keeps the run (it is resumable)."""
    cfg = tiny_config("train.max_epochs=2")
    nested = tmp_path / "a" / "b" / "run"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine", encoding="utf-8")
    with monkeypatch.context() as m:
        m.setattr(step_engine, "clip_gradients", _fail)
        for out in (nested, existing):
            with pytest.raises(Fails):
                train(cfg, store, *labels, out, progress=False)
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    assert (existing / "notes.txt").read_text(encoding="utf-8") == "mine"
    res = train(cfg, store, *labels, existing, progress=False)  # the plain rerun works
    assert len(res.history) == 2 and (existing / "notes.txt").is_file()

    kept = tmp_path / "kept"

    def fail_after_epoch_1(epoch: int, row: dict) -> None:
        raise Fails

    with pytest.raises(Fails):
        train(cfg, store, *labels, kept, progress=False, callbacks=[fail_after_epoch_1])
    assert (
        (kept / STATE_FILE).is_file()
        and (kept / "config.yaml").is_file()
        and not (kept / LOCK_FILE).exists()
    )


def test_train_holds_a_lock_on_its_run_folder(tmp_path, store, labels, tiny_config) -> None:
    """While train() runs, a second train (or --resume) on the same folder fails at once
    and changes nothing; the lock is gone once the run returns."""
    cfg = tiny_config("train.max_epochs=2")
    run = tmp_path / "run"
    seen = []

    def second_process(epoch: int, row: dict) -> None:
        if epoch != 1:
            return
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        for resume in (True, False):
            with pytest.raises(RunFolderError, match="being trained by another process"):
                train(cfg, store, *labels, run, resume=resume, progress=False)
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        seen.append(epoch)

    res = train(cfg, store, *labels, run, progress=False, callbacks=[second_process])
    assert seen == [1] and len(res.history) == 2
    assert not (run / LOCK_FILE).exists()
    with RunFolderLock(run):  # free again
        assert (run / LOCK_FILE).is_file()


def test_non_finite_loss_stops_training_at_once(tmp_path, store, labels, tiny_config) -> None:
    """train.lr=1e30 diverges within the first steps: stopped there, named, no stub left."""
    run = tmp_path / "run"
    with pytest.raises(
        TrainingError, match=r"epoch 1, step \d+ of \d+: the training loss is .*lower train.lr"
    ):
        train(tiny_config("train.lr=1e30"), store, *labels, run, progress=False)
    assert not run.exists()


def test_batched_loss_check_names_the_first_bad_step() -> None:
    """On an accelerator the loss is checked every few steps (one host sync each): the
    error still names the first step whose loss was NaN/Inf, not the step of the check."""
    from taemi.train.distributed import DistInfo
    from taemi.train.trainer import _check_step_losses

    cfg = build_config("paper", [("train.lr", 1e-3)])
    ok, bad = torch.tensor([0.5]), torch.tensor([float("nan")])
    pending = [(4, ok, [], 1e-3), (5, ok, [], 1e-3), (6, bad, [], 2e-3), (7, bad, [], 3e-3)]
    _check_step_losses(
        pending[:2], DistInfo(), epoch=2, steps=9, cfg=cfg, store=None
    )  # finite: no error
    with pytest.raises(
        TrainingError, match=r"epoch 2, step 6 of 9: the training loss is nan .*rate 0.002"
    ):
        _check_step_losses(pending, DistInfo(), epoch=2, steps=9, cfg=cfg, store=None)


def test_non_finite_features_are_named_where_they_enter(
    tmp_path, store, labels, tiny_config
) -> None:
    """Features holding NaN that reach the model (past the store's own read check, e.g. from
    a backbone) stop training at the step that sees them, naming the clip; in a validation
    clip they are named before the metric sees an anonymous NaN."""
    from taemi.store import FeatureStore

    class NanStore(FeatureStore):
        bad = ""

        def get(self, key):
            clip = super().get(key)
            if clip.clip_id == self.bad and clip.text is not None:
                clip = dataclasses.replace(clip, text=np.full(clip.text.shape, np.nan, np.float32))
            return clip

    nan_store = NanStore(store.root)
    train_labels, valid_labels = labels
    for split, error in ((train_labels, TrainingError), (valid_labels, ValueError)):
        nan_store.bad = next(i for i in split.ids if not store.missing[store.index(i), 2])
        run = tmp_path / f"run_{nan_store.bad}"
        with pytest.raises(error, match=f"'?{nan_store.bad}'?.*NaN/Inf") as info:
            train(tiny_config(), nan_store, *labels, run, progress=False)
        assert "epoch 1" in str(info.value) and not run.exists()


def test_resume_without_state_after_finished_epochs_is_refused(
    tmp_path, store, labels, tiny_config
) -> None:
    """Weights of finished epochs but state.pt deleted: an error, not a silent restart
    that would overwrite them."""
    cfg = tiny_config("train.max_epochs=2")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, *labels, run, progress=False, callbacks=[Interrupt(after=1)])
    (run / STATE_FILE).unlink()
    before = (run / "last.safetensors").read_bytes()
    with pytest.raises(RunFolderError, match=f"{STATE_FILE} is missing, but last.safetensors"):
        train(cfg, store, *labels, run, resume=True, progress=False)
    assert (run / "last.safetensors").read_bytes() == before


# --------------------------------------------------------------------------- train on all


def test_train_on_all_runs_fixed_epochs_without_validation(
    tmp_path, store, labels, tiny_config
) -> None:
    """valid_labels=None: exactly fixed_epochs epochs of the usual schedule, no validation,
    best = last."""
    cfg = tiny_config("train.max_epochs=4")  # patience 5 (preset): irrelevant without validation
    validated = tmp_path / "validated"
    with pytest.raises(KeyboardInterrupt):  # its weights after epoch 2 of 4
        train(cfg, store, *labels, validated, progress=False, callbacks=[Interrupt(after=2)])
    run = tmp_path / "all"
    res = train(cfg, store, labels[0], None, run, fixed_epochs=2, progress=False)

    assert res.best is None and res.best_epoch == 2 and not res.stopped_early
    assert [h["epoch"] for h in res.history] == [1, 2]
    rows = read_history(run)
    assert list(rows[0]) == ["epoch", "train_loss", "lr", "seconds"]  # no valid columns
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    # the cosine schedule spans max_epochs (4), as in the validated run: not decayed to 0 at epoch 2
    assert 0 < res.history[-1]["lr"] < cfg.train.lr
    assert [h["lr"] for h in res.history] == [float(r["lr"]) for r in read_history(validated)]
    # the same first epoch (later ones differ: validating draws a DataLoader seed from the global RNG)
    assert res.history[0]["train_loss"] == float(read_history(validated)[0]["train_loss"])
    assert_same_weights(run / "best.safetensors", run / "last.safetensors")

    m = json.loads((run / "metrics.json").read_text())
    assert m["valid"] is None and m["train_on_all"] is True and m["fixed_epochs"] == 2
    assert m["best_epoch"] == 2 and m["epochs_run"] == 2 and m["finished"] is True
    assert m["train_clips"] == len(labels[0]) and m["stopped_early"] is False
    assert json.loads((validated / "metrics.json").read_text())["train_on_all"] is False
    assert load_config(run / "config.yaml").train.patience == 0  # resolved: no early stopping
    assert not (run / "valid_predictions.csv").exists() and not (run / "plots").exists()


def test_train_on_all_resume_and_guards(tmp_path, store, labels, tiny_config) -> None:
    cfg = tiny_config("train.max_epochs=3")
    with pytest.raises(ValueError, match="needs fixed_epochs"):
        train(cfg, store, labels[0], None, tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="between 1 and train.max_epochs=3"):
        train(cfg, store, labels[0], None, tmp_path / "a", fixed_epochs=4, progress=False)
    with pytest.raises(ValueError, match="without validation"):
        train(cfg, store, *labels, tmp_path / "a", fixed_epochs=2, progress=False)
    assert not (tmp_path / "a").exists()

    straight = train(
        cfg, store, labels[0], None, tmp_path / "straight", fixed_epochs=3, progress=False
    )
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            cfg,
            store,
            labels[0],
            None,
            run,
            fixed_epochs=3,
            progress=False,
            callbacks=[Interrupt(after=1)],
        )
    with pytest.raises(ConfigError, match="fixed_epochs=3"):
        train(cfg, store, labels[0], None, run, fixed_epochs=2, resume=True, progress=False)
    res = train(cfg, store, labels[0], None, run, fixed_epochs=3, resume=True, progress=False)
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in straight.history]
    assert_same_weights(run / "best.safetensors", tmp_path / "straight" / "best.safetensors")


def test_run_records_its_features(short_run, store) -> None:
    """RUN/features.json: the store's dims, dtype and per-modality provenance."""
    res, _ = short_run
    rec = run_folder.load_features_record(res.run_dir)
    assert rec["dims"] == store.dims and rec["dtype"] == store.manifest["dtype"]
    assert rec["text_tokens"] is False and rec["clips"] == len(store)
    assert rec["modalities"] == store.manifest["modalities"] and set(rec["modalities"]) == {
        "audio",
        "vision",
        "text",
    }
    assert run_folder.load_features_record(res.run_dir / "absent") is None


def test_resume_refuses_features_of_another_kind(
    tmp_path, store, synth_tokens, labels, tiny_config
) -> None:
    cfg = tiny_config("train.max_epochs=2", "data.text_tokens=no")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, store, *labels, run, progress=False, callbacks=[Interrupt(after=1)])
    other = read_labels(synth_tokens.train_csv), read_labels(synth_tokens.valid_csv)
    with pytest.raises(ConfigError, match="features of another kind"):
        train(cfg, synth_tokens.store, *other, run, resume=True, progress=False)
