"""taemi.extract.face: Haar-cascade face crops (geometry, no-face handling, real faces)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="PyAV is not installed (media extra)")
pytest.importorskip("cv2", reason="OpenCV is not installed (media extra)")

from taemi.extract.face import FaceCropConfig, FaceCropper, interpolate_box, square_box
from taemi.extract.media import Video, decode_video


def test_square_box_centres_and_expands() -> None:
    # 40x40 face at (100, 80) in a 480x360 frame, margin 0.25 -> side 60 around (120, 100)
    assert square_box((100, 80, 40, 40), 480, 360, 0.25) == (90, 70, 60)
    # a non-square box uses its longer side
    assert square_box((100, 80, 20, 40), 480, 360, 0.0) == (90, 80, 40)


@pytest.mark.parametrize(
    "box",
    [(0, 0, 50, 50), (440, 320, 40, 40), (-5, 300, 60, 70), (10, 10, 400, 400)],
)
def test_square_box_stays_inside_the_frame(box: tuple[int, int, int, int]) -> None:
    x0, y0, side = square_box(box, 480, 360, 0.25)
    assert 0 <= x0 and 0 <= y0 and x0 + side <= 480 and y0 + side <= 360
    _, _, w, h = box
    assert side == min(round(max(w, h) * 1.5), 360)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="margin must be >= 0, got -0.1"):
        FaceCropConfig(margin=-0.1)
    with pytest.raises(ValueError, match="scale_factor must be > 1"):
        FaceCropper(scale_factor=1.0)
    with pytest.raises(FileNotFoundError, match="no_such_cascade.xml"):
        FaceCropper(cascade="no_such_cascade.xml")


def test_settings_record_everything() -> None:
    cropper = FaceCropper(size=112, margin=0.3)
    settings = cropper.settings
    assert settings["size"] == 112 and settings["margin"] == 0.3
    assert settings["detector"] == cropper.name == "opencv-haar:haarcascade_frontalface_default"
    assert {"detect_width", "min_face", "scale_factor", "min_neighbors", "opencv"} <= set(settings)


def test_frames_must_be_rgb_uint8() -> None:
    cropper = FaceCropper()
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        cropper.detect(np.zeros((48, 64), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        cropper.detect(np.zeros((48, 64, 3), np.float32))


def test_no_face_anywhere_gives_none() -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(6)]
    frames.append(np.zeros((120, 160, 3), np.uint8))
    video = Video(frames, np.arange(7, dtype=np.float64), total_frames_seen=7, policy="first")
    assert FaceCropper()(video) is None


# ---------------------------------------------------------------- real faces (CREMA-D)


def crema_d_media() -> Path:
    """The CREMA-D sample's media folder; skips the test when it is absent."""
    root = os.environ.get("TAEMI_CREMA_D")
    base = (
        Path(root)
        if root
        else Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample"
    )
    folder = base / "media"
    if not folder.is_dir():
        pytest.skip(f"CREMA-D sample not found at {base} (set TAEMI_CREMA_D to its folder)")
    return folder


@pytest.fixture(scope="module")
def crema_videos() -> dict[str, Video]:
    """Eight frames spread over each CREMA-D FLV clip (policy 'uniform')."""
    out = {}
    for path in sorted(crema_d_media().glob("*.flv")):
        video = decode_video(path, max_frames=8, policy="uniform")
        assert video is not None, path.name
        out[path.name] = video
    return out


@pytest.mark.realmedia
def test_crema_d_faces_found_and_cropped(crema_videos: dict[str, Video]) -> None:
    cropper = FaceCropper()
    assert len(crema_videos) == 6
    for name, video in crema_videos.items():
        crops = cropper(video)
        assert crops is not None, name
        assert len(crops) >= 0.8 * len(video), (name, len(crops), len(video))
        assert all(c.shape == (224, 224, 3) and c.dtype == np.uint8 for c in crops.frames)
        assert set(crops.timestamps) <= set(video.timestamps)
        assert crops.total_frames_seen == video.total_frames_seen and crops.policy == "uniform"


