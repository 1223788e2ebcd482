"""The offline profile's image encoder (DINOv2 ViT-S/14, ONNX) in fp32 and int8 on real
face crops: milliseconds per crop side by side, per batch size, and how close the int8
features are to the exact fp32 ones.

Crops: every frame (the first 400) of each video of the CREMA-D sample
(``--media``, default ``$TAEMI_CREMA_D/media`` or ``../shared/data/crema-d-sample/media``),
decoded with :func:`taemi.extract.media.decode_video` and cropped by
:class:`taemi.extract.face.FaceCropper` (the extraction's Haar crops, 224 x 224).

Measured, in this order:

1. loading: the fp32 encoder, the int8 encoder from an empty cache (quantised now, in a
   temporary folder) and from the cache;
2. speed: ``encode`` (Pillow resize + normalisation + onnxruntime + mean pooling) of
   ``--timing-crops`` crops at each ``--batch-sizes`` value, fp32 and int8 alternating,
   ``--repeats`` rounds (median reported; each round preceded by one warm-up batch), ms per
   crop and the int8 speed-up of the same round; preprocessing alone is timed apart.
   onnxruntime uses one thread per core this process may run on
   (:func:`taemi.backbones.dinov2.available_cores`);
3. fidelity: cosine similarity of each crop's int8 vector with its fp32 vector, over all
   crops (mean, min, 1st percentile, share below 0.99), and the mean per video.

Usage::

    python benchmarks/image_encoder.py          # ~3 min on 2 cores
    python benchmarks/image_encoder.py --batch-sizes 1 8 16 32 --timing-crops 96 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def crema_d_media() -> Path:
    root = os.environ.get("TAEMI_CREMA_D")
    base = (
        Path(root) if root else Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample"
    )
    return base / "media"


def face_crops(media: Path) -> dict[str, list[np.ndarray]]:
    """{video name: its face crops (224, 224, 3) uint8}, every frame of the first 400."""
    from taemi.extract.abaw import MEDIA_EXTENSIONS
    from taemi.extract.face import FaceCropper
    from taemi.extract.media import decode_video

    cropper = FaceCropper()
    out = {}
    for path in sorted(p for p in media.iterdir() if p.suffix.lower() in MEDIA_EXTENSIONS):
        video = decode_video(path, max_frames=400, policy="first")
        if video is None:  # audio only
            continue
        crops = [c for c in map(cropper.crop_frame, video.frames) if c is not None]
        if crops:
            out[path.name] = crops
    return out


def timed_encode(encoder, crops: list[np.ndarray], batch_size: int) -> float:
    """Seconds to encode ``crops`` in batches of ``batch_size`` (after one warm-up batch)."""
    encoder.batch_size = batch_size
    encoder.encode(crops[:batch_size])
    t0 = time.perf_counter()
    encoder.encode(crops)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--media", type=Path, default=None, help="folder of videos (CREMA-D sample)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--timing-crops", type=int, default=64, help="crops encoded per timing")
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds (median reported)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import onnxruntime as ort

    from taemi.backbones.dinov2 import DinoV2ImageEncoder, available_cores

    media = args.media or crema_d_media()
    if not media.is_dir():
        raise SystemExit(f"no media folder at {media} (--media, TAEMI_CREMA_D)")
    t0 = time.perf_counter()
    videos = face_crops(media)
    crops = [c for v in videos.values() for c in v]
    print(
        f"crops: {len(crops)} from {len(videos)} videos of {media} "
        f"({time.perf_counter() - t0:.1f} s to decode and crop)"
    )
    cpuinfo = Path("/proc/cpuinfo")
    cpu = cpuinfo.read_text() if cpuinfo.is_file() else ""
    print(
        f"onnxruntime {ort.__version__}, {available_cores()} cores available "
        f"(threads per session), avx512_vnni: {'avx512_vnni' in cpu}"
    )

    # 1. loading
    t0 = time.perf_counter()
    fp32 = DinoV2ImageEncoder()
    load_fp32 = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as empty:
        t0 = time.perf_counter()
        DinoV2ImageEncoder(precision="int8", cache_dir=empty)
        build = time.perf_counter() - t0
    DinoV2ImageEncoder(precision="int8")  # fills the user cache if it is empty
    t0 = time.perf_counter()
    int8 = DinoV2ImageEncoder(precision="int8")
    load_int8 = time.perf_counter() - t0
    print(
        f"load: fp32 {load_fp32:.2f} s; int8 from an empty cache {build:.2f} s "
        f"(quantised), from the cache {load_int8:.2f} s; int8 settings: "
        f"precision={int8.settings['precision']} int8_sha256={int8.settings['int8_sha256']}"
    )

    # 2. speed
    step = max(1, len(crops) // args.timing_crops)
    timing = crops[::step][: args.timing_crops]
    n = len(timing)
    t0 = time.perf_counter()
    fp32.preprocess(timing)
    pre_ms = (time.perf_counter() - t0) / n * 1e3
    print(f"\nspeed: {n} crops per timing, median of {args.repeats} rounds; ms per crop")
    print(f"preprocess alone (Pillow resize + normalise): {pre_ms:.1f} ms per crop")
    print(f"{'batch':>5} {'fp32':>8} {'int8':>8} {'speed-up':>9}")
    for bs in args.batch_sizes:
        f, q, ratio = [], [], []
        for _ in range(args.repeats):
            f.append(timed_encode(fp32, timing, bs) / n * 1e3)
            q.append(timed_encode(int8, timing, bs) / n * 1e3)
            ratio.append(f[-1] / q[-1])
        print(
            f"{bs:>5} {statistics.median(f):>8.1f} {statistics.median(q):>8.1f} "
            f"{statistics.median(ratio):>8.2f}x"
        )

    # 3. fidelity
    fp32.batch_size = int8.batch_size = 16
    sims, per_video = [], []
    for name, vc in videos.items():
        a, b = fp32.encode(vc), int8.encode(vc)  # (n, 384) each
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        sims.append(cos)
        per_video.append(f"{name} {cos.mean():.4f} ({len(vc)})")
    s = np.concatenate(sims)
    print(
        f"\nfidelity, int8 vs fp32 cosine over {s.size} crops: mean {s.mean():.4f}, "
        f"min {s.min():.4f}, 1st percentile {np.percentile(s, 1):.4f}, "
        f"below 0.99: {(s < 0.99).mean():.1%}"
    )
    print("per video (mean, crops): " + "; ".join(per_video))


if __name__ == "__main__":
    main()
