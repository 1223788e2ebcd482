"""Load on a real ``taemi serve``: N requests from K concurrent clients uploading clips.

Setup (not timed): a run (``--run``), or, without one, a tiny 1-epoch run trained on
offline-profile features of 6 generated talking-face clips (``taemi extract`` defaults:
face crops, the first 400 frames; as ``predict_latency.py`` makes it). Then ``python -m
taemi serve`` starts as its own process on a free port (uvicorn, the CLI's options), and
the script waits for ``/v1/health``.

Measured: ``--requests`` POST /v1/predict requests (default 50) sent by ``--concurrency``
client threads (default 8), each uploading ``--files-per-request`` clips taken in turn
from ``--media`` (default: the CREMA-D sample, 6 FLV videos + 6 MP3s,
``$TAEMI_CREMA_D/media`` or ``../shared/data/crema-d-sample/media``). Every upload is
named ``rNNN-fK-<clip>`` so that its answer can be matched.

Printed: throughput (requests/s, clips/s, seconds of media per second), latency p50 / p95 /
max, the mean per-clip timings the server reports (queue, extract, fusion ...), the
fusion micro-batch sizes the server formed (``/v1/health``) and the sizes the answers
report. It asserts that every request got exactly one answer, status 200, with exactly
its own files (names and count) and clip ids never seen in another answer: nothing lost,
nothing duplicated.

Usage::

    python benchmarks/serve_load.py                                   # ~4 min on 2 cores
    python benchmarks/serve_load.py --requests 24 --concurrency 4
    python benchmarks/serve_load.py --run runs/paper --workers 2 --files-per-request 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

from _paper_store import work_folder
from image_encoder import crema_d_media  # the CREMA-D sample's media folder
from predict_latency import make_run  # 6 generated clips -> offline features -> a tiny run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(
                f"taemi serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            get_json(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"taemi serve did not answer {url} within {timeout:.0f} s")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="run folder (default: a tiny run made here)")
    ap.add_argument("--media", type=Path, default=None, help="folder of clips to upload")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--files-per-request", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8, help="taemi serve --batch-size")
    ap.add_argument("--max-wait-ms", type=float, default=20.0, help="taemi serve --max-wait-ms")
    ap.add_argument("--workers", type=int, default=1, help="taemi serve --workers")
    ap.add_argument("--queue-size", type=int, default=32, help="taemi serve --queue-size")
    ap.add_argument("--workdir", type=Path, help="keep the run and the server log here")
    args = ap.parse_args()

    media_dir = args.media or crema_d_media()
    clips = sorted(
        p
        for p in media_dir.iterdir()
        if p.suffix.lower() in (".flv", ".mp3", ".mp4", ".m4a", ".wav")
    )
    if not clips:
        raise SystemExit(f"no clips in {media_dir}")
    data = {p.name: p.read_bytes() for p in clips}
    with work_folder(args.workdir, "taemi-serve-load-") as work:
        run = args.run or make_run(work)
        port = free_port()
        log = work / "serve.log"
        cmd = [sys.executable, "-m", "taemi", "serve", "--run", str(run), "--port", str(port)]
        cmd += ["--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms)]
        cmd += [
            "--workers",
            str(args.workers),
            "--queue-size",
            str(args.queue_size),
            "--device",
            "cpu",
        ]
        base = f"http://127.0.0.1:{port}"
        with open(log, "w") as log_fh:
            t_start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
            try:
                wait_for(f"{base}/v1/health", proc, log, timeout=600)
                startup = time.perf_counter() - t_start
                results = load(base, args, clips, data)
                health = get_json(f"{base}/v1/health")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        report(args, run, media_dir, startup, results, health)


def load(base: str, args, clips: list[Path], data: dict[str, bytes]) -> dict:
    lock = threading.Lock()
    next_request = iter(range(args.requests))
    answers: dict[int, list] = {}  # request -> [(status, body, seconds)], exactly one expected
    sent: dict[int, list[str]] = {}

    def client() -> None:
        while True:
            with lock:
                i = next(next_request, None)
            if i is None:
                return
            files = []
            for k in range(args.files_per_request):
                src = clips[(i * args.files_per_request + k) % len(clips)]
                files.append((f"r{i:03d}-f{k}-{src.name}", data[src.name]))
            body, ctype = multipart(files)
            req = urllib.request.Request(
                f"{base}/v1/predict", data=body, headers={"Content-Type": ctype}, method="POST"
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    status, payload = r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                status, payload = e.code, json.loads(e.read() or b"{}")
            seconds = time.perf_counter() - t0
            with lock:
                sent[i] = [n for n, _ in files]
                answers.setdefault(i, []).append((status, payload, seconds))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"answers": answers, "sent": sent, "wall": wall}


def report(args, run, media_dir, startup, results, health) -> None:
    answers, sent, wall = results["answers"], results["sent"], results["wall"]
    # exactly one answer per request, 200, with exactly its files, and ids never repeated
    assert sorted(answers) == list(range(args.requests)), "requests without an answer"
    assert all(len(a) == 1 for a in answers.values()), "a request answered twice"
    bad = {i: a[0][:2] for i, a in answers.items() if a[0][0] != 200}
    assert not bad, f"requests that failed: {bad}"
    ids: Counter[str] = Counter()
    clips = []
    for i, [(status, body, _)] in answers.items():
        names = [c["filename"] for c in body["clips"]]
        assert names == sent[i] and not body["failures"], (i, names, sent[i], body["failures"])
        ids.update(c["id"] for c in body["clips"])
        clips += body["clips"]
    assert all(n == 1 for n in ids.values()), "a clip id in two answers"
    assert len(clips) == args.requests * args.files_per_request

    lat = [a[0][2] for a in answers.values()]
    media_s = sum(c["media_seconds"] for c in clips)
    answered_sizes = Counter(c["fusion_batch_size"] for c in clips)
    from taemi.serve.service import TIMINGS as stages

    means = {s: sum(c["timings"].get(s, 0.0) for c in clips) / len(clips) for s in stages}
    print(f"taemi serve load: {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs")
    print(f"run {run}; media {media_dir}; server start-up (models loaded) {startup:.1f} s")
    print(
        f"{args.requests} requests x {args.files_per_request} file(s) from {args.concurrency} clients; "
        f"server --workers {args.workers} --batch-size {args.batch_size} --max-wait-ms {args.max_wait_ms:g}"
    )
    print(
        f"wall {wall:.1f} s: {args.requests / wall:.2f} requests/s, {len(clips) / wall:.2f} clips/s, "
        f"{media_s / wall:.2f} s of media per s"
    )
    print(f"latency: p50 {pct(lat, 50):.2f} s, p95 {pct(lat, 95):.2f} s, max {max(lat):.2f} s")
    print("mean per-clip timings (s): " + ", ".join(f"{s} {v:.3f}" for s, v in means.items()))
    print(f"fusion micro-batches formed (server, size: count): {health['fusion_batches']['sizes']}")
    print(f"batch sizes the answers report (size: clips): {dict(sorted(answered_sizes.items()))}")
    print(
        f"answers: {len(answers)} of {args.requests} requests, each exactly once, all 200; "
        f"{len(ids)} distinct clip ids for {len(clips)} clips: nothing lost or duplicated"
    )


if __name__ == "__main__":
    main()