@pytest.mark.realmedia
def test_crema_d_crop_holds_the_face_with_its_margin(crema_videos: dict[str, Video]) -> None:
    cropper = FaceCropper(margin=0.25)
    frame = crema_videos["1001_DFA_NEU_XX.flv"].frames[0]
    crop = cropper.crop_frame(frame)
    assert crop is not None
    inner = cropper.detect(crop)  # the face found again inside its own crop
    assert inner is not None
    x, y, w, h = inner
    assert w == pytest.approx(224 / 1.5, rel=0.2)  # face side / crop side = 1 / (1 + 2 margin)
    assert abs(x + w / 2 - 112) < 25 and abs(y + h / 2 - 112) < 25  # centred


@pytest.mark.realmedia
def test_crema_d_detection_scales_with_the_frame(crema_videos: dict[str, Video]) -> None:
    cropper = FaceCropper()
    frame = crema_videos["1001_DFA_ANG_XX.flv"].frames[3]  # (360, 480, 3)
    big = np.repeat(np.repeat(frame, 2, axis=0), 2, axis=1)  # (720, 960, 3)
    small_box = cropper.detect(frame)
    big_box = cropper.detect(big)
    assert small_box is not None and big_box is not None
    np.testing.assert_allclose(big_box, 2 * np.asarray(small_box), rtol=0.15, atol=8)


@pytest.mark.realmedia
def test_crema_d_frames_without_face_are_dropped(crema_videos: dict[str, Video]) -> None:
    faces = crema_videos["1001_DFA_HAP_XX.flv"]
    noise = np.random.default_rng(1).integers(0, 256, faces.frames[0].shape, dtype=np.uint8)
    frames = [faces.frames[0], noise, faces.frames[1]]
    times = np.array([faces.timestamps[0], 0.5, faces.timestamps[1]])
    crops = FaceCropper()(Video(frames, times, total_frames_seen=3, policy="first"))
    assert crops is not None and len(crops) == 2
    np.testing.assert_array_equal(crops.timestamps, times[[0, 2]])


# ---------------------------------------------------------------- detecting every k-th frame


def test_detect_every_is_validated_and_recorded_only_when_not_1() -> None:
    with pytest.raises(ValueError, match="detect_every must be >= 1, got 0"):
        FaceCropConfig(detect_every=0)
    with pytest.raises(ValueError, match="detect_every must be an int, got 2.5"):
        FaceCropper(detect_every=2.5)  # type: ignore[arg-type]
    # k=1 (the default) records exactly what stores written before the option recorded
    assert "detect_every" not in FaceCropper().settings
    assert FaceCropper(detect_every=1).settings == FaceCropper().settings
    three = FaceCropper(detect_every=3).settings
    assert three == {**FaceCropper().settings, "detect_every": 3}


def test_interpolate_box_moves_centre_and_side_linearly() -> None:
    a, b = (100, 80, 40, 40), (120, 60, 80, 60)  # centres (120, 100), (160, 90); sides 40, 80
    assert interpolate_box(a, b, 0.0) == (100, 80, 40, 40)
    assert interpolate_box(a, b, 1.0) == (120, 50, 80, 80)  # square, around b's centre
    assert interpolate_box(a, b, 0.5) == (110, 65, 60, 60)  # centre (140, 95), side 60
    # the crop of an interpolated box at an end is the detection's crop
    assert square_box(interpolate_box(a, b, 1.0), 480, 360, 0.25) == square_box(b, 480, 360, 0.25)


def scripted_frames(n: int, size: tuple[int, int] = (90, 120)) -> list[np.ndarray]:
    """``n`` frames whose pixel (0, 0) holds their index (for a scripted detector)."""
    rng = np.random.default_rng(n)
    frames = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
    for i, f in enumerate(frames):
        f[0, 0, 0] = i
    return frames


def scripted_cropper(boxes: dict[int, tuple[int, int, int, int] | None], k: int) -> FaceCropper:
    """A cropper whose detector answers ``boxes[frame index]`` and logs what it was asked."""
    cropper = FaceCropper(size=32, margin=0.0, detect_every=k)
    cropper.asked = []  # type: ignore[attr-defined]

    def detect(frame: np.ndarray) -> tuple[int, int, int, int] | None:
        i = int(frame[0, 0, 0])
        cropper.asked.append(i)  # type: ignore[attr-defined]
        return boxes[i]

    cropper.detect = detect  # type: ignore[method-assign]
    return cropper


