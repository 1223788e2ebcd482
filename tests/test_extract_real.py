"""``taemi extract`` with the real ``offline`` profile on the real CREMA-D sample.

One extraction of the sample's 12 clips (6 FLV videos, 6 MP3 recordings of the sentence
"Don't forget a jacket.") by the installed console script, in a subprocess without a
network (``unshare -n`` where permitted) and with ``HF_HUB_OFFLINE=1``; every test reads
that one store. The sample lives in ``../shared/data/crema-d-sample`` (or
``$TAEMI_CREMA_D``); without it, or without the packaged models, everything here skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from taemi.extract.pipeline import ERRORS_FILE, SUMMARY_FILE, TRANSCRIPTS
from taemi.store import FeatureStore, verify_store

pytestmark = [pytest.mark.realmedia, pytest.mark.slow]

SENTENCE = "Don't forget a jacket."  # what every clip of the sample says (its README)
DIM = 384  # Whisper tiny.en encoder, DINOv2 ViT-S/14, all-MiniLM-L6-v2
#: Import names the offline profile needs (models are found with find_spec, never imported).
NEEDED = ("av", "cv2", "faster_whisper", "ctranslate2", "onnxruntime", "transformers")


def _sample_dir() -> Path:
    env = os.environ.get("TAEMI_CREMA_D")
    return (
        Path(env)
        if env
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )


def _taemi() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m taemi``."""
    script = Path(sys.executable).with_name("taemi")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "taemi"]


def _words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes kept: "don't" is one word)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level Levenshtein distance: substitutions + insertions + deletions."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def test_word_errors():
    assert word_errors(SENTENCE, "don't forget a JACKET") == 0
    assert word_errors(SENTENCE, "Don't forget to jack it.") == 3  # 2 substitutions, 1 insertion
    assert word_errors(SENTENCE, "") == 4
    assert word_errors(SENTENCE, "forget a jacket") == 1


@dataclass
class Run:
    store: Path
    media: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    isolated: str | None  # None: ran in a network namespace without interfaces; else why not
    summary: dict  # extract_summary.json right after this run
    manifest: dict


def _extract(media: Path, store: Path) -> Run:
    unshare = shutil.which("unshare")
    isolated: str | None = "unshare is not on PATH"
    prefix: list[str] = []
    if unshare is not None:
        probe = subprocess.run(
            [unshare, "-n", "true"], check=False, capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            prefix, isolated = [unshare, "-n"], None
        else:
            isolated = f"unshare -n is not permitted here: {probe.stderr.decode().strip()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["extract", "--input", str(media), "--out", str(store), "--no-progress"]
    cmd = [*prefix, *_taemi(), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - t0
    summary, manifest = _read_json(store / SUMMARY_FILE), _read_json(store / "manifest.json")
    return Run(
        store,
        media,
        proc.returncode,
        proc.stdout,
        proc.stderr,
        seconds,
        isolated,
        summary,
        manifest,
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The one extraction of the 12 clips, into a new store."""
    media = _sample_dir() / "media"
    if not media.is_dir():
        pytest.skip(f"CREMA-D sample {media} absent (set TAEMI_CREMA_D to the sample folder)")
    absent = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    from taemi.backbones.weights import OFFLINE_MODELS

    absent += [m.requirement for m in OFFLINE_MODELS if importlib.util.find_spec(m.module) is None]
    if absent:
        pytest.skip(f"the offline profile needs {', '.join(absent)} (pip install 'taemi[extract]')")
    run = _extract(media, tmp_path_factory.mktemp("real") / "store")
    print(f"\nfirst extraction of 12 clips: {run.seconds:.1f} s")
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _clips(run: Run) -> dict[str, str]:
    """clip id -> file suffix of the sample's media."""
    return {
        p.stem: p.suffix.lower()
        for p in sorted(run.media.iterdir())
        if p.suffix.lower() in (".flv", ".mp3")
    }


def test_extract_exits_0_with_every_clip_done(first):
    assert len(_clips(first)) == 12
    assert (
        f"{first.store}: 12 done, 0 skipped, 0 failed; missing: audio 0, vision 6, text 0;"
        in first.stdout
    )
    assert "failures and their reasons" not in first.stdout
    assert not (first.store / ERRORS_FILE).exists()
    s = first.summary
    assert (s["total"], s["done"], s["skipped"], s["failed"]) == (12, 12, 0, 0)
    assert s["missing"] == {"audio": 0, "vision": 6, "text": 0}


def test_extract_ran_without_a_network(first):
    if first.isolated is not None:
        pytest.skip(f"extraction ran with the network available: {first.isolated}")
    assert first.returncode == 0  # the whole profile loaded and ran with no interface but lo


def test_missing_modalities_by_container(first):
    fs = FeatureStore(first.store)
    clips = _clips(first)
    assert sorted(fs.ids) == sorted(clips)
    for cid, suffix in clips.items():
        c = fs.get(cid)
        if suffix == ".flv":  # video with a face + audio
            assert c.missing == (False, False, False), cid
            assert 1 <= c.vision.shape[0] <= 400
        else:  # MP3: no video stream
            assert c.missing == (False, True, False), cid
        # Whisper encoder frames at 50/s from the clip's own samples (clips are 2-3 s)
        assert 50 <= c.audio.shape[0] <= 600, (cid, c.audio.shape)
        assert c.audio.shape[1] == c.text.shape[0] == DIM


def test_transcripts_word_error_rate(first, record_property):
    clips = _clips(first)
    errors = words = 0
    lines = []
    for cid in clips:
        path = first.store / TRANSCRIPTS / f"{cid}.txt"
        assert path.is_file(), cid
        text = path.read_text(encoding="utf-8").strip()
        assert text, f"{cid}: empty transcript"
        e = word_errors(SENTENCE, text)
        errors, words = errors + e, words + len(_words(SENTENCE))
        lines.append(f"  {cid}: {text!r} ({e} errors)")
    wer = errors / words
    record_property("crema_d_wer", wer)
    print(
        f"\nWER of Whisper tiny.en transcripts on the CREMA-D sample: {wer:.3f}\n"
        + "\n".join(lines)
    )
    assert wer < 0.6


def test_store_verifies_with_offline_provenance(first):
    assert verify_store(first.store) == []
    m = first.manifest
    assert m["dims"] == {"audio": DIM, "vision": DIM, "text": DIM}
    assert set(m["modalities"]) == {"audio", "vision", "text"}
    for mod in m["modalities"].values():
        assert mod["settings"]["profile"] == "offline"
    assert "whisper tiny.en" in m["modalities"]["audio"]["backbone"]
    assert "dinov2" in m["modalities"]["vision"]["backbone"]
    assert "all-MiniLM-L6-v2" in m["modalities"]["text"]["backbone"]
    vision = m["modalities"]["vision"]["settings"]
    assert (vision["max_frames"], vision["frame_policy"]) == (400, "first")
    assert vision["face"] is not None  # Haar face crops by default


def test_rerun_is_a_noop(first):
    again = _extract(first.media, first.store)
    print(f"\nrerun on the full store: {again.seconds:.1f} s (loading the models included)")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{first.store}: 0 done, 12 skipped, 0 failed" in again.stdout
    assert [s["name"] for s in again.manifest["shards"]] == [
        s["name"] for s in first.manifest["shards"]
    ]
    s = again.summary
    assert (s["done"], s["skipped"], s["failed"]) == (0, 12, 0)
    assert all(v == 0 for v in s["stage_seconds"].values()), s["stage_seconds"]  # nothing decoded
    assert s["wall_seconds"] < 10
    assert again.seconds < first.seconds
