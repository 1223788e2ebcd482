"""``taemi serve``'s HTTP API (FastAPI's TestClient), its micro-batcher and the model's
attention weights.

The media tests train a tiny 1-epoch run on offline-profile features of 4 generated clips
(00000 audio-only), as ``tests/test_predict_media.py`` does, and serve it in-process. The
batcher and attention tests need no media.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import generated_media_corpus, media_run_sets

from taemi import EMI_EMOTIONS
from taemi.cli.main import main

pytest.importorskip(
    "fastapi", reason="the serve extra is not installed (pip install 'taemi[serve]')"
)
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient

from taemi.serve.app import create_app
from taemi.serve.batcher import BatcherClosed, MicroBatcher
from taemi.serve.service import TIMINGS, ServeSettings, Service
from taemi.serve.uploads import safe_suffix

# --------------------------------------------------------------------------- no media


def test_batcher_forms_batches_and_answers_every_item_once() -> None:
    calls: list[list[int]] = []
    lock = threading.Lock()

    def run(items: list[int]) -> list[int]:
        with lock:
            calls.append(list(items))
        time.sleep(0.01)  # a model step: others queue up meanwhile
        return [2 * i for i in items]

    with MicroBatcher(run, batch_size=8, max_wait_s=0.05) as batcher:
        with ThreadPoolExecutor(8) as pool:
            futures = list(pool.map(batcher.submit, range(64)))
        results = [f.result(timeout=10) for f in futures]
        stats = batcher.stats()
    assert [r.value for r in results] == [2 * i for i in range(64)]
    seen = sorted(i for c in calls for i in c)
    assert seen == list(range(64))  # every item ran exactly once
    sizes = [len(c) for c in calls]
    assert max(sizes) > 1 and max(sizes) <= 8
    assert stats["items"] == 64 and stats["batches"] == len(calls) and stats["failed"] == 0
    assert sum(int(k) * v for k, v in stats["sizes"].items()) == 64
    assert all(r.batch_size == len(c) for c in calls for r in results if r.value // 2 in c)


def test_batcher_isolates_a_failing_item() -> None:
    def run(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("bad item")
        return [s.upper() for s in items]

    with MicroBatcher(run, batch_size=4, max_wait_s=0.2) as batcher:
        futures = [batcher.submit(s) for s in ("a", "bad", "c")]
        assert futures[0].result(5).value == "A" and futures[2].result(5).value == "C"
        with pytest.raises(ValueError, match="bad item"):
            futures[1].result(5)
        assert batcher.stats()["failed"] == 1 and batcher.stats()["items"] == 3
    with pytest.raises(BatcherClosed):
        batcher.submit("late")
    with pytest.raises(ValueError, match="batch_size"):
        MicroBatcher(run, batch_size=0)


def test_cross_attention_weights_leave_the_outputs_alone() -> None:
    from taemi.config import ModelConfig
    from taemi.data.batch import Batch
    from taemi.model.taemi import TAEMI

    torch.manual_seed(0)
    model = TAEMI(
        ModelConfig(
            audio_dim=12, vision_dim=10, text_dim=8, hidden=16, heads=2, sa_ffn=32, head_hidden=16
        )
    ).eval()
    B, Ta, Tv = 3, 7, 5
    audio_mask = torch.arange(Ta)[None] < torch.tensor([7, 4, 2])[:, None]  # (B, T_a)
    vision_mask = torch.arange(Tv)[None] < torch.tensor([5, 3, 1])[:, None]  # (B, T_v)
    batch = Batch(
        audio=torch.randn(B, Ta, 12),
        audio_mask=audio_mask,
        vision=torch.randn(B, Tv, 10),
        vision_mask=vision_mask,
        text=torch.randn(B, 8),
        missing=torch.tensor([[False, False, False], [False, True, False], [False, False, True]]),
    )
    with torch.no_grad():
        plain = model(batch)
        out, weights = model(batch, return_attention=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert set(weights) == {"audio", "vision"}
    assert weights["audio"].shape == (B, Ta) and weights["vision"].shape == (B, Tv)
    torch.testing.assert_close(weights["audio"].sum(1), torch.ones(B))
    assert (weights["audio"][~audio_mask] == 0).all()  # padding gets no weight
    # sample 1's vision is missing: its token sequence is attended uniformly, all steps valid
    torch.testing.assert_close(weights["vision"][1], torch.full((Tv,), 1 / Tv))
    concat = TAEMI(ModelConfig(audio_dim=12, vision_dim=10, text_dim=8, fusion="concat")).eval()
    with torch.no_grad():
        assert concat(batch, return_attention=True)[1] == {}


def test_client_file_names_never_reach_the_file_system() -> None:
    assert safe_suffix("clip.MP4") == ".mp4"
    assert safe_suffix("../../etc/passwd") == ""
    assert safe_suffix("a.b/../../x.mp3") == ".mp3"
    assert safe_suffix("evil.mp4;rm -rf") == ""
    assert safe_suffix("C:\\videos\\x.flv") == ".flv"
    assert safe_suffix("noext") == ""


def test_vision_rows_carry_their_frame_times(tmp_path) -> None:
    """The extraction records, per stored vision row, the time of the frame its feature
    came from (the attention timeline's vision times), with and without vision_fps."""
    pytest.importorskip("av", reason="PyAV is not installed ([extract])")
    from media_helpers import write_media

    from taemi.extract.pipeline import ExtractOptions, Source, decode_source

    frames = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(10)]
    video = write_media(tmp_path / "v.mp4", frames=frames, fps=10)
    every = decode_source(Source("v", video), ExtractOptions(max_frames=10), None)
    np.testing.assert_allclose(every.vision_times, np.arange(10) / 10)
    thinned = decode_source(Source("v", video), ExtractOptions(max_frames=10, vision_fps=5), None)
    assert len(thinned.faces) == 5 and thinned.repeats.tolist() == [2] * 5
    np.testing.assert_allclose(thinned.vision_times, np.repeat(np.arange(5) / 5, 2))


