"""Length-aware batching (taemi.data.sampler): partitions, determinism, distributed shares,
padding on the corpus's length mix, lengths from the store's index, and model results that
do not depend on how clips are grouped into batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from taemi.config import preset
from taemi.data.dataset import ClipDataset, Collator
from taemi.data.sampler import (
    LengthBucketBatchSampler,
    abaw_like_lengths,
    dataset_lengths,
    padding_fraction,
)
from taemi.model.taemi import TAEMI
from taemi.store import FeatureStore, StoreWriter
from taemi.store.clip import ClipFeatures

MIX = abaw_like_lengths(8072, seed=0)  # (N, 2): the corpus's training-split size and length mix


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
def test_each_epoch_is_a_partition_of_the_indices(n: int) -> None:
    lengths = MIX[:n]
    s = LengthBucketBatchSampler(lengths, 32, seed=1, bucket_size_multiplier=5)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert sorted(flat(batches)) == list(range(n))
        assert len(batches) == len(s) == -(-n // 32)
        assert sum(len(b) < 32 for b in batches) == (
            1 if n % 32 else 0
        )  # one partial batch at most
        assert all(isinstance(i, int) for i in flat(batches))


def test_drop_last_drops_fewer_than_a_batch_and_keeps_batches_full() -> None:
    s = LengthBucketBatchSampler(MIX[:1000], 32, seed=1, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 1000 // 32
    assert all(len(b) == 32 for b in batches)
    assert len(set(flat(batches))) == 1000 - 1000 % 32
    with pytest.raises(ValueError, match="no batch at all"):
        LengthBucketBatchSampler(MIX[:10], 32, seed=1, drop_last=True)


def test_order_depends_only_on_seed_and_epoch() -> None:
    a = LengthBucketBatchSampler(MIX, 32, seed=3407, epoch=4)
    b = LengthBucketBatchSampler(MIX, 32, seed=3407)
    list(b)  # iterating an earlier epoch changes nothing
    b.set_epoch(4)
    assert list(a) == list(b) == list(a)
    b.set_epoch(5)
    assert list(b) != list(a)
    assert list(LengthBucketBatchSampler(MIX, 32, seed=3408, epoch=4)) != list(a)
    # independent of the global RNGs
    torch.manual_seed(0)
    np.random.seed(0)
    first = list(a)
    torch.manual_seed(1)
    np.random.seed(1)
    assert list(a) == first


def test_batches_change_between_epochs() -> None:
    s = LengthBucketBatchSampler(MIX, 32, seed=0)
    e0 = {tuple(sorted(b)) for b in s}
    s.set_epoch(1)
    e1 = {tuple(sorted(b)) for b in s}
    assert len(e0 & e1) < 0.05 * len(e0)


@pytest.mark.parametrize(("n", "replicas"), [(1000, 2), (1000, 3), (1001, 4), (5, 8)])
def test_distributed_ranks_share_every_global_batch(n: int, replicas: int) -> None:
    lengths = MIX[:n]
    ref = LengthBucketBatchSampler(lengths, 32, seed=7, epoch=2)
    ranks = [
        list(LengthBucketBatchSampler(lengths, 32, seed=7, epoch=2, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    glob = ref.global_batches()
    assert all(len(r) == len(glob) == len(ref) for r in ranks)  # equal numbers of batches
    for k, g in enumerate(glob):
        shares = [ranks[r][k] for r in range(replicas)]
        assert all(len(s) == -(-len(g) // replicas) for s in shares)  # equal shares, none empty
        joined = flat(shares)
        if len(g) % replicas == 0:
            assert sorted(joined) == sorted(g.tolist())  # disjoint and covering
        else:  # the last partial batch: completed with its own clips
            assert set(joined) == set(g.tolist()) and len(joined) == len(g) + (-len(g)) % replicas
    if n % 32 == 0 or n % 32 % replicas == 0:
        assert sorted(flat(flat(ranks))) == list(range(n))


def test_distributed_shares_of_a_batch_have_similar_lengths() -> None:
    ranks = [
        list(LengthBucketBatchSampler(MIX, 32, seed=7, num_replicas=2, rank=r)) for r in range(2)
    ]
    for a, b in zip(*ranks):  # each rank pads to its own longest clip: similar work per rank
        la, lb = MIX[a].sum(), MIX[b].sum()
        assert abs(la - lb) <= 0.05 * max(la, lb) + 30, (la, lb)


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        LengthBucketBatchSampler(MIX, 0, seed=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\), got 2"):
        LengthBucketBatchSampler(MIX, 32, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        LengthBucketBatchSampler(np.array([[1, -1]]), 32, seed=0)
    with pytest.raises(ValueError, match="lengths must be integer"):
        LengthBucketBatchSampler(np.array([[1.5, 2.0]]), 32, seed=0)


# --------------------------------------------------------------------------- padding


def test_padding_fraction_counts_computed_positions() -> None:
    lengths = np.array([[4, 2], [2, 2], [0, 1], [3, 0]])
    # batch [0, 1]: audio 2*4 computed, 6 useful; vision 2*2, 4 -> 2 padded of 12
    assert padding_fraction([[0, 1]], lengths) == pytest.approx(2 / 12)
    # batch [2, 3]: audio 2*3 computed, 1 (token) + 3 useful; vision 2*1, 1 + 1 (token)
    assert padding_fraction([[2, 3]], lengths) == pytest.approx(2 / 8)
    assert padding_fraction([[0, 1], [2, 3]], lengths[:, [0]]) == pytest.approx((2 + 2) / (8 + 6))
    assert padding_fraction([], lengths) == 0.0


def test_padding_under_ten_percent_on_the_corpus_length_mix() -> None:
    a, v = MIX[:, 0][MIX[:, 0] > 0], MIX[:, 1][MIX[:, 1] > 0]
    assert (
        6.6 < a.mean() / 50 < 7.2 and 11.0 < np.percentile(a, 95) / 50 < 12.0
    )  # docs/method.md section 2
    assert v.std() / v.mean() > 0.3  # vision lengths vary as much
    s = LengthBucketBatchSampler(MIX, 32, seed=3407)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert padding_fraction(batches, MIX) < 0.10
        assert (
            padding_fraction(batches, MIX[:, [0]]) < 0.10
            and padding_fraction(batches, MIX[:, [1]]) < 0.15
        )
    rnd = torch.randperm(len(MIX), generator=torch.Generator().manual_seed(0)).split(32)
    assert padding_fraction(rnd, MIX) > 0.40  # what random batches waste


# --------------------------------------------------------------------------- the store

DIMS = {"audio": 5, "vision": 4, "text": 3}


def _store(
    root: Path, specs: list[tuple[int, int, int]], *, seed: int = 0, tokens: bool = False
) -> FeatureStore:
    """Clips ``{k:05d}`` with (T_a, T_v, T_t) lengths (0 = missing; T_t 0 = text missing)."""
    rng = np.random.default_rng(seed)

    def seq(t: int, d: int) -> np.ndarray | None:
        return None if t == 0 else rng.normal(size=(t, d)).astype(np.float16)

    with StoreWriter(root, dims=DIMS, text_tokens=tokens, shard_size=7) as w:
        for k, (ta, tv, tt) in enumerate(specs):
            w.add(
                ClipFeatures(
                    clip_id=f"{k:05d}",
                    audio=seq(ta, DIMS["audio"]),
                    vision=seq(tv, DIMS["vision"]),
                    text=None if tt == 0 else rng.normal(size=DIMS["text"]).astype(np.float16),
                    text_tokens=seq(tt, DIMS["text"]) if tokens else None,
                )
            )
    return FeatureStore(root)


def test_dataset_lengths_read_the_index_and_trim(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", [(9, 3, 2), (0, 5, 4), (2, 0, 0), (12, 1, 1)], tokens=True)
    ids = ["00003", "00000", "00001", "00002"]
    np.testing.assert_array_equal(
        dataset_lengths(store, ids, 10, 4), [[10, 1], [9, 3], [0, 4], [2, 0]]
    )
    hidden = dataset_lengths(store, ids, 10, 4, modalities=("vision", "text"))
    np.testing.assert_array_equal(hidden[:, 0], 0)
    with_tokens = dataset_lengths(store, ids, 10, 4, max_text_tokens=3)
    np.testing.assert_array_equal(with_tokens[:, 2], [1, 2, 3, 0])
    with pytest.raises(KeyError, match="99999"):
        dataset_lengths(store, ["99999"], 10, 4)
    ds = ClipDataset(store, ids, max_audio_len=10, max_vision_len=4)
    for i, row in enumerate(dataset_lengths(store, ids, 10, 4)):
        item = ds[i]
        assert row.tolist() == [0 if x is None else len(x) for x in (item.audio, item.vision)]


# --------------------------------------------------------------------------- model results


def _tiny_model() -> TAEMI:
    cfg = preset("paper").model
    for k, v in dict(
        audio_dim=5,
        vision_dim=4,
        text_dim=3,
        hidden=8,
        heads=2,
        sa_ffn=16,
        head_hidden=8,
        modality_dropout=0.0,
        attn_dropout=0.0,
        sa_dropout=0.0,
        head_dropout=0.0,
    ).items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return TAEMI(cfg)


def test_model_results_do_not_depend_on_bucketing(tmp_path: Path) -> None:
    """Bucketed batches give every clip the output it gets in random (more padded) batches,
    and the gradient of the epoch's summed per-clip loss is the same."""
    rng = np.random.default_rng(3)
    specs = [
        (int(a), int(v), int(rng.integers(0, 2))) for a, v in abaw_like_lengths(96, seed=5) // 10
    ]
    store = _store(tmp_path / "s", specs, seed=1)
    targets = rng.random((len(store), 6), dtype=np.float32)
    ds = ClipDataset(store, store.ids, targets, max_audio_len=60, max_vision_len=40)
    lengths = dataset_lengths(store, store.ids, 60, 40)
    model = _tiny_model().train()
    collate = Collator(DIMS)
    bucketed = LengthBucketBatchSampler(lengths, 16, seed=0, bucket_size_multiplier=3)
    loaders = {
        "bucketed": DataLoader(ds, batch_sampler=bucketed, collate_fn=collate),
        "random": DataLoader(
            ds,
            batch_size=16,
            sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
            collate_fn=collate,
        ),
    }
    outs, grads, pads = {}, {}, {}
    for name, loader in loaders.items():
        model.zero_grad(set_to_none=True)
        outs[name] = {}
        groups = []
        for batch in loader:
            pred = model(batch)  # (B, E)
            (pred - batch.target).square().sum().backward()
            outs[name].update(zip(batch.ids, pred.detach()))
            groups.append([store.index(i) for i in batch.ids])
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
        pads[name] = padding_fraction(groups, lengths)
    assert pads["bucketed"] < pads["random"]
    assert set(outs["bucketed"]) == set(outs["random"]) == set(store.ids)
    for cid, out in outs["bucketed"].items():
        torch.testing.assert_close(out, outs["random"][cid], rtol=1e-5, atol=1e-5, msg=cid)
    for k, g in grads["bucketed"].items():
        torch.testing.assert_close(g, grads["random"][k], rtol=1e-4, atol=1e-5, msg=k)
