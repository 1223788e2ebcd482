"""The extraction speed settings together, against the exact path, in one run (issue 15).

Each named setting is a full ``taemi extract`` (``extract()`` into a temporary store,
offline profile, face crops, every model loaded beforehand and warmed up on one clip)
over the same corpus: the CREMA-D sample by default (6 talking-face FLV videos at 30
fps + 6 MP3s, ``--media DIR``; ``--repeat N`` links it N times under new ids so the
timed run is longer). Settings (``--settings``; each a ``+``-joined list of):

- ``exact``: fp32 DINOv2 on every frame's Haar crop, two Whisper passes on 30 s windows;
- ``int8``: ``--image-precision int8``; ``fpsN``: ``--vision-fps N``; ``detectK``:
  ``--detect-every K``; ``windowS``: ``--whisper-window S``; ``share``: ``--share-whisper``.

Printed per setting: the real-time factor (media seconds per wall second; the issue's
target is >= 4 on 2 cores), wall seconds, seconds per stage, and, against ``exact``, the
per-frame cosine similarity of the vision and audio features (mean over all frames of
all clips, and the lowest clip mean), the text-feature cosine (mean, min) and how many
transcripts are identical. The settings run one after the other, the exact path first,
on the same box: compare the ratios, not the absolute seconds of runs on other days.

Usage::

    python benchmarks/speed_settings.py            # ~3 min on 2 cores
    python benchmarks/speed_settings.py --settings exact int8+fps10+detect3 \\
        int8+fps10+detect3+window10+share --repeat 2
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MEDIA = Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample/media"
DEFAULT_SETTINGS = ("exact", "int8+fps10+detect3", "int8+fps10+detect3+window10+share")


def parse_setting(name: str) -> dict:
    """``int8+fps10+detect3+window10+share`` -> the load and extract options it stands for."""
    out = {"image_precision": "fp32", "vision_fps": None, "detect_every": 1, "window": 30.0}
    out["share"] = False
    for part in name.split("+"):
        if part == "exact":
            continue
        if part == "int8":
            out["image_precision"] = "int8"
        elif part == "share":
            out["share"] = True
        elif m := re.fullmatch(r"fps([0-9.]+)", part):
            out["vision_fps"] = float(m.group(1))
        elif m := re.fullmatch(r"detect([0-9]+)", part):
            out["detect_every"] = int(m.group(1))
        elif m := re.fullmatch(r"window([0-9.]+)", part):
            out["window"] = float(m.group(1))
        else:
            raise SystemExit(f"unknown setting part {part!r} in {name!r}")
    return out


def corpus(media: Path, repeat: int, dst: Path) -> list:
    from taemi.extract.pipeline import Source, find_sources

    sources, errors = find_sources([media])
    if errors or not sources:
        raise SystemExit(f"{media}: no usable media ({errors})")
    out = []
    for r in range(repeat):
        for s in sources:
            link = dst / f"{s.clip_id}_r{r}{s.media.suffix}"
            if not link.exists():
                link.symlink_to(s.media.resolve())
            out.append(Source(link.stem, link))
    return out


def run_setting(name: str, sources: list, root: Path) -> dict:
    from taemi.extract.pipeline import ExtractOptions, extract
    from taemi.extract.profiles import load_encoders

    s = parse_setting(name)
    enc = load_encoders(
        "offline",
        device="cpu",
        face=True,
        face_detect_every=s["detect_every"],
        image_precision=s["image_precision"],
        whisper_window=s["window"],
    )
    opts = ExtractOptions(vision_fps=s["vision_fps"], share_whisper=s["share"])
    store = root / re.sub(r"[^a-z0-9]+", "_", name)
    extract(sources[:1], root / f"warm_{store.name}", enc, opts, progress=False)  # warm-up
    t0 = time.perf_counter()
    summary = extract(sources, store, enc, opts, progress=False)
    wall = time.perf_counter() - t0
    if not summary.ok or summary.failed:
        raise SystemExit(f"{name}: extraction failed, see {summary.errors_file}")
    return {
        "name": name,
        "store": store,
        "wall": wall,
        "media": summary.media_seconds,
        "stages": dict(summary.stage_seconds),
    }


def frame_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = min(len(a), len(b))  # equal lengths unless a face was found in one path only
    a, b = a[:n].astype(np.float64), b[:n].astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def fidelity(exact: Path, other: Path) -> dict:
    from taemi.store import FeatureStore

    a, b = FeatureStore(exact), FeatureStore(other)
    out: dict = {}
    for m in ("vision", "audio"):
        per_clip, frames, lengths_differ = [], [], 0
        for cid in a.ids:
            x, y = getattr(a.get(cid), m), getattr(b.get(cid), m)
            if x is None or y is None:
                lengths_differ += (x is None) != (y is None)
                continue
            lengths_differ += len(x) != len(y)
            c = frame_cosines(x, y)
            per_clip.append(c.mean())
            frames.append(c)
        out[m] = {
            "mean": float(np.concatenate(frames).mean()) if frames else float("nan"),
            "lowest_clip": float(min(per_clip)) if per_clip else float("nan"),
            "clips_differing_in_length_or_presence": lengths_differ,
        }
    texts = [(a.get(cid).text, b.get(cid).text) for cid in a.ids]
    cos = [
        float(frame_cosines(x[None], y[None])[0])
        for x, y in texts
        if x is not None and y is not None
    ]
    same = sum(
        (exact / "transcripts" / f"{cid}.txt").read_text()
        == (other / "transcripts" / f"{cid}.txt").read_text()
        for cid in a.ids
        if (exact / "transcripts" / f"{cid}.txt").is_file()
        and (other / "transcripts" / f"{cid}.txt").is_file()
    )
    out["text"] = {
        "mean": float(np.mean(cos)),
        "min": float(min(cos)),
        "identical": same,
        "of": len(a.ids),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--media", type=Path, default=DEFAULT_MEDIA)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    args = p.parse_args(argv)
    if args.settings[0] != "exact":
        p.error("the first setting must be 'exact' (the reference)")
    for name in args.settings:
        parse_setting(name)  # a typo fails before any model loads
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="taemi-speed-") as tmp:
        root = Path(tmp)
        (root / "media").mkdir()
        sources = corpus(args.media, args.repeat, root / "media")
        rows = [run_setting(name, sources, root) for name in args.settings]
        print(f"\n{len(sources)} clips, {rows[0]['media']:.1f} s of media, offline profile, CPU")
        exact = rows[0]
        for r in rows:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items() if v >= 0.05)
            print(
                f"- {r['name']}: real-time factor {r['media'] / r['wall']:.2f} (wall {r['wall']:.1f} s, "
                f"{exact['wall'] / r['wall']:.2f}x the exact path); stage seconds: {stages}"
            )
            if r is exact:
                continue
            f = fidelity(exact["store"], r["store"])
            v, a, t = f["vision"], f["audio"], f["text"]
            print(
                f"  vs exact: vision cosine per frame mean {v['mean']:.4f} (lowest clip "
                f"{v['lowest_clip']:.4f}, {v['clips_differing_in_length_or_presence']} clips "
                f"differ in length or presence); audio mean {a['mean']:.4f} (lowest clip "
                f"{a['lowest_clip']:.4f}); text mean {t['mean']:.4f} (min {t['min']:.4f}), "
                f"transcripts identical {t['identical']} of {t['of']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