# --------------------------------------------------------------------------- a served run


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory) -> SimpleNamespace:
    """4 generated clips (00000 audio-only), their offline features, a 1-epoch tiny run."""
    root = tmp_path_factory.mktemp("serve_api")
    corpus = generated_media_corpus(root)
    assert (corpus.raw / "00000.m4a").is_file() and (corpus.raw / "00001.mp4").is_file()
    store = root / "store"
    extract = ["extract", "--input", str(corpus.raw), "--out", str(store), "--max-frames", "4"]
    assert main([*extract, "--frame-policy", "uniform", "--no-face", "--no-progress"]) == 0
    run = root / "run"
    sets = media_run_sets()
    train = ["train", "--store", str(store), "--train", str(corpus.train_csv)]
    train += ["--valid", str(corpus.valid_csv), "--out", str(run), "--train-on-all"]
    assert main([*train, "--epochs", "1", "--no-progress", *sets]) == 0
    return SimpleNamespace(root=root, raw=corpus.raw, run=run, store=store, corpus=corpus)


@contextlib.contextmanager
def serving(serve_run, tmp_root: Path, **settings):
    """A Service over the run (models cached per process) and a TestClient on its app."""
    tmp_root.mkdir(exist_ok=True)
    kw = {"device": "cpu", "max_wait_ms": 50.0, "tmp_root": str(tmp_root), **settings}
    service = Service(ServeSettings(run=str(serve_run.run), **kw))
    try:
        with TestClient(create_app(service=service)) as client:
            yield SimpleNamespace(client=client, service=service, tmp_root=tmp_root)
    finally:
        service.close()


@pytest.fixture(scope="module")
def served(serve_run, tmp_path_factory):
    with serving(serve_run, tmp_path_factory.mktemp("serve_tmp")) as s:
        yield s


