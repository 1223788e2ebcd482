"""Length-aware batching: batches of clips of similar lengths, so little of what the model
computes is padding.

A batch is padded to its longest clip (:func:`taemi.data.dataset.collate`). With the
corpus's length mix (docs/method.md section 2: audio mean 6.9 s, 95th percentile 11.5 s, capped at
599 frames; face frames just as varied) a random batch of 32 almost always holds a clip
near the cap, and ~45% of the positions computed are padding (more of the self-attention's
T^2 work). :class:`LengthBucketBatchSampler` draws the same random partition of the
clips every epoch would draw, but groups clips of similar lengths into a batch:

1. shuffle all indices with a generator seeded by (seed, epoch) only;
2. cut the shuffled order into "megabatches" of ``batch_size * bucket_size_multiplier``
   clips; inside each, sort by the first length column (audio), cut the sorted run into
   groups of ``batch_size * group_batches`` clips, sort each group by the next column
   (vision), and so on; then cut into batches of ``batch_size``;
3. shuffle the order of all batches.

Each batch is drawn from a random megabatch, so which clips meet in a batch still changes
from epoch to epoch; the two-level sort keeps both the audio and the vision padding low
when their lengths are only loosely correlated (face frames are missing at random in a
clip). On the length mix of :func:`abaw_like_lengths`, 8,072 clips in batches of 32:
random batches ~45% padding, audio-only sort ~9% (vision still ~22%), this sampler ~5.5%
(``tests/test_sampler.py`` checks < 10%).

The model's outputs do not depend on padding (``tests/test_model.py``: a padded batch
equals each clip alone), so bucketing changes only which clips share an optimiser step,
never a clip's prediction.

Distributed training: every rank builds the same global batches (same seed, same epoch)
and takes its share of each: rank ``r`` of ``R`` gets ``global_batch[r::R]`` of the global
batch sorted by total length (all columns), so the shares are balanced. ``batch_size`` is the GLOBAL
batch size. All ranks get the same number of batches; a global batch whose size is not a
multiple of ``R`` (only the last one, when ``drop_last=False``) is completed with its own
first clips, as :class:`torch.utils.data.DistributedSampler` pads its index list.

Lengths come from the store's index (:func:`dataset_lengths`), no feature is read.
Bucketing by length follows common practice in speech and NMT toolkits (e.g. ESPnet's and
fairseq's length-sorted batches; Hugging Face's ``group_by_length`` megabatches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from taemi import MODALITIES
from taemi.store import FeatureStore

__all__ = [
    "LengthBucketBatchSampler",
    "abaw_like_lengths",
    "dataset_lengths",
    "padding_fraction",
]


def _check_lengths(lengths: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    a = np.asarray(lengths)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[1] < 1 or a.dtype.kind not in "iu":
        raise ValueError(
            f"lengths must be integer (N, K) per clip (audio, vision, ...), got {a.dtype} {a.shape}"
        )
    if (a < 0).any():
        raise ValueError(f"lengths must be >= 0 (0 = missing), got a minimum of {int(a.min())}")
    return a.astype(np.int64)


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, clips of similar lengths together; see the module docstring.

    Args:
        lengths: (N, K) ints per dataset index, e.g. (audio_len, vision_len) after trimming
            to the max lengths; 0 = the modality is missing. Column 0 is sorted first.
        batch_size: clips per GLOBAL batch (all ranks together).
        seed, epoch: the order of an epoch depends only on these two (see :meth:`set_epoch`).
        drop_last: drop the last ``N % batch_size`` clips of the shuffled order (random
            ones), so that every batch is full.
        num_replicas, rank: distributed training; rank ``r`` yields ``global_batch[r::num_replicas]``.
        bucket_size_multiplier: batches per megabatch (the pool sorted together). Larger:
            less padding, less randomness in which clips meet.
        group_batches: batches per group of the second-level sort (K >= 2).
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int]] | np.ndarray,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        bucket_size_multiplier: int = 100,
        group_batches: int = 4,
    ):
        self.lengths = _check_lengths(lengths)  # (N, K)
        for name, v in (
            ("batch_size", batch_size),
            ("num_replicas", num_replicas),
            ("bucket_size_multiplier", bucket_size_multiplier),
            ("group_batches", group_batches),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank!r}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed!r}, epoch={epoch!r}")
        if drop_last and len(self.lengths) < batch_size:
            raise ValueError(
                f"drop_last=True with {len(self.lengths)} clips < batch_size={batch_size}: no batch at all"
            )
        self.batch_size = int(batch_size)
        self.seed, self.epoch = int(seed), int(epoch)
        self.drop_last = drop_last
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.bucket_size_multiplier = int(bucket_size_multiplier)
        self.group_batches = int(group_batches)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration draws epoch ``epoch``'s order (call before each epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches, in order: arrays of dataset indices (all ranks)."""
        n, B = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])  # depends on (seed, epoch) only
        order = rng.permutation(n)  # (N,)
        if self.drop_last:
            order = order[: n - n % B]
        mega = B * self.bucket_size_multiplier
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            pool = self._sort(order[start : start + mega])
            batches += [pool[i : i + B] for i in range(0, len(pool), B)]
        return [batches[k] for k in rng.permutation(len(batches))]

    def _sort(self, pool: np.ndarray) -> np.ndarray:
        """Sort by column 0, then groups of ``batch_size * group_batches**(K-1-k)`` by column k."""
        K = self.lengths.shape[1]
        pool = pool[np.argsort(self.lengths[pool, 0], kind="stable")]
        for k in range(1, K):
            g = self.batch_size * self.group_batches ** (K - k)
            pool = np.concatenate(
                [
                    p[np.argsort(self.lengths[p, k], kind="stable")]
                    for p in np.split(pool, range(g, len(pool), g))
                ]
            )
        return pool

    def __iter__(self) -> Iterator[list[int]]:
        R = self.num_replicas
        for batch in self.global_batches():
            if R > 1:  # balanced shares: stride over the batch in order of total length
                batch = batch[np.argsort(self.lengths[batch].sum(axis=1), kind="stable")]
            if len(batch) % R:  # only a last, partial batch: complete it with its own first clips
                batch = np.concatenate([batch, np.resize(batch, R - len(batch) % R)])
            yield batch[self.rank :: R].tolist()

    def __len__(self) -> int:
        n, B = len(self.lengths), self.batch_size
        return n // B if self.drop_last else -(-n // B)


