"""The ABAW EMI layout reader (docs/method.md section 2): ids as strings, media lookup, face-frame
order, input errors for ids without media, test roots without labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from taemi.extract.abaw import AbawLayout, is_abaw_root, open_abaw

HEADER = "Filename,Admiration,Amusement,Determination,Empathic Pain,Excitement,Joy\n"


def _labels(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        HEADER + "".join(f"{i},0.1,0.2,0.3,0.4,0.5,0.6\n" for i in ids), encoding="utf-8"
    )


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by these tests")
    return path


def _faces(folder: Path, ks: list[int]) -> None:
    """Tiny JPEGs ``{k}.jpg`` whose grey level encodes k (10 * k)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k in ks:
        Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(folder / f"{k}.jpg", quality=95)


def _mp3(path: Path, seconds: float = 0.5) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    x = (0.3 * np.sin(np.arange(int(16000 * seconds)) * 2 * np.pi * 440 / 16000)).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mp3", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """train: 00042 (video, audio, faces), 00007 (video only); valid: 00100 (audio only),
    00999 (no media); 00500 a test video listed by no split."""
    r = tmp_path / "abaw"
    _labels(r / "train_split.csv", ["00042", "00007"])
    _labels(r / "valid_split.csv", ["00100", "00999"])
    for i in ("00042", "00007", "00500"):
        _touch(r / "raw" / f"{i}.mp4")
    for i in ("00042", "00100"):
        _touch(r / "audio" / f"{i}.mp3")
    _faces(r / "face_images" / "00042", [1, 2])
    return r


def test_layout_keeps_zero_padded_ids(root: Path) -> None:
    layout = open_abaw(root)
    assert set(layout.splits) == {"train", "valid"}
    assert layout.ids("train") == ["00042", "00007"]  # file order, strings
    assert layout.ids("valid") == ["00100", "00999"]
    assert layout.ids() == ["00007", "00042", "00100", "00500"]  # raw/ + audio/, sorted
    assert layout.ids("test") == ["00500"]  # no test csv: clips no split lists
    with pytest.raises(ValueError, match="no split 'extra'"):
        layout.ids("extra")


def test_sources_media_and_missing(root: Path) -> None:
    layout = open_abaw(root)
    sources, errors = layout.sources("valid")
    assert [s.clip_id for s in sources] == ["00100"]
    assert sources[0].media == root / "audio" / "00100.mp3"  # no video: the audio file
    assert sources[0].face_dir is None
    [err] = errors
    assert err["clip_id"] == "00999" and err["stage"] == "input"
    assert "00999" in err["reason"] and "raw/00999.mp4" in err["reason"]

    sources, errors = layout.sources("train")
    assert errors == []
    by_id = {s.clip_id: s for s in sources}
    assert by_id["00042"].face_dir == root / "face_images" / "00042"
    assert by_id["00007"].media == root / "raw" / "00007.mp4" and by_id["00007"].face_dir is None
    s42 = by_id["00042"]
    if hasattr(s42, "audio"):  # Source with an audio field: video + separate audio file
        assert s42.media == root / "raw" / "00042.mp4" and s42.audio == root / "audio" / "00042.mp3"
    else:  # frames from face_images/, so the audio file is the media
        assert s42.media == root / "audio" / "00042.mp3"

    sources, _ = layout.sources(["00042"], use_face_images=False, use_audio_files=False)
    assert sources[0].media == root / "raw" / "00042.mp4" and sources[0].face_dir is None
    assert getattr(sources[0], "audio", None) is None
    _, errors = layout.sources(["00100"], use_audio_files=False)
    assert "audio files are not used" in errors[0]["reason"]


def test_error_records_match_the_pipeline(root: Path) -> None:
    from taemi.extract import pipeline

    _, errors = open_abaw(root).sources(["00999", "00042", "00042", "../x", "42"])
    reference = pipeline._error_record("00999", root / "raw" / "00999.mp4", "input", "r")
    assert all(set(e) == set(reference) for e in errors)
    reasons = [e["reason"] for e in errors]
    assert len(errors) == 4
    assert "listed twice" in reasons[1] and "path separator" in reasons[2]
    assert "zero padding" in reasons[3] and "'00042'" in reasons[3]
    from taemi.extract import abaw

    assert abaw.MEDIA_EXTENSIONS is pipeline.MEDIA_EXTENSIONS  # one list


def test_face_frames_are_read_in_numeric_order(tmp_path: Path) -> None:
    from taemi.extract.media import read_face_images
    from taemi.extract.pipeline import ExtractOptions, decode_source

    r = tmp_path / "abaw"
    _touch(r / "raw" / "00001.mp4")
    audio = _mp3(r / "audio" / "00001.mp3")
    _faces(r / "face_images" / "00001", [10, 9, 2, 1, 11])
    _labels(r / "train_split.csv", ["00001"])
    [src], errors = open_abaw(r).sources("train")
    assert errors == []
    video = read_face_images(src.face_dir)
    levels = [round(f.mean() / 10) for f in video.frames]
    assert levels == [1, 2, 9, 10, 11]
    # the pipeline decodes this source: audio from the mp3, frames from face_images/
    decoded = decode_source(src, ExtractOptions(), face=None)
    assert decoded.error is None, decoded.error
    assert [round(f.mean() / 10) for f in decoded.faces] == [1, 2, 9, 10, 11]
    assert decoded.waveform is not None and abs(decoded.waveform.shape[0] - 8000) < 2000
    if not hasattr(src, "audio"):
        assert src.media == audio


def test_test_root_without_labels(tmp_path: Path) -> None:
    r = tmp_path / "test_root"
    for i in ("00003", "00001"):
        _touch(r / "raw" / f"{i}.mp4")
    _faces(r / "face_images" / "00001", [1])
    assert is_abaw_root(r)
    layout = open_abaw(r)
    assert layout.splits == {}
    assert layout.ids() == layout.ids("test") == ["00001", "00003"]
    sources, errors = layout.sources()
    assert errors == [] and [s.face_dir is not None for s in sources] == [True, False]
    # a test_split.csv with only a Filename column
    (r / "test_split.csv").write_text("Filename\n00003\n00001\n", encoding="utf-8")
    assert open_abaw(r).ids("test") == ["00003", "00001"]


def test_bad_file_names_become_input_errors(tmp_path: Path) -> None:
    r = tmp_path / "abaw"
    _touch(r / "raw" / "00001.mp4")
    _touch(r / "raw" / "bad\tname.mp4")
    _touch(r / "raw" / ".hidden.mp4")
    _touch(r / "raw" / "notes.txt")
    sources, errors = open_abaw(r).sources()
    assert [s.clip_id for s in sources] == ["00001"]
    [err] = errors
    assert err["stage"] == "input" and "control character" in err["reason"]


def test_is_abaw_root_and_open_errors(tmp_path: Path, root: Path) -> None:
    assert is_abaw_root(root)
    assert not is_abaw_root(tmp_path / "nope")
    only_raw = tmp_path / "only_raw"
    (only_raw / "raw").mkdir(parents=True)
    assert not is_abaw_root(only_raw)  # raw/ alone: no split csv, no face_images/
    assert isinstance(open_abaw(only_raw), AbawLayout)  # but it opens
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_abaw(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*no raw/ folder"):
        open_abaw(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        open_abaw(tmp_path / "file")


def test_layout_is_a_dataclass(root: Path) -> None:
    layout = open_abaw(root)
    assert {f.name for f in dataclasses.fields(layout)} == {"root", "splits"}