def post(client, *files: tuple[str, bytes], field: str = "file", headers=None):
    return client.post(
        "/v1/predict", files=[(field, (name, data)) for name, data in files], headers=headers
    )


def media(serve_run, name: str) -> tuple[str, bytes]:
    return name, (serve_run.raw / name).read_bytes()


def assert_error(r, status: int, code: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "code", "message"}
    assert body["error"]["status"] == status and body["error"]["code"] == code, body
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]


def assert_no_request_folders(tmp_root: Path) -> None:
    assert list(tmp_root.iterdir()) == []


@pytest.mark.slow
def test_predict_equals_predict_media_with_attention_in_time(serve_run, served) -> None:
    from taemi.predict_media import predict_media

    r = post(served.client, media(serve_run, "00001.mp4"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run"] == "run" and body["emotions"] == list(EMI_EMOTIONS)
    assert body["failures"] == [] and len(body["clips"]) == 1
    clip = body["clips"][0]
    assert clip["filename"] == "00001.mp4" and clip["id"] != "00001"  # the server's id

    ref = predict_media(serve_run.run, [serve_run.raw / "00001.mp4"], device="cpu", clip=False)
    expect = ref.clips[0].intensities
    np.testing.assert_allclose(
        [clip["raw"][e] for e in EMI_EMOTIONS], [expect[e] for e in EMI_EMOTIONS], atol=1e-6
    )
    np.testing.assert_allclose(
        [clip["intensities"][e] for e in EMI_EMOTIONS],
        np.clip([expect[e] for e in EMI_EMOTIONS], 0, 1),
        atol=1e-6,
    )
    assert clip["transcript"] == ref.clips[0].transcript and clip["transcript"]
    assert clip["modalities"] == {
        m: {"present": True, "reason": None} for m in ("audio", "vision", "text")
    }
    assert 1.5 < clip["media_seconds"] < 3.5
    assert set(TIMINGS) <= set(clip["timings"])
    assert clip["timings"]["total"] >= clip["timings"]["extract"] > 0

    audio, vision = clip["attention"]["audio"], clip["attention"]["vision"]
    for a in (audio, vision):
        assert len(a["times"]) == len(a["weights"]) > 1
        assert abs(sum(a["weights"]) - 1) < 1e-5 and min(a["weights"]) >= 0
        assert a["times"] == sorted(a["times"]) and a["times"][0] >= 0
    # audio: one step per 20 ms feature frame of the clip's audio (Whisper tiny.en: 50 per second)
    np.testing.assert_allclose(audio["times"], np.arange(len(audio["times"])) / 50.0, atol=1e-6)
    assert abs(len(audio["times"]) / 50.0 - clip["media_seconds"]) < 0.1
    # vision: 4 frames spread over the clip (--max-frames 4 --frame-policy uniform), 10 fps
    assert len(vision["times"]) == 4 and vision["times"][0] == 0.0
    assert vision["times"][-1] <= clip["media_seconds"] + 0.1
    assert all(abs(t * 10 - round(t * 10)) < 1e-6 for t in vision["times"])  # frame times
    assert_no_request_folders(served.tmp_root)


@pytest.mark.slow
def test_two_files_are_one_batch(serve_run, served) -> None:
    r = post(served.client, media(serve_run, "00002.mp4"), media(serve_run, "00001.mp4"))
    assert r.status_code == 200, r.text
    clips = r.json()["clips"]
    assert [c["filename"] for c in clips] == ["00002.mp4", "00001.mp4"]  # request order
    assert len({c["id"] for c in clips}) == 2
    assert [c["fusion_batch_size"] for c in clips] == [2, 2]
    alone = post(served.client, media(serve_run, "00002.mp4")).json()["clips"][0]
    for e in EMI_EMOTIONS:
        assert abs(alone["raw"][e] - clips[0]["raw"][e]) < 1e-6
    health = served.client.get("/v1/health").json()
    assert health["status"] == "ok" and health["queue_length"] == 0
    assert health["fusion_batches"]["sizes"].get("2", 0) >= 1
    assert health["requests_served"] >= 2
    assert_no_request_folders(served.tmp_root)


@pytest.mark.slow
def test_audio_only_upload(serve_run, served) -> None:
    r = post(served.client, media(serve_run, "00000.m4a"))
    assert r.status_code == 200, r.text
    clip = r.json()["clips"][0]
    assert clip["modalities"]["vision"]["present"] is False
    assert "no video stream" in clip["modalities"]["vision"]["reason"]
    assert clip["modalities"]["audio"] == {"present": True, "reason": None}
    assert clip["attention"]["vision"] is None and clip["attention"]["audio"] is not None
    assert abs(sum(clip["attention"]["audio"]["weights"]) - 1) < 1e-5


@pytest.mark.slow
def test_bad_uploads_are_json_errors_and_leave_no_files(serve_run, served) -> None:
    c = served.client
    junk = ("junk.mp4", b"this is not a video\n" * 50)
    assert_error(post(c, junk), 422, "not_media", "junk.mp4", "cannot be read as media")
    assert_error(post(c, ("empty.mp4", b"")), 422, "empty_upload", "empty.mp4", "empty")
    assert_error(
        post(c, media(serve_run, "00001.mp4"), field="upload"),
        422,
        "wrong_field",
        "'upload'",
        "'file'",
    )
    assert_error(c.post("/v1/predict", content=b"raw bytes"), 422, "not_multipart", "'file'")
    assert_error(c.post("/v1/predict", data={"note": "x"}), 422, "not_multipart", "'file'")
    two = assert_error(
        post(c, junk, ("empty.mp3", b"")), 422, "all_failed", "junk.mp4", "empty.mp3"
    )
    assert two["message"].startswith("all 2 files failed")
    # one good file, one bad: 200 with the failure listed
    r = post(c, junk, media(serve_run, "00002.mp4"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["filename"] for x in body["clips"]] == ["00002.mp4"]
    [failure] = body["failures"]
    assert failure["filename"] == "junk.mp4" and failure["status"] == 422
    assert (
        failure["error"].startswith("junk.mp4: ") and str(served.tmp_root) not in failure["error"]
    )
    assert_no_request_folders(served.tmp_root)


@pytest.mark.slow
def test_upload_over_the_limit_is_413(serve_run, tmp_path) -> None:
    with serving(serve_run, tmp_path, max_upload_bytes=4000) as s:
        video = media(serve_run, "00001.mp4")
        assert len(video[1]) > 4000
        assert_error(post(s.client, video), 413, "upload_too_large", "limit", "--max-upload-mb")

        # streamed without Content-Length: stopped while reading, naming the file
        def chunks():
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
            for _ in range(100):
                yield b"x" * 1000
            yield b"\r\n--B--\r\n"

        r = s.client.post(
            "/v1/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=B"},
        )
        assert_error(r, 413, "upload_too_large", "'big.mp4'", "reading stopped")
        assert_no_request_folders(tmp_path)


@pytest.mark.slow
def test_token(serve_run, served, tmp_path) -> None:
    assert served.client.get("/v1/model").status_code == 200  # no token configured: open
    with serving(serve_run, tmp_path, token="s3cret") as s:
        assert_error(s.client.get("/v1/model"), 401, "unauthorized", "Authorization: Bearer")
        r = s.client.get("/v1/model", headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(post(s.client, media(serve_run, "00001.mp4")), 401, "unauthorized")
        assert s.client.get("/v1/health").status_code == 200  # open: tells nothing of the model
        ok = s.client.get("/v1/model", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        r = post(
            s.client, media(serve_run, "00002.mp4"), headers={"Authorization": "Bearer s3cret"}
        )
        assert r.status_code == 200, r.text
        assert_no_request_folders(tmp_path)


@pytest.mark.slow
def test_full_queue_is_503_with_retry_after(serve_run, tmp_path) -> None:
    with serving(serve_run, tmp_path, queue_size=1, workers=1) as s:
        entered, release = threading.Event(), threading.Event()
        real = s.service.extract_request

        def blocked(uploads, folder):
            entered.set()
            assert release.wait(30)
            return real(uploads, folder)

        s.service.extract_request = blocked
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, s.client, media(serve_run, "00001.mp4"))
            assert entered.wait(30)
            r = post(s.client, media(serve_run, "00002.mp4"))
            assert_error(r, 503, "queue_full", "--queue-size")
            assert int(r.headers["retry-after"]) >= 1
            health = s.client.get("/v1/health").json()
            assert health["queue_length"] == 1 and health["requests_rejected"] == 1
            release.set()
            assert first.result(60).status_code == 200
        assert post(s.client, media(serve_run, "00002.mp4")).status_code == 200  # room again
        assert_no_request_folders(tmp_path)


@pytest.mark.slow
def test_a_failing_extraction_fails_only_its_request(serve_run, tmp_path) -> None:
    with serving(serve_run, tmp_path, workers=2) as s:
        real = s.service.extract_request

        def flaky(uploads, folder):
            if uploads[0].filename.startswith("boom"):
                time.sleep(0.2)
                raise RuntimeError(f"encoder crashed in {folder}")
            return real(uploads, folder)

        s.service.extract_request = flaky
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post, s.client, ("boom.mp4", media(serve_run, "00001.mp4")[1]))
            good = pool.submit(post, s.client, media(serve_run, "00002.mp4"))
            err = assert_error(bad.result(60), 500, "extraction_error", "encoder crashed")
            assert str(tmp_path) not in err["message"]
            assert good.result(60).status_code == 200
        assert s.client.get("/v1/health").json()["requests_failed"] == 1
        assert_no_request_folders(tmp_path)


@pytest.mark.slow
def test_model_health_openapi_and_error_shape(serve_run, served) -> None:
    c = served.client
    info = c.get("/v1/model").json()
    assert info["run"] == "run" and info["emotions"] == list(EMI_EMOTIONS)
    assert info["preset"] == "paper" and info["attention"] is True
    assert (
        info["features"]["profile"] == "offline" and info["features"]["options"]["max_frames"] == 4
    )
    assert set(info["features"]["dims"]) == {"audio", "vision", "text"}
    assert info["training"]["best_epoch"] == 1 and "valid_mean_pearson" in info["training"]
    spec = c.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/v1/health" in spec["paths"]
    assert_error(c.get("/docs"), 404, "not_found")  # disabled: its assets come from a CDN
    assert_error(c.get("/v1/predict"), 405, "method_not_allowed")

    app = c.app

    @app.get("/_typed")
    async def typed(n: int) -> int:  # a route with a validated parameter
        return n

    assert_error(c.get("/_typed", params={"n": "x"}), 422, "invalid_request", "n")
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


@pytest.mark.slow
def test_a_model_without_cross_attention_gives_no_attention(serve_run, tmp_path) -> None:
    run = tmp_path / "concat"
    sets = media_run_sets()
    train = ["train", "--store", str(serve_run.store), "--train", str(serve_run.corpus.train_csv)]
    train += ["--valid", str(serve_run.corpus.valid_csv), "--out", str(run), "--train-on-all"]
    assert main([*train, "--preset", "concat", "--epochs", "1", "--no-progress", *sets]) == 0
    with serving(SimpleNamespace(run=run), tmp_path / "tmp") as s:
        assert s.client.get("/v1/model").json()["attention"] is False
        r = post(s.client, media(serve_run, "00001.mp4"))
        assert r.status_code == 200, r.text
        clip = r.json()["clips"][0]
        assert clip["attention"] == {"audio": None, "vision": None}
        assert all(v["present"] for v in clip["modalities"].values())