def run_track(cropper: FaceCropper, frames: list[np.ndarray]):
    """(kept frame indices, crops, square boxes) of a track over ``frames``."""
    track = cropper.for_video()
    out = [track(f) for f in frames]
    kept = [c for c in out if c is not None]
    times = np.array([i for i, c in enumerate(out) if c is not None], dtype=np.float64)
    video = track.finish(Video(kept, times, total_frames_seen=len(frames), policy="first"))
    return [int(t) for t in video.timestamps], video.frames, track.boxes


def test_track_interpolates_between_detections_and_keeps_the_last_box_at_the_end() -> None:
    frames = scripted_frames(9)
    boxes = {0: (10, 10, 20, 20), 3: (40, 10, 20, 20), 6: (40, 40, 32, 32)}
    cropper = scripted_cropper(boxes, k=3)
    kept, crops, squares = run_track(cropper, frames)
    assert cropper.asked == [0, 3, 6]  # one detector pass per 3 frames
    assert kept == list(range(9))
    assert squares[:4] == [(10, 10, 20), (20, 10, 20), (30, 10, 20), (40, 10, 20)]
    assert squares[4] == square_box(interpolate_box(boxes[3], boxes[6], 1 / 3), 120, 90, 0.0)
    assert squares[6:] == [(40, 40, 32)] * 3  # after the last detection: its box (the nearest)
    for i in (1, 4, 8):  # a carried crop is the crop of its box, as for a detection
        x0, y0, side = squares[i]
        assert np.array_equal(crops[i], cropper.crop_box(frames[i], (x0, y0, side, side)))


def test_track_finds_where_the_face_left_and_came_back_frame_by_frame() -> None:
    """A detection without a face: the frames since the last face are detected one by one
    (kept or dropped by their own detection), and so is every frame after it until a face is
    found again; the every-k schedule resumes from there."""
    frames = scripted_frames(16)
    face, other = (10, 10, 20, 20), (30, 30, 20, 20)
    boxes = {i: (face if i < 2 else None if i < 7 else other) for i in range(16)}
    cropper = scripted_cropper(boxes, k=3)
    kept, crops, squares = run_track(cropper, frames)
    assert kept == [0, 1, *range(7, 16)]  # what detecting every frame keeps
    # 0; 3 (miss) -> 1, 2 on their own; search 4, 5, 6, 7 (face); then the schedule 9, 12, 15
    assert cropper.asked == [0, 3, 1, 2, 4, 5, 6, 7, 9, 12, 15]
    assert squares[1] == (10, 10, 20)  # frame 1: its own detection
    assert squares[2:] == [(30, 30, 20)] * 9
    assert len(crops) == len(kept)
    per_frame = run_track(scripted_cropper(boxes, k=1), frames)
    assert per_frame[0] == kept and per_frame[2] == squares


def test_track_on_a_video_without_faces_detects_every_frame() -> None:
    frames = scripted_frames(7)
    cropper = scripted_cropper(dict.fromkeys(range(7)), k=3)
    kept, crops, _ = run_track(cropper, frames)
    assert kept == [] and crops == []
    assert cropper.asked == list(range(7))  # no face to carry: the per-frame cost


def test_track_detects_again_when_the_frame_size_changes() -> None:
    frames = scripted_frames(4)
    small = scripted_frames(6, size=(60, 80))[4:]  # indices 4, 5 at another size
    cropper = scripted_cropper({0: (10, 10, 20, 20), 4: (5, 5, 10, 10)}, k=7)
    kept, _, squares = run_track(cropper, frames + small)
    assert cropper.asked == [0, 4]  # frame 4 is not a multiple of 7, but changes size
    assert kept == list(range(6))
    assert squares[:4] == [(10, 10, 20)] * 4  # before the change: the last box (the nearest)
    assert squares[4:] == [(5, 5, 10)] * 2


