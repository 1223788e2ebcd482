"""Which clips each optimiser step sees: the trainer's epoch batches, single and distributed."""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, RandomSampler

from taemi.data.sampler import dataset_lengths, padding_fraction
from taemi.train.distributed import DistInfo
from taemi.train.modes import make_dataset
from taemi.train.trainer import epoch_batches, train


def test_random_batches_are_those_of_a_seeded_random_sampler(store, labels, tiny_config) -> None:
    cfg = tiny_config("train.batch_size=10")
    ds = make_dataset(cfg, store, labels[0])
    for epoch in (1, 2):
        gen = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
        expected = list(BatchSampler(RandomSampler(ds, generator=gen), 10, drop_last=False))
        assert epoch_batches(cfg, ds, store, epoch, DistInfo()) == expected
    assert epoch_batches(cfg, ds, store, 1, DistInfo()) != epoch_batches(
        cfg, ds, store, 2, DistInfo()
    )


def test_ranks_share_each_global_batch(store, labels, tiny_config) -> None:
    cfg = tiny_config("train.batch_size=10")
    ds = make_dataset(cfg, store, labels[0])  # 72 clips: 7 batches of 10, then 2
    whole = epoch_batches(cfg, ds, store, 3, DistInfo())
    for world in (2, 3):
        shares = [epoch_batches(cfg, ds, store, 3, DistInfo(world, r, r)) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank makes the same number of steps
        for k, glob in enumerate(whole):
            parts = [s[k] for s in shares]
            assert all(parts)  # no rank gets an empty micro-batch (DDP needs every rank to compute)
            if len(glob) >= world:
                assert sorted(i for p in parts for i in p) == sorted(glob)
            else:  # 2 clips on 3 ranks: completed with the batch's own clips
                assert set(i for p in parts for i in p) == set(glob)


def test_bucketed_batches_cover_the_epoch_with_less_padding(
    tmp_path, store, labels, tiny_config
) -> None:
    cfg = tiny_config("train.batch_size=8", "data.batching=bucket", "train.max_epochs=2")
    ds = make_dataset(cfg, store, labels[0])
    batches = epoch_batches(cfg, ds, store, 1, DistInfo())
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    lengths = dataset_lengths(store, ds.ids, cfg.data.max_audio_len, cfg.data.max_vision_len)
    rand = epoch_batches(tiny_config("train.batch_size=8"), ds, store, 1, DistInfo())
    assert padding_fraction(batches, lengths) < padding_fraction(rand, lengths)
    # the trainer reads the lengths once per run and passes them in: the same batches
    assert epoch_batches(cfg, ds, store, 1, DistInfo(), ds.lengths()) == batches
    res = train(cfg, store, *labels, tmp_path / "run", progress=False)  # the trainer runs on them
    assert len(res.history) == 2


def test_bucketing_also_groups_text_token_lengths_when_tokens_are_used(
    synth_tokens, tiny_config
) -> None:
    from taemi.data.labels import read_labels
    from taemi.store import FeatureStore

    store = FeatureStore(synth_tokens.store)
    cfg = tiny_config(
        "train.batch_size=8", "data.batching=bucket", "model.anchor=audio", "data.text_tokens=yes"
    )
    ds = make_dataset(cfg, store, read_labels(synth_tokens.train_csv))
    assert ds.text_tokens
    tokens = dataset_lengths(store, ds.ids, 10**6, 10**6, max_text_tokens=cfg.data.max_text_tokens)[
        :, 2:
    ]  # (N, 1)
    bucketed = epoch_batches(cfg, ds, store, 1, DistInfo())
    rand = epoch_batches(tiny_config("train.batch_size=8"), ds, store, 1, DistInfo())
    assert padding_fraction(bucketed, tokens) < 0.5 * padding_fraction(rand, tokens)


def test_padding_fraction_counts_the_quantum_s_padding() -> None:
    lengths = [[5, 0], [3, 9]]  # (audio, vision); vision 0: missing, one useful step
    # quantum 1: audio 2 x 5 computed, 8 useful; vision 2 x 9, 10 useful -> 10 of 28 padded
    assert padding_fraction([[0, 1]], lengths) == 10 / 28
    # quantum 4: audio 2 x 8, vision 2 x 12 computed -> 22 of 40 padded
    assert padding_fraction([[0, 1]], lengths, quantum=4) == 22 / 40
