"""Throughput of feature extraction (``offline`` profile) on this CPU, its floor, and its
peak memory on a long input.

Everything is measured in ONE run, so the ratios compare like with like on a shared box:

1. Real-time factor: ``extract()`` over a corpus (default: the 12 real CREMA-D clips of
   ``shared/data/crema-d-sample/media``, 6 FLV videos + 6 MP3s; ``--input DIR``;
   ``--repeat N`` links the corpus N times under new clip ids), into a temporary store.
   Seconds of media (``ExtractSummary.media_seconds``: audio length, or the video's
   timestamp span if longer) per wall-clock second, and the seconds per stage from
   ``ExtractSummary.stage_seconds``. The pipeline decodes in ``--workers`` threads while
   the models run, so its decode time (summed over threads) overlaps the model stages
   and the stages can add up to more than the wall time.

   The pipeline's ``decode`` stage includes face cropping (``FaceCropper.crop_frame`` is
   applied to each frame as it is decoded). To split it, a SEPARATE single-threaded pass
   over the same (unique) clips afterwards times ``decode_audio``, ``decode_video``
   without a transform, and then ``crop_frame`` on every decoded frame, one call at a
   time. (With ``--repeat N`` this pass runs once and its times are multiplied by N.)

2. The floor: the encoders' standalone forward times on the same inputs, everything
   decoded beforehand (by the pass above) so only model calls are timed: Whisper
   ``transcribe`` per clip; ``WhisperEncoder.encode`` on the waveforms in batches of
   ``--batch-size`` clips; ``DinoV2ImageEncoder.encode`` on all face crops (chunks of
   ``8 x --batch-size`` images, as the pipeline passes them; the encoder batches 16);
   ``MiniLMTextEncoder.encode`` on the non-empty transcripts in batches of ``--batch-size``.
   These are the calls the pipeline makes, including the encoders' own preprocessing
   (log-mel for Whisper, resize + normalise for DINOv2), which is also timed on its own
   ("of which"). Overhead ratio = pipeline wall time / floor (sum of the four). Every
   model is called once on the first clip before anything is timed (warm-up).

   "cores used" = process CPU seconds / wall seconds of each part (2 at most on 2 cores;
   lower means the process waited: other load on the box, or idle threads), and a
   1024^3 fp32 matmul rate is taken before each part, to see how contended the box was.
   The CPU seconds of the two parts are compared too: on a shared box the load can
   change between the pipeline and the floor, which moves the wall ratio more than the
   CPU ratio. "floor + decode pass" is the serial, single-threaded cost of all the work
   the pipeline does (models, decoding, face cropping); the "alone s" column holds the
   standalone times (floor parts and the separate decode pass).

3. Peak memory on a long input (``--skip-long`` skips it): a ``--long-minutes`` (20) file
   and a 10-second file made the same way (160x120 at 10 fps, MPEG-4 Part 2 video of a
   square moving over a gradient, 16 kHz mono PCM audio of an amplitude-modulated
   tone, in Matroska, written with PyAV to a temp dir; ``--long-face`` moves a real face
   frame from the corpus instead, so that crops are made and DINOv2 runs). Each is
   extracted alone in a fresh child process (same options), which reports peak RSS
   during ``extract()`` (``VmHWM`` from ``/proc/self/status`` after resetting it with
   ``/proc/self/clear_refs`` once the models are loaded), peak RssAnon (sampled every
   10 ms), RSS after loading the models, the peak while loading them (``VmHWM`` before
   the reset) and the wall time. (``ru_maxrss`` is not used: in a child started by
   fork + exec it can report the parent's RSS at the fork, and it survives the reset.) Peak memory must not grow with the duration: audio is cut at 12 s while
   decoding and at most ``--max-frames`` frames are decoded, each cropped (or dropped)
   as it is decoded.

4. Face detection threads (``--detector``; ``--detector --skip-throughput --skip-long``
   runs it alone, in seconds, no models loaded): every decoding thread has its own
   OpenCV cascade (``FaceCropper`` keeps one per thread; one shared cascade is not
   thread-safe). Times loading a cascade in a fresh thread (the cost each worker pays
   once), then decoding + face cropping of the corpus' videos (``--repeat`` times, under
   new ids) through the pipeline's decoding threads (``_decoded_in_order``) with 1, 2 and
   4 workers, and decoding alone (no cropper) with the same workers: frames per second,
   and whether the crops are bit-identical for every worker count.

5. Face detection every k-th frame (``--detect-every 1 3 5``; with ``--skip-throughput
   --skip-long`` it runs alone): the corpus' videos (every frame up to ``--max-frames``,
   ``--frame-policy``) decoded and face-cropped in this thread, one
   ``FaceCropper(detect_every=k).for_video()`` track per video, for each k side by side
   (best of ``--timing-runs`` passes, k interleaved), and decoding alone: frames per
   second, ms per frame, detector passes and crops. Fidelity against k=1: the frames
   cropped (the same set?), the IoU of each frame's square crop box (mean, min), and,
   unless ``--no-vision-features``, the cosine similarity of the offline profile's
   DINOv2 ViT-S/14 features (fp32 ONNX, packaged) of each crop with those of k=1 (mean,
   min; detection frames give k=1's crops bit for bit, so only the others are encoded).

Run from the repository root with the project's environment::

    python benchmarks/extract_throughput.py   # ~2.5 min on 2 quiet cores, ~5 min under load
    python benchmarks/extract_throughput.py --repeat 4 --skip-long
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _paper_store import PeakSampler, proc_status

MiB = 1 << 20
DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "crema-d-sample" / "media"
SHORT_SECONDS = 10.0


# --------------------------------------------------------------------------- helpers


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def matmul_gflops(n: int = 1024, reps: int = 3) -> float:
    """Best of ``reps`` fp32 n^3 matmuls with torch's default threads, GFLOP/s."""
    import torch

    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