def test_track_belongs_to_one_decode() -> None:
    cropper = scripted_cropper({0: (10, 10, 20, 20)}, k=1)
    track = cropper.for_video()
    frames = scripted_frames(1)
    crop = track(frames[0])
    assert crop is not None
    other = Video([crop.copy()], np.zeros(1), total_frames_seen=1, policy="first")
    with pytest.raises(RuntimeError, match="not the 1 crops this track returned"):
        track.finish(other)
    with pytest.raises(RuntimeError, match="use a new track"):
        track(frames[0])
    assert cropper.for_video().finish(None) is None  # no video stream


def box_iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """IoU of two square boxes (x0, y0, side)."""
    (ax, ay, sa), (bx, by, sb) = a, b
    ix = max(0, min(ax + sa, bx + sb) - max(ax, bx))
    iy = max(0, min(ay + sa, by + sb) - max(ay, by))
    inter = ix * iy
    return inter / (sa * sa + sb * sb - inter)


def decode_crops(path: Path, cropper: FaceCropper, **kw) -> tuple[Video, list]:
    """(face crops of ``path`` decoded through a track, the track's square boxes)."""
    track = cropper.for_video()
    video = track.finish(decode_video(path, transform=track, **kw))
    assert video is not None
    return video, track.boxes


@pytest.mark.realmedia
def test_crema_d_detect_every_1_is_the_per_frame_path_bit_for_bit() -> None:
    path = crema_d_media() / "1001_DFA_SAD_XX.flv"
    cropper = FaceCropper()
    exact = decode_video(path, max_frames=40, transform=cropper.crop_frame)
    tracked, _ = decode_crops(path, FaceCropper(detect_every=1), max_frames=40)
    assert exact is not None and len(exact) == len(tracked) == 40
    np.testing.assert_array_equal(tracked.timestamps, exact.timestamps)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(tracked.frames, exact.frames))
    whole = decode_video(path, max_frames=40)  # FaceCropper.__call__ on a decoded video
    assert whole is not None
    called = FaceCropper(detect_every=1)(whole)
    assert called is not None
    assert all(a.tobytes() == b.tobytes() for a, b in zip(called.frames, exact.frames))


@pytest.mark.realmedia
def test_crema_d_detect_every_3_crops_the_same_frames_with_close_boxes() -> None:
    path = crema_d_media() / "1001_DFA_ANG_XX.flv"
    exact, exact_boxes = decode_crops(path, FaceCropper())
    fast, fast_boxes = decode_crops(path, FaceCropper(detect_every=3))
    n = exact.total_frames_seen
    assert len(exact) == n  # a face in every frame of this clip
    np.testing.assert_array_equal(fast.timestamps, exact.timestamps)
    ious = [box_iou(a, b) for a, b in zip(exact_boxes, fast_boxes)]
    assert min(ious) > 0.8, min(ious)
    for i in range(0, n, 3):  # detection frames: the exact crops
        assert fast.frames[i].tobytes() == exact.frames[i].tobytes(), i
        assert ious[i] == 1.0


@pytest.mark.realmedia
def test_crema_d_tracks_in_two_threads_match_serial() -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths = [crema_d_media() / f"1001_DFA_{e}_XX.flv" for e in ("HAP", "NEU")]
    cropper = FaceCropper(detect_every=3)  # shared: each decode gets its own track

    def crops(path: Path) -> tuple[list[bytes], list[float]]:
        video, _ = decode_crops(path, cropper, max_frames=30)
        return [f.tobytes() for f in video.frames], video.timestamps.tolist()

    serial = [crops(p) for p in paths]
    for _ in range(2):
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(crops, paths)) == serial


@pytest.mark.realmedia
def test_crema_d_pipeline_decodes_through_a_track(tmp_path: Path) -> None:
    from taemi.extract.pipeline import ExtractOptions, Source, decode_source

    path = crema_d_media() / "1001_DFA_FEA_XX.flv"
    cropper = FaceCropper(detect_every=4)
    decoded = decode_source(Source("c", path), ExtractOptions(max_frames=25), cropper)
    assert decoded.error is None and decoded.faces is not None
    expected, _ = decode_crops(path, cropper, max_frames=25)
    assert [f.tobytes() for f in decoded.faces] == [f.tobytes() for f in expected.frames]


