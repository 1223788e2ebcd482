"""The cartoon talking face of the synthetic media corpus, drawn with OpenCV.

:func:`static_face` draws a clip's still layer (background, shoulders, hair, skin shaded
like a frontal face: dark eye sockets, light nose bridge and cheeks) and
:func:`render_face` each frame on top of it (eyes that blink, eyebrows, a mouth that
opens with the speech, a small head sway). The face knobs (smile, mouth width, eyebrow
raise and tilt, eye openness, gaze, blush) come from :func:`taemi.synth.media.face_knobs`;
:class:`FaceStyle` holds the per-clip nuisances (colours, position, sway, blink times).

The shading is what OpenCV's Haar frontal-face detector (:mod:`taemi.extract.face`,
default settings) relies on: it finds the face in about 90 % of the frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

try:
    import cv2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taemi.synth.face needs OpenCV: pip install 'taemi[extract]' (opencv-python-headless)"
    ) from exc

__all__ = ["FaceStyle", "render_face", "static_face"]

#: Skin and hair colours a clip's face draws from (nuisances, jittered per clip).
_SKIN_RGB = ((236, 188, 160), (224, 172, 135), (198, 140, 105), (160, 110, 80), (110, 72, 50))
_HAIR_RGB = ((35, 25, 20), (70, 45, 30), (120, 85, 50), (180, 150, 100), (90, 90, 95))


@dataclass
class FaceStyle:
    """Per-clip nuisances of the face drawing (independent of the labels)."""

    skin: tuple[float, float, float]  # RGB in [0, 1]
    hair: tuple[float, float, float]  # RGB in [0, 1]
    background: tuple[float, float, float]  # RGB in [0, 1]
    centre: tuple[float, float]  # face centre, fraction of the frame side
    scale: float  # face size factor
    sway: tuple[float, float, float]  # sway amplitude (pixels), rotation (degrees), Hz
    phase: float  # sway phase, radians
    blinks: tuple[float, ...]  # blink start times, seconds

    @classmethod
    def draw(cls, rng: np.random.Generator, seconds: float) -> FaceStyle:
        def jitter(rgb: tuple[int, ...], amount: float) -> tuple[float, float, float]:
            bright = rng.uniform(1.0 - 3 * amount, 1.0 + 3 * amount)
            c = np.clip(np.asarray(rgb) / 255.0 * bright + rng.normal(0.0, amount, 3), 0.0, 1.0)
            return (float(c[0]), float(c[1]), float(c[2]))

        grey = rng.uniform(0.35, 0.8)
        bg = np.clip(grey + rng.normal(0.0, 0.08, 3), 0.0, 1.0)
        blinks, t = [], rng.uniform(0.3, 2.0)
        while t < seconds:
            blinks.append(float(t))
            t += rng.uniform(1.5, 4.0)
        return cls(
            skin=jitter(_SKIN_RGB[rng.integers(len(_SKIN_RGB))], 0.015),
            hair=jitter(_HAIR_RGB[rng.integers(len(_HAIR_RGB))], 0.03),
            background=(float(bg[0]), float(bg[1]), float(bg[2])),
            centre=(float(rng.uniform(0.46, 0.54)), float(rng.uniform(0.5, 0.56))),
            scale=float(rng.uniform(0.92, 1.06)),
            sway=(
                float(rng.uniform(0.5, 2.5)),
                float(rng.uniform(0.5, 3.0)),
                float(rng.uniform(0.2, 0.6)),
            ),
            phase=float(rng.uniform(0, 2 * np.pi)),
            blinks=tuple(blinks),
        )


_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

Point = tuple[float, float]


def _pts(points: list[Point]) -> np.ndarray:
    """(n, 2) int32 fixed-point coordinates for cv2 (``_SHIFT`` fractional bits)."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32)


Colour = float | tuple[float, ...]  # a mask value, or RGB in [0, 1]


def _cv(colour: Colour) -> float | tuple[float, ...]:
    """A colour as cv2 takes it: Python floats."""
    return float(colour) if np.isscalar(colour) else tuple(float(c) for c in colour)


def _ellipse(canvas: np.ndarray, centre: Point, axes: Point, colour: Colour, arc=(0, 360)) -> None:
    """Fill an (arc of an) axis-aligned ellipse, anti-aliased, in place."""
    c, a = _pts([centre, axes])
    cv2.ellipse(canvas, c, a, 0, arc[0], arc[1], _cv(colour), -1, _AA, _SHIFT)