class Clock:
    """Accumulates wall seconds of ``with clock:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Clock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def load_offline(batch_size: int):
    from taemi.extract.profiles import load_encoders

    return load_encoders("offline", batch_size=batch_size)


def options(args: argparse.Namespace):
    from taemi.extract.pipeline import ExtractOptions

    return ExtractOptions(
        max_frames=args.max_frames,
        frame_policy=args.frame_policy,
        batch_size=args.batch_size,
        workers=args.workers,
    )


# --------------------------------------------------------------------------- parts 1 + 2


def link_corpus(input_dir: Path, dst: Path, repeat: int):
    """Symlinks to the corpus' media in ``dst``, ``repeat`` times (copies k >= 1 get the id
    suffix ``_r{k}``); returns (unique sources, linked sources)."""
    from taemi.extract.pipeline import find_sources

    unique, errors = find_sources([input_dir])
    for e in errors:
        print(f"  skipped input {e['path']}: {e['reason']}")
    if not unique:
        raise SystemExit(f"no usable media files in {input_dir}")
    for k in range(repeat):
        for s in unique:
            name = s.media.name if k == 0 else f"{s.media.stem}_r{k}{s.media.suffix}"
            (dst / name).symlink_to(s.media.resolve())
    linked, errors = find_sources([dst])
    assert not errors and len(linked) == repeat * len(unique), errors
    return unique, linked


def warm_up(enc, unique) -> None:
    """One call of every model on the first clip with audio (and crops of the first video)."""
    from taemi.backbones.base import SAMPLE_RATE
    from taemi.extract.media import decode_audio, decode_video

    for s in unique:
        a = decode_audio(s.media, sample_rate=SAMPLE_RATE, max_seconds=12.0)
        if a is not None:
            text = enc.asr.transcribe(a.samples) or "warm up"
            enc.audio.encode([a.samples])
            enc.text.encode([text])
            break
    for s in unique:
        v = decode_video(s.media, max_frames=8)
        if v is not None:
            crops = [c for c in map(enc.face.crop_frame, v.frames) if c is not None]
            enc.image.encode(crops or v.frames)
            break


def run_pipeline(enc, linked, store: Path, args: argparse.Namespace) -> dict:
    from taemi.extract.pipeline import extract

    gf = matmul_gflops()
    c0, t0 = cpu_seconds(), time.perf_counter()
    summary = extract(linked, store, enc, options(args), progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if summary.failed:
        print(f"  WARNING: {summary.failed} clip(s) failed, see {summary.errors_file}")
    return {"summary": summary, "wall": wall, "cpu": cpu, "gflops": gf}


def predecode(enc, unique, args: argparse.Namespace) -> dict:
    """Single-threaded decode of the unique clips; face cropping timed per frame apart."""
    from taemi.backbones.base import SAMPLE_RATE
    from taemi.extract.media import decode_audio, decode_video

    t_audio, t_video, t_crop = Clock(), Clock(), Clock()
    waves, crops, frames, n_video = [], [], 0, 0
    c0 = cpu_seconds()
    for s in unique:
        with t_audio:
            a = decode_audio(s.media, sample_rate=SAMPLE_RATE, max_seconds=12.0)
        waves.append(None if a is None or a.samples.shape[0] == 0 else a.samples)
        with t_video:
            v = decode_video(s.media, max_frames=args.max_frames, policy=args.frame_policy)
        clip_crops = []
        if v is not None:
            n_video += 1
            frames += len(v.frames)
            for f in v.frames:
                with t_crop:
                    c = enc.face.crop_frame(f)
                if c is not None:
                    clip_crops.append(c)
        crops.append(clip_crops)
        del v
    return {
        "cpu": cpu_seconds() - c0,
        "audio": t_audio.seconds,
        "video": t_video.seconds,
        "crop": t_crop.seconds,
        "waves": waves,
        "crops": crops,
        "frames": frames,
        "n_video": n_video,
    }


def floor(enc, dec: dict, repeat: int, batch_size: int) -> dict:
    """Model calls only, on the pre-decoded inputs (the corpus ``repeat`` times)."""
    waves = [w for w in dec["waves"] if w is not None] * repeat
    crops = [c for clip in dec["crops"] for c in clip] * repeat
    gf = matmul_gflops()
    c0, t0 = cpu_seconds(), time.perf_counter()
    asr, audio, vision, text = Clock(), Clock(), Clock(), Clock()
    transcripts = []
    with asr:
        for w in waves:
            transcripts.append(enc.asr.transcribe(w).strip())
    with audio:
        for i in range(0, len(waves), batch_size):
            enc.audio.encode(waves[i : i + batch_size])
    chunk = batch_size * 8  # what the pipeline hands the image encoder at once
    with vision:
        for i in range(0, len(crops), chunk):
            enc.image.encode(crops[i : i + chunk])
    texts = [t for t in transcripts if t]
    with text:
        for i in range(0, len(texts), batch_size):
            enc.text.encode(texts[i : i + batch_size])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0

    # "of which": the encoders' own preprocessing, timed again on its own (not in the floor)
    fe = enc.audio.whisper.model.feature_extractor
    mel, pre = Clock(), Clock()
    with mel:
        for w in waves:
            fe(np.pad(w, (0, enc.audio.window - w.size)), padding=0)
    with pre:
        for i in range(0, len(crops), enc.image.batch_size):
            enc.image.preprocess(crops[i : i + enc.image.batch_size])
    return {
        "asr": asr.seconds,
        "audio": audio.seconds,
        "vision": vision.seconds,
        "text": text.seconds,
        "wall": wall,
        "cpu": cpu,
        "gflops": gf,
        "mel": mel.seconds,
        "preprocess": pre.seconds,
        "n_waves": len(waves),
        "n_crops": len(crops),
        "n_texts": len(texts),
        "transcripts": transcripts,
    }


def part_throughput(args: argparse.Namespace) -> dict:
    from taemi.extract.pipeline import STAGES, TRANSCRIPTS
    from taemi.store import FeatureStore

    t0 = time.perf_counter()
    enc = load_offline(args.batch_size)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="taemi-extract-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "media").mkdir()
        unique, linked = link_corpus(args.input, tmp / "media", args.repeat)
        warm_up(enc, unique)
        print(
            f"models loaded in {load_s:.1f} s; corpus {len(unique)} clips x {args.repeat} = "
            f"{len(linked)}; running extract() ...",
            flush=True,
        )
        pipe = run_pipeline(enc, linked, tmp / "store", args)
        store = FeatureStore(tmp / "store")
        pipe_crops = sum(0 if c.vision is None else c.vision.shape[0] for c in store)
        pipe_texts = {
            s.clip_id: (tmp / "store" / TRANSCRIPTS / f"{s.clip_id}.txt").read_text().strip()
            for s in unique
        }
        print(f"  extract: {pipe['wall']:.1f} s; pre-decoding for the floor ...", flush=True)
        dec = predecode(enc, unique, args)
        print("  timing the models alone (floor) ...", flush=True)
        fl = floor(enc, dec, args.repeat, args.batch_size)
    s = pipe["summary"]
    n_crops_unique = sum(len(c) for c in dec["crops"])
    same_text = sum(
        pipe_texts[u.clip_id] == t
        for u, t in zip(
            [u for u, w in zip(unique, dec["waves"]) if w is not None], fl["transcripts"]
        )
    )
    return {
        "load_s": load_s,
        "clips": len(linked),
        "unique": len(unique),
        "repeat": args.repeat,
        "n_video": dec["n_video"] * args.repeat,
        "frames": dec["frames"] * args.repeat,
        "pipe_crops": pipe_crops,
        "floor_crops": fl["n_crops"],
        "crops_unique": n_crops_unique,
        "media_s": s.media_seconds,
        "done": s.done,
        "failed": s.failed,
        "missing": s.missing,
        "stages": {k: s.stage_seconds[k] for k in STAGES},
        "pipe": {k: pipe[k] for k in ("wall", "cpu", "gflops")},
        "decode_pass": {k: dec[k] * args.repeat for k in ("audio", "video", "crop", "cpu")},
        "floor": {k: v for k, v in fl.items() if k != "transcripts"},
        "same_transcripts": f"{same_text}/{len(fl['transcripts']) // args.repeat}",
    }


def print_throughput(r: dict) -> None:
    st, fl, dp, pipe = r["stages"], r["floor"], r["decode_pass"], r["pipe"]
    floor_total = fl["asr"] + fl["audio"] + fl["vision"] + fl["text"]
    print()
    print(
        f"corpus: {r['clips']} clips ({r['unique']} unique x {r['repeat']}), "
        f"{r['n_video']} with video; "
        f"{r['media_s']:.1f} s of media; {r['frames']} video frames decoded, face crops: "
        f"pipeline {r['pipe_crops']}, floor {r['floor_crops']}; done {r['done']}, "
        f"failed {r['failed']}, missing {r['missing']}; floor transcripts equal to the "
        f"pipeline's: {r['same_transcripts']}"
    )
    w = 52
    print(f"{'stage':<{w}} {'pipeline s':>10} {'alone s':>9} {'pipe/alone':>10}")
    print("-" * (w + 32))

    def row(name: str, p: float | None, f: float | None, extra: str = "") -> None:
        ps = f"{p:10.2f}" if p is not None else f"{'':>10}"
        fs = f"{f:9.2f}" if f is not None else f"{'':>9}"
        ratio = f"{p / f:10.2f}" if p is not None and f else f"{'':>10}"
        print(f"{name:<{w}} {ps} {fs} {ratio}  {extra}".rstrip())

    decode_alone = dp["audio"] + dp["video"] + dp["crop"]
    row("decode (sum over worker threads, incl. face crops)", st["decode"], decode_alone)
    row("  separate pass: audio decode (12 s cut)", None, dp["audio"])
    row("  separate pass: video decode (no transform)", None, dp["video"])
    nf = max(r["frames"], 1)
    row(
        "  separate pass: face cropping (Haar)",
        None,
        dp["crop"],
        f"{1000 * dp['crop'] / nf:.1f} ms/frame",
    )
    row(
        "asr (Whisper tiny.en transcribe, per clip)",
        st["asr"],
        fl["asr"],
        f"{1000 * fl['asr'] / max(fl['n_waves'], 1):.0f} ms/clip (floor)",
    )
    row(
        "audio (Whisper encoder, 30 s window)",
        st["audio"],
        fl["audio"],
        f"{1000 * fl['audio'] / max(fl['n_waves'], 1):.0f} ms/clip (floor)",
    )
    row("  of which log-mel (timed apart)", None, fl["mel"])
    row(
        "vision (DINOv2 ViT-S/14, ONNX)",
        st["vision"],
        fl["vision"],
        f"{1000 * fl['vision'] / max(fl['n_crops'], 1):.0f} ms/crop (floor)",
    )
    row("  of which resize + normalise (timed apart)", None, fl["preprocess"])
    row("text (MiniLM-L6)", st["text"], fl["text"])
    row("write", st["write"], None)
    serial = floor_total + decode_alone
    row("sum of stages (decode overlaps the models)", sum(st.values()), serial)
    row(
        "model stages only = FLOOR (asr + audio + vision + text)",
        st["asr"] + st["audio"] + st["vision"] + st["text"],
        floor_total,
    )
    print("-" * (w + 32))
    row("WALL: extract() vs floor (overhead ratio)", pipe["wall"], floor_total)
    row("WALL: extract() vs floor + decode pass (serial)", pipe["wall"], serial)
    row("CPU s: extract() vs floor + decode pass", pipe["cpu"], fl["cpu"] + dp["cpu"])
    total = sum(st.values()) or 1.0
    slowest = max(st, key=st.get)
    print(
        "stage shares of the pipeline's stage seconds: "
        + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in st.items())
        + f"; slowest stage {slowest} {st[slowest]:.2f} s; wall / slowest stage "
        f"{pipe['wall'] / max(st[slowest], 1e-9):.2f} (1.00: the slowest stage sets the pace; "
        "the models run one after the other, decoding runs beside them)"
    )
    print(
        f"real-time factor (media s per wall s): pipeline {r['media_s'] / pipe['wall']:.3f}, "
        f"floor {r['media_s'] / floor_total:.3f}, floor + decode pass {r['media_s'] / serial:.3f}"
    )
    print(
        f"cores used (CPU s / wall s): pipeline {pipe['cpu'] / pipe['wall']:.2f}, "
        f"floor {fl['cpu'] / fl['wall']:.2f}; matmul 1024^3 fp32 before: pipeline "
        f"{pipe['gflops']:.0f} GFLOP/s, floor {fl['gflops']:.0f} GFLOP/s; "
        f"model load {r['load_s']:.1f} s"
    )


# --------------------------------------------------------------------------- part 3


def face_frame(input_dir: Path, width: int, height: int) -> np.ndarray | None:
    """A frame with a face from the corpus' first video, scaled to width x height."""
    import cv2

    from taemi.extract.face import FaceCropper
    from taemi.extract.media import decode_video
    from taemi.extract.pipeline import find_sources

    cropper = FaceCropper()
    for s in find_sources([input_dir])[0]:
        v = decode_video(s.media, max_frames=30)
        for f in [] if v is None else v.frames:
            small = cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA)
            if cropper.detect(small) is not None:
                return small
    return None


