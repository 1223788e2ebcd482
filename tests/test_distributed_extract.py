"""Distributed extraction: sharding, merging shard stores, and the local and Ray runners.

Media are generated with PyAV and features come from the numpy stand-ins of
``tests/test_extract.py``. Worker subprocesses (and Ray tasks) get the same stand-ins
through ``taemi extract --encoders test_distributed_extract:stub_encoders``, with this
folder on ``PYTHONPATH``: the documented hook for custom encoders, not a test-only path.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is not installed (media extra)")

from test_extract import BAD_NAME, colour_frames, fake_encoders, good_corpus, write_clip

from taemi.cli.main import build_parser, main
from taemi.extract import distributed, pipeline
from taemi.extract.distributed import parse_shard, select_shard, shard_of, shard_store
from taemi.extract.factory import encoders_from_factory
from taemi.extract.pipeline import (
    ERRORS_FILE,
    SUMMARY_FILE,
    TRANSCRIPTS,
    ExtractOptions,
    extract,
    find_sources,
)
from taemi.store import FeatureStore, StoreError, StoreWriter, verify_store
from taemi.store import merge as merge_mod
from taemi.store.clip import ClipFeatures
from taemi.store.merge import merge_stores

TESTS = Path(__file__).resolve().parent
STUB = "test_distributed_extract:stub_encoders"
#: The media corpus: clip id -> shard among 2 (pinned: the hash must never change).
SHARDS_OF_2 = {
    "c330": 0,
    "c440": 0,
    "c550": 0,
    "c660": 0,
    "c880": 0,
    "av": 1,
    "c770": 1,
    "silent": 1,
}
DONE = sorted(SHARDS_OF_2)


def stub_encoders():
    """``--encoders`` factory of the workers: the fast numpy stand-ins."""
    return fake_encoders()


def not_encoders():
    return []


def failing_in_shard_1():
    """``--encoders`` factory that breaks the worker of shard 1/2 (a crash, not a clip failure)."""
    if "1/2" in sys.argv:
        raise RuntimeError("worker 1 cannot load its models")
    return fake_encoders()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 good clips, one corrupt file (garbage.mp4) and one file name that is not UTF-8."""
    root = good_corpus(tmp_path_factory.mktemp("dist") / "media", hz=(330, 440, 550, 770, 880))
    write_clip(root / "silent.wav", hz=440, amplitude=0.0, seconds=0.5)
    write_clip(root / "c660.mp4", hz=660, seconds=0.5, frames=colour_frames(3))
    (root / "garbage.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    )
    write_clip(os.fsencode(root) + b"/" + BAD_NAME, hz=440, seconds=0.5)
    return root


def _extract(media: Path, store: Path, shard: tuple[int, int] | None = None, **opts):
    sources, errors = find_sources([media])
    if shard is not None:
        sources, errors = select_shard(sources, errors, *shard)
    return extract(
        sources, store, stub_encoders(), ExtractOptions(**opts), input_errors=errors, progress=False
    )


@pytest.fixture(scope="module")
def single(media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole corpus extracted by one process."""
    store = tmp_path_factory.mktemp("single") / "store"
    s = _extract(media, store, batch_size=3)
    assert (s.done, s.failed) == (8, 2)
    return store


def assert_same_store(a: Path, b: Path) -> None:
    """Same clip ids, arrays, missing flags and transcripts; both verify."""
    assert verify_store(a) == [] and verify_store(b) == []
    fa, fb = FeatureStore(a), FeatureStore(b)
    assert sorted(fa.ids) == sorted(fb.ids)
    for cid in fa.ids:
        x, y = fa.get(cid), fb.get(cid)
        assert x.missing == y.missing, cid
        for m in ("audio", "vision", "text", "text_tokens"):
            u, v = getattr(x, m), getattr(y, m)
            assert (u is None) == (v is None), (cid, m)
            if u is not None:
                assert np.array_equal(u, v), (cid, m)
        assert (a / TRANSCRIPTS / f"{cid}.txt").read_text() == (
            b / TRANSCRIPTS / f"{cid}.txt"
        ).read_text()
    assert fa.manifest["modalities"] == fb.manifest["modalities"]


def error_lines(store: Path) -> list[dict]:
    path = store / ERRORS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tiny_store(
    root: Path,
    ids: list[str],
    *,
    dims=None,
    text_tokens=False,
    modalities=None,
    dtype="float16",
    seed=0,
    transcripts=True,
) -> Path:
    """A store of random clips (a few rows each), with transcripts/{id}.txt."""
    dims = dims or {"audio": 4, "vision": 3, "text": 5}
    mods = modalities or {m: {"backbone": f"fake-{m}", "settings": {"k": 1}} for m in dims}
    rng = np.random.default_rng(seed)
    with StoreWriter(root, dims=dims, dtype=dtype, text_tokens=text_tokens, modalities=mods) as w:
        for i, cid in enumerate(ids):
            audio = rng.normal(size=(2 + i % 3, dims["audio"])) if i % 4 != 1 else None
            text = rng.normal(size=dims["text"])
            tokens = rng.normal(size=(3, dims["text"])) if text_tokens else None
            w.add(
                ClipFeatures(cid, audio, rng.normal(size=(1 + i % 2, dims["vision"])), text, tokens)
            )
    if transcripts:
        (root / TRANSCRIPTS).mkdir()
        for cid in ids:
            (root / TRANSCRIPTS / f"{cid}.txt").write_text(f"words of {cid}\n")
    return root


# ---------------------------------------------------------------- sharding


def test_shard_assignment_is_a_stable_balanced_partition():
    ids = [f"{i:05d}" for i in range(2000)] + ["av", "c440", "ünïcode", "a.b"]
    for n in (1, 2, 3, 7):
        shards = [{s.clip_id for s in select_shard(_ids(ids), [], k, n)[0]} for k in range(n)]
        assert set().union(*shards) == set(ids)  # every clip in some shard ...
        assert sum(len(s) for s in shards) == len(ids)  # ... and in exactly one
        shuffled = ids[:]
        random.Random(n).shuffle(shuffled)
        assert [
            {s.clip_id for s in select_shard(_ids(shuffled), [], k, n)[0]} for k in range(n)
        ] == shards
        sizes = [len(s) for s in shards]
        mean = len(ids) / n
        assert all(abs(k - mean) < 4 * mean**0.5 for k in sizes), (
            sizes
        )  # balanced as a fair die would be
    # pinned: the same on every machine and every taemi version (blake2b, not hash())
    assert {cid: shard_of(cid, 2) for cid in SHARDS_OF_2} == SHARDS_OF_2
    assert [shard_of("00042", n) for n in (2, 3, 4, 1000)] == [0, 1, 2, 958]


def _ids(ids):
    return [pipeline.Source(cid, Path(f"{cid}.wav")) for cid in ids]


def test_input_errors_go_to_exactly_one_shard():
    errors = [
        {"clip_id": "dup", "path": "/a/dup.wav"},
        {"clip_id": None, "path": "/x/bad_\\xff.wav"},
        {"clip_id": None, "path": "/elsewhere/bad_\\xff.wav"},
    ]
    per = [select_shard([], errors, k, 3)[1] for k in range(3)]
    assert sorted(len(p) for p in per) in ([0, 0, 3], [0, 1, 2], [1, 1, 1])
    assert sum(len(p) for p in per) == 3
    # by file name, not by folder: any machine's mount point gives the same shard
    (where,) = [k for k, p in enumerate(per) if errors[1] in p]
    assert errors[2] in per[where]


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1/0", "a/b", "1", "1/2/3"])
def test_parse_shard_refuses_bad_values(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_parse_shard_and_shard_folder():
    assert parse_shard("0/2") == (0, 2) and parse_shard(" 11 / 12 ") == (11, 12)
    assert shard_store(Path("/data/feats"), 3, 12) == Path("/data/feats.shards/shard-03-of-12")


# ---------------------------------------------------------------- merge


def test_constants_agree_with_the_pipeline():
    assert merge_mod.ERRORS_FILE == pipeline.ERRORS_FILE
    assert merge_mod.SUMMARY_FILE == pipeline.SUMMARY_FILE
    assert (
        distributed.TRANSCRIPTS == pipeline.TRANSCRIPTS
        and distributed.SUMMARY_FILE == pipeline.SUMMARY_FILE
    )


def test_two_shards_merged_equal_one_extraction(media, single, tmp_path):
    parts = [tmp_path / f"s{k}" for k in range(2)]
    for k, p in enumerate(parts):
        _extract(media, p, shard=(k, 2), batch_size=2)
    assert sorted(FeatureStore(parts[0]).ids) == sorted(c for c, k in SHARDS_OF_2.items() if k == 0)
    report = merge_stores(tmp_path / "merged", parts, progress=False)
    out = tmp_path / "merged"
    assert (report.copied, report.skipped, report.clips) == (8, 0, 8)
    assert report.side_files == 8  # the transcripts
    assert_same_store(single, out)
    # the failures of both shards, each once, with the shard it came from
    lines = error_lines(out)
    assert (
        sorted((str(e["clip_id"]), e["stage"]) for e in lines)
        == sorted((str(e["clip_id"]), e["stage"]) for e in error_lines(single))
        == [("None", "input"), ("garbage", "decode")]
    )
    assert {e["shard"] for e in lines} == {str(parts[0]), str(parts[1])}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    one = json.loads((single / SUMMARY_FILE).read_text())
    for key in ("total", "done", "skipped", "failed", "missing"):
        assert summary[key] == one[key], key
    assert summary["store"] == str(out) and summary["errors_file"] == str(out / ERRORS_FILE)
    assert [s["store"] for s in summary["shards"]] == [str(p) for p in parts]
    assert summary["wall_seconds"] == max(s["wall_seconds"] for s in summary["shards"])


def test_merge_carries_per_clip_and_shared_side_files(tmp_path):
    a = tiny_store(tmp_path / "a", ["a1", "a2"])
    b = tiny_store(tmp_path / "b", ["b1"], seed=1)
    for root, ids in ((a, ["a1", "a2"]), (b, ["b1"])):
        cache = root / "cache"
        cache.mkdir()
        (cache / "manifest.json").write_text('{"sample_rate": 16000}\n')  # shared: identical
        for cid in ids:
            np.save(cache / f"{cid}.npy", np.arange(3, dtype="<i2"))
        (cache / "x.npy.tmp").write_bytes(b"partial")  # an interrupted write: never copied
        (root / "crops" / ids[0]).mkdir(parents=True)  # a per-clip folder
        (root / "crops" / ids[0] / "0.jpg").write_bytes(b"jpg")
    out = tmp_path / "out"
    report = merge_stores(out, [a, b], progress=False)
    assert sorted((out / "cache").iterdir()) == [
        out / "cache" / n for n in ("a1.npy", "a2.npy", "b1.npy", "manifest.json")
    ]
    assert (out / "crops" / "a1" / "0.jpg").read_bytes() == b"jpg" and (
        out / "crops" / "b1" / "0.jpg"
    ).exists()
    assert report.side_files == 3 + 3 + 2 + 1
    assert not (out / ERRORS_FILE).exists() and report.summary is None  # the shards had none

    (b / "cache" / "manifest.json").write_text('{"sample_rate": 8000}\n')
    with pytest.raises(StoreError, match=r"cache/manifest.json differs") as info:
        merge_stores(tmp_path / "out2", [a, b], progress=False)
    assert str(b) in str(info.value) and str(a) in str(info.value)


def test_merge_with_the_waveform_cache_of_extract(media, tmp_path):
    if not hasattr(ExtractOptions(), "waveforms"):
        pytest.skip("this taemi has no waveform cache (ExtractOptions.waveforms)")
    parts = [tmp_path / f"s{k}" for k in range(2)]
    for k, p in enumerate(parts):
        _extract(media, p, shard=(k, 2), waveforms=True)
    out = tmp_path / "out"
    merge_stores(out, parts, progress=False)
    cached = sorted(p.name for p in (out / "waveforms").iterdir())
    with_audio = [c for c in DONE if not FeatureStore(out).get(c).missing[0]]
    assert cached == sorted([f"{c}.npy" for c in with_audio] + ["manifest.json"])
    from taemi.store.waveforms import WaveformCache

    assert WaveformCache(out).verify() == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dims": {"audio": 4, "vision": 3, "text": 6}}, "dims.text"),
        ({"dtype": "float32"}, "dtype"),
        ({"text_tokens": True}, "text_tokens"),
        (
            {
                "modalities": {
                    "audio": {"backbone": "fake-audio", "settings": {"k": 2}},
                    "vision": {"backbone": "fake-vision", "settings": {"k": 1}},
                    "text": {"backbone": "fake-text", "settings": {"k": 1}},
                }
            },
            "modalities.audio.settings.k",
        ),
    ],
)
def test_incompatible_shards_are_refused_naming_the_field(tmp_path, change, field):
    a = tiny_store(tmp_path / "a", ["a1"])
    b = tiny_store(tmp_path / "b", ["b1"], **change)
    with pytest.raises(StoreError) as info:
        merge_stores(tmp_path / "out", [a, b], progress=False)
    msg = str(info.value)
    assert f"{field} differs" in msg and str(a) in msg and str(b) in msg
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_merge_into_an_existing_store_of_other_settings_is_refused(tmp_path):
    out = tiny_store(tmp_path / "out", ["o1"], dtype="float32")
    a = tiny_store(tmp_path / "a", ["a1"])
    with pytest.raises(StoreError, match="dtype differs"):
        merge_stores(out, [a], progress=False)


def test_duplicate_ids_are_refused(tmp_path):
    a = tiny_store(tmp_path / "a", ["x1", "x2", "x3"])
    b = tiny_store(tmp_path / "b", ["x3", "y1", "x2"], seed=1)
    with pytest.raises(StoreError) as info:
        merge_stores(tmp_path / "out", [a, b], progress=False)
    msg = str(info.value)
    assert "'x3' is in both" in msg and str(a) in msg and str(b) in msg and "'x2'" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="given twice"):
        merge_stores(tmp_path / "out", [a, tmp_path / "b" / ".." / "a"], progress=False)
    with pytest.raises(ValueError, match="also one of the shard stores"):
        merge_stores(a, [a, b], progress=False)


def test_interrupted_merge_resumes(tmp_path, monkeypatch):
    a = tiny_store(tmp_path / "a", [f"a{i:02d}" for i in range(20)])
    b = tiny_store(tmp_path / "b", [f"b{i:02d}" for i in range(15)], seed=1)
    out = tmp_path / "out"
    real_add = StoreWriter.add
    added: list[str] = []

    def add_then_crash(self, clip, **kw):
        if len(added) == 27:
            raise KeyboardInterrupt
        real_add(self, clip, **kw)
        added.append(clip.clip_id)

    monkeypatch.setattr(StoreWriter, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        merge_stores(out, [a, b], progress=False)
    monkeypatch.setattr(StoreWriter, "add", real_add)
    assert verify_store(out) == [] and len(FeatureStore(out)) == 27  # what was added is committed
    (out / TRANSCRIPTS / "a03.txt").unlink()  # a side file lost with the crash is copied again

    report = merge_stores(out, [a, b], progress=False)
    assert (report.copied, report.skipped, report.clips) == (8, 27, 35)
    assert report.side_files == 8 + 1
    assert (out / TRANSCRIPTS / "a03.txt").read_text() == "words of a03\n"
    fa, fb, fo = FeatureStore(a), FeatureStore(b), FeatureStore(out)
    for src in (fa, fb):
        for cid in src.ids:
            assert np.array_equal(src.get(cid).vision, fo.get(cid).vision)
    assert (
        len(json.loads((out / "manifest.json").read_text())["shards"]) == 2
    )  # nothing copied twice


def test_merge_replace_supersedes(tmp_path):
    a = tiny_store(tmp_path / "a", ["a1", "a2"])
    out = tmp_path / "out"
    merge_stores(out, [a], progress=False)
    a2 = tiny_store(tmp_path / "a2", ["a1", "a2"], seed=5)
    assert merge_stores(out, [a2], progress=False).skipped == 2  # default: OUT's clips kept
    assert merge_stores(out, [a2], replace=True, progress=False).copied == 2
    assert np.array_equal(FeatureStore(out).get("a1").vision, FeatureStore(a2).get("a1").vision)


def test_merge_refuses_a_store_being_written(tmp_path):
    a = tiny_store(tmp_path / "a", ["a1"])
    busy = pytest.raises(StoreError, match=f"{a} is being written .* held by pid {os.getpid()}")
    with StoreWriter(a), busy:
        merge_stores(tmp_path / "out", [a], progress=False)


def test_cli_store_merge(tmp_path, capsys):
    a = tiny_store(tmp_path / "a", ["a1", "a2"])
    b = tiny_store(tmp_path / "b", ["b1"], seed=1)
    out = tmp_path / "out"
    assert main(["store", "merge", str(out), str(a), str(b), "--no-progress"]) == 0
    assert (
        f"{out}: 3 clips after merging 2 stores (3 copied, 0 already there, 3 side files); verified OK"
        in (capsys.readouterr().out)
    )
    c = tiny_store(tmp_path / "c", ["c1"], text_tokens=True)
    assert main(["store", "merge", str(tmp_path / "o2"), str(a), str(c)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taemi: error: cannot merge") and "text_tokens differs" in err


# ---------------------------------------------------------------- CLI pieces


def test_worker_command_line_carries_every_extract_option(tmp_path):
    parser = build_parser()
    argv = [
        "extract",
        "--input",
        "m1",
        "m 2",
        "--out",
        "S",
        "--distributed",
        "3",
        "--backend",
        "ray",
        "--ray-address",
        "auto",
        "--threads-per-worker",
        "4",
        "--max-frames",
        "7",
        "--text-tokens",
        "--model",
        "vision=/models/v",
        "--model",
        "text=t",
        "--frame-policy",
        "uniform",
        "--no-progress",
        "--encoders",
        "pkg.mod:make",
    ]
    args = parser.parse_args(argv)
    from taemi.cli.distributed_cmd import _worker_args

    worker = _worker_args(args.extract_parser, args)
    assert "--distributed" not in worker and "--backend" not in worker and "--out" not in worker
    assert "--ray-address" not in worker and "--threads-per-worker" not in worker
    back = parser.parse_args(["extract", *worker, "--out", "S"])
    for key, value in vars(args).items():
        if key not in (
            "distributed",
            "backend",
            "ray_address",
            "threads_per_worker",
            "no_progress",
            "extract_parser",
            "func",
        ):
            assert getattr(back, key) == value, key


def test_encoders_factory_errors():
    assert encoders_from_factory(STUB).profile == "fake"
    with pytest.raises(ValueError, match="expected MODULE:FUNCTION"):
        encoders_from_factory("no_colon")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'.*PYTHONPATH"):
        encoders_from_factory("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        encoders_from_factory("test_distributed_extract:nope")
    with pytest.raises(ValueError, match="returned a list, not a taemi.extract.pipeline.Encoders"):
        encoders_from_factory("test_distributed_extract:not_encoders")


def test_cli_shard_extracts_only_its_clips(media, tmp_path, capsys, monkeypatch):
    store = tmp_path / "s1"
    code = main(
        [
            "extract",
            "--input",
            str(media),
            "--out",
            str(store),
            "--shard",
            "1/2",
            "--encoders",
            STUB,
            "--no-progress",
        ]
    )
    assert code == 0
    assert sorted(FeatureStore(store).ids) == sorted(c for c, k in SHARDS_OF_2.items() if k == 1)
    assert "3 done, 0 skipped, 1 failed" in capsys.readouterr().out  # garbage.mp4 is in shard 1
    assert (
        main(
            [
                "extract",
                "--input",
                str(media),
                "--out",
                str(store),
                "--shard",
                "1/2",
                "--distributed",
                "2",
            ]
        )
        == 2
    )
    assert "exclude each other" in capsys.readouterr().err
    assert (
        main(
            [
                "extract",
                "--input",
                str(media),
                "--out",
                str(store),
                "--encoders",
                STUB,
                "--model",
                "text=x",
            ]
        )
        == 2
    )
    assert "--model and --encoders exclude each other" in capsys.readouterr().err


# ---------------------------------------------------------------- runners


@pytest.fixture
def worker_path(monkeypatch):
    """Workers (subprocesses, Ray tasks) can import this module: the --encoders factories."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )


def _distributed(media: Path, store: Path, *extra: str) -> int:
    return main(
        [
            "extract",
            "--input",
            str(media),
            "--out",
            str(store),
            "--distributed",
            "2",
            "--threads-per-worker",
            "1",
            "--no-progress",
            *extra,
        ]
    )


def test_local_backend_two_workers_end_to_end(media, single, tmp_path, capsys, worker_path):
    store = tmp_path / "store"
    t0 = time.perf_counter()
    assert _distributed(media, store, "--encoders", STUB) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert_same_store(single, store)
    assert (
        f"{store}: 8 clips from 2 shards (8 copied, 0 already there), verified; 2 failed inputs"
        in out
    )
    assert f"failures and their reasons: {store / ERRORS_FILE}" in out
    # per-shard counts; the corrupt file failed in its shard without stopping it
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    assert rows["0"][:5] == ["0", "5", "5", "0", "1"] and rows["1"][:5] == ["1", "4", "3", "0", "1"]
    assert {(e["clip_id"], e["stage"]) for e in error_lines(store)} == {
        (None, "input"),
        ("garbage", "decode"),
    }
    shards = store.with_name("store.shards")
    assert sorted(p.name for p in shards.iterdir()) == [
        "shard-0-of-2",
        "shard-0-of-2.log",
        "shard-1-of-2",
        "shard-1-of-2.log",
    ]
    assert "--shard 1/2" in (shards / "shard-1-of-2.log").read_text()

    # rerun: the workers skip their clips, the merge skips the store's
    assert _distributed(media, store, "--encoders", STUB) == 0
    assert "8 clips from 2 shards (0 copied, 8 already there)" in capsys.readouterr().out
    summary = json.loads((store / SUMMARY_FILE).read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 8, 2)
    print(f"local backend, 2 workers: {seconds:.1f} s")


def test_local_backend_failed_worker_is_reported_and_rerun_resumes(
    media, single, tmp_path, capsys, worker_path
):
    store = tmp_path / "store"
    assert (
        _distributed(media, store, "--encoders", "test_distributed_extract:failing_in_shard_1") == 1
    )
    out = capsys.readouterr().out
    log1 = tmp_path / "store.shards" / "shard-1-of-2.log"
    assert f"FAILED: worker exited with status 1; its log: {log1}" in out
    assert "1 of 2 workers failed; nothing merged" in out
    assert "worker 1 cannot load its models" in log1.read_text()
    assert not store.exists()
    assert (
        len(FeatureStore(tmp_path / "store.shards" / "shard-0-of-2")) == 5
    )  # the other worker finished

    assert _distributed(media, store, "--encoders", STUB) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    assert rows["0"][2:4] == ["0", "5"] and rows["1"][2:4] == [
        "3",
        "0",
    ]  # shard 0 resumed: all skipped
    assert_same_store(single, store)


@pytest.mark.slow
def test_ray_backend_two_workers(media, single, tmp_path, capsys, worker_path):
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (pip install 'taemi[distributed]')"
    )
    store = tmp_path / "store"
    try:
        assert _distributed(media, store, "--backend", "ray", "--encoders", STUB) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    out = capsys.readouterr().out
    assert "8 clips from 2 shards (8 copied, 0 already there), verified" in out
    assert_same_store(single, store)
    assert (
        "on " in (tmp_path / "store.shards" / "shard-0-of-2.log").read_text()
    )  # the node it ran on
