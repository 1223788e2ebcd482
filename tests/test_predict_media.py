"""``taemi predict --run RUN MEDIA...``: features extracted as the run's were, then predicted.

The media tests make a 4-clip generated corpus (one audio-only clip), extract it with
the offline profile, train a tiny 1-epoch run on it (``--train-on-all``), and predict
from two of its files plus a corrupt one. The plan/provenance tests need no media.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import generated_media_corpus, media_run_sets, run_main

from taemi import EMI_EMOTIONS
from taemi.cli.main import main
from taemi.extract.pipeline import Encoders, ExtractOptions


def read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [r[0] for r in rows[1:]], np.array([r[1:] for r in rows[1:]], dtype=np.float32)


# --------------------------------------------------------------------------- the run's extraction plan


def provenance(profile: str = "offline", face: bool = False, **vision) -> dict:
    """features.json as training writes it for a store made by ``taemi extract``."""
    common = {"profile": profile}
    return {
        "dims": {"audio": 384, "vision": 384, "text": 384},
        "dtype": "float16",
        "text_tokens": False,
        "modalities": {
            "audio": {
                "backbone": "whisper",
                "settings": {**common, "device": "cpu", "max_seconds": 6.0, "sample_rate": 16000},
            },
            "vision": {
                "backbone": "dino",
                "settings": {
                    **common,
                    "device": "cpu",
                    "max_frames": 8,
                    "frame_policy": "uniform",
                    "face": {"detector": "haar"} if face else None,
                    **vision,
                },
            },
            "text": {
                "backbone": "minilm",
                "settings": {**common, "device": "cpu", "asr": "whisper", "token_states": False},
            },
        },
    }


def test_extraction_plan_follows_the_run() -> None:
    from taemi.predict_media import extraction_plan

    profile, opts, face = extraction_plan(provenance(face=True), None)
    assert profile == "offline" and face is True
    assert (opts.max_audio_seconds, opts.max_frames, opts.frame_policy, opts.text_tokens) == (
        6.0,
        8,
        "uniform",
        False,
    )
    assert extraction_plan(provenance(), "offline")[2] is False  # the same profile, said explicitly

    with pytest.raises(ValueError, match="has no features.json.*pass --profile"):
        extraction_plan(None, None, run="imported")
    profile, opts, face = extraction_plan(None, "paper")  # then: the extraction defaults
    assert profile == "paper" and face is True and opts == ExtractOptions()
    with pytest.raises(ValueError, match="'offline' profile"):
        extraction_plan(provenance(), "paper")
    synthetic = {
        "modalities": {
            m: {"backbone": "synthetic", "settings": {}} for m in ("audio", "vision", "text")
        }
    }
    with pytest.raises(ValueError, match="cannot be extracted from media"):
        extraction_plan(synthetic, None)
    with pytest.raises(ValueError, match="cannot be extracted from media"):
        extraction_plan({"modalities": {}}, "offline")
    broken = provenance()
    del broken["modalities"]["vision"]["settings"]["max_frames"]
    with pytest.raises(ValueError, match="lack 'max_frames'"):
        extraction_plan(broken, None)


def stand_in_encoders(**names: str) -> Encoders:
    """Encoders whose names/settings are those of ``provenance()`` unless renamed."""

    def enc(name: str, **settings) -> SimpleNamespace:
        return SimpleNamespace(
            name=names.get(name, name),
            settings={"profile": "offline", "device": "cpu", **settings},
            dim=384,
        )

    asr = SimpleNamespace(name=names.get("whisper_asr", "whisper"), settings={})
    return Encoders(
        asr=asr,
        audio=enc("whisper"),
        image=enc("dino"),
        text=enc("minilm"),
        face=None,
        profile="offline",
    )


def test_other_models_than_the_runs_are_refused() -> None:
    from taemi.predict_media import check_provenance

    opts = ExtractOptions(max_audio_seconds=6.0, max_frames=8, frame_policy="uniform")
    rec = provenance()
    rec["modalities"]["text"]["settings"]["asr_settings"] = {}
    assert check_provenance(rec, stand_in_encoders(), opts) == []
    with pytest.raises(ValueError, match=r"vision model was 'dino'.*--model vision="):
        check_provenance(rec, stand_in_encoders(dino="vit"), opts)
    with pytest.raises(ValueError, match=r"asr model was 'whisper'.*--model asr="):
        check_provenance(rec, stand_in_encoders(whisper_asr="large-v3"), opts)
    rec["modalities"]["audio"]["settings"]["device"] = (
        "cuda"  # other settings: reported, not refused
    )
    assert check_provenance(rec, stand_in_encoders(), opts) == [
        "audio.device: 'cuda' (run) vs 'cpu' (now)"
    ]


# --------------------------------------------------------------------------- real media


@pytest.fixture(scope="module")
def media_run(tmp_path_factory) -> SimpleNamespace:
    """4 generated clips (00000 audio-only), their offline features, a 1-epoch tiny run."""
    root = tmp_path_factory.mktemp("predict_media")
    corpus = generated_media_corpus(root)
    assert sorted(p.name for p in corpus.raw.iterdir()) == [
        "00000.m4a",
        "00001.mp4",
        "00002.mp4",
        "00003.mp4",
    ]
    store = root / "store"
    assert (
        main(
            [
                "extract",
                "--input",
                str(corpus.raw),
                "--out",
                str(store),
                "--max-frames",
                "2",
                "--frame-policy",
                "uniform",
                "--no-face",
                "--no-progress",
            ]
        )
        == 0
    )
    run = root / "run"
    sets = media_run_sets()
    assert (
        main(
            [
                "train",
                "--store",
                str(store),
                "--train",
                str(corpus.train_csv),
                "--valid",
                str(corpus.valid_csv),
                "--out",
                str(run),
                "--train-on-all",
                "--epochs",
                "1",
                "--no-progress",
                *sets,
            ]
        )
        == 0
    )
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video\n" * 50)
    return SimpleNamespace(root=root, raw=corpus.raw, store=store, run=run, corrupt=corrupt)


@pytest.fixture
def count_loads(monkeypatch):
    """Counts taemi.extract.profiles.load_encoders calls; starts with an empty model cache."""
    from taemi import predict_media
    from taemi.extract import profiles

    calls = []
    real = profiles.load_encoders

    def counting(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(profiles, "load_encoders", counting)
    monkeypatch.setattr(predict_media, "_ENCODERS", {})
    return calls


@pytest.mark.slow
def test_predict_from_media_files(media_run, count_loads, tmp_path) -> None:
    audio_only, video, corrupt = (
        media_run.raw / "00000.m4a",
        media_run.raw / "00001.mp4",
        media_run.corrupt,
    )
    out = tmp_path / "preds.csv"
    code, stdout = run_main(
        [
            "predict",
            "--run",
            str(media_run.run),
            str(video),
            str(audio_only),
            str(corrupt),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 1  # one input failed; the others are predicted and written
    assert len(count_loads) == 1 and count_loads[0][0] == (
        "offline",
    )  # the run's profile, loaded once
    assert (
        count_loads[0][1]["face"] is False
    )  # the run's features were extracted without face crops

    # the table: one line per clip, with its modalities; the failure with its reason
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["clip", "Admiration"] and lines[0].endswith("modalities")
    row0 = next(line for line in lines if line.startswith("00000"))
    row1 = next(line for line in lines if line.startswith("00001"))
    assert row0.endswith("audio + text (vision missing)") and row1.endswith("all three")
    assert len(row0.split()) > len(EMI_EMOTIONS)
    failed = next(line for line in lines if line.startswith("FAILED"))
    assert str(corrupt) in failed and "(decode)" in failed and "FFmpeg cannot read it" in failed
    assert (
        "2 predicted, 1 failed; clipped to [0, 1]; features: offline profile, 2 frames (uniform)"
        in stdout
    )

    header, ids, values = read_csv(out)
    assert header == ["Filename", *EMI_EMOTIONS] and ids == ["00000", "00001"]
    assert (
        values.shape == (2, 6)
        and np.isfinite(values).all()
        and values.min() >= 0
        and values.max() <= 1
    )
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert report["clipped"] is True and report["emotions"] == list(EMI_EMOTIONS)
    assert report["extraction"]["profile"] == "offline" and report["extraction"]["store"] is None
    assert report["extraction"]["options"] == {
        "max_audio_seconds": 12.0,
        "max_frames": 2,
        "frame_policy": "uniform",
        "face": False,
        "text_tokens": False,
    }
    clips = {c["id"]: c for c in report["clips"]}
    assert clips["00000"]["present"] == {"audio": True, "vision": False, "text": True}
    assert clips["00000"]["missing"] == ["vision"] and clips["00001"]["missing"] == []
    assert clips["00001"]["path"] == str(video)
    assert all(isinstance(c["transcript"], str) and c["transcript"] for c in clips.values())
    np.testing.assert_array_equal(
        values[0], np.float32([clips["00000"]["intensities"][e] for e in EMI_EMOTIONS])
    )
    assert report["failures"] == [
        {
            "clip_id": "corrupt",
            "path": str(corrupt),
            "stage": "decode",
            "reason": report["failures"][0]["reason"],
        }
    ]


@pytest.mark.slow
def test_media_predictions_match_the_store_and_reuse_the_models(
    media_run, count_loads, tmp_path
) -> None:
    """Features extracted as the run's were give the predictions of the run's own store;
    a second prediction in the process loads no model; --features keeps the store."""
    from taemi.predict_media import predict_media

    kept = tmp_path / "features"
    res = predict_media(media_run.run, [media_run.raw], features_dir=kept, clip=False, device="cpu")
    assert [c.clip_id for c in res.clips] == [
        "00000",
        "00001",
        "00002",
        "00003",
    ] and res.failures == []
    assert res.store == str(kept) and (kept / "manifest.json").is_file()
    code, _ = run_main(
        [
            "predict",
            "--run",
            str(media_run.run),
            "--store",
            str(media_run.store),
            "--out",
            str(tmp_path / "store.csv"),
            "--no-clip",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    _, ids, from_store = read_csv(tmp_path / "store.csv")
    assert ids == ["00000", "00001", "00002", "00003"]
    # same models and options; only the batching of the extraction differs (float16 features)
    np.testing.assert_allclose(res.values(), from_store, atol=2e-3)

    again = predict_media(media_run.run, [media_run.raw / "00002.mp4"], device="cpu")
    assert len(count_loads) == 1  # the models of the first call
    assert again.clipped and [c.clip_id for c in again.clips] == ["00002"]
    np.testing.assert_allclose(again.values()[0], np.clip(res.values()[2], 0, 1), atol=2e-3)


@pytest.mark.slow
def test_encoders_load_while_the_run_loads(media_run, monkeypatch, tmp_path) -> None:
    """With the device known without torch, the encoders load in a background thread with
    the settings the in-order load uses, and the predictions are the same; bad inputs or a
    run folder without weights start no load at all (their errors come as before)."""
    import threading

    from taemi import predict_media as pm
    from taemi.extract import profiles

    calls: list[tuple[str, dict]] = []
    real = profiles.load_encoders

    def recording(*args, **kw):
        calls.append((threading.current_thread().name, {"args": args, **kw}))
        return real(*args, **kw)

    monkeypatch.setattr(profiles, "load_encoders", recording)
    scans = []
    real_scan = pm.find_sources
    monkeypatch.setattr(pm, "find_sources", lambda inputs: scans.append(1) or real_scan(inputs))
    video = media_run.raw / "00001.mp4"
    monkeypatch.setattr(pm, "_ENCODERS", {})
    early = pm.predict_media(media_run.run, [video], device="cpu", clip=False)
    assert len(scans) == 1  # the inputs are scanned once, for the preload and the extraction
    monkeypatch.setattr(pm, "_ENCODERS", {})
    monkeypatch.setattr(pm, "device_without_torch", lambda device: None)
    in_order = pm.predict_media(media_run.run, [video], device="cpu", clip=False)
    (thread_a, kw_a), (thread_b, kw_b) = calls
    assert thread_a.startswith("taemi-preload") and thread_b == threading.main_thread().name
    assert kw_a == kw_b and kw_a["device"] == "cpu"
    np.testing.assert_array_equal(early.values(), in_order.values())
    assert early.timings["load"] > 0

    monkeypatch.undo()
    monkeypatch.setattr(profiles, "load_encoders", recording)
    monkeypatch.setattr(pm, "_ENCODERS", {})
    calls.clear()
    with pytest.raises(FileNotFoundError, match="no-such.mp4"):
        pm.predict_media(media_run.run, [tmp_path / "no-such.mp4"], device="cpu")
    broken = tmp_path / "broken-run"
    shutil.copytree(media_run.run, broken)
    (broken / "best.safetensors").unlink()
    with pytest.raises(Exception, match="best.safetensors"):
        pm.predict_media(broken, [video], device="cpu")
    assert calls == []  # refused before any model load
    # weights that are there but unreadable are found by the run's load, in the main
    # thread, while the encoders may already be loading: the error is the same
    (broken / "best.safetensors").write_bytes(b"not weights")
    with pytest.raises(Exception, match="best.safetensors"):
        pm.predict_media(broken, [video], device="cpu")


def test_device_without_torch_agrees_with_torch() -> None:
    """Only certain answers: an explicit CPU, or "auto" where torch finds no CUDA device."""
    import torch

    from taemi.predict_media import device_without_torch

    assert device_without_torch("cpu") == "cpu"
    assert device_without_torch("cuda") is None and device_without_torch("cuda:1") is None
    if device_without_torch("auto") == "cpu":
        assert not torch.cuda.is_available()


@pytest.mark.slow
def test_run_without_features_json_asks_for_a_profile(media_run, tmp_path, capsys) -> None:
    run = tmp_path / "imported"
    shutil.copytree(media_run.run, run)
    (run / "features.json").unlink()
    assert (
        main(["predict", "--run", str(run), str(media_run.raw / "00001.mp4"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err
    assert "has no features.json" in err and "--profile offline|paper" in err


def test_predict_needs_media_or_a_store(tmp_path, capsys) -> None:
    assert main(["predict", "--run", str(tmp_path)]) == 2
    assert "--store STORE (features) or media files" in capsys.readouterr().err
    assert main(["predict", "--run", str(tmp_path), "--store", "s", "x.mp4"]) == 2
    assert "not both" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "--run",
                str(tmp_path),
                "--store",
                "s",
                "--out",
                "o.csv",
                "--profile",
                "offline",
            ]
        )
        == 2
    )
    assert "--profile is for predicting from media" in capsys.readouterr().err
