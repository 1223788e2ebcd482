"""From the feature store to padded batches: ClipDataset and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from taemi.data.dataset import ClipDataset, Collator, Item, collate

DIMS = {"audio": 3, "vision": 2, "text": 4}


def _item(
    clip_id: str,
    t_a: int | None,
    t_v: int | None,
    text: bool = True,
    t_t: int | None = None,
    target: bool = True,
    seed: int = 0,
) -> Item:
    rng = np.random.default_rng(seed)

    def seq(t, d):
        return None if t is None else rng.normal(size=(t, d)).astype(np.float16)

    return Item(
        clip_id=clip_id,
        audio=seq(t_a, DIMS["audio"]),
        vision=seq(t_v, DIMS["vision"]),
        text=rng.normal(size=DIMS["text"]).astype(np.float16) if text else None,
        text_tokens=seq(t_t, DIMS["text"]),
        target=rng.random(6).astype(np.float32) if target else None,
    )


def test_collate_pads_and_masks() -> None:
    items = [_item("a", 5, 2, seed=1), _item("b", 3, 4, seed=2), _item("c", 1, 1, seed=3)]
    b = collate(items, DIMS)
    assert b.ids == ("a", "b", "c")
    assert b.audio.shape == (3, 5, 3) and b.audio_mask.shape == (3, 5)
    assert b.vision.shape == (3, 4, 2) and b.vision_mask.shape == (3, 4)
    assert b.text.shape == (3, 4) and b.target.shape == (3, 6)
    for t in (b.audio, b.vision, b.text, b.target):
        assert t.dtype == torch.float32
    assert b.audio_mask.dtype == torch.bool and b.missing.dtype == torch.bool
    assert b.audio_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4]
    assert b.vision_mask.sum(1).tolist() == [2, 4, 1]
    assert not b.missing.any()
    for i, it in enumerate(items):
        n_a, n_v = len(it.audio), len(it.vision)
        # float16 values become float32 exactly; padding is zero
        assert torch.equal(b.audio[i, :n_a], torch.from_numpy(it.audio.astype(np.float32)))
        assert torch.equal(b.vision[i, :n_v], torch.from_numpy(it.vision.astype(np.float32)))
        assert (b.audio[i, n_a:] == 0).all() and (b.vision[i, n_v:] == 0).all()
        assert torch.equal(b.text[i], torch.from_numpy(it.text.astype(np.float32)))
        assert torch.equal(b.target[i], torch.from_numpy(it.target))
    assert b.text_tokens is None and b.text_tokens_mask is None  # not requested


def test_collate_missing_modalities() -> None:
    items = [_item("a", None, 3, seed=1), _item("b", 4, None, text=False, seed=2)]
    b = collate(items, DIMS)
    assert b.missing.tolist() == [[True, False, False], [False, True, True]]
    assert b.audio.shape == (2, 4, 3)
    assert not b.audio_mask[0].any() and (b.audio[0] == 0).all()
    assert not b.vision_mask[1].any() and (b.vision[1] == 0).all()
    assert (b.text[1] == 0).all()

    # a modality missing in every clip of the batch: exactly one zero step, masked out
    b = collate([_item("a", None, 2, seed=1), _item("b", None, 3, seed=2)], DIMS)
    assert b.audio.shape == (2, 1, 3) and b.audio_mask.shape == (2, 1)
    assert not b.audio_mask.any() and (b.audio == 0).all()
    assert b.missing[:, 0].all() and not b.missing[:, 1:].any()


def test_collate_text_tokens_and_no_targets() -> None:
    items = [
        _item("a", 2, 2, t_t=3, target=False, seed=1),
        _item("b", 2, 2, t_t=5, target=False, seed=2),
        _item("c", 2, 2, text=False, target=False, seed=3),
    ]
    b = collate(items, DIMS, text_tokens=True)
    assert b.target is None
    assert b.text_tokens.shape == (3, 5, 4) and b.text_tokens.dtype == torch.float32
    assert b.text_tokens_mask.sum(1).tolist() == [3, 5, 0]
    assert torch.equal(
        b.text_tokens[0, :3], torch.from_numpy(items[0].text_tokens.astype(np.float32))
    )
    assert (b.text_tokens[0, 3:] == 0).all() and (b.text_tokens[2] == 0).all()
    assert b.missing[:, 2].tolist() == [False, False, True]
    # the Collator is the same function, picklable for workers
    b2 = Collator(DIMS, text_tokens=True)(items)
    assert torch.equal(b2.text_tokens, b.text_tokens) and b2.ids == b.ids


def test_dataset_reads_the_store_and_trims_to_the_first_steps(store, labels) -> None:
    train, _ = labels
    ds = ClipDataset(store, train.ids, train.values, max_audio_len=7, max_vision_len=5)
    assert len(ds) == len(train.ids)
    long_a = long_v = 0
    for i in range(len(ds)):
        it, clip = ds[i], store.get(train.ids[i])
        assert it.clip_id == train.ids[i]
        np.testing.assert_array_equal(it.target, train.values[i])
        assert it.text_tokens is None
        if clip.audio is None:
            assert it.audio is None
        else:
            long_a += len(clip.audio) > 7
            np.testing.assert_array_equal(it.audio, clip.audio[:7])  # the FIRST 7 frames
        if clip.vision is None:
            assert it.vision is None
        else:
            long_v += len(clip.vision) > 5
            np.testing.assert_array_equal(it.vision, clip.vision[:5])
    assert long_a > 0 and long_v > 0  # trimming was exercised

    b = collate([ds[i] for i in range(len(ds))], store.dims)
    assert b.audio.shape[1] == 7 and b.vision.shape[1] == 5
    assert b.missing.any(0).all()  # the store has clips missing each modality
    assert torch.equal(
        b.missing, torch.from_numpy(store.missing[[store.index(i) for i in train.ids]])
    )
    # float16 store values become float32 exactly
    assert store.dtype == np.float16
    i = next(k for k, c in enumerate(train.ids) if not store.missing[store.index(c), 0])
    a = store.get(train.ids[i]).audio[:7]
    assert torch.equal(b.audio[i, : len(a)], torch.from_numpy(np.asarray(a, dtype=np.float32)))


def test_dataset_text_tokens(synth_tokens) -> None:
    from taemi.store import FeatureStore

    s = FeatureStore(synth_tokens.store)
    ids = s.ids[:10]
    ds = ClipDataset(s, ids, text_tokens=True, max_text_tokens=4)
    assert any(len(s.get(c).text_tokens) > 4 for c in ids if s.get(c).text_tokens is not None)
    for i, cid in enumerate(ids):
        clip, it = s.get(cid), ds[i]
        assert it.target is None
        if clip.text_tokens is None:
            assert it.text_tokens is None
        else:
            np.testing.assert_array_equal(it.text_tokens, clip.text_tokens[:4])
    b = collate([ds[i] for i in range(len(ds))], s.dims, text_tokens=True)
    assert b.text_tokens.shape[1] == 4 and b.target is None
    assert not ClipDataset(s, ids).text_tokens and ClipDataset(s, ids)[0].text_tokens is None


def test_dataset_errors(store, synth_tokens) -> None:
    with pytest.raises(KeyError, match=r"2 clip ids .*\['99998', '99999'\]"):
        ClipDataset(store, ["00001", "99998", "99999"])
    with pytest.raises(KeyError) as e:
        ClipDataset(store, ["00001", "nope"])
    assert "'nope'" in str(e.value) and str(store.root) in str(e.value)
    with pytest.raises(ValueError, match="text token states.*has none"):
        ClipDataset(store, store.ids[:3], text_tokens=True)
    with pytest.raises(ValueError, match="3 ids but 2 target rows"):
        ClipDataset(store, store.ids[:3], np.zeros((2, 6), np.float32))


def test_dataloader_workers_give_the_same_batches(store, labels) -> None:
    train, _ = labels
    ds = ClipDataset(store, train.ids, train.values, max_audio_len=9)
    collate_fn = Collator(store.dims)

    def batches(workers: int) -> list:
        loader = DataLoader(
            ds, batch_size=16, shuffle=False, num_workers=workers, collate_fn=collate_fn
        )
        return list(loader)

    single, multi = batches(0), batches(2)
    assert len(single) == len(multi) == 5
    for a, b in zip(single, multi):
        assert a.ids == b.ids
        for name in ("audio", "audio_mask", "vision", "vision_mask", "text", "missing", "target"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
