"""Face detection and square face crops for the vision backbone (docs/method.md section 3).

The ABAW organisers ship aligned face crops (``face_images/{id}/{k}.jpg``, read by
:func:`taemi.extract.media.read_face_images`); for other corpora (e.g. CREMA-D) or raw
videos this module makes comparable crops from decoded frames.

Detector: OpenCV's Haar cascade (P. Viola, M. Jones, "Rapid Object Detection using a
Boosted Cascade of Simple Features", CVPR 2001; R. Lienhart, J. Maydt, "An Extended Set of
Haar-like Features for Rapid Object Detection", ICIP 2002), the frontal-face model shipped
inside ``opencv-python-headless`` (``cv2.data.haarcascades``): nothing is downloaded.

Policy, per frame (with ``detect_every=1``, the default, no state is carried between
frames: no tracking, no smoothing):

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

Detecting every k-th frame (``detect_every=k``, ``taemi extract --detect-every K``). The
detector pass (steps 1-3) is most of the cost of a crop (about 6 ms of a 480x360 frame's
7 ms on one core). With ``k > 1`` it runs on frames ``0, k, 2k, ...`` of the frames a
:class:`FaceTrack` is given (the frames the decoder selected), and on any frame whose size
differs from the previous frame's; in between, the face box is carried from the two
detections around the frame, keyframe-interpolation style:

* both found a face: the box centre and side (``max(w, h)``) are interpolated linearly
  in the frame index, then step 4 makes the square crop as for a detection;
* the next detection finds no face: the face left somewhere in between, so each frame
  since the last face is detected on its own (kept with its own box, or dropped), and the
  frames after the miss are detected one by one until a face is found again, which becomes
  the next anchor of the every-k schedule. Frames where faces come and go thus get the
  per-frame policy's answer, at the per-frame cost only around the changes and where no
  face is seen (a video without faces costs what ``k=1`` costs);
* no next detection (the end of the video, or a frame size change): the nearest, i.e.
  the last detection's box is used.

Detection frames get exactly the crops of ``k=1``; ``k=1`` is the per-frame policy above,
bit for bit. A crop of a frame between detections is known only at the next detection,
so :class:`FaceTrack` returns an empty crop buffer for it right away (what the decoder's
``transform`` hook keeps, see :func:`taemi.extract.media.decode_video`), keeps that frame
(at most ``k - 1`` raw frames are held), fills the buffer in place once the next
detection is in, and :meth:`FaceTrack.finish` drops the frames that turned out to have
no face. ``benchmarks/extract_throughput.py --detect-every`` measures the speed and the
fidelity (box IoU and DINOv2 feature cosine similarity against ``k=1``).

Threads. OpenCV's ``CascadeClassifier`` keeps per-image scratch data inside the object, so
one classifier used by two threads at once corrupts it (``cv::Mat`` assertion errors,
crashes, or silently different detections when the frame sizes differ). A
:class:`FaceCropper` therefore gives every thread that calls it its own classifier, loaded
on that thread's first frame (about 10 ms; see ``benchmarks/extract_throughput.py``). One
cropper can be shared by any number of decoding threads, and a frame's crop does not
depend on which thread, or how many, computed it. The state of ``detect_every > 1`` lives
in a :class:`FaceTrack`, one per decoded video (:meth:`FaceCropper.for_video`), used by the
thread that decodes that video: no mutable state is shared between videos.
"""

from __future__ import annotations

import dataclasses
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
    detect_every: int = 1  # detect on every k-th frame, boxes interpolated between (docstring)

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
        if isinstance(self.detect_every, bool) or not isinstance(self.detect_every, int):
            problems.append(f"detect_every must be an int, got {self.detect_every!r}")
        elif self.detect_every < 1:
            problems.append(f"detect_every must be >= 1, got {self.detect_every}")
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


