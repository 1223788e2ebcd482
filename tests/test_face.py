"""taemi.extract.face: Haar-cascade face crops (geometry, no-face handling, real faces)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="PyAV is not installed (media extra)")
pytest.importorskip("cv2", reason="OpenCV is not installed (media extra)")

from taemi.extract.face import FaceCropConfig, FaceCropper, square_box
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