def make_media(
    path: Path,
    seconds: float,
    face: np.ndarray | None,
    fps: int = 10,
    width: int = 160,
    height: int = 120,
    sample_rate: int = 16000,
) -> None:
    """An audio + video file: a moving pattern (or ``face`` shifted about) at ``fps``,
    MPEG-4 Part 2 video (cheap to encode), 16 kHz mono PCM; 40 distinct frames cycled."""
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 96)], -1).astype(
        np.uint8
    )
    cycle = []
    for k in range(40):
        if face is None:
            f = background.copy()
            x0 = (k * 4) % (width - 24)
            f[height // 2 - 12 : height // 2 + 12, x0 : x0 + 24] = 255  # a white square
        else:
            f = np.roll(face, (k % 20) - 10, axis=1)  # the face slides +-10 px
        cycle.append(np.ascontiguousarray(f))
    n_frames = round(seconds * fps)
    t = np.arange(sample_rate) / sample_rate
    tone = 0.1 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    pcm = (tone * 32767).astype(np.int16)[None]  # (1, sample_rate): one second
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.codec_context.gop_size = 10 * fps
        aus = c.add_stream("pcm_s16le", rate=sample_rate)
        aus.layout = "mono"
        for sec in range(int(np.ceil(seconds))):
            n = min(sample_rate, round((seconds - sec) * sample_rate))
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm[:, :n]), format="s16", layout="mono"
            )
            af.sample_rate, af.pts = sample_rate, sec * sample_rate
            for p in aus.encode(af):
                c.mux(p)
            for i in range(sec * fps, min((sec + 1) * fps, n_frames)):
                vf = av.VideoFrame.from_ndarray(cycle[i % len(cycle)], format="rgb24")
                vf.pts = i
                for p in vs.encode(vf):
                    c.mux(p)
        for p in vs.encode():
            c.mux(p)
        for p in aus.encode():
            c.mux(p)


