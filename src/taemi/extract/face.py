"""Face detection and square face crops for the vision backbone (docs/method.md section 3).

The ABAW organisers ship aligned face crops (``face_images/{id}/{k}.jpg``, read by
:func:`taemi.extract.media.read_face_images`); for other corpora (e.g. CREMA-D) or raw
videos this module makes comparable crops from decoded frames.

Detector: OpenCV's Haar cascade (P. Viola, M. Jones, "Rapid Object Detection using a
Boosted Cascade of Simple Features", CVPR 2001; R. Lienhart, J. Maydt, "An Extended Set of
Haar-like Features for Rapid Object Detection", ICIP 2002), the frontal-face model shipped
inside ``opencv-python-headless`` (``cv2.data.haarcascades``): nothing is downloaded.

Policy, per frame, with no state carried between frames (no tracking, no smoothing):

1. Grayscale copy, downscaled (never upscaled) to ``detect_width`` pixels wide, then
   histogram-equalised when ``equalize`` is set.
2. ``detectMultiScale(scale_factor, min_neighbors)`` with a smallest face side of
   ``min_face`` times the (downscaled) frame height.
3. The largest detection by area (ties: the topmost, then the leftmost), mapped back to
   frame pixels.
4. A square centred on that box with side ``max(w, h) * (1 + 2 * margin)``, shrunk to the
   frame's shorter edge if larger, then shifted (never cut) to lie inside the frame: crops
   are always square, so faces are never stretched.
5. Crop, resize to ``size`` x ``size`` (area interpolation when shrinking, bilinear when
   enlarging); RGB ``uint8``.

A frame without a face is dropped (its timestamp too). A video where no frame has a face
gives ``None``: the vision modality is missing, which is not an error.

Threads. OpenCV's ``CascadeClassifier`` keeps per-image scratch data inside the object, so
one classifier used by two threads at once corrupts it (``cv::Mat`` assertion errors,
crashes, or silently different detections when the frame sizes differ). A
:class:`FaceCropper` therefore gives every thread that calls it its own classifier, loaded
on that thread's first frame (about 10 ms; see ``benchmarks/extract_throughput.py``). One
cropper can be shared by any number of decoding threads, and a frame's crop does not
depend on which thread, or how many, computed it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

try:
    import cv2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.extract.face needs OpenCV: pip install opencv-python-headless"
    ) from exc

from taemi.extract.media import Video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceCropConfig:
    """Settings of :class:`FaceCropper` (recorded in the feature store's provenance)."""

    size: int = 224  # output crop side in pixels
    margin: float = 0.25  # the face box grows by this fraction of its side on every side
    detect_width: int = 320  # frames wider than this are downscaled to it for detection
    min_face: float = 0.1  # smallest face side, as a fraction of the frame height
    scale_factor: float = 1.1  # Haar pyramid step (OpenCV scaleFactor, > 1)
    min_neighbors: int = 5  # overlapping detections needed to accept a face (minNeighbors)
    equalize: bool = True  # histogram-equalise the grayscale copy before detection
    cascade: str = "haarcascade_frontalface_default.xml"  # file in cv2.data.haarcascades

    def __post_init__(self) -> None:
        problems = []
        if self.size < 1:
            problems.append(f"size must be >= 1, got {self.size}")
        if self.margin < 0:
            problems.append(f"margin must be >= 0, got {self.margin}")
        if self.detect_width < 24:
            problems.append(
                f"detect_width must be >= 24 (the cascade's window), got {self.detect_width}"
            )
        if not 0 < self.min_face <= 1:
            problems.append(f"min_face must be in (0, 1], got {self.min_face}")
        if not self.scale_factor > 1:
            problems.append(f"scale_factor must be > 1, got {self.scale_factor}")
        if self.min_neighbors < 0:
            problems.append(f"min_neighbors must be >= 0, got {self.min_neighbors}")
        if problems:
            raise ValueError("FaceCropConfig: " + "; ".join(problems))


def square_box(
    box: tuple[float, float, float, float], frame_w: int, frame_h: int, margin: float
) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of the square crop for face ``box = (x, y, w, h)`` (frame pixels):
    centred on the box, side ``max(w, h) * (1 + 2 * margin)`` capped at the frame's shorter
    edge, shifted to lie inside the frame."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    side = max(1, round(min(max(w, h) * (1 + 2 * margin), frame_w, frame_h)))
    x0 = min(max(round(cx - side / 2), 0), frame_w - side)
    y0 = min(max(round(cy - side / 2), 0), frame_h - side)
    return int(x0), int(y0), int(side)


class FaceCropper:
    """Crops the largest frontal face of every frame to ``size`` x ``size`` RGB (see the
    module docstring for the exact policy)."""

    def __init__(
        self,
        size: int = 224,
        margin: float = 0.25,
        detect_width: int = 320,
        min_face: float = 0.1,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        equalize: bool = True,
        cascade: str = "haarcascade_frontalface_default.xml",
    ) -> None:
        self.config = FaceCropConfig(
            size=size,
            margin=margin,
            detect_width=detect_width,
            min_face=min_face,
            scale_factor=scale_factor,
            min_neighbors=min_neighbors,
            equalize=equalize,
            cascade=cascade,
        )
        path = Path(cv2.data.haarcascades) / cascade
        if not path.is_file():
            raise FileNotFoundError(
                f"Haar cascade {cascade!r} not found in {cv2.data.haarcascades} "
                "(cv2.data.haarcascades of the installed opencv-python-headless)"
            )
        self._path = path
        self._local = threading.local()  # .detector: this thread's classifier (module docstring)
        self._detector()  # a cascade OpenCV cannot load fails here, not in a decoding thread

    def _detector(self) -> cv2.CascadeClassifier:
        """The calling thread's own classifier, loaded on its first use."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = cv2.CascadeClassifier(str(self._path))
            if detector.empty():
                raise RuntimeError(f"OpenCV could not load the Haar cascade {self._path}")
            self._local.detector = detector
        return detector

    @property
    def name(self) -> str:
        """Detector identifier, e.g. ``opencv-haar:haarcascade_frontalface_default``."""
        return f"opencv-haar:{Path(self.config.cascade).stem}"

    @property
    def settings(self) -> dict[str, object]:
        """Everything that determines the crops, for the feature store's provenance."""
        return {"detector": self.name, "opencv": cv2.__version__, **asdict(self.config)}

    def detect(self, frame: np.ndarray) -> tuple[int, int, int, int] | None:
        """The largest face ``(x, y, w, h)`` in frame pixels, or ``None``.

        frame: (H, W, 3) uint8 RGB.
        """
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB frame, got shape {frame.shape} {frame.dtype}"
            )
        height, width = frame.shape[:2]
        scale = min(1.0, self.config.detect_width / width)
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)  # (H, W) uint8
        if scale < 1.0:
            small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
            gray = cv2.resize(gray, small_size, interpolation=cv2.INTER_AREA)  # (h, w)
        if self.config.equalize:
            gray = cv2.equalizeHist(gray)
        min_side = max(1, round(self.config.min_face * gray.shape[0]))
        faces = self._detector().detectMultiScale(
            gray,
            scaleFactor=self.config.scale_factor,
            minNeighbors=self.config.min_neighbors,
            minSize=(min_side, min_side),
        )  # (k, 4) int32 (x, y, w, h), or an empty tuple
        if len(faces) == 0:
            return None
        # largest area; ties: topmost, then leftmost (independent of OpenCV's output order)
        x, y, w, h = min(faces.tolist(), key=lambda f: (-f[2] * f[3], f[1], f[0]))
        return (
            round(x / scale),
            round(y / scale),
            round(w / scale),
            round(h / scale),
        )

    def crop_frame(self, frame: np.ndarray) -> np.ndarray | None:
        """The face crop of one frame, (size, size, 3) uint8 RGB, or ``None`` if no face."""
        box = self.detect(frame)
        if box is None:
            return None
        height, width = frame.shape[:2]
        x0, y0, side = square_box(box, width, height, self.config.margin)
        crop = frame[y0 : y0 + side, x0 : x0 + side]  # (side, side, 3)
        size = self.config.size
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        out = cv2.resize(crop, (size, size), interpolation=interpolation)  # (size, size, 3)
        return np.ascontiguousarray(out)

    def __call__(self, video: Video) -> Video | None:
        """Face crops of ``video``'s frames that have a face (their timestamps kept), or
        ``None`` if no frame has one."""
        crops: list[np.ndarray] = []
        kept: list[float] = []
        for frame, t in zip(video.frames, video.timestamps):
            crop = self.crop_frame(frame)
            if crop is not None:
                crops.append(crop)
                kept.append(float(t))
        log.debug("faces found in %d of %d frames", len(crops), len(video.frames))
        if not crops:
            return None
        return Video(
            frames=crops,
            timestamps=np.asarray(kept, dtype=np.float64),  # (n_faces,)
            total_frames_seen=video.total_frames_seen,
            policy=video.policy,
        )