def _disc(canvas: np.ndarray, centre: Point, radius: float, colour: Colour) -> None:
    cv2.circle(canvas, _pts([centre])[0], int(radius * _ONE), _cv(colour), -1, _AA, _SHIFT)


def _stroke(canvas: np.ndarray, points: list[Point], colour: Colour, width: float) -> None:
    cv2.polylines(canvas, [_pts(points)], False, _cv(colour), max(1, int(width)), _AA, _SHIFT)


def _bezier(p0: Point, mid: Point, p2: Point, n: int = 12) -> list[Point]:
    """A quadratic curve from p0 to p2 passing through ``mid`` at its middle."""
    ctrl = np.asarray(mid) * 2 - (np.asarray(p0) + np.asarray(p2)) / 2
    s = np.linspace(0.0, 1.0, n)[:, None]  # (n, 1)
    curve = (1 - s) ** 2 * np.asarray(p0) + 2 * (1 - s) * s * ctrl + s**2 * np.asarray(p2)
    return [(float(x), float(y)) for x, y in curve]


def _over(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``img`` (H, W, 3) with ``colour`` ((3,) or (H, W, 3)) laid over it with ``alpha`` (H, W)."""
    return img * (1 - alpha[..., None]) + alpha[..., None] * colour


def static_face(style: FaceStyle, knobs: dict[str, float], size: int) -> np.ndarray:
    """(size, size, 3) float32 RGB: background, shoulders, hair, shaded skin (eye sockets,
    nose, cheeks), blush. The Haar detector relies on this shading (dark sockets, light
    nose bridge and cheeks)."""
    s = size * style.scale
    cx, cy = style.centre[0] * size, style.centre[1] * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # (size, size) each

    def gauss(x0: float, y0: float, sx: float, sy: float) -> np.ndarray:
        return np.exp(-(((xx - x0) / (sx * s)) ** 2 + ((yy - y0) / (sy * s)) ** 2) / 2.0)

    def mask_of(draw: Callable[[np.ndarray], None]) -> np.ndarray:
        m = np.zeros((size, size), np.float32)
        draw(m)
        return m

    skin = np.asarray(style.skin, np.float32)
    vertical = 1.0 - 0.25 * yy / size  # light from above
    img = np.asarray(style.background, np.float32) * vertical[..., None]  # (size, size, 3)
    # shoulders (shirt) and neck (skin)
    body = mask_of(lambda m: _ellipse(m, (cx, cy + 0.62 * s), (0.45 * s, 0.22 * s), 1.0))
    neck = ((np.abs(xx - cx) < 0.1 * s) & (yy > cy + 0.2 * s)).astype(np.float32)
    shirt = np.asarray(style.hair, np.float32) * 0.5 + 0.25
    img = _over(
        img, np.maximum(body, neck), _over(np.broadcast_to(shirt, img.shape), neck, skin * 0.8)
    )
    # hair behind the head
    hair = mask_of(lambda m: _ellipse(m, (cx, cy - 0.06 * s), (0.34 * s, 0.4 * s), 1.0))
    hair[yy > cy + 0.05 * s] = 0.0
    hair_rgb = (
        np.asarray(style.hair, np.float32)
        * (0.8 + 0.2 * gauss(cx - 0.1 * s, cy - 0.3 * s, 0.2, 0.1))[..., None]
    )
    img = _over(img, hair, hair_rgb)
    # face: a skin ellipse, darker towards the rim, with sockets, nose and cheeks shaded
    a, b = 0.29 * s, 0.38 * s
    face = mask_of(lambda m: _ellipse(m, (cx, cy), (a, b), 1.0))
    shade = 1.05 - 0.3 * np.clip(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2, 0, 1) ** 2
    for side in (-1, 1):
        shade -= 0.3 * gauss(cx + side * 0.12 * s, cy - 0.08 * s, 0.08, 0.05)  # eye socket
        shade += 0.08 * gauss(cx + side * 0.14 * s, cy + 0.08 * s, 0.07, 0.06)  # cheek
        shade -= 0.22 * gauss(cx + side * 0.045 * s, cy + 0.02 * s, 0.015, 0.06)  # nose side
    shade += 0.12 * gauss(cx, cy - 0.01 * s, 0.02, 0.08)  # nose bridge
    shade -= 0.3 * gauss(cx, cy + 0.085 * s, 0.035, 0.012)  # under the nose
    shade -= 0.15 * gauss(cx, cy + 0.3 * s, 0.1, 0.03)  # under the lip
    face_rgb = skin * shade[..., None]
    if knobs["blush"] > 0:
        red = np.asarray((0.86, 0.35, 0.38), np.float32)
        for side in (-1, 1):
            g = 0.55 * knobs["blush"] * gauss(cx + side * 0.15 * s, cy + 0.09 * s, 0.05, 0.035)
            face_rgb = _over(face_rgb, g, red)
    img = _over(img, face, face_rgb)
    # fringe over the forehead, nostrils
    fringe = mask_of(
        lambda m: _ellipse(m, (cx, cy - 0.3 * s), (0.3 * s, 0.13 * s), 1.0, (180, 360))
    )
    img = _over(img, fringe * face, hair_rgb)
    for side in (-1, 1):
        _ellipse(
            img, (cx + side * 0.025 * s, cy + 0.07 * s), (0.012 * s, 0.007 * s), tuple(skin * 0.35)
        )
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_face(
    static: np.ndarray,
    style: FaceStyle,
    knobs: dict[str, float],
    mouth_open: float,
    t: float,
) -> np.ndarray:
    """One frame: (size, size, 3) uint8 RGB. ``static`` from the clip's static layer,
    ``mouth_open`` in [0, 1] (the speech envelope at ``t`` times the talking gain)."""
    size = static.shape[0]
    s = size * style.scale
    cx, cy = style.centre[0] * size, style.centre[1] * size
    img = static.copy()  # (size, size, 3) float32
    hair = tuple(float(c) * 0.8 for c in style.hair)
    blink = any(0.0 <= t - b < 0.15 for b in style.blinks)
    eye_y, ew = cy - 0.08 * s, 0.055 * s
    eh = 0.028 * s * knobs["eye_open"] * (0.08 if blink else 1.0)  # half the lid aperture
    for side in (-1, 1):
        ex = cx + side * 0.12 * s
        # eye: sclera, iris and pupil (clipped to the sclera), upper lid
        sclera = np.zeros((size, size), np.float32)
        _ellipse(sclera, (ex, eye_y), (ew, max(eh, 0.3)), 1.0)
        eye = np.empty_like(img)
        eye[:] = (0.92, 0.92, 0.9)
        iris_y = eye_y - knobs["gaze_up"] * 0.01 * s
        _disc(eye, (ex, iris_y), 0.024 * s, (0.3, 0.22, 0.15))
        _disc(eye, (ex, iris_y), 0.011 * s, (0.03, 0.03, 0.03))
        img = _over(img, sclera, eye)
        lid = _bezier((ex - ew, eye_y), (ex, eye_y - eh), (ex + ew, eye_y))
        _stroke(img, lid, (0.1, 0.07, 0.06), 0.012 * s)
        # eyebrow through its inner end, arch and outer end
        by = eye_y - 0.075 * s - knobs["brow_raise"] * 0.03 * s
        tilt = knobs["brow_tilt"] * 0.03 * s  # > 0: inner end up
        inner = (cx + side * 0.045 * s, by - tilt)
        arch = (cx + side * 0.11 * s, by - 0.015 * s - 0.3 * tilt)
        outer = (cx + side * 0.18 * s, by + 0.3 * tilt + 0.01 * s)
        _stroke(img, _bezier(inner, arch, outer), hair, max(2.0, 0.028 * s))
    # mouth: two curves through the corners, the opening between them
    my = cy + 0.2 * s
    mw = 0.085 * s * (1.0 + 0.35 * knobs["mouth_width"] + 0.15 * max(knobs["smile"], 0.0))
    lift = knobs["smile"] * 0.04 * s  # corners up (smile) or down
    gap = mouth_open * 0.075 * s
    left, right = (cx - mw, my - lift), (cx + mw, my - lift)
    upper = _bezier(left, (cx, my - 0.3 * gap), right)
    lower = _bezier(left, (cx, my + 0.7 * gap + 0.2 * max(lift, 0.0)), right)
    if gap > 0.5:
        cv2.fillPoly(img, [_pts(upper + lower[::-1])], (0.22, 0.05, 0.06), _AA, _SHIFT)
    _stroke(img, upper, (0.62, 0.3, 0.3), 0.018 * s)
    _stroke(img, lower, (0.62, 0.3, 0.3), 0.024 * s)
    # head sway: a small rotation and shift of the whole frame
    amp, deg, hz = style.sway
    phase = 2 * np.pi * hz * t + style.phase
    rot = cv2.getRotationMatrix2D((cx, cy), deg * math.sin(phase), 1.0)  # (2, 3)
    rot[0, 2] += amp * math.sin(phase * 1.3)
    rot[1, 2] += 0.5 * amp * math.cos(phase)
    img = cv2.warpAffine(
        img, rot, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