def child_long(args: argparse.Namespace) -> None:
    """Child process: extract one file, print one JSON line of memory and time figures."""
    from taemi.extract.pipeline import extract, find_sources
    from taemi.store import FeatureStore

    quiet_logs()
    enc = load_offline(args.batch_size)
    import gc

    gc.collect()
    after_load = proc_status()  # its VmHWM: the peak while loading the models
    reset = reset_peak_rss()
    sources, errors = find_sources([args.child_long])
    assert not errors, errors
    with tempfile.TemporaryDirectory(prefix="taemi-extract-long-") as tmp:
        sampler = PeakSampler()
        sampler.start()
        t0 = time.perf_counter()
        summary = extract(sources, Path(tmp) / "store", enc, options(args), progress=False)
        wall = time.perf_counter() - t0
        peak = sampler.stop()
        end = proc_status()
        clip = FeatureStore(Path(tmp) / "store").get(sources[0].clip_id) if summary.done else None
    print(
        json.dumps(
            {
                "wall": wall,
                "media_s": summary.media_seconds,
                "done": summary.done,
                "failed": summary.failed,
                "missing": summary.missing,
                "stages": summary.stage_seconds,
                "crops": None if clip is None or clip.vision is None else int(clip.vision.shape[0]),
                "audio_frames": None
                if clip is None or clip.audio is None
                else int(clip.audio.shape[0]),
                "rss_after_load": after_load["VmRSS"],
                "anon_after_load": after_load["RssAnon"],
                "hwm_reset": reset,
                "hwm_extract": end["VmHWM"] if reset else None,
                "peak_rss_sampled": peak["VmRSS"],
                "peak_anon_sampled": peak["RssAnon"],
                "hwm_load": after_load["VmHWM"],
            }
        )
    )


