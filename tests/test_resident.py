"""Tests of taemi.data.resident: device-resident features give the batches collate gives."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from taemi.data.batch import Batch
from taemi.data.dataset import ClipDataset
from taemi.data.resident import ResidentFeatures, memory_available, resident_bytes
from taemi.store import FeatureStore, StoreWriter
from taemi.store.clip import ClipFeatures

DIMS = {"audio": 12, "vision": 8, "text": 6}
N = 23
INDEX_LISTS = [[0], [5, 2, 19, 2, 0], list(range(N - 1))[::-1], np.array([7, 3, 3, 21, 11, 1])]


def make_clip(i: int, *, text_tokens: bool) -> ClipFeatures:
    """Clip ``i``: lengths up to 17 audio / 11 vision / 9 token steps, some modalities missing."""
    rng = np.random.default_rng(i)
    audio_missing, vision_missing, text_missing = i % 5 == 3, i % 7 == 4, i % 4 == 1
    return ClipFeatures(
        clip_id=f"c{i:03d}",
        audio=None if audio_missing else rng.standard_normal((1 + 3 * i % 17, DIMS["audio"])),
        vision=None if vision_missing else rng.standard_normal((1 + 5 * i % 11, DIMS["vision"])),
        text=None if text_missing else rng.standard_normal(DIMS["text"]),
        text_tokens=(
            rng.standard_normal((1 + i % 9, DIMS["text"]))
            if text_tokens and not text_missing
            else None
        ),
    )


def make_store(root: Path, dtype: str, text_tokens: bool) -> FeatureStore:
    with StoreWriter(root, dims=DIMS, dtype=dtype, text_tokens=text_tokens, shard_size=8) as w:
        for i in range(N):
            w.add(make_clip(i, text_tokens=text_tokens))
    return FeatureStore(root)


@pytest.fixture(scope="module", params=[("float16", True), ("float32", False)], ids=str)
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    dtype, tokens = request.param
    return make_store(tmp_path_factory.mktemp(f"store_{dtype}"), dtype, tokens)


def dataset(store: FeatureStore, **kw: object) -> ClipDataset:
    """All clips but two, in a shuffled order, with targets; trims below the longest clips."""
    ids = list(np.random.default_rng(0).permutation(store.ids))[: N - 2] + [store.ids[0]]
    targets = np.random.default_rng(1).standard_normal((len(ids), 3)).astype(np.float32)
    base = {"max_audio_len": 10, "max_vision_len": 7, "max_text_tokens": 4}
    return ClipDataset(store, ids, targets, **{**base, **kw})  # type: ignore[arg-type]


def assert_batches_equal(got: Batch, want: Batch) -> None:
    for f in fields(Batch):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), f.name
            assert g.dtype == w.dtype and g.shape == w.shape, (f.name, g.dtype, g.shape, w.shape)
            assert torch.equal(g, w), f.name
        else:
            assert g == w, f.name


CASES = {
    "default": {},
    "quantum8": {"length_quantum": 8},
    "no_vision": {"modalities": ("audio", "text")},
    "no_text_q4": {"modalities": ("audio", "vision"), "length_quantum": 4},
    "tokens": {"text_tokens": True},
    "tokens_q8_no_audio": {
        "text_tokens": True,
        "length_quantum": 8,
        "modalities": ("vision", "text"),
    },
    "vision_len_0": {"max_vision_len": 0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_batches_equal_collate(store: FeatureStore, case: str) -> None:
    kw = CASES[case]
    if kw.get("text_tokens") and not store.has_text_tokens:
        pytest.skip("store without text token states")
    ds = dataset(store, **kw)
    res = ResidentFeatures(ds, "cpu", chunk_clips=5)
    assert len(res) == len(ds) and res.ids == ds.ids
    collate = ds.collator()
    for idx in INDEX_LISTS:
        want = collate([ds[int(i)] for i in idx])
        assert_batches_equal(res.batch(idx), want)
    assert_batches_equal(res.batch([-1, 0]), collate([ds[len(ds) - 1], ds[0]]))


def test_trimming_and_missing_are_exercised(store: FeatureStore) -> None:
    """The fixtures really hold trimmed sequences and each kind of missing modality."""
    ds = dataset(store)
    b = ResidentFeatures(ds, "cpu").batch(range(len(ds)))
    assert b.missing.any(0).all()  # some clip misses audio, some vision, some text
    assert b.audio.shape[1] == 10 and b.vision.shape[1] == 7
    assert max(len(store.get(i).audio) for i in ds.ids if store.get(i).audio is not None) > 10


def test_no_targets(store: FeatureStore) -> None:
    ds = ClipDataset(store, store.ids[:6])
    b = ResidentFeatures(ds, "cpu").batch([4, 1])
    assert b.target is None
    assert_batches_equal(b, ds.collator()([ds[4], ds[1]]))


def test_chunking_gives_identical_tensors(store: FeatureStore) -> None:
    ds = dataset(store, text_tokens=store.has_text_tokens)
    one, big = ResidentFeatures(ds, "cpu", chunk_clips=1), ResidentFeatures(ds, "cpu")
    for m in one._flat:
        assert torch.equal(one._flat[m], big._flat[m]), m
    assert torch.equal(one._text, big._text)
    assert one.nbytes == big.nbytes


def test_resident_bytes_reads_no_feature(store: FeatureStore, monkeypatch) -> None:
    for kw in ({}, {"text_tokens": store.has_text_tokens, "length_quantum": 8}):
        ds = dataset(store, **kw)
        with monkeypatch.context() as m:
            m.setattr(FeatureStore, "get", lambda *a, **k: pytest.fail("read a feature"))
            expected = resident_bytes(ds)
        res = ResidentFeatures(ds, "cpu", chunk_clips=4)
        assert expected == res.nbytes > 0
        # Most of it is the features themselves in the store's dtype.
        features = sum(t.numel() * t.element_size() for t in res._flat.values())
        assert features > 0 and res.load_seconds >= 0


def test_bad_arguments(store: FeatureStore) -> None:
    ds = dataset(store)
    with pytest.raises(ValueError, match="chunk_clips"):
        ResidentFeatures(ds, "cpu", chunk_clips=0)
    res = ResidentFeatures(ds, "cpu")
    with pytest.raises(IndexError):
        res.batch([len(ds)])
    with pytest.raises(ValueError, match="at least one"):
        res.batch([])


def test_memory_available() -> None:
    assert memory_available(torch.device("cpu")) > 0
    assert memory_available("meta") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_collate_without_host_sync(store: FeatureStore) -> None:
    """On CUDA: the same batches as collate, and batch() never waits for the device."""
    for kw in CASES.values():
        if kw.get("text_tokens") and not store.has_text_tokens:
            continue
        ds = dataset(store, **kw)
        res = ResidentFeatures(ds, "cuda", chunk_clips=5)
        assert res.nbytes == resident_bytes(ds)
        torch.cuda.set_sync_debug_mode("error")  # raises on a host sync
        try:
            got = [res.batch(idx) for idx in INDEX_LISTS]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for idx, g in zip(INDEX_LISTS, got):
            assert g.audio.device.type == "cuda"
            assert_batches_equal(g, ds.collator()([ds[int(i)] for i in idx]).to("cuda"))