def padding_fraction(
    batches: Sequence[Sequence[int]],
    lengths: Sequence[Sequence[int]] | np.ndarray,
    quantum: int = 1,
) -> float:
    """Padded positions / all positions the model computes, over ``batches`` and every column.

    A batch computes ``len(batch) * padded_length(max(lengths), quantum)`` positions per
    column (as :func:`taemi.data.dataset.collate` pads it). A missing modality (length 0) is its
    token over the batch's whole length, of which one step counts as useful; a batch where
    every clip lacks the modality computes one step per clip. Pass ``lengths[:, [k]]`` for
    one modality's fraction.
    """
    L = np.maximum(_check_lengths(lengths), 1)  # (N, K): a missing modality is one useful step
    computed = useful = 0
    for b in batches:
        rows = L[np.asarray(b, dtype=np.int64)]  # (b, K)
        if len(rows) == 0:
            continue
        longest = -(-rows.max(axis=0) // quantum) * quantum  # (K,) padded_length per column
        computed += int(longest.sum()) * len(rows)
        useful += int(rows.sum())
    return (computed - useful) / computed if computed else 0.0


def dataset_lengths(
    store: FeatureStore,
    ids: Sequence[str],
    max_audio_len: int,
    max_vision_len: int,
    *,
    modalities: Sequence[str] = MODALITIES,
    max_text_tokens: int | None = None,
) -> np.ndarray:
    """(N, 2) int64 (audio_len, vision_len) per id after trimming, from the store's index.

    No feature is read. A modality not in ``modalities`` (a baseline that hides it, like
    ``ClipDataset(modalities=...)``) or missing in the store has length 0. With
    ``max_text_tokens`` (text token states as keys/values), a third column holds the
    trimmed text token count.
    """
    pos = np.fromiter((store.index(i) for i in ids), dtype=np.int64, count=len(ids))  # (N,)
    cols = [("audio", max_audio_len), ("vision", max_vision_len)]
    if max_text_tokens is not None:
        if not store.has_text_tokens:
            raise ValueError(
                f"max_text_tokens={max_text_tokens} but the store {store.root} has no text token states"
            )
        cols.append(("text_tokens", max_text_tokens))
    out = np.zeros((len(ids), len(cols)), dtype=np.int64)
    for k, (name, cap) in enumerate(cols):
        if ("text" if name == "text_tokens" else name) in modalities:
            out[:, k] = np.minimum(store.lengths[name][pos], cap)
    return out


def abaw_like_lengths(
    n: int,
    seed: int = 0,
    *,
    max_audio_len: int = 599,
    max_vision_len: int = 400,
    audio_fps: float = 50.0,
    video_fps: float = 30.0,
) -> np.ndarray:
    """(n, 2) int64 synthetic (audio_len, vision_len) with the corpus's length mix, for tests
    and benchmarks (the real lengths come from :func:`dataset_lengths`).

    Clip duration d ~ log-normal with mean 6.9 s and 95th percentile 11.5 s (docs/method.md section 2:
    sigma 0.347, median 6.5 s), at least 1 s. Audio: ``round(audio_fps * d)`` wav2vec2
    frames, capped at ``max_audio_len`` (~4% of clips reach the 599 cap = 12 s). Vision:
    the face frames, ``round(video_fps * d * f)`` with f ~ U(0.6, 1.0) the fraction of
    frames where a face was found, capped at ``max_vision_len`` (mean ~166, 95th
    percentile ~290). Missing at random: audio 1%, vision 3% (length 0).
    """
    rng = np.random.default_rng(seed)
    sigma = 0.347  # solves exp(1.645 s - s^2 / 2) = 11.5 / 6.9 (p95 / mean of a log-normal)
    mu = np.log(6.9) - sigma**2 / 2
    d = np.maximum(np.exp(rng.normal(mu, sigma, n)), 1.0)  # (n,) seconds
    audio = np.minimum(np.round(audio_fps * d), max_audio_len).astype(np.int64)
    faces = rng.uniform(0.6, 1.0, n)
    vision = np.clip(np.round(video_fps * d * faces), 1, max_vision_len).astype(np.int64)
    audio[rng.random(n) < 0.01] = 0
    vision[rng.random(n) < 0.03] = 0
    return np.stack([audio, vision], axis=1)