def measure_long(path: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child-long",
        str(path),
        "--workers",
        str(args.workers),
        "--batch-size",
        str(args.batch_size),
        "--max-frames",
        str(args.max_frames),
        "--frame-policy",
        args.frame_policy,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(
            f"the measuring child failed for {path} (exit {res.returncode}):\n{res.stderr[-4000:]}"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_long(args: argparse.Namespace) -> dict:
    face = None
    if args.long_face:
        face = face_frame(args.input, 160, 120)
        if face is None:
            raise SystemExit(
                f"--long-face: no frame of {args.input} has a face the Haar detector "
                "finds at 160x120"
            )
    out = {}
    with tempfile.TemporaryDirectory(prefix="taemi-extract-long-") as tmp:
        for label, seconds in (("short", SHORT_SECONDS), ("long", args.long_minutes * 60)):
            path = Path(tmp) / f"bench_{label}.mkv"
            t0 = time.perf_counter()
            make_media(path, seconds, face)
            made = time.perf_counter() - t0
            print(
                f"  made {path.name}: {seconds:.0f} s, {path.stat().st_size / MiB:.1f} MiB "
                f"in {made:.1f} s; "
                "extracting in a child process ...",
                flush=True,
            )
            out[label] = {
                "seconds": seconds,
                "bytes": path.stat().st_size,
                **measure_long(path, args),
            }
            path.unlink()
    return out


def print_long(r: dict, args: argparse.Namespace) -> None:
    s, g = r["short"], r["long"]

    def mib(x: int | None) -> str:
        return (
            "n/a" if x is None else f"{x / MiB:.1f} MiB" if x < 10 * MiB else f"{x / MiB:.0f} MiB"
        )

    def ratio(a: float | None, b: float | None) -> str:
        return f"{b / a:.3f}" if a and b is not None else ""

    print()
    what = "a face from the corpus" if args.long_face else "a moving square (no face)"
    print(
        f"peak memory, one file per child process (160x120 at 10 fps, {what}; 16 kHz mono PCM; "
        f"max_frames {args.max_frames}, policy {args.frame_policy})"
    )
    lab_l = f"{g['seconds'] / 60:.0f} min file"
    print(f"{'':<46} {'10 s file':>18} {lab_l:>18} {'ratio':>7}")
    rows = [
        ("file size", mib(s["bytes"]), mib(g["bytes"]), ratio(s["bytes"], g["bytes"])),
        (
            "media s processed (ExtractSummary)",
            f"{s['media_s']:.1f}",
            f"{g['media_s']:.1f}",
            ratio(s["media_s"], g["media_s"]),
        ),
        (
            "audio frames / face crops stored",
            f"{s['audio_frames']} / {s['crops']}",
            f"{g['audio_frames']} / {g['crops']}",
            "",
        ),
        (
            "missing audio / vision / text",
            " / ".join(str(v) for v in s["missing"].values()),
            " / ".join(str(v) for v in g["missing"].values()),
            "",
        ),
        ("extract() wall s", f"{s['wall']:.1f}", f"{g['wall']:.1f}", ratio(s["wall"], g["wall"])),
        (
            "  stage s: decode / asr / audio / vision",
            " / ".join(f"{s['stages'][k]:.1f}" for k in ("decode", "asr", "audio", "vision")),
            " / ".join(f"{g['stages'][k]:.1f}" for k in ("decode", "asr", "audio", "vision")),
            "",
        ),
        (
            "RSS after loading the models",
            mib(s["rss_after_load"]),
            mib(g["rss_after_load"]),
            ratio(s["rss_after_load"], g["rss_after_load"]),
        ),
        (
            "PEAK RSS during extract() (VmHWM after reset)",
            mib(s["hwm_extract"]),
            mib(g["hwm_extract"]),
            ratio(s["hwm_extract"], g["hwm_extract"]),
        ),
        (
            "  added by extract() (peak - after load)",
            mib(s["hwm_extract"] - s["rss_after_load"]) if s["hwm_extract"] else "n/a",
            mib(g["hwm_extract"] - g["rss_after_load"]) if g["hwm_extract"] else "n/a",
            "",
        ),
        (
            "peak RssAnon during extract() (10 ms samples)",
            mib(s["peak_anon_sampled"]),
            mib(g["peak_anon_sampled"]),
            ratio(s["peak_anon_sampled"], g["peak_anon_sampled"]),
        ),
        (
            "peak RSS while loading the models (VmHWM)",
            mib(s["hwm_load"]),
            mib(g["hwm_load"]),
            ratio(s["hwm_load"], g["hwm_load"]),
        ),
    ]
    for name, a, b, rt in rows:
        print(f"{name:<46} {a:>18} {b:>18} {rt:>7}")


# --------------------------------------------------------------------------- main


# --------------------------------------------------------------------------- part 4


def part_detector(args: argparse.Namespace) -> None:
    """Per-thread cascades: load cost in a fresh thread; decode + crop with 1, 2, 4 workers."""
    import threading

    from taemi.extract.face import FaceCropper
    from taemi.extract.media import probe
    from taemi.extract.pipeline import ExtractOptions, Source, _decoded_in_order, find_sources

    sources, _ = find_sources([args.input])
    videos = [s for s in sources if probe(s.media)["video"]]
    if not videos:
        raise SystemExit(f"part 4 needs video files; {args.input} has none")
    todo = [Source(f"{s.clip_id}_r{k}", s.media) for k in range(args.repeat) for s in videos]
    cropper = FaceCropper()
    loads: list[float] = []

    def load_in_thread() -> None:
        t0 = time.perf_counter()
        cropper._detector()  # this thread's first use: loads its cascade
        loads.append(time.perf_counter() - t0)

    for _ in range(8):
        t = threading.Thread(target=load_in_thread)
        t.start()
        t.join()
    print(
        f"\nface detection threads: cascade load in a fresh thread {1000 * min(loads):.1f} ms "
        f"(median {1000 * float(np.median(loads)):.1f} ms, 8 threads, one at a time); "
        f"{len(todo)} videos, max_frames {args.max_frames}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(
        f"  {'workers':>7} {'crop':>5} {'wall s':>7} {'cpu s':>7} {'frames/s':>9} {'faces':>6}  identical"
    )
    frames = 0  # decoded frames of all videos: from the first pass (no cropper keeps every frame)
    reference: list[bytes] | None = None
    for crop in (False, True):
        for workers in (1, 2, 4):
            opts = ExtractOptions(
                max_frames=args.max_frames, workers=workers, batch_size=args.batch_size
            )
            face = FaceCropper() if crop else None  # fresh: each worker thread loads its cascade
            c0, t0 = cpu_seconds(), time.perf_counter()
            decoded = list(_decoded_in_order(todo, opts, face))
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            kept = sum(len(d.faces or []) for d in decoded)
            frames = frames or kept
            same = faces = ""
            if crop:
                crops = [b"".join(f.tobytes() for f in d.faces or []) for d in decoded]
                reference = reference or crops
                same, faces = ("yes" if crops == reference else "NO"), str(kept)
            print(
                f"  {workers:>7} {'yes' if crop else 'no':>5} {wall:>7.2f} {cpu:>7.2f} {frames / wall:>9.1f} "
                f"{faces:>6}  {same}",
                flush=True,
            )


# --------------------------------------------------------------------------- part 5


def square_iou(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """IoU of two square boxes ``(x0, y0, side)``."""
    (ax, ay, sa), (bx, by, sb) = a, b
    ix = max(0, min(ax + sa, bx + sb) - max(ax, bx))
    iy = max(0, min(ay + sa, by + sb) - max(ay, by))
    return ix * iy / (sa * sa + sb * sb - ix * iy)


def part_detect_every(args: argparse.Namespace) -> None:
    """Decode + crop with the detector on every k-th frame: speed and fidelity vs k=1."""
    from taemi.extract.face import FaceCropper
    from taemi.extract.media import decode_video, probe
    from taemi.extract.pipeline import find_sources

    sources, _ = find_sources([args.input])
    videos = [s.media for s in sources if probe(s.media)["video"]]
    if not videos:
        raise SystemExit(f"part 5 needs video files; {args.input} has none")
    ks = sorted({1, *args.detect_every})
    decode = {"max_frames": args.max_frames, "policy": args.frame_policy}
    print(
        f"\nface detection every k-th frame: {len(videos)} videos, max_frames "
        f"{args.max_frames}, policy {args.frame_policy}, one thread, best of "
        f"{args.timing_runs} passes; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    best: dict[object, float] = {}
    results: dict[int, list] = {}  # k -> per video (Video of crops, square boxes, detections)
    frames = 0
    for _ in range(args.timing_runs):
        t0 = time.perf_counter()
        frames = sum(len(decode_video(v, **decode)) for v in videos)
        best["decode"] = min(best.get("decode", float("inf")), time.perf_counter() - t0)
        for k in ks:
            cropper = FaceCropper(detect_every=k)
            out = []
            t0 = time.perf_counter()
            for v in videos:
                track = cropper.for_video()
                crops = track.finish(decode_video(v, transform=track, **decode))
                out.append((crops, track.boxes, track.detections))
            best[k] = min(best.get(k, float("inf")), time.perf_counter() - t0)
            results[k] = out
    print(
        f"  {'k':>6} {'wall s':>7} {'frames/s':>9} {'ms/frame':>9} {'detections':>10} {'crops':>6}"
    )
    print(
        f"  {'decode':>6} {best['decode']:>7.2f} {frames / best['decode']:>9.1f} "
        f"{1000 * best['decode'] / frames:>9.2f} {'-':>10} {'-':>6}"
    )
    for k in ks:
        det = sum(r[2] for r in results[k])
        crops = sum(len(r[0]) for r in results[k])
        print(
            f"  {k:>6} {best[k]:>7.2f} {frames / best[k]:>9.1f} {1000 * best[k] / frames:>9.2f} "
            f"{det:>10} {crops:>6}",
            flush=True,
        )

    encoder = None
    if not args.no_vision_features:
        from taemi.backbones.dinov2 import DinoV2ImageEncoder

        encoder = DinoV2ImageEncoder()  # the offline profile's fp32 ONNX image encoder
        exact_features = [encoder.encode(r[0].frames) for r in results[1]]  # (n_v, 384) each
    print(
        f"  fidelity vs k=1: {'k':>3} {'same frames':>11} {'IoU mean':>9} {'IoU min':>8}"
        + ("" if encoder is None else f" {'cos mean':>9} {'cos min':>8} {'encoded':>8}")
    )
    for k in ks[1:]:
        same = all(
            np.array_equal(a[0].timestamps, b[0].timestamps) for a, b in zip(results[1], results[k])
        )
        ious, cosines, encoded = [], [], 0
        for v, (exact, fast) in enumerate(zip(results[1], results[k])):
            at = {t: i for i, t in enumerate(exact[0].timestamps.tolist())}
            pairs = [(at[t], j) for j, t in enumerate(fast[0].timestamps.tolist()) if t in at]
            ious += [square_iou(exact[1][i], fast[1][j]) for i, j in pairs]
            if encoder is None:
                continue
            redo = [(i, j) for i, j in pairs if exact[1][i] != fast[1][j]]  # other crop box
            cosines += [1.0] * (len(pairs) - len(redo))  # the same box: k=1's crop, bit for bit
            if redo:
                a = exact_features[v][[i for i, _ in redo]]  # (m, 384)
                b = encoder.encode([fast[0].frames[j] for _, j in redo])  # (m, 384)
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                cosines += cos.tolist()
                encoded += len(redo)
        line = (
            f"  {'':>15} {k:>3} {'yes' if same else 'NO':>11} {np.mean(ious):>9.4f} "
            f"{np.min(ious):>8.4f}"
        )
        if encoder is not None:
            line += f" {np.mean(cosines):>9.4f} {np.min(cosines):>8.4f} {encoded:>8}"
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--input",
        type=Path,
        default=DEFAULT_INPUT,
        help="folder of media files (default: %(default)s)",
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="decoding threads (ExtractOptions.workers)"
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="clips per model batch (ExtractOptions.batch_size)",
    )
    ap.add_argument(
        "--max-frames",
        type=int,
        default=400,
        help="video frames per clip (ExtractOptions.max_frames)",
    )
    ap.add_argument("--frame-policy", choices=("first", "uniform"), default="first")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="extract the corpus this many times (linked under new ids)",
    )
    ap.add_argument(
        "--skip-long", action="store_true", help="skip part 3 (peak memory on a long input)"
    )
    ap.add_argument("--skip-throughput", action="store_true", help="skip parts 1 and 2")
    ap.add_argument(
        "--long-minutes", type=float, default=20.0, help="duration of the long file (part 3)"
    )
    ap.add_argument(
        "--long-face",
        action="store_true",
        help="part 3 files show a face from the corpus (crops made, DINOv2 runs; slower)",
    )
    ap.add_argument(
        "--detector",
        action="store_true",
        help="part 4: per-thread face detectors: cascade load cost, decode+crop with 1/2/4 workers",
    )
    ap.add_argument(
        "--detect-every",
        type=int,
        nargs="+",
        metavar="K",
        help="part 5: decode+crop with the face detector on every K-th frame (k=1 added), "
        "speed and fidelity vs k=1",
    )
    ap.add_argument(
        "--timing-runs", type=int, default=3, help="part 5: passes timed per k (best kept)"
    )
    ap.add_argument(
        "--no-vision-features",
        action="store_true",
        help="part 5: skip the DINOv2 feature cosine similarity (IoU only)",
    )
    ap.add_argument("--child-long", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.child_long is not None:
        child_long(args)
        return
    needs_input = (
        not args.skip_throughput
        or (not args.skip_long and args.long_face)
        or args.detector
        or args.detect_every
    )
    if needs_input and not args.input.is_dir():
        raise SystemExit(
            f"input folder {args.input} does not exist: pass --input DIR (a folder of media "
            "files; the default is the CREMA-D sample, shared/data/crema-d-sample/media next "
            "to the repository)"
        )
    quiet_logs()
    import torch

    print(
        f"extract throughput, offline profile: workers {args.workers}, batch {args.batch_size}, "
        f"max_frames {args.max_frames}, policy {args.frame_policy}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M:%S')}",
        flush=True,
    )
    t0 = time.perf_counter()
    if not args.skip_throughput:
        print_throughput(part_throughput(args))
    if not args.skip_long:
        print(
            f"\npeak memory: {SHORT_SECONDS:.0f} s vs {args.long_minutes:g} min input ...",
            flush=True,
        )
        print_long(part_long(args), args)
    if args.detector:
        part_detector(args)
    if args.detect_every:
        part_detect_every(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
