"""One Whisper encoder pass per clip for the transcript and the audio features
(``taemi extract --share-whisper``) against the exact path's two passes, in one run.

On the CREMA-D sample's clips (``../shared/data/crema-d-sample``, or ``$TAEMI_CREMA_D``;
12 recordings of "Don't forget a jacket."), with the offline profile (Whisper tiny.en,
MiniLM-L6 for the text features). Per clip, alternating so that both paths see the same
load:

- exact: ``WhisperRecognizer.transcribe(w)`` (its own encoder pass) + ``WhisperEncoder.encode``;
- shared: ``WhisperEncoder.encode_windows`` (one pass) + ``transcribe(w, encoder_states=...)``.

Printed: seconds per clip of each path (median over clips and repeats) and the speed-up;
whether the audio features are bit-identical; how many transcripts are identical to the
exact path's; the text-feature cosine similarity between the two transcripts (mean, min);
word errors against the sentence the sample says, summed over the clips, for both paths;
and the transcripts of 3 s of digital silence and of 3 s of faint white noise (no speech:
the exact path gives none; the shared pass has been seen to hallucinate "you").

``--windows S ...`` adds, per S, the Whisper encoder on a shorter window (``taemi extract
--whisper-window S``: each clip zero-padded to the next multiple of S seconds instead of
30 s) in two forms: ``window S`` (short-window audio features, the transcript from its own
30 s pass as in the exact path) and ``window S + shared`` (the transcript decoded from the
short-window pass too). For these it prints, besides the above, the per-frame cosine
similarity of the audio features with the exact path's (mean over the clips' frames, and
the lowest clip mean).

Usage::

    python benchmarks/whisper_share.py            # ~1 min on 2 cores
    python benchmarks/whisper_share.py --repeats 3 --windows 5 10
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np

SENTENCE = "Don't forget a jacket."


def sample_media() -> list[Path]:
    env = os.environ.get("TAEMI_CREMA_D")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/crema-d-sample"
    files = sorted((root / "media").iterdir())
    if not files:
        raise SystemExit(f"no media in {root / 'media'} (set TAEMI_CREMA_D)")
    return files


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level Levenshtein distance, case and punctuation ignored."""

    def words(t: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]+", " ", t.lower()).split()

    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the clips")
    ap.add_argument(
        "--windows", type=float, nargs="*", default=[], help="shorter encoder windows, seconds"
    )
    args = ap.parse_args()

    from taemi.backbones.whisper import WhisperEncoder
    from taemi.extract.media import decode_audio
    from taemi.extract.profiles import load_encoders

    enc = load_encoders("offline", face=False)
    files = sample_media()
    waves = [np.asarray(getattr(w, "samples", w)) for w in (decode_audio(f) for f in files)]
    waves = [w[: 12 * 16000] for w in waves]  # extraction keeps the first 12 s
    print(
        f"{len(files)} clips, {sum(w.size for w in waves) / 16000:.1f} s of audio; {enc.asr.name}"
    )

    def exact(w: np.ndarray) -> tuple[str, np.ndarray]:
        return enc.asr.transcribe(w), enc.audio.encode([w])[0]

    def shared(w: np.ndarray) -> tuple[str, np.ndarray]:
        (window,) = enc.audio.encode_windows([w])  # (1500, D)
        text = enc.asr.transcribe(w, encoder_states=window)
        return text, window[: enc.audio.num_frames(w.size)]

    paths = {"exact": exact, "shared": shared}
    for seconds in args.windows:
        short = WhisperEncoder(enc.audio.whisper, window_s=seconds)

        def windowed(w: np.ndarray, short=short) -> tuple[str, np.ndarray]:
            return enc.asr.transcribe(w), short.encode([w])[0]

        def windowed_shared(w: np.ndarray, short=short) -> tuple[str, np.ndarray]:
            (window,) = short.encode_windows([w])
            return enc.asr.transcribe(w, encoder_states=window), window[: short.num_frames(w.size)]

        paths[f"window {seconds:g}"] = windowed
        paths[f"window {seconds:g} + shared"] = windowed_shared
    for fn in paths.values():
        fn(waves[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in paths}
    results: dict[str, list[tuple[str, np.ndarray]]] = {name: [] for name in paths}
    for rep in range(args.repeats):
        for i, w in enumerate(waves):
            order = tuple(paths.items())
            for name, fn in order if (i + rep) % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                out = fn(w)
                times[name].append(time.perf_counter() - t0)
                if rep == 0:
                    results[name].append(out)

    te, ts = statistics.median(times["exact"]), statistics.median(times["shared"])
    print(
        f"seconds per clip (median of {len(times['exact'])}): exact {te:.3f}, shared {ts:.3f} ({te / ts:.2f}x)"
    )
    same_audio = all(
        np.array_equal(a[1], b[1]) for a, b in zip(results["exact"], results["shared"])
    )
    print(f"audio features bit-identical: {same_audio}")
    texts_e = [t for t, _ in results["exact"]]
    texts_s = [t for t, _ in results["shared"]]
    vecs, _ = enc.text.encode(texts_e + texts_s)
    n = len(texts_e)
    cos = [
        float(vecs[i] @ vecs[n + i] / np.linalg.norm(vecs[i]) / np.linalg.norm(vecs[n + i]))
        for i in range(n)
    ]
    same = sum(a == b for a, b in zip(texts_e, texts_s))
    print(
        f"transcripts identical: {same} of {n}; text-feature cosine shared vs exact: mean "
        f"{np.mean(cos):.4f}, min {min(cos):.4f}"
    )
    print(
        f"word errors against {SENTENCE!r} over the {n} clips: exact "
        f"{sum(word_errors(SENTENCE, t) for t in texts_e)}, shared "
        f"{sum(word_errors(SENTENCE, t) for t in texts_s)}"
    )
    for f, a, b in zip(files, texts_e, texts_s):
        if a != b:
            print(f"  {f.name}: exact {a!r} / shared {b!r}")
    for name in list(paths)[2:]:
        t = statistics.median(times[name])
        frame_cos = []
        for (_, a), (_, b) in zip(results["exact"], results[name]):
            num = (a * b).sum(1)
            frame_cos.append(num / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
        texts = [t for t, _ in results[name]]
        print(
            f"{name}: {t:.3f} s per clip ({te / t:.2f}x the exact path); audio cosine with the "
            f"exact features per frame: mean {np.mean(np.concatenate(frame_cos)):.4f}, lowest "
            f"clip mean {min(float(c.mean()) for c in frame_cos):.4f}; transcripts identical "
            f"to the exact path's: {sum(a == b for a, b in zip(texts_e, texts))} of {n}; word "
            f"errors {sum(word_errors(SENTENCE, x) for x in texts)}"
        )
    rng = np.random.default_rng(0)
    for label, w in (
        ("3 s of silence", np.zeros(48000, np.float32)),
        ("3 s of faint noise", (1e-3 * rng.standard_normal(48000)).astype(np.float32)),
    ):
        print(f"no speech, {label}: exact {exact(w)[0]!r} / shared {shared(w)[0]!r}")


if __name__ == "__main__":
    main()
