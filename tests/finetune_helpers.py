"""Tiny stand-ins for end-to-end fine-tuning tests: random Hugging Face wav2vec2-emotion and
BERT folders built from configs (nothing downloaded), and a feature store with a waveform
cache and transcripts whose audio and words carry the targets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from taemi import EMI_EMOTIONS
from taemi.store import StoreWriter
from taemi.store.clip import ClipFeatures
from taemi.store.waveforms import WaveformCache

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "very", "happy", "sad", "today"]
SR = 16_000


def tiny_w2v_config(**kw):
    """Two conv layers (stride 10 samples), two transformer layers of width 32."""
    from transformers import Wav2Vec2Config

    base = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "conv_dim": (16, 16),
        "conv_kernel": (10, 3),
        "conv_stride": (5, 2),
        "conv_bias": True,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "num_labels": 3,
        "id2label": {0: "arousal", 1: "dominance", 2: "valence"},
        "label2id": {"arousal": 0, "dominance": 1, "valence": 2},
        "vocab_size": None,
        "mask_time_prob": 0.05,
        "mask_time_length": 2,
        "layerdrop": 0.1,  # as in wav2vec2-large-robust; the backbone sets it to 0
    }
    base.update(kw)
    return Wav2Vec2Config(**base)


def make_w2v_dir(folder: Path, seed: int = 0, **kw) -> Path:
    """A random wav2vec2 emotion model (hidden 32 + 3 head outputs = 35 per frame) saved as a folder."""
    from transformers import Wav2Vec2FeatureExtractor

    from taemi.backbones.wav2vec2 import Wav2Vec2EmotionModel

    torch.manual_seed(seed)
    Wav2Vec2EmotionModel(tiny_w2v_config(**kw)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, return_attention_mask=True, do_normalize=True
    ).save_pretrained(folder)
    return folder


def make_bert_dir(folder: Path, seed: int = 2) -> Path:
    """A random BERT (hidden 16, 2 layers) with a WordPiece tokenizer over WORDS."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)  # with a pooler: the backbone drops it
    return folder


def make_finetune_store(
    root: Path,
    n: int = 40,
    *,
    vision_dim: int = 6,
    seed: int = 0,
    max_seconds: float = 2.0,
    clip_seconds: float | None = None,
) -> tuple[Path, Path, Path]:
    """A store of ``n`` clips with waveforms and transcripts, and train/valid label CSVs.

    The waveform cache keeps ``max_seconds`` per clip; clips last 0.3 s to
    ``clip_seconds`` (default ``max_seconds``), so a cache made for a run's 12 s can hold
    short clips.

    Targets: emotion 0 follows the loudness of the clip's tone, emotion 1 the share of
    "happy" in its words, emotion 2 the vision features' mean; the rest is noise. Clip 3
    has no audio (no waveform), clip 5 an empty transcript (text missing), clip 7 no face.
    Returns (store, train_csv, valid_csv); the last quarter of the clips is the valid split.
    """
    rng = np.random.default_rng(seed)
    store = root / "store"
    targets = rng.uniform(0.05, 0.95, size=(n, len(EMI_EMOTIONS))).astype(np.float32)
    with StoreWriter(
        store, dims={"audio": 4, "vision": vision_dim, "text": 4}, dtype="float16"
    ) as w:
        for i in range(n):
            cid = f"{i:05d}"
            vision = (
                rng.standard_normal((int(rng.integers(3, 9)), vision_dim)).astype(np.float32) * 0.3
            )
            vision += targets[i, 2] * 2 - 1
            w.add(
                ClipFeatures(
                    clip_id=cid,
                    audio=None if i == 3 else rng.standard_normal((5, 4)).astype(np.float32),
                    vision=None if i == 7 else vision,
                    text=None if i == 5 else rng.standard_normal(4).astype(np.float32),
                )
            )
    cache = WaveformCache(store, create=True, max_seconds=max_seconds)
    (store / "transcripts").mkdir(exist_ok=True)
    for i in range(n):
        cid = f"{i:05d}"
        if i != 3:
            seconds = float(rng.uniform(0.3, clip_seconds or max_seconds))
            t = np.arange(int(seconds * SR)) / SR
            tone = np.sin(2 * np.pi * float(rng.uniform(120, 400)) * t) * (
                0.05 + 0.8 * targets[i, 0]
            )
            cache.put(cid, (tone + rng.standard_normal(t.size) * 0.01).astype(np.float32))
        k = int(rng.integers(3, 8))
        words = ["happy" if rng.uniform() < targets[i, 1] else "sad" for _ in range(k)]
        (store / "transcripts" / f"{cid}.txt").write_text(
            "" if i == 5 else " ".join(words), encoding="utf-8"
        )
    split = n - n // 4
    paths = []
    for name, rows in (("train.csv", range(split)), ("valid.csv", range(split, n))):
        path = root / name
        with open(path, "w", newline="", encoding="utf-8") as fh:
            wr = csv.writer(fh)
            wr.writerow(["Filename", *EMI_EMOTIONS])
            for i in rows:
                wr.writerow([f"{i:05d}", *(f"{v:.4f}" for v in targets[i])])
        paths.append(path)
    return store, paths[0], paths[1]