def interpolate_box(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float], w: float
) -> tuple[float, float, float, float]:
    """The square face box ``(x, y, s, s)`` at fraction ``w`` (0: ``a``, 1: ``b``) between
    face boxes ``a`` and ``b`` = ``(x, y, w, h)``: centre and side ``max(w, h)`` linear in
    ``w``. :func:`square_box` of it equals that of ``a`` at ``w=0`` (and ``b`` at 1)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    cx = (1 - w) * (ax + aw / 2) + w * (bx + bw / 2)
    cy = (1 - w) * (ay + ah / 2) + w * (by + bh / 2)
    side = (1 - w) * max(aw, ah) + w * max(bw, bh)
    return cx - side / 2, cy - side / 2, side, side


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
        detect_every: int = 1,
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
            detect_every=detect_every,
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
        """Everything that determines the crops, for the feature store's provenance.
        ``detect_every`` is recorded only when it is not 1: the settings of the per-frame
        policy are those of stores written before the option existed, which still match."""
        config = asdict(self.config)
        if config["detect_every"] == 1:
            del config["detect_every"]
        return {"detector": self.name, "opencv": cv2.__version__, **config}

    def for_video(self) -> FaceTrack:
        """A fresh :class:`FaceTrack` for one video's frames (the decoder's ``transform``)."""
        return FaceTrack(self)

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
        return self.crop_box(frame, box)

    def crop_box(self, frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """The (size, size, 3) uint8 crop of face ``box = (x, y, w, h)`` (steps 4-5)."""
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
        track = self.for_video()
        crops: list[np.ndarray] = []
        kept: list[float] = []
        for frame, t in zip(video.frames, video.timestamps):
            crop = track(frame)
            if crop is not None:
                crops.append(crop)
                kept.append(float(t))
        faces = track.finish(
            Video(
                frames=crops,
                timestamps=np.asarray(kept, dtype=np.float64),  # (n_faces,)
                total_frames_seen=video.total_frames_seen,
                policy=video.policy,
            )
        )
        assert faces is not None  # finish keeps a video a video
        log.debug("faces found in %d of %d frames", len(faces), len(video.frames))
        return faces if len(faces) else None


@dataclass
class _Pending:
    """A frame between two detections whose crop waits for the next detection."""

    index: int  # the frame's index among the frames the track was given
    frame: np.ndarray  # (H, W, 3) uint8 RGB, a copy held until the next detection
    slot: int  # its position among the crops the track returned


class FaceTrack:
    """Face crops of ONE video's frames, given in decoding order, with the detector run on
    every ``detect_every``-th frame (module docstring). Use it as the decoder's
    ``transform`` and pass the decoded video to :meth:`finish`::

        track = cropper.for_video()
        video = track.finish(decode_video(path, transform=track))

    A track belongs to one decode in one thread; the cropper it comes from is shared.
    """

    def __init__(self, cropper: FaceCropper) -> None:
        self.cropper = cropper
        self.every = cropper.config.detect_every
        self.detections = 0  # detector passes run
        self.boxes: list[tuple[int, int, int]] = []  # (x0, y0, side) of each returned crop
        self._seen = 0  # frames given so far
        self._kind: tuple[tuple[int, ...], np.dtype] | None = None  # previous frame's shape, dtype
        self._anchor: tuple[int, tuple[int, int, int, int]] | None = None  # last face detected
        self._pending: list[_Pending] = []  # frames since that detection (at most every - 1)
        self._returned: list[np.ndarray] = []  # every crop (or crop buffer) returned, in order
        self._kept: list[bool] = []  # ... False: dropped, no face there after all
        self._finished = False

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """The (size, size, 3) uint8 crop of ``frame``, ``None`` if it has no face; between
        detections a buffer filled at the next detection (or dropped by :meth:`finish`)."""
        if self._finished:
            raise RuntimeError("FaceTrack.finish was called: use a new track for another video")
        index = self._seen
        self._seen += 1
        kind = (frame.shape, frame.dtype)
        if kind != self._kind:  # the first frame, or the frame size changed
            self._settle(None)  # the frames before keep the last box (the nearest detection)
            self._kind = kind
        elif index % self.every != 0 and self._anchor is not None:
            size = self.cropper.config.size
            buffer = np.zeros((size, size, 3), np.uint8)  # (size, size, 3), filled later
            self._pending.append(_Pending(index, frame.copy(), len(self._returned)))
            return self._give(buffer, (0, 0, 0))
        box = self.cropper.detect(frame)  # scheduled, or searching since a miss
        self.detections += 1
        if box is None:  # the face left after the last face: find where, frame by frame
            self._detect_pending()
            self._anchor = None  # search (detect every frame) until a face is found again
            return None
        self._settle((index, box))
        self._anchor = (index, box)
        height, width = frame.shape[:2]
        square = square_box(box, width, height, self.cropper.config.margin)
        return self._give(self.cropper.crop_box(frame, box), square)

    def finish(self, video: Video | None) -> Video | None:
        """``video`` (the decoder's result of this track's crops) without the frames found
        to have no face; the frames after the last detection get its box. ``None`` stays
        ``None`` (no video stream)."""
        self._settle(None)
        self._finished = True
        if video is None:
            return None
        if len(video.frames) != len(self._returned) or any(
            a is not b for a, b in zip(video.frames, self._returned)
        ):
            raise RuntimeError(
                f"FaceTrack.finish: the video's {len(video.frames)} frames are not the "
                f"{len(self._returned)} crops this track returned, in order (one track per decode)"
            )
        log.debug(
            "face track: %d detections for %d frames, %d of %d crops kept",
            self.detections,
            self._seen,
            sum(self._kept),
            len(self._kept),
        )
        self.boxes = [b for b, k in zip(self.boxes, self._kept) if k]
        if all(self._kept):
            return video
        keep = np.asarray(self._kept, dtype=bool)  # (n,)
        per_frame = {
            "frames": [f for f, k in zip(video.frames, self._kept) if k],
            "timestamps": video.timestamps[keep],  # (n_kept,)
        }
        if getattr(video, "repeats", None) is not None:  # decode_video's vision_fps counts
            per_frame["repeats"] = video.repeats[keep]  # (n_kept,)
        return dataclasses.replace(video, **per_frame)

    def _give(self, crop: np.ndarray, square: tuple[int, int, int]) -> np.ndarray:
        self._returned.append(crop)
        self._kept.append(True)
        self.boxes.append(square)
        return crop

    def _detect_pending(self) -> None:
        """The next detection found no face: each pending frame gets its own detection, and
        its own crop, or is dropped when it has no face either."""
        margin = self.cropper.config.margin
        for p in self._pending:
            box = self.cropper.detect(p.frame)
            self.detections += 1
            if box is None:
                self._kept[p.slot] = False
                continue
            height, width = p.frame.shape[:2]
            self._returned[p.slot][...] = self.cropper.crop_box(p.frame, box)
            self.boxes[p.slot] = square_box(box, width, height, margin)
        self._pending = []

    def _settle(self, nxt: tuple[int, tuple[int, int, int, int]] | None) -> None:
        """Crop the pending frames, now that the next detection ``nxt`` (index, box) found a
        face (interpolated boxes), or that there is none (``None``: the last box)."""
        if not self._pending:
            return
        assert self._anchor is not None  # frames are pending only after a face
        start, a = self._anchor
        margin = self.cropper.config.margin
        for p in self._pending:
            if nxt is None:
                box: tuple[float, float, float, float] = a
            else:
                end, b = nxt
                box = interpolate_box(a, b, (p.index - start) / (end - start))
            height, width = p.frame.shape[:2]
            self._returned[p.slot][...] = self.cropper.crop_box(p.frame, box)
            self.boxes[p.slot] = square_box(box, width, height, margin)
        self._pending = []