def test_provenance_records_detect_every_and_predict_refuses_another() -> None:
    from types import SimpleNamespace

    from taemi.extract.pipeline import Encoders, ExtractOptions
    from taemi.predict_media import check_provenance, face_detect_every

    def encoders(k: int) -> Encoders:
        model = SimpleNamespace(name="m", settings={"profile": "offline"}, dim=4)
        return Encoders(
            asr=model, audio=model, image=model, text=model, face=FaceCropper(detect_every=k)
        )

    opts = ExtractOptions()
    three = encoders(3).provenance(opts)
    assert three["vision"]["settings"]["face"]["detect_every"] == 3
    assert face_detect_every(three["vision"]["settings"]) == 3
    one = encoders(1).provenance(opts)
    assert "detect_every" not in one["vision"]["settings"]["face"]
    assert face_detect_every(one["vision"]["settings"]) == 1
    assert face_detect_every({"face": None}) == 1
    run = {"modalities": json.loads(json.dumps(three))}
    assert check_provenance(run, encoders(3), opts) == []
    with pytest.raises(ValueError, match=r"every 3 frame\(s\).*detects on every 1"):
        check_provenance(run, encoders(1), opts)


def test_load_encoders_refuses_detect_every_without_faces_before_loading() -> None:
    from taemi.extract.profiles import load_encoders

    with pytest.raises(ValueError, match="needs face crops"):
        load_encoders("no-such-profile", face=False, face_detect_every=3)
    with pytest.raises(ValueError, match="detect_every must be >= 1, got 0"):
        load_encoders("no-such-profile", face_detect_every=0)


def test_predict_media_loads_a_cropper_with_the_runs_detect_every(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from taemi import predict_media as pm

    face = {**FaceCropper(detect_every=3).settings}
    settings = {"profile": "offline"}
    record = {
        "modalities": {
            "audio": {"backbone": "a", "settings": {**settings, "max_seconds": 12.0}},
            "vision": {
                "backbone": "v",
                "settings": {**settings, "max_frames": 9, "frame_policy": "first", "face": face},
            },
            "text": {"backbone": "t", "settings": {**settings, "token_states": False}},
        }
    }
    asked = {}

    class Loaded(Exception):
        pass

    def load_encoders_once(profile: str, **kw):
        asked.update(kw, profile=profile)
        raise Loaded

    monkeypatch.setattr(
        pm, "load_run_once", lambda run, which: SimpleNamespace(cfg=SimpleNamespace(mode="frozen"))
    )
    monkeypatch.setattr(pm, "load_features_record", lambda run: record)
    monkeypatch.setattr(pm, "load_encoders_once", load_encoders_once)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not opened before the models load")
    with pytest.raises(Loaded):
        pm.predict_media("RUN", [clip], device="cpu")
    assert (asked["profile"], asked["face"], asked["face_detect_every"]) == ("offline", True, 3)
    del face["detect_every"]  # a run of the per-frame policy (or recorded before the option)
    with pytest.raises(Loaded):
        pm.predict_media("RUN", [clip], device="cpu")
    assert asked["face_detect_every"] == 1


def test_finish_drops_the_repeat_counts_of_dropped_frames() -> None:
    """With decode_video's vision_fps, a dropped frame takes its repeat count along."""
    frames = scripted_frames(4)
    cropper = scripted_cropper({0: (10, 10, 20, 20), 1: None, 2: None, 3: None}, k=3)
    track = cropper.for_video()
    crops = [track(f) for f in frames]
    assert crops[3] is None and all(c is not None for c in crops[:3])
    video = Video(crops[:3], np.arange(3.0), total_frames_seen=4, policy="first")
    video.repeats = np.array([2, 3, 4])
    faces = track.finish(video)
    assert faces is not None and len(faces) == 1
    assert faces.repeats.tolist() == [2] and faces.timestamps.tolist() == [0.0]
